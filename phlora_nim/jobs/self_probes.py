"""Data-free probes where the fine-tune differs from its base: its own samples, ranked by KL.

Generic prompts rarely reach what a task fine-tune learned, so an adapter measured on them can
look faithful while keeping nothing of the task. Here the fine-tuned model writes its own probes:
short continuations sampled from its generation prompt (an empty or short generic user turn
through the chat template, else the start token) at a few temperatures. Each is scored by the mean
KL(fine-tuned ‖ base) over its tokens and the distinct ones where the two disagree most are kept
(each continuation once: a fine-tune that gives one answer to everything must not fill the probes
with it), at least ``keep`` of them and more, in that order, until they hold enough of the
fine-tune's decisive choices (:data:`~phlora_nim.converters.rank_policy.DECISIVE_P`) to measure a share on.
No user data, no gradient: one batched sampling call (two when too few samples are distinct or
decisive), the fine-tune's log-probs taken from it, and one pass of the base over the samples.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from phlora_nim.core.errors import InputError
from phlora_nim.jobs.fidelity import FidelityProbe, decisive_mask, token_ids
from phlora_nim.jobs.verify import common_prefix, compare_log_probs, log_probs

log = logging.getLogger("phlora_nim.self_probes")

# Short user turns that set no task: the fine-tune's own habits decide what follows.
OPENING_TURNS = ("", "Hi.", "Tell me something.", "Continue.")
# Sampling calls at most: a fine-tune whose samples end at once (dropped) or repeat too often to
# fill the probes is sampled again, with twice the rows (at most MAX_ROWS).
SAMPLING_ROUNDS = 2
MAX_ROWS = 128
# Rows sampled per sample kept (ranked by disagreement, the top ones kept).
RANK_FROM = 2
# Samples kept at most (search and held-out together), however few decisive choices they hold.
MAX_KEPT = 96


@dataclass(frozen=True)
class SelfProbeSettings:
    """How many continuations to sample (``per_start`` per opening and temperature, at least
    :data:`RANK_FROM` times the samples kept, more when too few are distinct or decisive), how long,
    how many of the most disagreeing distinct ones to keep at least, and how many decisive positions
    the kept ones should hold (more samples are kept, in the same order, until they do)."""

    temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)
    per_start: int = 8
    length: int = 8
    keep: int = 16
    decisive: int = 48
    seed: int = 0


def openings(tokenizer: Any) -> list[list[int]]:
    """Generation prompts to sample from: each opening turn through the chat template when there is
    one, else the start token alone (end token, then 0, where the tokenizer has none)."""
    if getattr(tokenizer, "chat_template", None):
        out = []
        for turn in OPENING_TURNS:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
        return out
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return [[int(start)]]


class _RowTemperature:
    """Divides each row's logits by its own temperature: one sampling call serves every temperature."""

    def __init__(self, temperatures: torch.Tensor) -> None:
        self.temperatures = temperatures[:, None]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperatures.to(scores.dtype)


@torch.no_grad()
def sample(
    model: Any,
    starts: Sequence[list[int]],
    temperatures: Sequence[float],
    *,
    length: int,
    pad_id: int,
    eos_id: int | None,
) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """One sampled continuation per row: ``starts[i]`` at ``temperatures[i]``, all rows in one
    ``generate`` call. Each comes with the model's own next-token log-probs along it
    (from the raw logits the sampling step saw), so no second pass of the model is needed to score
    it. The end token and what follows are cut off; rows that end at once are dropped.

    Returns:
        (start, continuation, log-probs ``[len(continuation), vocab]``) per non-empty row.
    """
    from transformers import LogitsProcessorList

    # The openings share a chat template's system turn: it runs once, its KV cache is repeated for
    # every row, and each row's own tail is left-padded after it (masked, positions kept contiguous).
    shared = common_prefix(list(starts), [len(s) - 1 for s in starts])
    tail = max(len(s) for s in starts) - shared
    ids = torch.full((len(starts), shared + tail), pad_id, dtype=torch.long)
    att = torch.zeros((len(starts), shared + tail), dtype=torch.long)
    ids[:, :shared] = torch.tensor(starts[0][:shared])
    att[:, :shared] = 1
    for i, s in enumerate(starts):
        ids[i, shared + tail - (len(s) - shared) :] = torch.tensor(s[shared:])
        att[i, shared + tail - (len(s) - shared) :] = 1
    cached: dict[str, Any] = {}
    if shared:
        cache = model(input_ids=ids[:1, :shared], use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(starts))
        cached["past_key_values"] = cache
    gen = model.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=length,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        logits_processor=LogitsProcessorList([_RowTemperature(torch.tensor(temperatures))]),
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        output_logits=True,
        return_dict_in_generate=True,
        **cached,
    )
    logits = torch.stack(gen.logits, dim=1)  # [rows, steps, vocab], before the temperature
    outs = []
    for i, row in enumerate(gen.sequences[:, shared + tail :].tolist()):
        row = row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row
        if row:
            outs.append((list(starts[i]), row, torch.log_softmax(logits[i, : len(row)].float(), -1)))
    return outs


