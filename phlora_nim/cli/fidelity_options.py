"""Options shared by ``extract`` and ``convert`` for fidelity-driven and activation-aware extraction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from phlora_nim.converters.errors import OptionError

if TYPE_CHECKING:
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import FidelityTarget, RankPolicy

_PANEL = "Fidelity (instead of a rank policy)"

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
        help="Prompts for --target-kl/--target-top1, one per line (default: generic prompts shipped with "
        "phlora-nim; no task data). Scored on the fine-tune's own greedy answers.",
        rich_help_panel=_PANEL,
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
    rank: int | None,
    energy: float | None,
    budget: int | None,
    max_rank: int | None,
    snap: str | None,
) -> tuple[FidelityTarget | None, RankPolicy | None]:
    """The fidelity target of the options, and the policy bounding its search (None, None: no target)."""
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.converters.rank_policy import FidelityTarget, search_policy

    if target_kl is None and target_top1 is None:
        if prompts is not None:
            raise OptionError(
                "--prompts needs a fidelity target",
                where="--prompts",
                expected="--target-kl and/or --target-top1 with it",
                fix="add --target-kl X, or drop --prompts",
            )
        return None, None
    chosen = [n for n, v in (("--rank", rank), ("--energy", energy), ("--budget-params", budget)) if v is not None]
    if chosen:
        raise OptionError(
            "a fidelity target chooses the ranks itself",
            where=", ".join(chosen),
            expected="no rank policy with --target-kl/--target-top1 (only --max-rank, --snap-ranks)",
            found=", ".join(chosen),
            fix="drop the rank policy, or drop the target",
        )
    if prompts is not None:
        read_prompts(prompts)  # refuse a bad file before any heavy work
    target = FidelityTarget(max_kl=target_kl, min_top1=target_top1, prompts=str(prompts) if prompts else None)
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
    **more: object,
) -> ExtractOptions:
    """``ExtractOptions`` from the rank-policy, fidelity and calibration options of ``extract`` / ``convert``.

    ``more``: further ``ExtractOptions`` fields (device, exact, dtype …).
    """
    from phlora_nim.cli.app import rank_policy
    from phlora_nim.converters.extract import ExtractOptions

    target, ceiling = fidelity_target(
        target_kl, target_top1, prompts, rank=rank, energy=energy, budget=budget, max_rank=max_rank, snap=snap
    )
    return ExtractOptions(
        policy=ceiling or rank_policy(rank, energy, budget, max_rank, snap, default_rank=16),
        target=target,
        calibration=calibration_file(calibration),
        **more,  # type: ignore[arg-type]
    )
