"""Options ``extract`` and ``convert`` share (``prune`` the rank policy's): how ranks are chosen (a policy or
a fidelity target) and how the decomposition runs. Each class is one flag table (see ``cli/flags.py``);
:func:`extract_options` turns them into the converter's ``ExtractOptions``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phlora_nim.cli.flags import option
from phlora_nim.converters.rank_policy import (
    BUDGET,
    DECISIVE_P,
    DEFAULT_RANK,
    DEFAULT_RECOVERY,
    ENERGY,
    GENERIC_PROMPTS,
    MAX_KL,
    MAX_RANK,
    MIN_DECISIVE,
    MIN_RECOVERY,
    MIN_TOP1,
    RANK,
    RankPolicy,
    RankRequest,
    choose_ranks,
)

if TYPE_CHECKING:
    from phlora_nim.converters.extract import ExtractOptions

RANK_PANEL = "Rank policy (choose one)"
FIDELITY_PANEL = "Fidelity (instead of a rank policy)"


@dataclass(frozen=True)
class RankFlags:
    """A rank policy: one of --rank, --energy, --budget-params, with --max-rank and --snap-ranks."""

    rank: int | None = option(
        "--rank", "Same rank R for every module.", default=None, short="-r", panel=RANK_PANEL, bound=RANK
    )
    energy: float | None = option(
        "--energy",
        "Per module, the smallest rank keeping ≥ F of its delta energy ‖ΔW‖²_F (0 < F ≤ 1).",
        default=None,
        panel=RANK_PANEL,
        bound=ENERGY,
    )
    budget_params: int | None = option(
        "--budget-params",
        "One global budget of N LoRA parameters, spent where it buys the most energy: ranks differ per "
        "module. The default --layout padded stores every module at the largest rank (zero-padded, what vLLM "
        "needs); --layout mixed stores the true ranks.",
        default=None,
        panel=RANK_PANEL,
        bound=BUDGET,
    )
    max_rank: int | None = option(
        "--max-rank",
        "Cap per module for --energy/--budget-params (default 256).",
        default=None,
        panel=RANK_PANEL,
        bound=MAX_RANK,
    )
    snap_ranks: str | None = option(
        "--snap-ranks",
        "Round ranks up to a server's allowed set: 'vllm' = {1,8,16,32,64,128,256,320,512}.",
        default=None,
        panel=RANK_PANEL,
    )

    def policy(self) -> RankPolicy:
        """The policy given (exactly one of rank, energy and budget must be)."""
        return choose_ranks(self.request(), default_rank=None)[0]

    def request(self, fidelity: FidelityFlags | None = None) -> RankRequest:
        """What these flags (and ``fidelity``'s) ask of the ranks."""
        target = fidelity or FidelityFlags()
        return RankRequest(
            rank=self.rank,
            energy=self.energy,
            budget_params=self.budget_params,
            max_rank=self.max_rank,
            snap=self.snap_ranks,
            max_kl=target.target_kl,
            min_top1=target.target_top1,
            min_recovery=target.target_recovery,
            prompts=str(target.prompts) if target.prompts is not None else None,
            self_probes=target.self_probes,
        )


@dataclass(frozen=True)
class FidelityFlags:
    """A fidelity target: the smallest adapter meeting a bound on probes (instead of a rank policy)."""

    target_recovery: float | None = option(
        "--target-recovery",
        "Smallest global budget whose adapter keeps ≥ F of the fine-tune's decisive choices on the probes (the "
        "fine-tune's own samples unless --prompts is given): the tokens it picks with probability ≥ "
        f"{DECISIVE_P} where its base would pick another, relative to the floor, base + every linear delta at full "
        f"rank. Where the probes hold fewer than {MIN_DECISIVE} such choices: closes ≥ F of the reachable "
        "base→fine-tune gap, (KL_base − KL_adapter)/(KL_base − KL_floor), and the same for top-1 disagreement (0–1; "
        f"default {DEFAULT_RECOVERY} with --prompts or --self-probes and no other target).",
        default=None,
        panel=FIDELITY_PANEL,
        bound=MIN_RECOVERY,
    )
    target_kl: float | None = option(
        "--target-kl",
        "Smallest global budget whose adapter keeps mean KL(fine-tuned ‖ base+adapter) ≤ X per token on "
        "the probes (decomposed to rank 16, then 64, then --max-rank only as far as the target needs).",
        default=None,
        panel=FIDELITY_PANEL,
        bound=MAX_KL,
    )
    target_top1: float | None = option(
        "--target-top1",
        "Smallest global budget whose adapter agrees with the fine-tune's top-1 token on ≥ Y of the scored "
        "tokens (0–1); with --target-kl, both must hold.",
        default=None,
        panel=FIDELITY_PANEL,
        bound=MIN_TOP1,
    )
    prompts: Path | None = option(
        "--prompts",
        "Prompts of the fine-tune's task for the fidelity target, one per line, scored on the fine-tune's "
        "own greedy answers (default: the fine-tune's own samples, see --self-probes). 'generic': about 30 "
        "generic prompts shipped with phlora-nim, which rarely exercise what a task fine-tune learned. Either way "
        "the chosen adapter is checked on held-out samples of the fine-tune and refused (exit 2) if it keeps "
        "less than half there of what it keeps on the prompts.",
        default=None,
        panel=FIDELITY_PANEL,
    )
    self_probes: bool = option(
        "--self-probes",
        "Measure the fidelity target on short continuations sampled from the fine-tune itself, kept "
        "where it disagrees most with its base (no data needed). The default for every target unless --prompts "
        f"is given; alone, it asks for --target-recovery {DEFAULT_RECOVERY}.",
        default=False,
        panel=FIDELITY_PANEL,
    )


@dataclass(frozen=True)
class DecompositionFlags:
    """Where and how the deltas are decomposed."""

    device: str = option("--device", "cpu or cuda[:N] for the decomposition.", default="cpu")
    calibration: Path | None = option(
        "--calibration",
        "Prompts file (one per line): decompose each ΔW weighted by the base model's input activations "
        "on them (whitened SVD), minimising the adapter's output error rather than its weight error.",
        default=None,
    )
    allow_mismatch: bool = option(
        "--allow-mismatch",
        "Extract even when the fine-tune does not look like one of this base (config fields no adapter can "
        "carry differ, e.g. rope_theta, or the weights are unrelated: median cosine(W_base, W_ft) < 0.2).",
        default=False,
    )
    threads: int | None = option(
        "--threads",
        "torch threads for the extraction (default: $PHLORA_THREADS, else the CPUs this process may use: "
        "affinity mask and cgroup quota).",
        default=None,
    )


def extract_options(
    rank: RankFlags, fidelity: FidelityFlags, decomposition: DecompositionFlags, **more: Any
) -> ExtractOptions:
    """The converter's ``ExtractOptions`` of these flags (``more``: further fields, e.g. ``exact``, ``dtype``).

    Prompt files are read here, to refuse a bad one before any heavy work.
    """
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.converters.extract import ExtractOptions

    policy, target = choose_ranks(rank.request(fidelity), default_rank=DEFAULT_RANK)
    if target is not None and fidelity.prompts is not None and str(fidelity.prompts) != GENERIC_PROMPTS:
        read_prompts(fidelity.prompts)
    if decomposition.calibration is not None:
        read_prompts(decomposition.calibration, where="--calibration")
    return ExtractOptions(
        policy=policy,
        target=target,
        calibration=decomposition.calibration,
        device=decomposition.device,
        allow_mismatch=decomposition.allow_mismatch,
        threads=decomposition.threads,
        **more,
    )
