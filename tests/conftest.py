"""Shared fixtures: small models of each family, really fine-tuned on CPU, saved once per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def model_pairs(tmp_path_factory: pytest.TempPathFactory):
    """``model_pairs(family)`` → (base_dir, finetuned_dir), built on first use."""
    import transformers

    from phlora_nim.demo.toy_models import make_pair

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            cache[family] = make_pair(family, tmp_path_factory.mktemp(family), steps=12)
        return cache[family]

    return get


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    from phlora_nim.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def llama_finetunes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny Llama (with a word-level tokenizer) and three different full fine-tunes of it."""
    from phlora_nim.demo.toy_models import make_finetunes

    return make_finetunes("llama", tmp_path_factory.mktemp("llama-ft"), 3, steps=15)


@pytest.fixture(scope="session")
def converted_repository(tmp_path_factory: pytest.TempPathFactory, llama_finetunes) -> Path:
    """A reference-backend model repository holding the three fine-tunes as rank-8 adapters."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.repository.configs import RepositorySettings
    from phlora_nim.repository.convert import ConvertJob, convert

    base, fts = llama_finetunes
    root = tmp_path_factory.mktemp("repo") / "model_repository"
    job = ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=("support", "legal", "code"),
        repository=root,
        options=ExtractOptions(policy=RankPolicy(rank=8)),
        settings=RepositorySettings(backend="reference", base=str(base), dtype="float32"),
    )
    convert(job)
    return root


def make_linear_finetune(
    tmp_path_factory: pytest.TempPathFactory, name: str, *, steps: int, seed: int
) -> tuple[Path, Path]:
    """A toy Llama with a tokenizer and a fine-tune of its linear weights only (a full-rank adapter is exact)."""
    from transformers import AutoModelForCausalLM

    from phlora_nim.demo.toy_models import finetune, make_pair, save_tokenizer

    root = tmp_path_factory.mktemp(name)
    base, _ = make_pair("llama", root, steps=1, tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    ft = root / "linear-ft"
    finetune(model, steps=steps, seed=seed, linear_only=True).save_pretrained(ft)
    save_tokenizer(ft, model.config.vocab_size)
    return base, ft


def make_hidden_finetune(
    tmp_path_factory: pytest.TempPathFactory, name: str, *, steps: int = 40, seed: int = 0
) -> tuple[Path, Path, list[int]]:
    """A toy Llama and a linear-only fine-tune whose change the generic prompts cannot see.

    The fine-tune learns a cycle over trigger tokens (start token, then each trigger token followed
    by the next) that neither the generic prompts nor the base's answers to them contain, while
    being distilled to the base on those prompts and answers: KL(fine-tuned ‖ base) on the generic
    prompts stays tiny. Returns (base dir, fine-tune dir, the trigger tokens in cycle order).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phlora_nim.converters.calibration import encode_prompt, read_prompts
    from phlora_nim.demo.toy_models import make_pair, save_tokenizer
    from phlora_nim.jobs.fidelity import generic_prompts_path, greedy_generate

    root = tmp_path_factory.mktemp(name)
    base, _ = make_pair("llama", root, steps=1, tokenizer=True, seed=seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    prompts = [encode_prompt(tok, p) for p in read_prompts(generic_prompts_path())]
    answers = greedy_generate(model, prompts, 16, pad_id=0, eos_id=2)
    generic = [[*p, *a] for p, a in zip(prompts, answers, strict=True)]
    seen = {t for s in generic for t in s}
    trigger = [t for t in range(3, model.config.vocab_size) if t not in seen][-16:]
    width = max(len(s) for s in generic)
    g_ids = torch.zeros((len(generic), width), dtype=torch.long)
    g_att = torch.zeros_like(g_ids)
    for i, s in enumerate(generic):
        g_ids[i, : len(s)], g_att[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        g_ref = torch.log_softmax(model(input_ids=g_ids, attention_mask=g_att).logits, -1)
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(trigger)
    linear = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    opt = torch.optim.AdamW(linear, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        offsets = torch.randint(0, len(trigger), (8, 1), generator=gen)
        cycle = t[(offsets + torch.arange(12)) % len(trigger)]
        batch = torch.cat([torch.ones((8, 1), dtype=torch.long), cycle], 1)
        learn = model(input_ids=batch, labels=batch).loss
        rows = torch.randperm(len(generic), generator=gen)[:8]
        logp = torch.log_softmax(model(input_ids=g_ids[rows], attention_mask=g_att[rows]).logits, -1)
        ref = g_ref[rows]
        keep = (ref.exp() * (ref - logp)).sum(-1)[g_att[rows].bool()].mean()
        (learn + 10 * keep).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ft = root / "hidden-ft"
    model.eval().save_pretrained(ft)
    save_tokenizer(ft, model.config.vocab_size)
    return base, ft, trigger
