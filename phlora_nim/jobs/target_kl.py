"""Rank chosen by fidelity: the smallest global budget whose adapter meets a KL / top-1 target.

The fine-tune is decomposed once, at the policy's cap (``--max-rank``); each candidate budget is
then a truncation of those spectra by the existing budget policy (rank increments where they buy
the most energy per parameter), merged into the base model and measured against the fine-tune on
prompts (:class:`~phlora_nim.jobs.fidelity.FidelityProbe`). Bisection over the budget, on a log
scale, keeps the passing budget above and the failing one below until they are within the target's
tolerance; no second pass over the checkpoints.

The base model alone is measured first. A probe set on which the fine-tune hardly differs from
its base (KL(fine-tuned ‖ base) below :data:`MIN_GAP_KL`), or on which the base alone already
meets an absolute target, cannot tell a task-keeping adapter from an empty one: the search is
refused rather than returning an adapter that keeps nothing.

A recovery target is relative to the gap an adapter can close. Part of the base→fine-tune gap may
live in tensors no LoRA adapter carries (embeddings, norms, an untargeted or tied ``lm_head``), so
the floor, base + every linear delta at full rank, is measured once after the extraction, and
recovery is ``(KL_base − KL_adapter) / (KL_base − KL_floor)`` (the same in top-1 disagreement);
the raw share of the whole gap is reported beside it. A reachable gap below :data:`MIN_GAP_KL` is
refused like an uninformative probe set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.calibration import read_prompts
from phlora_nim.converters.checkpoint import Checkpoint, DeltaReader
from phlora_nim.converters.extract import ExtractionResult, reassign
from phlora_nim.converters.rank_policy import FidelityTarget, RankPolicy, recovery
from phlora_nim.core.errors import InputError, OptionError

log = logging.getLogger("phlora_nim.target")

# Below this mean KL(fine-tuned ‖ base) per scored token (nats) the probes barely see the
# fine-tune: a bf16 round trip of the same weights is ~1e-3, a task fine-tune on its own task
# is usually > 0.1, so recovery measured under 0.02 is mostly noise.
MIN_GAP_KL = 0.02
FIDELITY_FLAGS = "--target-recovery/--target-kl/--target-top1"


@dataclass(frozen=True)
class SearchStep:
    """One evaluated budget."""

    budget: int
    params: int
    kl: float
    top1: float
    met: bool
    recovery_kl: float  # share of the reachable gap (base → floor)
    recovery_top1: float
    raw_recovery_kl: float  # share of the whole base → fine-tune gap
    raw_recovery_top1: float


@dataclass(frozen=True)
class SearchOutcome:
    """The chosen budget, its truncation of the extraction, and every step tried."""

    budget: int
    result: ExtractionResult
    policy: RankPolicy
    steps: tuple[SearchStep, ...]
    tokens: int
    prompts: str
    base_kl: float
    base_top1: float
    floor: tuple[float, float] | None = None  # (KL, top-1) of base + every linear delta; None: not measured

    def report(self, target: FidelityTarget) -> dict[str, Any]:
        """The ``fidelity_target`` section of ``phlora_report.json``."""
        chosen = next(s for s in self.steps if s.budget == self.budget)
        return {
            "target": {"max_kl": target.max_kl, "min_top1": target.min_top1, "min_recovery": target.min_recovery},
            "prompts": self.prompts,
            "min_gap_kl": MIN_GAP_KL,
            "scored_tokens": self.tokens,
            "base_alone": {"kl": self.base_kl, "top1": self.base_top1},
            "floor": floor_report((self.base_kl, self.base_top1), self.floor) if self.floor else None,
            "chosen": dataclasses.asdict(chosen),
            "steps": [dataclasses.asdict(s) for s in self.steps],
        }


def floor_report(base: tuple[float, float], floor: tuple[float, float]) -> dict[str, float]:
    """The floor (base + every linear delta at full rank) and the share of the base's gap it closes:
    what recovery is relative to."""
    reachable_kl, reachable_top1 = recovery(*floor, *base)
    return {"kl": floor[0], "top1": floor[1], "reachable_kl": reachable_kl, "reachable_top1": reachable_top1}


def _caps(result: ExtractionResult, ceiling: RankPolicy) -> list[tuple[int, int]]:
    return [
        (min(ceiling.cap(r.plan.short_side), r.factors.available_rank), r.plan.in_dim + r.plan.out_dim)
        for r in result.modules
        if r.factors is not None
    ]


def bisect_budget(
    result: ExtractionResult,
    ceiling: RankPolicy,
    judge: Callable[[int, ExtractionResult], bool],
    *,
    tolerance: float,
    max_steps: int,
) -> tuple[int, ExtractionResult] | None:
    """The smallest global budget whose truncation of ``result`` ``judge`` accepts, by bisection.

    ``judge(budget, candidate)`` is asked about every module at its cap first, then one rank-1
    increment on the cheapest module, then geometric midpoints until the accepted and the refused
    budget are within ``tolerance`` or ``max_steps`` distinct adapters were tried.

    Returns:
        (budget, the extraction truncated to it), or None when even every module at its cap is refused.

    Raises:
        OptionError: the fine-tune changed no linear module.
    """
    caps = _caps(result, ceiling)
    if not caps:
        raise OptionError("nothing to search: the fine-tune changed no linear module", where=FIDELITY_FLAGS)
    tried: set[int] = set()

    def evaluate(budget: int) -> tuple[bool, ExtractionResult]:
        candidate = reassign(result, RankPolicy(budget_params=budget, max_rank=ceiling.max_rank, snap=ceiling.snap))
        tried.add(candidate.adapter.num_parameters())
        return judge(budget, candidate), candidate

    top = sum(cap * cost for cap, cost in caps)
    ok, best = evaluate(top)
    if not ok:
        return None
    lo, hi = min(cost for _, cost in caps), top  # lo: one rank-1 increment on the cheapest module
    ok, low = evaluate(lo)
    if ok:
        return lo, low
    while hi / lo > 1 + tolerance and len(tried) < max_steps:
        mid = round(math.sqrt(lo * hi))
        if mid <= lo or mid >= hi:
            break
        ok, candidate = evaluate(mid)
        if ok:
            hi, best = mid, candidate
        else:
            lo = mid
    return hi, best


def search_budget(
    result: ExtractionResult,
    ceiling: RankPolicy,
    target: FidelityTarget,
    measure: Callable[[LoraAdapter | None], tuple[float, float]],
    *,
    base: tuple[float, float] | None = None,
    floor: tuple[float, float] = (0.0, 1.0),
    on_step: Callable[[SearchStep], None] | None = None,
) -> tuple[int, ExtractionResult, list[SearchStep]]:
    """Bisect the global budget (:func:`bisect_budget`) for the smallest one whose adapter meets ``target``.

    Args:
        result: an extraction that kept its factors up to ``ceiling``'s caps.
        ceiling: the policy bounding every module's rank (``max_rank``, ``snap``).
        measure: (KL, top-1) of an adapter (None: the base alone) against the fine-tune.
        base: the base model's (KL, top-1), if already measured.
        floor: (KL, top-1) of base + every linear delta at full rank (:func:`measure_floor`), which
            recovery is relative to; the default, a perfect floor, gives the raw recovery.

    Returns:
        (chosen budget, the extraction truncated to it, the steps tried in order).

    Raises:
        OptionError: even every module at its cap misses the target.
    """
    base = base if base is not None else measure(None)
    steps: list[SearchStep] = []
    measured: dict[int, tuple[float, float]] = {}  # by parameter count: budgets that give the same adapter

    def judge(budget: int, candidate: ExtractionResult) -> bool:
        params = candidate.adapter.num_parameters()
        if params not in measured:
            measured[params] = measure(candidate.adapter)
        kl, top1 = measured[params]
        met = target.met(kl, top1, base, floor)
        step = SearchStep(budget, params, kl, top1, met, *recovery(kl, top1, *base, *floor), *recovery(kl, top1, *base))
        steps.append(step)
        log.info(
            "budget %s → %s params: KL %.4g, top-1 %.2f%%, recovery %.1f%% / %.1f%% of the reachable gap "
            "(raw %.1f%% / %.1f%%; base alone: KL %.4g, top-1 %.2f%%; floor: KL %.4g, top-1 %.2f%%, "
            "reachable %.1f%% / %.1f%% of the gap) %s",
            f"{budget:,}", f"{params:,}", kl, 100 * top1, 100 * step.recovery_kl, 100 * step.recovery_top1,
            100 * step.raw_recovery_kl, 100 * step.raw_recovery_top1, base[0], 100 * base[1], floor[0],
            100 * floor[1], *(100 * r for r in recovery(*floor, *base)), "meets" if met else "misses",
        )  # fmt: skip
        if on_step:
            on_step(step)
        return step.met

    found = bisect_budget(result, ceiling, judge, tolerance=target.tolerance, max_steps=target.max_steps)
    if found is None:
        top_step = steps[0]
        raise OptionError(
            "the fidelity target is out of reach at the rank cap",
            where=FIDELITY_FLAGS,
            expected=target.describe(),
            found=f"KL {top_step.kl:.4g}, top-1 {top_step.top1:.2%} (recovery {top_step.recovery_kl:.1%} / "
            f"{top_step.recovery_top1:.1%} of the reachable gap, raw {top_step.raw_recovery_kl:.1%} / "
            f"{top_step.raw_recovery_top1:.1%}) with every module at rank ≤ "
            f"{ceiling.max_rank or 'the default cap'} ({top_step.params:,} parameters)",
            fix="raise --max-rank or loosen the target"
            + (
                "; an absolute target also counts the part of the gap no adapter carries (embeddings, norms), "
                "--target-recovery is relative to what an adapter can reach"
                if target.absolute
                else ""
            ),
        )
    return found[0], found[1], steps


def run_to_target(
    job: Any,  # pipeline.Planned
    pair: Any,  # pipeline.PlannedPair
    *,
    progress: Callable[[str], None] | None = None,
) -> SearchOutcome:
    """Extract ``pair`` once at the cap, then bisect the budget against ``job.options.target``."""
    from phlora_nim.converters.extract import run_extraction
    from phlora_nim.converters.rank_policy import search_policy

    given = job.options.policy
    # The given policy's cap bounds the search (--max-rank, or --rank as a ceiling); decompose once to it.
    ceiling = search_policy(given.rank if given.kind == "rank" else given.max_rank, given.snap)
    options = dataclasses.replace(job.options, policy=ceiling)
    target: FidelityTarget = options.target
    probe, source, count = _probe(job.base_path, pair.path, target)
    base_kl, base_top1 = probe.measure(None)
    log.info(
        "fidelity target %s on %d %s (%d scored tokens); base model alone: KL %.4g, top-1 %.2f%%",
        target.describe(), count, source, probe.tokens, base_kl, 100 * base_top1,
    )  # fmt: skip
    check_informative(target, base_kl, base_top1, source=source, tokens=probe.tokens)
    result = run_extraction(pair.plan, job.base, pair.checkpoint, options, progress=progress, statistics=job.statistics)
    base, floor = (base_kl, base_top1), None
    if not target.absolute:  # only recovery is relative to the floor
        floor = measure_floor(probe, result, job.base, pair.checkpoint)
        log.info("floor (base + every linear delta at full rank): KL %.4g, top-1 %.2f%%", floor[0], 100 * floor[1])
        check_reachable(base, floor, source=source, tokens=probe.tokens)
    budget, chosen, steps = search_budget(
        result, ceiling, target, probe.measure, base=base, floor=floor if floor else (0.0, 1.0)
    )
    policy = RankPolicy(budget_params=budget, max_rank=ceiling.max_rank, snap=ceiling.snap)
    return SearchOutcome(
        budget=budget,
        result=chosen,
        policy=policy,
        steps=tuple(steps),
        tokens=probe.tokens,
        prompts=source,
        base_kl=base_kl,
        base_top1=base_top1,
        floor=floor,
    )


def measure_floor(probe: Any, result: ExtractionResult, base: Checkpoint, finetuned: Checkpoint) -> tuple[float, float]:
    """(KL, top-1) on ``probe`` of base + every linear delta of ``result``'s plan at full rank (plus
    the bias deltas its adapter carries): the fine-tune with every tensor no adapter carries reverted
    to the base's, the best any truncation of ``result`` can do."""
    from phlora_nim.jobs.verify import added

    reader = DeltaReader(base, finetuned)
    weights = ((t.module, reader.delta(t.weight)) for t in result.plan.targets)
    with added(probe.base_model, weights, result.adapter.lora_biases) as model:
        kl, top1, _ = probe.measure_all(None, model=model)
    return kl, top1