@dataclass(frozen=True)
class RankedSample:
    """A sample, the mean KL(fine-tuned ‖ base) over its continuation, and both models' log-probs along it."""

    kl: float
    start: list[int]
    continuation: list[int]
    finetuned: torch.Tensor
    base: torch.Tensor

    @functools.cached_property  # counted by the draw, the cut and the log: computed once
    def decisive(self) -> int:
        """Positions where the fine-tune makes a decisive choice (:func:`~phlora_nim.jobs.fidelity.decisive_mask`)."""
        return int(decisive_mask(self.finetuned, self.base).sum())


def rank_by_disagreement(
    base_model: Any, samples: Sequence[tuple[list[int], list[int], torch.Tensor]]
) -> list[RankedSample]:
    """Samples of :func:`sample` (with the fine-tune's log-probs) ranked by mean KL(fine-tuned ‖ base)
    over the continuation's tokens, largest first: one pass of the base over them all."""
    sequences = [[*p, *c[:-1]] for p, c, _ in samples]
    starts = [len(p) - 1 for p, _, _ in samples]
    base = log_probs(base_model, sequences, starts=starts, shared_prefix=common_prefix(sequences, starts))
    ranked = [
        RankedSample(compare_log_probs([f], [b])[0], list(p), list(c), f, b)
        for b, (p, c, f) in zip(base, samples, strict=True)
    ]
    return sorted(ranked, key=lambda r: -r.kl)


def self_probe(
    base_model: Any, ft_model: Any, tokenizer: Any, settings: SelfProbeSettings = SelfProbeSettings()
) -> FidelityProbe:
    """A :class:`FidelityProbe` on the ``settings.keep`` sampled continuations where the fine-tune
    disagrees most with its base, scored along those continuations."""
    return self_probe_sets(base_model, ft_model, tokenizer, settings)[0]


def self_probe_sets(
    base_model: Any,
    ft_model: Any,
    tokenizer: Any,
    settings: SelfProbeSettings = SelfProbeSettings(),
    *,
    held_out: int = 0,
) -> tuple[FidelityProbe, FidelityProbe | None]:
    """The probe of :func:`self_probe`, and (``held_out`` > 0) a second one of about ``held_out /
    keep`` as many samples, equally disagreeing, never searched on: the kept samples dealt out in
    turn, so an adapter chosen on the first can be checked on the second.

    Raises:
        InputError: the fine-tune ends every sample at once (nothing to probe with).
    """
    pad, eos = token_ids(tokenizer)
    torch.manual_seed(settings.seed)
    needed = settings.keep + held_out
    # Decisive positions wanted over search and held-out samples together (the same share held out).
    decisive_wanted = math.ceil(settings.decisive * needed / settings.keep)
    ranked, distinct = _draw(base_model, ft_model, openings(tokenizer), settings, needed, decisive_wanted, pad, eos)
    ranked = _enough(ranked, needed, decisive_wanted)
    kept, out = _deal(ranked, held_out, needed) if held_out and len(ranked) > 1 else (ranked, [])
    if kept:
        log.info(
            "self-probes: kept %d (+%d held out) of %d distinct samples, KL(fine-tuned ‖ base) %.4g–%.4g, "
            "%d decisive choices (+%d held out)",
            len(kept), len(out), distinct, ranked[-1].kl, ranked[0].kl, sum(r.decisive for r in kept),
            sum(r.decisive for r in out),
        )  # fmt: skip

    def build(rows: list[RankedSample]) -> FidelityProbe:
        return FidelityProbe.build(
            base_model, ft_model, [r.start for r in rows], pad_id=pad, eos_id=eos,
            continuations=[r.continuation for r in rows], reference=[r.finetuned for r in rows],
            base_reference=[r.base for r in rows],
        )  # fmt: skip

    return build(kept), (build(out) if out else None)


