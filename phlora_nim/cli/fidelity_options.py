"""Options shared by ``extract`` and ``convert`` for fidelity-driven and activation-aware extraction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from phlora_nim.core.errors import OptionError

if TYPE_CHECKING:
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import FidelityTarget, RankPolicy

_PANEL = "Fidelity (instead of a rank policy)"

# The kind of target given --prompts or --self-probes without a fidelity-target flag.
DEFAULT_RECOVERY = 0.9

TargetRecoveryOpt = Annotated[
    float | None,
    typer.Option(
        "--target-recovery",
        help="Smallest global budget whose adapter closes ≥ F of the reachable base→fine-tune gap on the probes: "
        "(KL_base − KL_adapter)/(KL_base − KL_floor) ≥ F, the floor being base + every linear delta at full "
        "rank, and the same for top-1 disagreement; the raw share of the whole gap is reported beside it (0–1; "
        f"default {DEFAULT_RECOVERY} with --prompts or --self-probes and no other target).",
        rich_help_panel=_PANEL,
    ),
]
SelfProbesOpt = Annotated[
    bool,
    typer.Option(
        "--self-probes",
        help="Measure the fidelity target on short continuations sampled from the fine-tune itself, kept "
        "where it disagrees most with its base (no data needed; instead of --prompts).",
        rich_help_panel=_PANEL,
    ),
]
TargetKlOpt = Annotated[
    float | None,
    typer.Option(
        "--target-kl",
        help="Smallest global budget whose adapter keeps mean KL(fine-tuned ‖ base+adapter) ≤ X per token on "
        "the prompts (bisection over the budget; spectra computed once up to --max-rank).",
        rich_help_panel=_PANEL,
    ),
]
TargetTop1Opt = Annotated[
    float | None,
    typer.Option(
        "--target-top1",
        help="Smallest global budget whose adapter agrees with the fine-tune's top-1 token on ≥ Y of the scored "
        "tokens (0–1); with --target-kl, both must hold.",
        rich_help_panel=_PANEL,
    ),
]
PromptsOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="Prompts for the fidelity target, one per line (default: generic prompts shipped with "
        "phlora-nim; no task data, refused when they barely tell the fine-tune from its base). Scored on the "
        "fine-tune's own greedy answers.",
        rich_help_panel=_PANEL,
    ),
]
AllowMismatchOpt = Annotated[
    bool,
    typer.Option(
        "--allow-mismatch",
        help="Extract even when the fine-tune does not look like one of this base (config fields no adapter can "
        "carry differ, e.g. rope_theta, or the weights are unrelated: median cosine(W_base, W_ft) < 0.2).",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="torch threads for the extraction (default: $PHLORA_THREADS, else the CPUs this process may use: "
        "affinity mask and cgroup quota).",
    ),
]
CalibrationOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibration",
        help="Prompts file (one per line): decompose each ΔW weighted by the base model's input activations "
        "on them (whitened SVD), minimising the adapter's output error rather than its weight error.",
    ),
]


def fidelity_target(
    target_kl: float | None,
    target_top1: float | None,
    prompts: Path | None,
    *,
    target_recovery: float | None = None,
    self_probes: bool = False,
    rank: int | None,
    energy: float | None,
    budget: int | None,
    max_rank: int | None,
    snap: str | None,
) -> tuple[FidelityTarget | None, RankPolicy | None]:
    """The fidelity target of the options, and the policy bounding its search (None, None: no target)."""
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.converters.rank_policy import FidelityTarget, search_policy

    if target_kl is None and target_top1 is None and target_recovery is None:
        if prompts is None and not self_probes:
            return None, None
        target_recovery = DEFAULT_RECOVERY
    chosen = [n for n, v in (("--rank", rank), ("--energy", energy), ("--budget-params", budget)) if v is not None]
    if chosen:
        raise OptionError(
            "a fidelity target chooses the ranks itself",
            where=", ".join(chosen),
            expected="no rank policy with --target-recovery/--target-kl/--target-top1 (only --max-rank, --snap-ranks)",
            found=", ".join(chosen),
            fix="drop the rank policy, or drop the target",
        )
    if prompts is not None:
        read_prompts(prompts)  # refuse a bad file before any heavy work
    target = FidelityTarget(
        max_kl=target_kl,
        min_top1=target_top1,
        prompts=str(prompts) if prompts else None,
        min_recovery=target_recovery,
        self_probes=self_probes,
    )
    return target, search_policy(max_rank, snap)  # type: ignore[arg-type]


def calibration_file(calibration: Path | None) -> Path | None:
    """``--calibration``, checked before any heavy work."""
    if calibration is not None:
        from phlora_nim.converters.calibration import read_prompts

        read_prompts(calibration, where="--calibration")
    return calibration


def extraction_options(
    *,
    rank: int | None,
    energy: float | None,
    budget: int | None,
    max_rank: int | None,
    snap: str | None,
    target_kl: float | None,
    target_top1: float | None,
    prompts: Path | None,
    calibration: Path | None,
    target_recovery: float | None = None,
    self_probes: bool = False,
    **more: object,
) -> ExtractOptions:
    """``ExtractOptions`` from the rank-policy, fidelity and calibration options of ``extract`` / ``convert``.

    ``more``: further ``ExtractOptions`` fields (device, exact, dtype …).
    """
    from phlora_nim.cli.app import rank_policy
    from phlora_nim.converters.extract import ExtractOptions

    target, ceiling = fidelity_target(
        target_kl,
        target_top1,
        prompts,
        target_recovery=target_recovery,
        self_probes=self_probes,
        rank=rank,
        energy=energy,
        budget=budget,
        max_rank=max_rank,
        snap=snap,
    )
    return ExtractOptions(
        policy=ceiling or rank_policy(rank, energy, budget, max_rank, snap, default_rank=16),
        target=target,
        calibration=calibration_file(calibration),
        **more,  # type: ignore[arg-type]
    )
