"""Rank policies: how many singular directions each module keeps.

Planning is separate from decomposing: a policy says how many triplets to compute per module
(``sketch_rank``) and, once spectra are known, the final rank of every module (``assign``).
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from phlora_nim.core.bounds import Bound, at_least_one, share
from phlora_nim.core.errors import OptionError
from phlora_nim.engines.registry import ENGINES, engine

if TYPE_CHECKING:  # annotations only: choosing a rank from flags needs no torch
    from phlora_nim.converters.decompose import Factors

# vLLM's --max-lora-rank accepts only these; adapters with other ranks must be padded up.
VLLM_RANKS: tuple[int, ...] = engine("vllm").lora_ranks
DEFAULT_MAX_RANK = 256
# The policy when none of rank, energy, budget or a fidelity target is given.
DEFAULT_RANK = 16
# The kind of target given probes (--prompts, --self-probes) without a bound.
DEFAULT_RECOVERY = 0.98
# A decisive choice of the fine-tune: a scored position where it puts at least this probability on a
# token its base would not pick first. What a task fine-tune learned (an answer's form, an injected
# fact) shows as such choices; the diffuse drift of a full fine-tune on uncertain tokens does not, and
# it is what dominates a KL over every token.
DECISIVE_P = 0.9
# Fewer decisive positions than this on the probes a search runs on: too few to size an adapter by.
MIN_DECISIVE = 16
GENERIC_PROMPTS = "generic"  # prompts "generic": the prompts shipped with phlora-nim

# What each number may be: checked here and by the CLI's flag rows, one text for both.
RANK = at_least_one("rank must be positive")
ENERGY = share("energy must be a share of the delta's energy", "0.9")
BUDGET = at_least_one("parameter budget must be positive")
MAX_RANK = at_least_one("max rank must be positive")
MAX_KL = Bound("KL target must be positive", "a number > 0 (nats per token), e.g. 0.05", low=0.0, low_open=True)
MIN_TOP1 = share("top-1 target must be a share of tokens", "0.95")
MIN_RECOVERY = share("recovery target must be a share of what the fine-tune changed", "0.95")


@dataclass(frozen=True)
class RankPolicy:
    """Exactly one of ``rank``, ``energy`` or ``budget_params``, plus an optional ``max_rank`` cap.

    Example:
        >>> RankPolicy(energy=0.9, max_rank=64).kind
        'energy'
    """

    rank: int | None = None
    energy: float | None = None
    budget_params: int | None = None
    max_rank: int | None = None
    snap: Literal["vllm"] | None = None

    def __post_init__(self) -> None:
        chosen = [
            n
            for n, v in (("--rank", self.rank), ("--energy", self.energy), ("--budget-params", self.budget_params))
            if v is not None
        ]
        if len(chosen) != 1:
            raise OptionError(
                "choose exactly one rank policy",
                where="rank options",
                expected="one of --rank, --energy, --budget-params",
                found=", ".join(chosen) if chosen else "none",
            )
        RANK.check(self.rank, "--rank")
        ENERGY.check(self.energy, "--energy")
        BUDGET.check(self.budget_params, "--budget-params")
        MAX_RANK.check(self.max_rank, "--max-rank")
        if self.rank is not None and self.max_rank is not None and self.rank > self.max_rank:
            raise OptionError(
                "--rank exceeds --max-rank", where="--rank", expected=f"≤ {self.max_rank}", found=str(self.rank)
            )
        if self.snap is not None and not snap_ranks(self.snap):
            raise OptionError(
                "unknown rank snapping",
                where="--snap-ranks",
                expected=" or ".join(row.name for row in ENGINES if row.lora_ranks),
                found=str(self.snap),
            )

    @property
    def kind(self) -> str:
        if self.rank is not None:
            return "rank"
        return "energy" if self.energy is not None else "budget"

    def to_json(self) -> dict[str, object]:
        """The policy as reports record it."""
        return {
            "kind": self.kind,
            "rank": self.rank,
            "energy": self.energy,
            "budget_params": self.budget_params,
            "max_rank": self.max_rank,
            "snap": self.snap,
        }

    def at_budget(self, budget: int) -> RankPolicy:
        """A global budget under this policy's cap and snapping: one candidate of a fidelity search."""
        return RankPolicy(budget_params=budget, max_rank=self.max_rank, snap=self.snap)

    def cap(self, short_side: int) -> int:
        """The largest rank this policy may give a module whose short side is ``short_side``."""
        limit = self.rank if self.rank is not None else (self.max_rank or DEFAULT_MAX_RANK)
        return min(limit, short_side)

    def fixed_rank(self, short_side: int) -> int | None:
        """The final rank of a module when it does not depend on other modules (``--rank``)."""
        if self.kind != "rank":
            return None
        return snap_rank(self.cap(short_side), self.snap, short_side)

    def sketch_rank(self, short_side: int) -> int:
        """Triplets to compute for a module (ranks snapped upward need a few more)."""
        return min(short_side, snap_rank(self.cap(short_side), self.snap, short_side))

    def assign(self, spectra: list[tuple[Factors, int, int]]) -> list[int]:
        """Final ranks for modules given as ``(factors, short_side, params_per_rank)``."""
        if self.kind == "rank":
            ranks = [self.cap(short) for _, short, _ in spectra]
        elif self.kind == "energy":
            assert self.energy is not None
            ranks = [energy_rank(f, self.energy, self.cap(short)) for f, short, _ in spectra]
        else:
            assert self.budget_params is not None
            ranks = allocate_budget([(f, self.cap(short), cost) for f, short, cost in spectra], self.budget_params)
        return [snap_rank(r, self.snap, short) for r, (_, short, _) in zip(ranks, spectra, strict=True)]


