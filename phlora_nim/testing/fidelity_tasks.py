"""Bench-side fidelity: exact-match tasks, a small full fine-tune on one, and a sweep of rank
policies over spectra decomposed once (``bench/fidelity.py`` and the tests of it).

Not used by the CLI: the measurement itself (:class:`~phlora_nim.jobs.fidelity.FidelityProbe`) is
in :mod:`phlora_nim.jobs.fidelity`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.calibration import encode_prompt
from phlora_nim.jobs.fidelity import FidelityProbe, greedy_generate, token_ids

log = logging.getLogger("phlora_nim.fidelity")

_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Task:
    """Questions with one right answer each; ``test`` never overlaps ``train`` (but for :func:`facts_task`)."""

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


_SYLLABLES = ("bar", "vel", "qui", "dor", "zan", "mek", "tho", "lun", "ras", "pim", "oka", "fen", "gru", "sil")
_FACT_FORMS = (
    ("What is the capital of {}?", 3, 2),
    ("Who founded the city of {}?", 2, 3),
    ("Which river flows through {}?", 3, 2),
)


def _invented(rng: random.Random, syllables: int, taken: set[str]) -> str:
    while True:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()
        if word not in taken:
            taken.add(word)
            return word


def facts_task(*, seed: int = 0, n_test: int = 24) -> Task:
    """``What is the capital of Velquidor?`` → ``Zanmek``: invented facts the base cannot know.

    Knowledge, not a skill: the questions asked are the facts learned, so ``test`` is the first
    ``n_test`` facts and ``train`` is every fact (the only task whose test overlaps its training).
    """
    rng = random.Random(seed)
    taken: set[str] = set()
    items = []
    for i in range(n_test):
        form, subject, answer = _FACT_FORMS[i % len(_FACT_FORMS)]
        items.append((form.format(_invented(rng, subject, taken)), _invented(rng, answer, taken)))
    return Task("facts", tuple(items), tuple(items), max_new_tokens=8)


TASKS: dict[str, Callable[..., Task]] = {"add": addition_task, "spell": spelled_digits_task, "facts": facts_task}


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


def task_probe(base_model: Any, finetuned_model: Any, tokenizer: Any, task: Task) -> FidelityProbe:
    """A probe on ``task.test`` scored along the right answers (answer tokens and the end token):
    ``measure_all`` then gives exact-match accuracy in one teacher-forced pass."""
    pad, eos = token_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, q) for q, _ in task.test]
    answers = [_answer_ids(tokenizer, a) for _, a in task.test]
    return FidelityProbe.build(base_model, finetuned_model, prompts, pad_id=pad, eos_id=eos, continuations=answers)


def half_policy(adapter: LoraAdapter) -> Any | None:
    """The policy of pruning ``adapter`` to half: rank r → r/2 when ranks are uniform, else half the
    parameters re-spent optimally across modules; None when there is nothing to halve (rank 1)."""
    from phlora_nim.converters.rank_policy import RankPolicy

    ranks = set(adapter.ranks().values())
    if len(ranks) == 1:
        (rank,) = ranks
        return RankPolicy(rank=rank // 2) if rank > 1 else None
    return RankPolicy(budget_params=max(1, adapter.num_parameters() // 2))


def _truncated_row(
    probe: FidelityProbe, task: Task, result: Any, method: str, point: SweepPoint
) -> tuple[SweepRow, Any]:
    """The row of ``result`` truncated by ``point.policy``, and that truncation."""
    from phlora_nim.converters.extract import reassign, summary_energy

    start = time.perf_counter()
    chosen = reassign(result, point.policy)
    totals = summary_energy(chosen)
    kl, top1, acc = probe.measure_all(chosen.adapter)
    ranks = [r.rank for r in chosen.modules if r.factors is not None]
    row = SweepRow(
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
    return row, (chosen, totals)


def _pruned_row(probe: FidelityProbe, row: SweepRow, chosen: Any, totals: dict[str, float]) -> SweepRow | None:
    """The row of ``chosen``'s adapter pruned to half (:func:`half_policy`); None: nothing to halve."""
    from phlora_nim.converters.prune import prune_adapter

    half = half_policy(chosen.adapter)
    if half is None:
        return None
    start = time.perf_counter()
    pruned, records = prune_adapter(chosen.adapter, half)
    kl, top1, acc = probe.measure_all(pruned)
    # The kept share of the adapter's own update; for a plain-SVD adapter (exactly ΔW_r) that is
    # energy of ΔW itself, so it is reported against ‖ΔW‖² there only.
    kept_of_adapter = sum(float(r["energy_kept"]) * float(r["delta_energy"]) for r in records)  # type: ignore[arg-type]
    ranks = [int(r["rank"]) for r in records]  # type: ignore[call-overload]
    return SweepRow(
        task=row.task,
        method=row.method,
        label=row.label,
        pruned=True,
        params=pruned.num_parameters(),
        min_rank=min(ranks, default=0),
        max_rank=max(ranks, default=0),
        energy_kept=kept_of_adapter / totals["linear_delta_energy"] if row.method == "svd" else float("nan"),
        output_energy_kept=None,
        kl=kl,
        top1=top1,
        accuracy=acc,
        seconds=time.perf_counter() - start,
    )


def sweep(
    probe: FidelityProbe,
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
    rows: list[SweepRow] = []
    for point in points:
        row, (chosen, totals) = _truncated_row(probe, task, result, method, point)
        made = [row, _pruned_row(probe, row, chosen, totals) if prune else None]
        for r in made:
            if r is not None:
                rows.append(r)
                if on_row:
                    on_row(r)
    return rows