def _probe(base: Path, finetuned: Path, target: FidelityTarget) -> tuple[Any, str, int]:
    """(the probe, where its prompts come from, how many) for ``target``."""
    from phlora_nim.jobs.fidelity import generic_prompts_path, probe_for_checkpoints

    if target.self_probes:
        probe = probe_for_checkpoints(base, finetuned, None, self_probes=True)
        return probe, "(self-probes) the fine-tune's own samples", len(probe.sequences)
    prompts_file = Path(target.prompts) if target.prompts else generic_prompts_path()
    prompts = read_prompts(prompts_file, where="--prompts")
    source = str(prompts_file) if target.prompts else f"(generic, shipped) {prompts_file.name}"
    return probe_for_checkpoints(base, finetuned, prompts), source, len(prompts)


def check_informative(target: FidelityTarget, base_kl: float, base_top1: float, *, source: str, tokens: int) -> None:
    """Refuse probes that cannot tell a task-keeping adapter from an empty one.

    Raises:
        InputError: the base alone meets ``target``, or KL(fine-tuned ‖ base) < :data:`MIN_GAP_KL`.
    """
    found = f"base model alone: KL(fine-tuned ‖ base) {base_kl:.4g} nats/token, top-1 {base_top1:.2%} on {tokens} "
    found += f"tokens of {source}"
    fix = (
        "give prompts of the fine-tune's task with --prompts, or use --self-probes (the fine-tune's own samples "
        "where it differs most from its base)"
    )
    if target.met(base_kl, base_top1, (base_kl, base_top1)):
        raise InputError(
            "the base model alone already meets the fidelity target on these prompts: the search would pick an "
            "adapter that keeps nothing of the fine-tune",
            where=FIDELITY_FLAGS,
            expected=f"a target the base alone misses ({target.describe()})",
            found=found,
            fix=fix + "; or set the target relative to the base with --target-recovery",
        )
    if base_kl < MIN_GAP_KL:
        raise InputError(
            "the prompts barely tell the fine-tune from its base: fidelity measured on them says nothing about "
            "what the adapter keeps",
            where=FIDELITY_FLAGS,
            expected=f"KL(fine-tuned ‖ base) ≥ {MIN_GAP_KL} nats/token on the probe prompts",
            found=found,
            fix=fix,
        )


