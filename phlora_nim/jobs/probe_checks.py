"""The checks that refuse a fidelity search whose probes cannot size an adapter.

Before the search: probes on which the fine-tune hardly differs from its base, or on which the base
alone meets an absolute target (:func:`check_informative`), and a reachable gap too small to measure
(:func:`check_reachable`). After it: the chosen adapter, checked on samples of the fine-tune the
search never saw, must keep there a good part of what it kept on its probes (:func:`check_on_own_samples`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from phlora_nim.converters.rank_policy import FidelityTarget, decisive_recovery, kept_share
from phlora_nim.core.errors import InputError

if TYPE_CHECKING:  # annotations only: the search imports these checks
    from phlora_nim.converters.extract import ExtractionResult
    from phlora_nim.jobs.target_kl import Probes, SearchStep

log = logging.getLogger("phlora_nim.target")

# Below this mean KL(fine-tuned ‖ base) per scored token (nats) the probes barely see the
# fine-tune: a bf16 round trip of the same weights is ~1e-3, a task fine-tune on its own task
# is usually > 0.1, so recovery measured under 0.02 is mostly noise.
MIN_GAP_KL = 0.02
FIDELITY_FLAGS = "--target-recovery/--target-kl/--target-top1"
# The chosen adapter must keep, on the fine-tune's own held-out samples, at least this share of the
# recovery it showed on the probes it was chosen on; else the probes missed what the fine-tune changed.
CHECK_MIN_SHARE = 0.5


def check_on_own_samples(
    patcher: Any,
    probes: Probes,
    chosen: ExtractionResult,
    step: SearchStep,
    base: tuple[float, float],
    floors: Any,
    target: FidelityTarget,
) -> dict[str, Any]:
    """Check the chosen adapter on the fine-tune's own samples the search never saw: the share of the
    fine-tune's decisive choices it makes there (else of the reachable gap it closes), and how often it
    continues them exactly as the fine-tune would.

    ``floors``: the floor's :class:`~phlora_nim.jobs.fidelity.ProbeScores` on the search and the check probes.

    Raises:
        InputError: it keeps less than :data:`CHECK_MIN_SHARE` of the recovery the search probes
            showed: they do not exercise what the fine-tune changed, and the adapter would keep little
            of it.
    """
    check = probes.check
    if check is None or floors[1] is None:
        return {"checked": False, "why": "no held-out samples"}
    patcher.restore()
    own_base = check.base_scores()
    own = check.scores(patcher.apply(chosen.adapter))
    patcher.restore()
    floor, search_floor = floors[1], floors[0]
    own_decisive = (
        decisive_recovery(own.decisive, floor.decisive) if own.decisive is not None and floor.decisive else None
    )
    kept = kept_share(own.kl, own.top1, (own_base.kl, own_base.top1), (floor.kl, floor.top1), own_decisive)
    decisive = None if target.absolute else step.recovery_decisive
    shown = kept_share(step.kl, step.top1, base, (search_floor.kl, search_floor.top1), decisive)
    report = {
        "checked": True,
        "samples": len(check.sequences),
        "tokens": check.tokens,
        "decisive_positions": own.decisive_positions,
        "base_alone": {"kl": own_base.kl, "top1": own_base.top1, "greedy_same": own_base.greedy},
        "floor": {"kl": floor.kl, "top1": floor.top1, "decisive": floor.decisive},
        "adapter": {"kl": own.kl, "top1": own.top1, "greedy_same": own.greedy, "decisive": own.decisive},
        "recovery": kept,
        "recovery_decisive": own_decisive,
        "recovery_on_probes": shown,
        "min_share": CHECK_MIN_SHARE,
        "probe_gap_kl": base[0],  # what the search probes see of the fine-tune's change …
        "own_samples_gap_kl": own_base.kl,  # … and what its own samples show
    }
    measured = "decisive choices kept" if own_decisive is not None else "recovery"
    log.info(
        "check on %d held-out samples of the fine-tune: %s %.1f%% (on the probes %.1f%%); greedy "
        "continuations reproduced %.0f%% (base alone %.0f%%)",
        len(check.sequences), measured, 100 * kept, 100 * shown, 100 * own.greedy, 100 * own_base.greedy,
    )  # fmt: skip
    if own_decisive is None and own_base.kl - floor.kl < MIN_GAP_KL:
        return {**report, "passed": True, "why": "the fine-tune's own samples show no gap an adapter can close"}
    if kept < CHECK_MIN_SHARE * shown:
        raise InputError(
            "the adapter chosen on these probes keeps little of what the fine-tune changed: the probes do not "
            "exercise it",
            where=FIDELITY_FLAGS,
            expected=f"on the fine-tune's own samples, at least {CHECK_MIN_SHARE:.0%} of the recovery the probes "
            f"showed ({shown:.1%})",
            found=f"{measured} {kept:.1%} on {len(check.sequences)} held-out samples of the fine-tune (KL "
            f"{own.kl:.4g} against {own_base.kl:.4g} for the base alone; greedy continuations reproduced "
            f"{own.greedy:.0%}, base alone {own_base.greedy:.0%}); the probes ({probes.source}) show a gap of KL "
            f"{base[0]:.4g}, the fine-tune's own samples {own_base.kl:.4g}",
            fix="drop --prompts to size on the fine-tune's own samples (the default), or give prompts of the "
            "fine-tune's task",
        )
    if kept < shown - 0.1:
        log.warning(
            "the chosen adapter keeps %.1f%% on the fine-tune's own held-out samples, less than the %.1f%% it "
            "keeps on the probes it was chosen on",
            100 * kept, 100 * shown,
        )  # fmt: skip
    return {**report, "passed": True}


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
