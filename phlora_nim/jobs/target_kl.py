"""Rank chosen by fidelity: the smallest global budget whose adapter meets a KL / top-1 / recovery target.

The probes (by default the fine-tune's own samples where it disagrees most with its base,
:mod:`~phlora_nim.jobs.self_probes`) are built once, with the fine-tune's log-probs on them; the
base alone and the floor are measured once. The fine-tune is decomposed to a small cap first and
to a larger one only when every module at that cap misses the target (:func:`search_ceilings`); each
candidate budget is a truncation of those spectra by the budget policy (rank increments where they
buy the most energy per parameter), applied by patching the base model's weights in place, and the
search interpolates the target's margin in log-budget space until the passing and the failing
budget are within the target's tolerance.

The base model alone is measured first. A probe set on which the fine-tune hardly differs from
its base (KL(fine-tuned ‖ base) below :data:`MIN_GAP_KL`), or on which the base alone already
meets an absolute target, cannot tell a task-keeping adapter from an empty one: the search is
refused. The chosen adapter is then checked on held-out samples of the fine-tune itself: if it
keeps much less there than on the probes it was chosen on, the probes missed what the fine-tune
changed, and it is refused too (:mod:`~phlora_nim.jobs.probe_checks`).

A recovery target is relative to the gap an adapter can close. Part of the base→fine-tune gap may
live in tensors no LoRA adapter carries (embeddings, norms, an untargeted or tied ``lm_head``), so
the floor, base + every linear delta at full rank, is measured, and recovery is
``(KL_base − KL_adapter) / (KL_base − KL_floor)`` (the same in top-1 disagreement); the raw share of
the whole gap is reported beside it. A reachable gap below :data:`MIN_GAP_KL` is refused like an
uninformative probe set.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.calibration import read_prompts
from phlora_nim.converters.checkpoint import Checkpoint, DeltaReader
from phlora_nim.converters.extract import ExtractionResult, reassign
from phlora_nim.converters.rank_policy import (
    DECISIVE_P,
    GENERIC_PROMPTS,
    MIN_DECISIVE,
    FidelityTarget,
    RankPolicy,
    decisive_recovery,
    recovery,
    search_ceilings,
)
from phlora_nim.core.errors import OptionError
from phlora_nim.jobs.probe_checks import (
    FIDELITY_FLAGS,
    MIN_GAP_KL,
    check_informative,
    check_on_own_samples,
    check_reachable,
)

log = logging.getLogger("phlora_nim.target")

GENERIC = GENERIC_PROMPTS
SELF_PROBES_SOURCE = "(self-probes) the fine-tune's own samples"


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
    decisive: float | None = None  # share of the fine-tune's decisive choices made (None: too few on the probes)
    recovery_decisive: float | None = None  # the same relative to the floor's: what a recovery target bounds


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
    floor_decisive: float | None = None  # share of the decisive choices the floor makes (None: too few)
    decisive_positions: int = 0
    check: dict[str, Any] = dataclasses.field(default_factory=dict)
    decomposed_to: tuple[int, ...] = ()
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def report(self, target: FidelityTarget) -> dict[str, Any]:
        """The ``fidelity_target`` section of ``phlora_report.json``."""
        chosen = next(s for s in reversed(self.steps) if s.budget == self.budget)
        return {
            "decomposed_to_ranks": list(self.decomposed_to),
            "check_on_own_samples": self.check,
            "search_timings": self.timings,
            "target": {"max_kl": target.max_kl, "min_top1": target.min_top1, "min_recovery": target.min_recovery},
            "prompts": self.prompts,
            "min_gap_kl": MIN_GAP_KL,
            "scored_tokens": self.tokens,
            "decisive_positions": self.decisive_positions,
            "decisive_p": DECISIVE_P,
            "base_alone": {"kl": self.base_kl, "top1": self.base_top1},
            "floor": (
                {**floor_report((self.base_kl, self.base_top1), self.floor), "decisive": self.floor_decisive}
                if self.floor
                else None
            ),
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


# What a judge says of a candidate: met or not, optionally with a margin (≥ 0 when met, growing with
# the budget) that lets the search interpolate instead of halving.
Verdict = bool | tuple[bool, float]


def bisect_budget(
    result: ExtractionResult,
    ceiling: RankPolicy,
    judge: Callable[[int, ExtractionResult], Verdict],
    *,
    tolerance: float,
    max_steps: int,
    below: tuple[int, float | None] | None = None,
) -> tuple[int, ExtractionResult] | None:
    """The smallest global budget whose truncation of ``result`` ``judge`` accepts.

    ``judge(budget, candidate)`` is asked about every module at its cap first; then, between the
    accepted budget and a refused one (``below``: a budget known to be refused and its margin, e.g.
    the base alone; else one rank-1 increment on the cheapest module, asked), points in log-budget
    space until the two are within ``tolerance`` or ``max_steps`` distinct adapters were tried. With
    margins the point is where the margin's line crosses zero (regula falsi, kept inside the middle
    70 % of the bracket so a curved margin cannot stall it); without, the geometric midpoint.

    Returns:
        (budget, the extraction truncated to it), or None when even every module at its cap is refused.

    Raises:
        OptionError: the fine-tune changed no linear module.
    """
    caps = _caps(result, ceiling)
    if not caps:
        raise OptionError("nothing to search: the fine-tune changed no linear module", where=FIDELITY_FLAGS)
    tried: set[int] = set()

    def evaluate(budget: int) -> tuple[bool, float | None, ExtractionResult]:
        candidate = reassign(result, ceiling.at_budget(budget))
        tried.add(candidate.adapter.num_parameters())
        verdict = judge(budget, candidate)
        met, margin = verdict if isinstance(verdict, tuple) else (verdict, None)
        return met, margin, candidate

    top = sum(cap * cost for cap, cost in caps)
    ok, m_hi, best = evaluate(top)
    if not ok:
        return None
    cheapest = min(cost for _, cost in caps)  # one rank-1 increment on the cheapest module
    if below is not None and below[0] < top:
        lo, m_lo = max(below[0], cheapest), below[1]
    else:
        lo = cheapest
        ok, m_lo, low = evaluate(lo)
        if ok:
            return lo, low
    hi = top
    while hi / lo > 1 + tolerance and len(tried) < max_steps:
        t = 0.5
        if m_lo is not None and m_hi is not None and m_hi > m_lo:
            t = min(0.85, max(0.15, -m_lo / (m_hi - m_lo)))
        mid = round(lo * (hi / lo) ** t)
        if mid <= lo or mid >= hi:
            mid = round(math.sqrt(lo * hi))
            if mid <= lo or mid >= hi:
                break
        ok, margin, candidate = evaluate(mid)
        if ok:
            hi, m_hi, best = mid, margin, candidate
        else:
            lo, m_lo = mid, margin
    return hi, best


def search_budget(
    result: ExtractionResult,
    ceiling: RankPolicy,
    target: FidelityTarget,
    measure: Callable[[LoraAdapter | None], tuple[float, ...]],
    *,
    base: tuple[float, float] | None = None,
    floor: tuple[float, float] = (0.0, 1.0),
    floor_decisive: float | None = None,
    on_step: Callable[[SearchStep], None] | None = None,
    steps: list[SearchStep] | None = None,
    below: tuple[int, float | None] | None = None,
    cap_note: str = "",
) -> tuple[int, ExtractionResult, list[SearchStep]]:
    """Bisect the global budget (:func:`bisect_budget`) for the smallest one whose adapter meets ``target``.

    Args:
        result: an extraction that kept its factors up to ``ceiling``'s caps.
        ceiling: the policy bounding every module's rank (``max_rank``, ``snap``).
        measure: (KL, top-1) of an adapter (None: the base alone) against the fine-tune, and optionally
            the share of the fine-tune's decisive choices it makes (None: too few on the probes).
        base: the base model's (KL, top-1), if already measured.
        floor: (KL, top-1) of base + every linear delta at full rank (:func:`measure_floor`), which
            recovery is relative to; the default, a perfect floor, gives the raw recovery.
        floor_decisive: the share of the decisive choices the floor makes (None: recovery in KL and top-1).
        steps: where to append the steps tried (measurements are shared by parameter count).
        below: a budget known to miss the target, and its margin (see :func:`bisect_budget`).

    Returns:
        (chosen budget, the extraction truncated to it, the steps tried in order).

    Raises:
        OptionError: even every module at its cap misses the target.
    """
    base = base if base is not None else _kl_top1(measure(None))
    steps = steps if steps is not None else []
    first = len(steps)
    measured: dict[int, tuple[float, ...]] = {}  # by parameter count: budgets that give the same adapter

    def judge(budget: int, candidate: ExtractionResult) -> Verdict:
        params = candidate.adapter.num_parameters()
        if params not in measured:
            measured[params] = measure(candidate.adapter)
        kl, top1, *more = measured[params]
        share = more[0] if more else None
        decisive = decisive_recovery(share, floor_decisive) if share is not None and floor_decisive else None
        met = target.met(kl, top1, base, floor, decisive)
        step = SearchStep(
            budget, params, kl, top1, met, *recovery(kl, top1, *base, *floor), *recovery(kl, top1, *base), share,
            decisive,
        )  # fmt: skip
        steps.append(step)
        log.info(
            "budget %s → %s params: KL %.4g, top-1 %.2f%%, recovery %.1f%% / %.1f%% of the reachable gap "
            "(raw %.1f%% / %.1f%%; base alone: KL %.4g, top-1 %.2f%%; floor: KL %.4g, top-1 %.2f%%, "
            "reachable %.1f%% / %.1f%% of the gap); decisive choices kept %s %s",
            f"{budget:,}", f"{params:,}", kl, 100 * top1, 100 * step.recovery_kl, 100 * step.recovery_top1,
            100 * step.raw_recovery_kl, 100 * step.raw_recovery_top1, base[0], 100 * base[1], floor[0],
            100 * floor[1], *(100 * r for r in recovery(*floor, *base)),
            "–" if decisive is None else f"{decisive:.1%}", "meets" if met else "misses",
        )  # fmt: skip
        if on_step:
            on_step(step)
        return step.met, target.margin(kl, top1, base, floor, decisive)

    found = bisect_budget(result, ceiling, judge, tolerance=target.tolerance, max_steps=target.max_steps, below=below)
    if found is None:
        raise _out_of_reach(target, steps[first], ceiling, cap_note)
    return found[0], found[1], steps


def _out_of_reach(target: FidelityTarget, top_step: SearchStep, ceiling: RankPolicy, cap_note: str) -> OptionError:
    """The error for a target that every module at ``ceiling``'s cap (``top_step``) still misses."""
    decisive = "" if top_step.recovery_decisive is None else f"decisive choices kept {top_step.recovery_decisive:.1%}, "
    return OptionError(
        "the fidelity target is out of reach at the rank cap",
        where=FIDELITY_FLAGS,
        expected=target.describe(),
        found=f"KL {top_step.kl:.4g}, top-1 {top_step.top1:.2%} ({decisive}recovery {top_step.recovery_kl:.1%} / "
        f"{top_step.recovery_top1:.1%} of the reachable gap, raw {top_step.raw_recovery_kl:.1%} / "
        f"{top_step.raw_recovery_top1:.1%}) with every module at rank ≤ "
        f"{ceiling.max_rank or 'the default cap'} ({top_step.params:,} parameters){cap_note}",
        fix="raise --max-rank or loosen the target"
        + (
            "; an absolute target also counts the part of the gap no adapter carries (embeddings, norms), "
            "--target-recovery is relative to what an adapter can reach"
            if target.absolute
            else ""
        ),
    )