def check_reachable(base: tuple[float, float], floor: tuple[float, float], *, source: str, tokens: int) -> None:
    """Refuse a recovery target when the gap an adapter can close is itself too small to measure.

    Raises:
        InputError: KL(fine-tuned ‖ base) − KL(fine-tuned ‖ floor) < :data:`MIN_GAP_KL`.
    """
    if base[0] - floor[0] >= MIN_GAP_KL:
        return
    raise InputError(
        "the gap an adapter can close is too small on these prompts: most of what tells the fine-tune from its "
        "base lives in tensors no LoRA adapter carries (embeddings, norms, an untargeted lm_head)",
        where=FIDELITY_FLAGS,
        expected=f"KL(fine-tuned ‖ base) − KL(fine-tuned ‖ floor) ≥ {MIN_GAP_KL} nats/token on the probe prompts",
        found=f"base model alone: KL {base[0]:.4g}, top-1 {base[1]:.2%}; floor (base + every linear delta at full "
        f"rank): KL {floor[0]:.4g}, top-1 {floor[1]:.2%}; reachable gap {base[0] - floor[0]:.4g} nats/token on "
        f"{tokens} tokens of {source}",
        fix="give prompts of the fine-tune's task with --prompts or use --self-probes, target more modules "
        "(--target-modules) if the fine-tune's change lives outside them, or set an absolute target with "
        "--target-kl/--target-top1",
    )