def snap_ranks(snap: str) -> tuple[int, ...]:
    """The ranks the engine ``snap`` accepts (from the engine table; empty for an engine that takes any)."""
    for row in ENGINES:
        if snap in (row.name, *row.aliases):
            return row.lora_ranks
    return ()


def snap_rank(rank: int, snap: str | None, short_side: int) -> int:
    """Round ``rank`` up to the next rank the target server accepts (never past the short side)."""
    if snap is None or rank == 0:
        return rank
    ranks = snap_ranks(snap)
    i = bisect.bisect_left(ranks, rank)
    snapped = ranks[i] if i < len(ranks) else rank
    return min(snapped, short_side)


def energy_rank(factors: Factors, share: float, cap: int) -> int:
    """Smallest rank keeping ≥ ``share`` of ‖ΔW‖²_F, at most ``cap`` (at least 1)."""
    if factors.total_energy == 0.0:
        return 0
    if share >= 1.0:
        return cap  # all of it: float32 singular values can sum a hair short of the float64 total
    target = share * factors.total_energy
    cum = factors.S[:cap].double().pow(2).cumsum(0)
    idx = int(bisect.bisect_left(cum.tolist(), target * (1 - 1e-12)))
    return max(1, min(cap, idx + 1))


def allocate_budget(modules: list[tuple[Factors, int, int]], budget: int) -> list[int]:
    """Spend ``budget`` LoRA parameters where each buys the most energy.

    Each module is ``(factors, cap, params_per_rank)`` with ``params_per_rank = in + out``. Rank
    increments are taken greedily by energy per parameter (σ²_{r+1} / (in + out)); as σ² falls
    with r, each module's gains are concave and the greedy order is the optimal fractional
    allocation. Increments that no longer fit are skipped in favour of cheaper ones, so the
    remainder left unspent is smaller than any module's next step.

    Returns:
        Ranks per module, in input order; Σ rank·params_per_rank ≤ budget.
    """
    ranks = [0] * len(modules)
    sq = [f.S[:cap].double().pow(2).tolist() for f, cap, _ in modules]
    heap = [(-sq[i][0] / cost, i) for i, (_, cap, cost) in enumerate(modules) if cap > 0 and sq[i]]
    heapq.heapify(heap)
    left = budget
    while heap:
        _, i = heapq.heappop(heap)
        _, cap, cost = modules[i]
        if cost > left:
            continue  # too big for what is left; cheaper modules may still fit
        ranks[i] += 1
        left -= cost
        if ranks[i] < cap and ranks[i] < len(sq[i]):
            heapq.heappush(heap, (-sq[i][ranks[i]] / cost, i))
    return ranks


# The budget of a search's starting point: every module at its cap (the spectra are computed once to it).
UNBOUNDED_BUDGET = 2**62


