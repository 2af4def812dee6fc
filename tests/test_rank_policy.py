"""Rank policies: validation, energy threshold, global parameter budget, rank snapping."""

from __future__ import annotations

import itertools

import pytest
import torch

from phlora_nim.converters.decompose import Factors
from phlora_nim.converters.rank_policy import RankPolicy, allocate_budget, energy_rank, snap_rank
from phlora_nim.core.errors import OptionError


def _factors(sigma: list[float]) -> Factors:
    s = torch.tensor(sigma)
    n = len(sigma)
    return Factors(torch.eye(n), s, torch.eye(n), float((s.double() ** 2).sum()), 0, exact=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one rank policy"),
        ({"rank": 4, "energy": 0.5}, "exactly one rank policy"),
        ({"rank": 0}, "rank must be positive"),
        ({"rank": -3}, "rank must be positive"),
        ({"energy": 0.0}, "energy must be a share"),
        ({"energy": 1.5}, "energy must be a share"),
        ({"budget_params": 0}, "budget must be positive"),
        ({"energy": 0.5, "max_rank": 0}, "max rank must be positive"),
        ({"rank": 32, "max_rank": 16}, "exceeds --max-rank"),
        ({"rank": 8, "snap": "tgi"}, "unknown rank snapping"),
    ],
)
def test_bad_policies(kwargs: dict, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        RankPolicy(**kwargs)


def test_energy_rank_is_smallest_rank_reaching_share() -> None:
    f = _factors([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    assert energy_rank(f, 9 / 15, cap=4) == 1
    assert energy_rank(f, 0.61, cap=4) == 2
    assert energy_rank(f, 14 / 15, cap=4) == 3
    assert energy_rank(f, 1.0, cap=4) == 4
    assert energy_rank(f, 1.0, cap=2) == 2  # capped


def test_budget_spends_budget_where_energy_per_parameter_is_highest() -> None:
    mods = [(_factors([5.0, 4.0, 1.0, 0.5]), 4, 10), (_factors([3.0, 2.9, 2.8, 2.7]), 4, 30)]
    budget = 70
    ranks = allocate_budget(mods, budget)
    spent = sum(r * cost for r, (_, _, cost) in zip(ranks, mods, strict=True))
    assert spent <= budget
    # Nothing else fits in what is left.
    assert all(r == cap or cost > budget - spent for r, (_, cap, cost) in zip(ranks, mods, strict=True))

    # Greedy equals the best of all feasible allocations here (concave gains).
    def energy(rs: tuple[int, ...]) -> float:
        return sum(f.captured(r) for r, (f, _, _) in zip(rs, mods, strict=True))

    best = max(
        (
            rs
            for rs in itertools.product(range(5), range(5))
            if sum(r * c for r, (_, _, c) in zip(rs, mods, strict=True)) <= budget
        ),
        key=energy,
    )
    assert energy(tuple(ranks)) == pytest.approx(energy(best))


def test_budget_policy_assign_exact_spend() -> None:
    mods = [(_factors([2.0, 1.0, 0.5]), 3, 8), (_factors([1.5, 1.2, 0.1]), 3, 8)]
    ranks = RankPolicy(budget_params=40).assign(mods)
    assert sum(ranks) * 8 == 40


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (100, 128), (300, 320), (600, 600)])
def test_snap_to_vllm_ranks(rank: int, expected: int) -> None:
    assert snap_rank(rank, "vllm", 10_000) == expected
    assert snap_rank(rank, "vllm", 12) == min(expected, 12)


def test_rank_choice_is_one_decision() -> None:
    """What was asked → the policy and target an extraction runs with (the CLI only fills the request)."""
    from phlora_nim.converters.rank_policy import (
        DEFAULT_RANK,
        DEFAULT_RECOVERY,
        UNBOUNDED_BUDGET,
        RankRequest,
        choose_ranks,
    )

    policy, target = choose_ranks(RankRequest())
    assert policy == RankPolicy(rank=DEFAULT_RANK) and target is None
    policy, target = choose_ranks(RankRequest(energy=0.8, max_rank=32, snap="vllm"))
    assert policy == RankPolicy(energy=0.8, max_rank=32, snap="vllm") and target is None
    with pytest.raises(OptionError, match="exactly one rank policy"):
        choose_ranks(RankRequest(), default_rank=None)  # prune: no default
    # Probes alone ask for the default recovery; the policy is then the search's ceiling.
    policy, target = choose_ranks(RankRequest(self_probes=True, max_rank=64))
    assert target is not None and target.min_recovery == DEFAULT_RECOVERY and target.self_probes
    assert policy == RankPolicy(budget_params=UNBOUNDED_BUDGET, max_rank=64)
    policy, target = choose_ranks(RankRequest(max_kl=0.1, prompts="p.txt"))
    assert target is not None and (target.max_kl, target.min_recovery, target.prompts) == (0.1, None, "p.txt")
    with pytest.raises(OptionError, match="chooses the ranks itself") as caught:
        choose_ranks(RankRequest(rank=8, energy=0.5, min_top1=0.9))
    assert caught.value.where == "--rank, --energy"


@pytest.mark.parametrize(
    ("policy", "caps"),
    [
        (RankPolicy(energy=0.9), [16, 64, 256]),  # fourfold: the passes before the last cost a third of it
        (RankPolicy(energy=0.9, max_rank=64), [16, 64]),
        (RankPolicy(energy=0.9, max_rank=40), [16, 40]),
        (RankPolicy(rank=8), [8]),
    ],
)
def test_a_search_decomposes_up_a_ladder_of_ceilings(policy: RankPolicy, caps: list[int]) -> None:
    from phlora_nim.converters.rank_policy import search_ceilings

    ceilings = search_ceilings(policy)
    assert [c.max_rank for c in ceilings] == caps and all(c.kind == "budget" for c in ceilings)
    assert ceilings[-1].at_budget(100) == RankPolicy(budget_params=100, max_rank=caps[-1])