def _draw(
    base_model: Any,
    ft_model: Any,
    starts: list[list[int]],
    settings: SelfProbeSettings,
    needed: int,
    decisive_wanted: int,
    pad: int,
    eos: int | None,
) -> tuple[list[RankedSample], int]:
    """The fine-tune's distinct samples ranked by disagreement (largest first), and how many there are:
    one sampling call, a second of twice the rows when fewer than ``needed`` are distinct or they hold
    fewer than ``decisive_wanted`` decisive choices.

    Raises:
        InputError: every sample ended at once.
    """
    wanted = math.ceil(RANK_FROM * needed)  # more samples than are kept, to rank from
    per = max(settings.per_start, math.ceil(wanted / (len(starts) * len(settings.temperatures))))
    # Openings and temperatures dealt out in turn: any first N rows are an even mix of them.
    rows = [(s, t) for _ in range(per) for s in starts for t in settings.temperatures]
    ranked: list[RankedSample] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(SAMPLING_ROUNDS):
        drawn = sample(
            ft_model, [s for s, _ in rows], [t for _, t in rows], length=settings.length, pad_id=pad, eos_id=eos
        )
        # One of each continuation: a fine-tune that answers everything alike (a knowledge fine-tune's
        # favourite fact) would otherwise fill the probes with its mode, and its other answers, what
        # an adapter must also keep, would never be scored.
        fresh = []
        for row in drawn:
            if tuple(row[1]) not in seen:
                seen.add(tuple(row[1]))
                fresh.append(row)
        if fresh:
            ranked = sorted([*ranked, *rank_by_disagreement(base_model, fresh)], key=lambda r: -r.kl)
        decisive = sum(r.decisive for r in ranked)
        if not ranked or (len(ranked) >= needed and (decisive >= decisive_wanted or decisive == 0)):
            break
        # Fewer distinct samples than the probe keeps (short answers end at once and are dropped, or
        # repeat), or some decisive choices but fewer than it wants: draw again, twice as many rows (the
        # same mix of openings and temperatures). A fine-tune that makes none is not drawn again: its
        # search holds to KL and top-1. Between that and what is wanted, the held-out share shrinks in
        # proportion instead.
        rows = [rows[i % len(rows)] for i in range(min(2 * len(rows), MAX_ROWS))]
    if not ranked:
        raise InputError(
            "the fine-tuned model ends every sampled continuation at once",
            where="--self-probes",
            expected="non-empty samples from its generation prompt",
            found=f"{len(rows)} empty samples",
            fix="give task prompts with --prompts instead",
        )
    return ranked, len(seen)


def _deal(ranked: list[RankedSample], held_out: int, needed: int) -> tuple[list[RankedSample], list[RankedSample]]:
    """``ranked`` dealt out in turn (in proportion to ``needed - held_out`` : ``held_out``) into the samples
    searched on and those held out: both span the same range of disagreement."""
    n_out = max(1, round(len(ranked) * held_out / needed))
    step = len(ranked) / n_out
    marks = {min(len(ranked) - 1, int(step * (i + 1)) - 1) for i in range(n_out)}
    return [r for i, r in enumerate(ranked) if i not in marks], [r for i, r in enumerate(ranked) if i in marks]


def _enough(ranked: list[RankedSample], needed: int, decisive_wanted: int) -> list[RankedSample]:
    """The first ``needed`` samples of ``ranked``, then more in order until they hold ``decisive_wanted``
    decisive choices (at most :data:`MAX_KEPT` samples, and none past ``needed`` that holds none: a
    sample without a decisive choice costs every evaluation and adds nothing to the share)."""
    n, decisive = 0, 0
    while n < min(len(ranked), MAX_KEPT) and (n < needed or decisive < decisive_wanted):
        decisive += ranked[n].decisive
        n += 1
    while n > needed and ranked[n - 1].decisive == 0:
        n -= 1
    return ranked[:n]