@dataclass(frozen=True)
class FidelityTarget:
    """Pick the smallest global budget whose adapter reaches this fidelity to the fine-tune.

    Fidelity is measured on probes: the fine-tune's own samples where it disagrees most with its
    base (the default, ``self_probes``), or prompts (``prompts``: a file, or ``generic`` for the ones
    shipped with phlora-nim):
    ``max_kl`` bounds the mean KL(fine-tuned ‖ base+adapter) per scored token, ``min_top1`` the
    share of tokens whose most likely next token agrees, ``min_recovery`` the share of the
    reachable base→fine-tune gap the adapter closes, in KL and in top-1 disagreement alike (see
    :func:`recovery`: the gap between the base alone and the floor, base plus every linear delta at
    full rank). The search over the budget stops when the bracket is within ``tolerance``
    (relative) or after ``max_steps`` evaluations.
    """

    max_kl: float | None = None
    min_top1: float | None = None
    prompts: str | None = None
    min_recovery: float | None = None
    self_probes: bool = False
    tolerance: float = 0.2
    max_steps: int = 12

    def __post_init__(self) -> None:
        if self.max_kl is None and self.min_top1 is None and self.min_recovery is None:
            raise OptionError(
                "a fidelity target needs a bound",
                where="--target-recovery / --target-kl / --target-top1",
                expected="at least one of them",
                found="none",
            )
        MAX_KL.check(self.max_kl, "--target-kl")
        MIN_TOP1.check(self.min_top1, "--target-top1")
        MIN_RECOVERY.check(self.min_recovery, "--target-recovery")
        if self.self_probes and self.prompts is not None:
            raise OptionError(
                "two probe sets given",
                where="--self-probes, --prompts",
                expected="one of them",
                found="both",
                fix="drop --prompts to probe with the fine-tune's own samples, or drop --self-probes",
            )
        if not 0.0 < self.tolerance < 1.0 or self.max_steps < 2:
            raise OptionError(
                "bad search settings",
                where="fidelity target",
                expected="0 < tolerance < 1 and max_steps ≥ 2",
                found=f"tolerance={self.tolerance}, max_steps={self.max_steps}",
            )

    @property
    def on_self_probes(self) -> bool:
        """Measured on the fine-tune's own samples (the default when no prompts are given)."""
        return self.self_probes or self.prompts is None

    @property
    def absolute(self) -> bool:
        """Only absolute bounds (KL, top-1): the base model alone may already meet them."""
        return self.min_recovery is None

    def met(
        self,
        kl: float,
        top1: float,
        base: tuple[float, float] | None = None,
        floor: tuple[float, float] = (0.0, 1.0),
        decisive: float | None = None,
    ) -> bool:
        """Whether (KL, top-1) meets the target; ``base``: the base model's (KL, top-1), needed for
        a recovery bound; ``floor``: the (KL, top-1) of base + every linear delta at full rank (the
        default, a perfect floor, gives the raw recovery); ``decisive``: the recovery of the
        fine-tune's decisive choices (:func:`decisive_recovery`), what a recovery bound holds to when
        the probes show enough of them (see :func:`kept_share`)."""
        absolute = (self.max_kl is None or kl <= self.max_kl) and (self.min_top1 is None or top1 >= self.min_top1)
        if self.min_recovery is None or not absolute:
            return absolute
        if base is None:
            raise ValueError("a recovery target needs the base model's KL and top-1")
        return kept_share(kl, top1, base, floor, decisive) >= self.min_recovery

    def margin(
        self,
        kl: float,
        top1: float,
        base: tuple[float, float],
        floor: tuple[float, float] = (0.0, 1.0),
        decisive: float | None = None,
    ) -> float:
        """How far (KL, top-1) is past the target: ≥ 0 exactly when :meth:`met`, growing as the adapter
        gets closer to the fine-tune (the smallest of the bounds' slacks: recovery − F, log(X / KL),
        top-1 − Y), for a search to interpolate on."""
        slacks = []
        if self.min_recovery is not None:
            slacks.append(kept_share(kl, top1, base, floor, decisive) - self.min_recovery)
        if self.max_kl is not None:
            slacks.append(math.log(self.max_kl / max(kl, 1e-12)))
        if self.min_top1 is not None:
            slacks.append(top1 - self.min_top1)
        return min(slacks)

    def describe(self) -> str:
        parts = (
            ([f"recovery ≥ {self.min_recovery:g}"] if self.min_recovery is not None else [])
            + ([f"KL ≤ {self.max_kl:g}"] if self.max_kl is not None else [])
            + ([f"top-1 ≥ {self.min_top1:g}"] if self.min_top1 is not None else [])
        )
        return " and ".join(parts)


def recovery(
    kl: float, top1: float, base_kl: float, base_top1: float, floor_kl: float = 0.0, floor_top1: float = 1.0
) -> tuple[float, float]:
    """Share of the reachable base→fine-tune gap an adapter closes, in KL and in top-1 disagreement:
    ``(KL_base − KL_adapter) / (KL_base − KL_floor)`` and the same with ``1 − top1``.

    The floor is what base + every linear delta at full rank reaches (the fine-tune with the tensors
    no LoRA adapter carries, embeddings and norms, reverted to the base's); the default floor (KL 0,
    top-1 1) gives the raw share of the whole gap. 1.0 where there is no reachable gap at all.
    """
    kl_gap, top1_gap = base_kl - floor_kl, floor_top1 - base_top1
    kl_rec = (base_kl - kl) / kl_gap if kl_gap > 0 else 1.0
    top1_rec = (top1 - base_top1) / top1_gap if top1_gap > 0 else 1.0
    return kl_rec, top1_rec


def decisive_recovery(share: float, floor_share: float) -> float:
    """Share of the fine-tune's decisive choices an adapter makes too, relative to the floor's (the
    base alone makes none of them: a decisive choice is one the base would not make)."""
    return min(share / floor_share, 1.0) if floor_share > 0 else 1.0


