"""Data-free probes where the fine-tune differs from its base: its own samples, ranked by KL.

Generic prompts rarely reach what a task fine-tune learned, so an adapter measured on them can
look faithful while keeping nothing of the task. Here the fine-tuned model writes its own probes:
short continuations sampled from its generation prompt (an empty or short generic user turn
through the chat template, else the start token) at a few temperatures. Each is scored by the
mean KL(fine-tuned ‖ base) over its tokens and the ones where the two disagree most are kept. No
user data, no gradient: a bounded number of sampled tokens and two forward passes over them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from phlora_nim.core.errors import InputError
from phlora_nim.jobs.fidelity import FidelityProbe, token_ids
from phlora_nim.jobs.verify import common_prefix, compare_log_probs, log_probs

log = logging.getLogger("phlora_nim.self_probes")

# Short user turns that set no task: the fine-tune's own habits decide what follows.
OPENING_TURNS = ("", "Hi.", "Tell me something.", "Continue.")


@dataclass(frozen=True)
class SelfProbeSettings:
    """How many continuations to sample (``per_start`` per opening and temperature, more when that
    gives fewer than twice the samples kept), how long, and how many of the most disagreeing to keep."""

    temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)
    per_start: int = 4
    length: int = 16
    keep: int = 16
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


@torch.no_grad()
def sample(
    model: Any, start: list[int], *, count: int, length: int, temperature: float, pad_id: int, eos_id: int | None
) -> list[list[int]]:
    """``count`` sampled continuations of ``start`` (end token and what follows cut off; empty dropped)."""
    ids = torch.tensor([start]).expand(count, -1)
    gen = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=length,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    outs = []
    for row in gen[:, len(start) :].tolist():
        row = row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row
        if row:
            outs.append(row)
    return outs


def rank_by_disagreement(
    base_model: Any, ft_model: Any, samples: Sequence[tuple[list[int], list[int]]]
) -> list[tuple[float, list[int], list[int]]]:
    """(mean KL(fine-tuned ‖ base) over the continuation's tokens, prompt, continuation), largest first."""
    return [(kl, p, c) for kl, p, c, _ in _ranked(base_model, ft_model, samples)]


def _ranked(
    base_model: Any, ft_model: Any, samples: Sequence[tuple[list[int], list[int]]]
) -> list[tuple[float, list[int], list[int], torch.Tensor]]:
    """:func:`rank_by_disagreement` with the fine-tune's log-probs of each (reused as the probe's reference)."""
    sequences = [[*p, *c[:-1]] for p, c in samples]
    starts = [len(p) - 1 for p, _ in samples]
    prefix = common_prefix(sequences, starts)
    ft = log_probs(ft_model, sequences, starts=starts, shared_prefix=prefix)
    base = log_probs(base_model, sequences, starts=starts, shared_prefix=prefix)
    scored = [
        (compare_log_probs([f], [b])[0], list(p), list(c), f) for f, b, (p, c) in zip(ft, base, samples, strict=True)
    ]
    return sorted(scored, key=lambda s: -s[0])


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
    """The probe of :func:`self_probe`, and (``held_out`` > 0) a second one of as many samples, equally
    disagreeing, never searched on: the ``keep + held_out`` most disagreeing samples dealt out in turn,
    so an adapter chosen on the first can be checked on the second.

    Raises:
        InputError: the fine-tune ends every sample at once (nothing to probe with).
    """
    pad, eos = token_ids(tokenizer)
    torch.manual_seed(settings.seed)
    samples: list[tuple[list[int], list[int]]] = []
    starts = openings(tokenizer)
    # At least twice as many samples as are kept, whatever the number of openings, to rank from.
    count = max(
        settings.per_start, math.ceil(2 * (settings.keep + held_out) / (len(starts) * len(settings.temperatures)))
    )
    for start in starts:
        for temperature in settings.temperatures:
            conts = sample(
                ft_model, start, count=count, length=settings.length,
                temperature=temperature, pad_id=pad, eos_id=eos,
            )  # fmt: skip
            samples += [(start, c) for c in conts]
    if not samples:
        raise InputError(
            "the fine-tuned model ends every sampled continuation at once",
            where="--self-probes",
            expected="non-empty samples from its generation prompt",
            found=f"{count * len(settings.temperatures)} empty ones per opening",
            fix="give task prompts with --prompts instead",
        )
    ranked = _ranked(base_model, ft_model, samples)[: settings.keep + held_out]
    if held_out:
        # Dealt out in turn (two to the probe for each one held out, in proportion): both halves span the same range.
        step = (settings.keep + held_out) / held_out
        marks = {min(len(ranked) - 1, int(step * (i + 1)) - 1) for i in range(held_out)}
        kept = [r for i, r in enumerate(ranked) if i not in marks]
        out = [r for i, r in enumerate(ranked) if i in marks]
    else:
        kept, out = ranked, []
    if kept:
        log.info(
            "self-probes: kept %d (+%d held out) of %d samples, KL(fine-tuned ‖ base) %.4g–%.4g",
            len(kept), len(out), len(samples), ranked[-1][0], ranked[0][0],
        )  # fmt: skip

    def build(rows: list[tuple[float, list[int], list[int], torch.Tensor]]) -> FidelityProbe:
        return FidelityProbe.build(
            base_model, ft_model, [p for _, p, _, _ in rows], pad_id=pad, eos_id=eos,
            continuations=[c for _, _, c, _ in rows], reference=[f for _, _, _, f in rows],
        )  # fmt: skip

    return build(kept), (build(out) if out else None)