def _kl_top1(measured: tuple[float, ...]) -> tuple[float, float]:
    return measured[0], measured[1]


# Self-probe samples kept out of the search, to check the chosen adapter on.
HELD_OUT = 8


@dataclass
class Probes:
    """What the search measures on, what the chosen adapter is checked on, and the models behind them."""

    search: Any  # FidelityProbe
    check: Any | None  # FidelityProbe on the fine-tune's own samples, never searched on
    source: str
    count: int
    seconds: float
    finetuned_model: Any = None  # kept until the floor is measured, then dropped


def run_to_target(
    job: Any,  # pipeline.Planned
    pair: Any,  # pipeline.PlannedPair
    *,
    progress: Callable[[str], None] | None = None,
) -> SearchOutcome:
    """The smallest budget meeting ``job.options.target``, decomposing only as far as it needs.

    The probes are built once (the fine-tune's log-probs on them cached), the base alone and the floor
    are measured once, and each candidate is applied by patching the base model's weights in place.
    The fine-tune is decomposed to the first cap of :func:`search_ceilings`; only if every module at that
    cap misses the target is it decomposed to the next. The chosen adapter is then checked on
    held-out samples of the fine-tune (:func:`check_on_own_samples`).
    """
    from phlora_nim.jobs.fidelity import WeightPatcher

    target = job.options.target
    ceilings = search_ceilings(job.options.policy)
    probes = _probes(job.base_path, pair.path, target)
    timings: dict[str, float] = {"probes_s": probes.seconds, "decompose_s": 0.0}
    probe = probes.search
    patcher = WeightPatcher(probe.base_model)
    evaluated: list[float] = []
    measure = functools.partial(_measure_candidate, probe, patcher, evaluated)
    base = _measure_base(patcher, probes, target)
    t0 = time.perf_counter()
    floor_scores = _measure_floors(patcher, probes, job, pair, target, base)
    floors = tuple((s.kl, s.top1) if s is not None else None for s in floor_scores)
    floor_decisive = _floor_decisive(probe, floor_scores[0], target)
    timings["floor_s"] = time.perf_counter() - t0
    steps: list[SearchStep] = []
    below: tuple[int, float | None] | None = None
    found = None
    decomposed: list[int] = []
    for i, ceiling in enumerate(ceilings):
        t0 = time.perf_counter()
        result = _decompose_to(job, pair, ceiling, progress=progress)
        timings["decompose_s"] += time.perf_counter() - t0
        decomposed.append(cap := int(ceiling.max_rank or 0))
        floor = floors[0] if not target.absolute else (0.0, 1.0)
        if below is None:
            # The base alone misses (checked above); it makes none of the decisive choices.
            below = (0, target.margin(*base, base, floor, 0.0 if floor_decisive else None))
        try:
            budget, chosen, _ = search_budget(
                result, ceiling, target, measure, base=base, floor=floor, floor_decisive=floor_decisive, steps=steps,
                below=below,
                cap_note="" if not decomposed[:-1] else f" (decomposed to ranks {', '.join(map(str, decomposed))})",
            )  # fmt: skip
            found = (budget, chosen, ceiling)
            break
        except OptionError:
            if i == len(ceilings) - 1:
                raise
            top = next(s for s in reversed(steps))
            below = (top.budget, target.margin(top.kl, top.top1, base, floor, top.recovery_decisive))
            log.info("every module at rank %d misses the target: decomposing to rank %d", cap, ceilings[i + 1].max_rank)
    assert found is not None and floors is not None
    budget, chosen, ceiling = found
    timings |= {"evaluate_s": sum(evaluated), "evaluations": len(evaluated)}
    chosen_step = next(s for s in reversed(steps) if s.budget == budget)
    check = check_on_own_samples(patcher, probes, chosen, chosen_step, base, floor_scores, target)
    patcher.restore()
    return SearchOutcome(
        budget=budget,
        result=chosen,
        policy=ceiling.at_budget(budget),
        steps=tuple(steps),
        tokens=probe.tokens,
        prompts=probes.source,
        base_kl=base[0],
        base_top1=base[1],
        floor=floors[0] if not target.absolute else None,
        floor_decisive=floor_decisive,
        decisive_positions=probe.decisive_positions,
        check=check,
        decomposed_to=tuple(decomposed),
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def _floor_decisive(probe: Any, floor: Any, target: FidelityTarget) -> float | None:
    """The floor's share of the decisive choices, what a recovery target is then relative to; None (the
    KL / top-1 recovery instead) for an absolute target, or where the probes hold fewer than
    :data:`MIN_DECISIVE` decisive choices to size by."""
    return floor.decisive if probe.decisive_positions >= MIN_DECISIVE and not target.absolute else None


def _measure_candidate(
    probe: Any, patcher: Any, seconds: list[float], adapter: LoraAdapter | None
) -> tuple[float, float, float | None]:
    """KL, top-1 and the share of decisive choices made (None: too few on the probe) of the base with
    ``adapter`` patched in (None: the base alone); its time appended to ``seconds``."""
    t0 = time.perf_counter()
    scores = probe.scores(patcher.apply(adapter))
    seconds.append(time.perf_counter() - t0)
    return scores.kl, scores.top1, scores.decisive


def _measure_base(patcher: Any, probes: Any, target: FidelityTarget) -> tuple[float, float]:
    """KL and top-1 of the base model alone on the search probes; refused when the probes cannot tell."""
    probe = probes.search
    patcher.restore()
    scores = probe.base_scores()
    base = (scores.kl, scores.top1)
    log.info(
        "fidelity target %s on %d %s (%d scored tokens, %d decisive choices of the fine-tune); base model "
        "alone: KL %.4g, top-1 %.2f%%",
        target.describe(), probes.count, probes.source, probe.tokens, probe.decisive_positions, base[0], 100 * base[1],
    )  # fmt: skip
    check_informative(target, *base, source=probes.source, tokens=probe.tokens)
    return base


def _measure_floors(
    patcher: Any, probes: Probes, job: Any, pair: Any, target: FidelityTarget, base: Any
) -> tuple[Any, Any]:
    """The floor (base + every linear delta at full rank) on the probes; refused when it leaves no gap.
    The fine-tuned model the probes were sampled from is dropped once it is measured."""
    floors = _floors(patcher, probes, pair.plan.targets, save_biases=job.options.non_linear_deltas == "save")
    probes.finetuned_model = None
    search = floors[0]
    log.info(
        "floor (base + every linear delta at full rank): KL %.4g, top-1 %.2f%%, decisive choices made %s of %d",
        search.kl, 100 * search.top1, "–" if search.decisive is None else f"{search.decisive:.1%}",
        search.decisive_positions,
    )  # fmt: skip
    if not target.absolute:
        check_reachable(base, (search.kl, search.top1), source=probes.source, tokens=probes.search.tokens)
    return floors


def _decompose_to(job: Any, pair: Any, ceiling: RankPolicy, *, progress: Callable[[str], None] | None) -> Any:
    """``pair`` decomposed up to ``ceiling`` (its plan's sketch ranks were sized for the policy's own cap:
    compute only as far as this one)."""
    from phlora_nim.converters.extract import run_extraction

    options = dataclasses.replace(job.options, policy=ceiling)
    targets = tuple(dataclasses.replace(t, sketch_rank=ceiling.sketch_rank(t.short_side)) for t in pair.plan.targets)
    plan = dataclasses.replace(pair.plan, targets=targets)
    return run_extraction(plan, job.base, pair.checkpoint, options, progress=progress, statistics=job.statistics)


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


def _floors(patcher: Any, probes: Probes, targets: Any, *, save_biases: bool) -> Any:
    """The :class:`~phlora_nim.jobs.fidelity.ProbeScores` of the floor, base + every linear delta of
    ``targets`` at full rank (and, with ``save_biases``, their bias changes, as ``--extra save`` carries
    them), on the search probe and on the check probe (None without one). The deltas come from the
    fine-tuned model already in memory, one module at a time, added in place: no pass over the checkpoints."""
    ft = probes.finetuned_model
    base = patcher.model

    def delta(module: str) -> torch.Tensor:
        return ft.get_submodule(module).weight.detach() - base.get_submodule(module).weight.detach()

    weights = ((t.module, delta(t.module)) for t in targets)
    biases = {}
    for t in targets if save_biases else ():
        b, f = base.get_submodule(t.module).bias, ft.get_submodule(t.module).bias
        if b is not None and f is not None and not torch.equal(b, f):
            biases[t.module] = (f - b).detach()
    model = patcher.apply(None, full=weights, biases=biases)
    out = [probes.search.scores(model)]
    out.append(probes.check.scores(model) if probes.check is not None else None)
    patcher.restore()
    return tuple(out)


def _probes(base: Path, finetuned: Path, target: FidelityTarget) -> Probes:
    """The probes for ``target``: self-probes (the search's and held-out ones), or prompts (a file,
    or the shipped generic ones) with self-probes held out to check on."""
    from phlora_nim.jobs.fidelity import generic_prompts_path, load_pair, prompts_probe
    from phlora_nim.jobs.self_probes import SelfProbeSettings, self_probe_sets

    t0 = time.perf_counter()
    purpose = "--self-probes" if target.on_self_probes else "the fidelity prompts"
    tokenizer, base_model, ft_model = load_pair(base, finetuned, purpose=purpose)
    if target.on_self_probes:
        search, check = self_probe_sets(base_model, ft_model, tokenizer, held_out=HELD_OUT)
        source, count = SELF_PROBES_SOURCE, len(search.sequences)
    else:
        generic = target.prompts == GENERIC
        prompts_file = generic_prompts_path() if generic else Path(str(target.prompts))
        prompts = read_prompts(prompts_file, where="--prompts")
        source = f"(generic, shipped) {prompts_file.name}" if generic else str(prompts_file)
        search, count = prompts_probe(base_model, ft_model, tokenizer, prompts), len(prompts)
        check, _ = self_probe_sets(base_model, ft_model, tokenizer, SelfProbeSettings(keep=HELD_OUT))
    seconds = time.perf_counter() - t0
    return Probes(search=search, check=check, source=source, count=count, seconds=seconds, finetuned_model=ft_model)