def kept_share(
    kl: float, top1: float, base: tuple[float, float], floor: tuple[float, float], decisive: float | None
) -> float:
    """What a recovery target bounds: the recovery of the fine-tune's decisive choices where the probes
    show enough of them (``decisive``, :func:`decisive_recovery`), else the smaller of the KL and top-1
    recoveries (:func:`recovery`).

    Decisive choices are what a task fine-tune learned (an answer's form, an injected fact); a KL over
    every token also weighs the fine-tune's diffuse drift on uncertain tokens, which a skill's adapter
    need not keep and which hides how much a knowledge adapter loses."""
    return decisive if decisive is not None else min(recovery(kl, top1, *base, *floor))


def search_policy(max_rank: int | None, snap: Literal["vllm"] | None = None) -> RankPolicy:
    """The budget policy a fidelity search starts from: every module at its cap."""
    return RankPolicy(budget_params=UNBOUNDED_BUDGET, max_rank=max_rank, snap=snap)


# Caps a fidelity search decomposes to, in turn, until every module at the cap meets the target: a small
# adapter costs a small decomposition. The randomized SVD's cost grows with the rank it computes
# (SmolLM2 on 2 cores: rank 16 1.8 s, 32 3.2 s, 64 6.4 s), so the caps grow fourfold: the passes before
# the last cost a third of it together, and a fine-tune needing rank 20 pays 16 and 64, not 16, 32 and 64.
CAP_LADDER = (16, 64)


def search_ceilings(policy: RankPolicy) -> list[RankPolicy]:
    """The policies a fidelity search bounded by ``policy`` decomposes to, in turn: every module at a cap
    of :data:`CAP_LADDER` below ``policy``'s (its rank, else its max rank, else the default cap), then at
    that cap itself."""
    top = (policy.rank if policy.kind == "rank" else policy.max_rank) or DEFAULT_MAX_RANK
    return [search_policy(cap, policy.snap) for cap in [c for c in CAP_LADDER if c < top] + [top]]


@dataclass(frozen=True)
class RankRequest:
    """What was asked of the ranks, as given: a policy (``rank``, ``energy`` or ``budget_params``, with
    ``max_rank``/``snap``), a fidelity target (its bounds and probes), or nothing (the default rank).

    :func:`choose_ranks` turns it into the policy and target an extraction runs with.
    """

    rank: int | None = None
    energy: float | None = None
    budget_params: int | None = None
    max_rank: int | None = None
    snap: str | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    min_recovery: float | None = None
    prompts: str | None = None
    self_probes: bool = False

    @property
    def policy_flags(self) -> list[str]:
        """The policy options given (by flag)."""
        given = (("--rank", self.rank), ("--energy", self.energy), ("--budget-params", self.budget_params))
        return [flag for flag, value in given if value is not None]

    @property
    def wants_target(self) -> bool:
        """A fidelity target was asked for: a bound, or probes to measure one on."""
        bounds = (self.max_kl, self.min_top1, self.min_recovery)
        return any(b is not None for b in bounds) or self.prompts is not None or self.self_probes


def choose_ranks(
    request: RankRequest, *, default_rank: int | None = DEFAULT_RANK
) -> tuple[RankPolicy, FidelityTarget | None]:
    """The rank policy and fidelity target of ``request``.

    A fidelity target chooses the ranks itself: its policy is the search's ceiling (only ``max_rank``
    and ``snap`` apply), and probes given without a bound ask for recovery ≥ :data:`DEFAULT_RECOVERY`.
    Without a target the policy asked for is used, or ``default_rank`` when none is (None: one must be).

    Raises:
        OptionError: a policy and a target both given; a value out of bounds; not exactly one policy.
    """
    snap = request.snap
    if not request.wants_target:
        rank = request.rank
        if not request.policy_flags:
            rank = default_rank
        policy = RankPolicy(rank, request.energy, request.budget_params, request.max_rank, snap)  # type: ignore[arg-type]
        return policy, None
    if request.policy_flags:
        chosen = ", ".join(request.policy_flags)
        raise OptionError(
            "a fidelity target chooses the ranks itself",
            where=chosen,
            expected="no rank policy with --target-recovery/--target-kl/--target-top1 (only --max-rank, --snap-ranks)",
            found=chosen,
            fix="drop the rank policy, or drop the target",
        )
    bounds = (request.max_kl, request.min_top1, request.min_recovery)
    target = FidelityTarget(
        max_kl=request.max_kl,
        min_top1=request.min_top1,
        prompts=request.prompts,
        min_recovery=DEFAULT_RECOVERY if all(b is None for b in bounds) else request.min_recovery,
        self_probes=request.self_probes,
    )
    return search_policy(request.max_rank, snap), target  # type: ignore[arg-type]
