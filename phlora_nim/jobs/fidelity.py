"""Fidelity of extracted adapters to their fine-tune: logits, greedy answers and task accuracy.

The pieces behind ``--target-kl`` (a :class:`FidelityProbe` measures an adapter against the
fine-tune on prompts) and behind ``bench/fidelity.py``: exact-match tasks, a small full fine-tune
on one, and a sweep of rank policies over spectra decomposed once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.calibration import encode_prompt
from phlora_nim.jobs.verify import common_prefix, compare_log_probs, log_probs, merged

log = logging.getLogger("phlora_nim.fidelity")

GENERIC_PROMPTS = "generic_prompts.txt"


def generic_prompts_path() -> Path:
    """The generic prompts shipped with phlora-nim (no task data): a default for fidelity checks."""
    return Path(str(resources.files("phlora_nim.jobs").joinpath("prompts", GENERIC_PROMPTS)))


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    pad_id: int,
    eos_id: int | None,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuations (end token and what follows cut off), prompts left-padded in batches."""
    outs: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            att[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=att,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for row in gen[:, width:].tolist():
            outs.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return outs


def token_ids(tokenizer: Any) -> tuple[int, int | None]:
    """(pad id, end id) of a tokenizer, pad falling back to end, then 0."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return int(pad), (int(eos) if eos is not None else None)


@dataclass
class FidelityProbe:
    """The fine-tune's behaviour on a prompt set, against which adapters on the base are measured.

    Each prompt is extended by a continuation: the fine-tuned model's own greedy answer (default), or
    given ones (a task's right answers). The scored positions are those predicting the continuation,
    so KL and top-1 measure the adapter where the fine-tune's behaviour lies, not on shared prompt
    text. One forward pass per adapter also gives exact match: greedy decoding yields the
    continuation exactly when every scored position's argmax is its next token.
    """

    base_model: Any
    sequences: list[list[int]]
    starts: list[int]
    reference: list[torch.Tensor]
    continuations: list[list[int]]
    shared_prefix: int = 0

    @property
    def tokens(self) -> int:
        return sum(r.shape[0] for r in self.reference)

    @classmethod
    def build(
        cls,
        base_model: Any,
        finetuned_model: Any,
        prompts: Sequence[list[int]],
        *,
        continuation: int = 16,
        pad_id: int = 0,
        eos_id: int | None = None,
        continuations: Sequence[list[int]] | None = None,
    ) -> FidelityProbe:
        if continuations is None:
            conts = greedy_generate(finetuned_model, prompts, continuation, pad_id=pad_id, eos_id=eos_id)
            continuations = [[*c, eos_id] if eos_id is not None and len(c) < continuation else list(c) for c in conts]
        sequences, starts, kept = [], [], []
        for p, c in zip(prompts, continuations, strict=True):
            answer = list(c) or [pad_id]
            # Feed prompt + answer[:-1]: position len(p)-1+j predicts answer[j].
            sequences.append([*p, *answer[:-1]])
            starts.append(len(p) - 1)
            kept.append(answer)
        prefix = common_prefix(sequences, starts)
        reference = log_probs(finetuned_model, sequences, starts=starts, shared_prefix=prefix)
        return cls(base_model, sequences, starts, reference, kept, prefix)

    def _log_probs(self, model: Any) -> list[torch.Tensor]:
        return log_probs(model, self.sequences, starts=self.starts, shared_prefix=self.shared_prefix)

    def measure_model(self, model: Any) -> tuple[float, float]:
        """(mean KL(fine-tuned ‖ model), top-1 agreement) over the scored positions."""
        kl, top1, _ = compare_log_probs(self.reference, self._log_probs(model))
        return kl, top1

    def measure(self, adapter: LoraAdapter | None) -> tuple[float, float]:
        """The same for base + ``adapter`` (merged into the base model's weights, then restored)."""
        return self.measure_all(adapter)[:2]

    def measure_all(self, adapter: LoraAdapter | None, model: Any = None) -> tuple[float, float, float]:
        """(KL, top-1, share of prompts whose greedy answer is exactly the continuation) of base +
        ``adapter`` (or of ``model``), in one forward pass."""
        ctx = contextlib.nullcontext(model) if model is not None else self._with(adapter)
        with ctx as m:
            logps = self._log_probs(m)
        kl, top1, _ = compare_log_probs(self.reference, logps)
        exact = sum(
            bool((lp.argmax(-1) == torch.tensor(c[: lp.shape[0]])).all())
            for lp, c in zip(logps, self.continuations, strict=True)
        )
        return kl, top1, exact / max(1, len(logps))

    def _with(self, adapter: LoraAdapter | None) -> contextlib.AbstractContextManager[Any]:
        return merged(self.base_model, adapter) if adapter is not None else contextlib.nullcontext(self.base_model)


def probe_for_checkpoints(
    base: Path, finetuned: Path, prompts: Sequence[str] | None, *, continuation: int = 16, self_probes: bool = False
) -> FidelityProbe:
    """A :class:`FidelityProbe` for checkpoint folders: prompts encoded as requests (chat template if
    any), or (``self_probes``) the fine-tune's own samples where it disagrees most with its base."""
    from transformers import AutoModelForCausalLM

    from phlora_nim.converters.calibration import load_tokenizer

    purpose = "--self-probes" if self_probes else "the fidelity prompts"
    tokenizer = load_tokenizer(Path(finetuned), Path(base), purpose=purpose)
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    ft_model = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).eval()
    if self_probes:
        from phlora_nim.jobs.self_probes import self_probe

        probe = self_probe(base_model, ft_model, tokenizer)
    else:
        pad, eos = token_ids(tokenizer)
        encoded = [encode_prompt(tokenizer, p) for p in prompts or ()]
        probe = FidelityProbe.build(base_model, ft_model, encoded, continuation=continuation, pad_id=pad, eos_id=eos)
    del ft_model
    return probe


# --------------------------------------------------------------------------- exact-match tasks

_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Task:
    """Questions with one right answer each; ``test`` never overlaps ``train``."""

    name: str
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    max_new_tokens: int = 6


def _split(name: str, items: list[tuple[str, str]], *, seed: int, n_test: int, max_new_tokens: int) -> Task:
    random.Random(seed).shuffle(items)
    return Task(name, tuple(items[n_test:]), tuple(items[:n_test]), max_new_tokens)


def addition_task(*, seed: int = 0, n_test: int = 64) -> Task:
    """``What is 37+45?`` → ``82`` over two-digit operands."""
    items = [(f"What is {a}+{b}?", str(a + b)) for a in range(10, 100) for b in range(10, 100)]
    return _split("add", items, seed=seed, n_test=n_test, max_new_tokens=6)


def spelled_digits_task(*, seed: int = 0, n_test: int = 64) -> Task:
    """``Spell 407 in words.`` → ``four zero seven`` (digit by digit)."""
    items = [(f"Spell {n} in words.", " ".join(_DIGITS[int(c)] for c in str(n))) for n in range(100, 1000)]
    return _split("spell", items, seed=seed, n_test=n_test, max_new_tokens=6)


def toy_task(words: Sequence[str], name: str, shift: int, *, seed: int = 0, n_test: int = 8) -> Task:
    """For the toy word-level models: ``a b`` → the words ``shift`` places after each, cyclically."""
    items = [
        (f"{a} {b}", f"{words[(i + shift) % len(words)]} {words[(j + shift) % len(words)]}")
        for i, a in enumerate(words)
        for j, b in enumerate(words)
    ]
    return _split(name, items, seed=seed, n_test=n_test, max_new_tokens=3)


TASKS: dict[str, Callable[..., Task]] = {"add": addition_task, "spell": spelled_digits_task}


def _answer_ids(tokenizer: Any, answer: str) -> list[int]:
    ans = list(tokenizer(answer, add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is not None:
        ans.append(int(tokenizer.eos_token_id))
    return ans


def _example(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    prompt = encode_prompt(tokenizer, question)
    ans = _answer_ids(tokenizer, answer)
    return [*prompt, *ans], [-100] * len(prompt) + ans


def _answer_loss(model: Any, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The output layer runs on answer positions only: the vocabulary projection is most of a small
    # model's step otherwise.
    hidden = model.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state
    target = labels[:, 1:]
    scored = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits.float(), target[scored])


def finetune_on_task(
    model: Any, tokenizer: Any, task: Task, *, steps: int = 50, lr: float = 1e-4, batch_size: int = 8, seed: int = 0
) -> dict[str, float]:
    """A full fine-tune (every parameter, AdamW) on ``task.train``, loss on answer tokens only."""
    torch.manual_seed(seed)
    order = list(range(len(task.train)))
    random.Random(seed).shuffle(order)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad, _ = token_ids(tokenizer)
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        batch = [task.train[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        encoded = [_example(tokenizer, q, a) for q, a in batch]
        width = max(len(x) for x, _ in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        att = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (x, y) in enumerate(encoded):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            att[i, : len(x)] = 1
        loss = _answer_loss(model, ids, att, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if step % 10 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f", task.name, step + 1, steps, loss_value)
    model.eval()
    return {"seconds": time.perf_counter() - start, "final_loss": loss_value, "steps": steps}


def exact_match(
    model: Any, tokenizer: Any, items: Sequence[tuple[str, str]], max_new_tokens: int
) -> tuple[float, list[str]]:
    """Share of greedy answers equal to the expected one (whitespace-trimmed), and the answers."""
    pad, eos = token_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, q) for q, _ in items]
    outs = greedy_generate(model, prompts, max_new_tokens, pad_id=pad, eos_id=eos)
    answers = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    return sum(a == gold for a, (_, gold) in zip(answers, items, strict=True)) / max(1, len(items)), answers


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepPoint:
    """One adapter of the sweep: how it was chosen (``label``) and the policy that made it."""

    label: str
    policy: Any  # RankPolicy
    prune_to: Any | None = None  # RankPolicy of the pruned variant, None: none


@dataclass
class SweepRow:
    """Measurements of one adapter against its fine-tune."""

    task: str
    method: str  # "svd" or "whitened"
    label: str
    pruned: bool
    params: int
    min_rank: int
    max_rank: int
    energy_kept: float
    output_energy_kept: float | None
    kl: float
    top1: float
    accuracy: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def megabytes_fp16(self) -> float:
        return self.params * 2 / 1e6


def measure_adapter(probe: FidelityProbe, adapter: LoraAdapter | None) -> tuple[float, float, float]:
    """(KL, top-1, exact-match accuracy) of base + ``adapter`` on a probe whose continuations are the
    task's right answers (see :func:`task_probe`)."""
    return probe.measure_all(adapter)


def task_probe(base_model: Any, finetuned_model: Any, tokenizer: Any, task: Task) -> FidelityProbe:
    """A probe on ``task.test`` scored along the right answers (answer tokens and the end token)."""
    pad, eos = token_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, q) for q, _ in task.test]
    answers = [_answer_ids(tokenizer, a) for _, a in task.test]
    return FidelityProbe.build(base_model, finetuned_model, prompts, pad_id=pad, eos_id=eos, continuations=answers)


@contextlib.contextmanager
def _timed() -> Iterator[list[float]]:
    box = [time.perf_counter()]
    yield box
    box[0] = time.perf_counter() - box[0]


def half_policy(adapter: LoraAdapter) -> Any | None:
    """The policy of pruning ``adapter`` to half: rank r → r/2 when ranks are uniform, else half the
    parameters re-spent optimally across modules; None when there is nothing to halve (rank 1)."""
    from phlora_nim.converters.rank_policy import RankPolicy

    ranks = set(adapter.ranks().values())
    if len(ranks) == 1:
        (rank,) = ranks
        return RankPolicy(rank=rank // 2) if rank > 1 else None
    return RankPolicy(budget_params=max(1, adapter.num_parameters() // 2))


def sweep(
    probe: FidelityProbe,
    tokenizer: Any,
    task: Task,
    result: Any,  # ExtractionResult holding its factors (see converters.extract.reassign)
    method: str,
    points: Sequence[SweepPoint],
    *,
    prune: bool = True,
    on_row: Callable[[SweepRow], None] | None = None,
) -> list[SweepRow]:
    """Measure the adapter of every policy in ``points``, truncated from one decomposition, and
    (``prune``) the same adapter pruned to half (:func:`half_policy`)."""
    from phlora_nim.converters.extract import reassign, summary_energy
    from phlora_nim.converters.prune import prune_adapter

    rows: list[SweepRow] = []

    def add(row: SweepRow) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    for point in points:
        start = time.perf_counter()
        chosen = reassign(result, point.policy)
        totals = summary_energy(chosen)
        kl, top1, acc = measure_adapter(probe, chosen.adapter)
        ranks = [r.rank for r in chosen.modules if r.factors is not None]
        add(
            SweepRow(
                task=task.name,
                method=method,
                label=point.label,
                pruned=False,
                params=chosen.adapter.num_parameters(),
                min_rank=min(ranks, default=0),
                max_rank=max(ranks, default=0),
                energy_kept=totals["energy_kept_linear"],
                output_energy_kept=totals.get("output_energy_kept_linear"),
                kl=kl,
                top1=top1,
                accuracy=acc,
                seconds=time.perf_counter() - start,
            )
        )
        half = half_policy(chosen.adapter) if prune else None
        if half is None:
            continue
        start = time.perf_counter()
        pruned, records = prune_adapter(chosen.adapter, half)
        kl, top1, acc = measure_adapter(probe, pruned)
        # The kept share of the adapter's own update; for a plain-SVD adapter (exactly ΔW_r) that
        # is energy of ΔW itself, so it is reported against ‖ΔW‖² there only.
        kept_of_adapter = sum(float(r["energy_kept"]) * float(r["delta_energy"]) for r in records)  # type: ignore[arg-type]
        ranks = [int(r["rank"]) for r in records]  # type: ignore[call-overload]
        add(
            SweepRow(
                task=task.name,
                method=method,
                label=point.label,
                pruned=True,
                params=pruned.num_parameters(),
                min_rank=min(ranks, default=0),
                max_rank=max(ranks, default=0),
                energy_kept=kept_of_adapter / totals["linear_delta_energy"] if method == "svd" else float("nan"),
                output_energy_kept=None,
                kl=kl,
                top1=top1,
                accuracy=acc,
                seconds=time.perf_counter() - start,
            )
        )
    return rows
