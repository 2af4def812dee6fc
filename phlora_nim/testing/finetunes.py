"""Toy fine-tunes for the tests: linear-only ones, one whose change generic prompts cannot see, and
:func:`built_once`, which builds each of them once per test run however many processes ask."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def make_linear_finetune(root: Path, *, steps: int, seed: int) -> tuple[Path, Path]:
    """A toy Llama with a tokenizer and a fine-tune of its linear weights only (a full-rank adapter is exact)."""
    from transformers import AutoModelForCausalLM

    from phlora_nim.demo.toy_models import finetune, make_pair, save_tokenizer

    base, _ = make_pair("llama", root, steps=1, tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    ft = root / "linear-ft"
    finetune(model, steps=steps, seed=seed, linear_only=True).save_pretrained(ft)
    save_tokenizer(ft, model.config.vocab_size)
    return base, ft


def make_hidden_finetune(root: Path, *, steps: int = 40, seed: int = 0) -> tuple[Path, Path, list[int]]:
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


def built_once(root: Path, name: str, build: Callable[[Path], T], **params: Any) -> T:
    """``build(folder)`` run once per ``(name, params)`` under ``root``, whichever process asks first.

    Test fine-tunes take seconds to minutes and xdist workers are separate processes: the first caller
    builds under a file lock and leaves its result (pickled paths) beside the folder; the others wait
    on the lock and reuse it. ``params`` must pin down what ``build`` makes (they name the folder). A
    folder without a result (a build that failed half-way) is built again.
    """
    from filelock import FileLock

    key = json.dumps(params, sort_keys=True, default=str)
    folder = Path(root) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    done = folder.with_suffix(".pickle")
    with FileLock(str(folder.with_suffix(".lock"))):
        if done.is_file():
            with done.open("rb") as f:
                return pickle.load(f)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        result = build(folder)
        partial = done.with_suffix(".partial")
        with partial.open("wb") as f:
            pickle.dump(result, f)
        partial.replace(done)
        return result
