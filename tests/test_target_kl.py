"""--target-kl / --target-top1 / --target-recovery: the smallest budget meeting a fidelity target, by bisection."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from phlora_nim.converters.rank_policy import FidelityTarget
from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.testing.finetunes import make_linear_finetune


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A toy Llama with a tokenizer whose fine-tune changed linear weights only: full rank is exact."""
    return make_linear_finetune(tmp_path_factory.mktemp("target"), steps=25, seed=4)


@pytest.fixture(scope="module")
def probe_and_extraction(pair):
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.converters.checkpoint import open_checkpoint
    from phlora_nim.converters.extract import ExtractOptions, plan_extraction, run_extraction
    from phlora_nim.converters.rank_policy import search_policy
    from phlora_nim.jobs.fidelity import generic_prompts_path, probe_for_checkpoints

    base, ft = pair
    options = ExtractOptions(policy=search_policy(None), exact=True)
    with open_checkpoint(base) as b, open_checkpoint(ft) as f:
        result = run_extraction(plan_extraction(b, f, options), b, f, options)
    probe = probe_for_checkpoints(base, ft, read_prompts(generic_prompts_path()))
    return probe, result, options.policy


def test_search_picks_a_budget_that_meets_the_target_and_the_next_smaller_tried_one_does_not(
    probe_and_extraction,
) -> None:
    from phlora_nim.jobs.target_kl import search_budget

    probe, result, ceiling = probe_and_extraction
    base_kl, _ = probe.measure(None)
    full_kl, _ = probe.measure(result.adapter)
    assert full_kl < 1e-4 < base_kl  # linear-only fine-tune: the full-rank adapter is the fine-tune
    target = FidelityTarget(max_kl=math.sqrt(base_kl * 1e-3) / 3, tolerance=0.02)
    budget, chosen, steps = search_budget(result, ceiling, target, probe.measure)
    kl, _ = probe.measure(chosen.adapter)
    assert kl <= target.max_kl
    assert chosen.adapter.num_parameters() <= budget
    below = [s for s in steps if s.budget < budget]
    assert below, "the search tried nothing smaller"
    assert not max(below, key=lambda s: s.budget).met
    # Bisection: far fewer evaluations than budgets.
    assert len(steps) <= target.max_steps + 2


def test_top1_target_and_both_together(probe_and_extraction) -> None:
    from phlora_nim.jobs.target_kl import search_budget

    probe, result, ceiling = probe_and_extraction
    _, base_top1 = probe.measure(None)
    goal = (1 + base_top1) / 2
    budget, chosen, _ = search_budget(result, ceiling, FidelityTarget(min_top1=goal), probe.measure)
    assert probe.measure(chosen.adapter)[1] >= goal
    both = FidelityTarget(min_top1=goal, max_kl=1e-3)
    budget2, _, _ = search_budget(result, ceiling, both, probe.measure)
    assert budget2 >= budget * (1 - 0.05)  # both bounds need at least what one needs (bracket tolerance)


def test_cli_extract_and_convert_with_target_kl(pair, tmp_path: Path, run_cli) -> None:
    base, ft = pair
    code, out, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "a", "--target-kl", "0.01", "--no-plot"
    )
    assert code == 0, err
    assert "budget search for KL ≤ 0.01" in out and "chosen budget" in out
    report = json.loads((tmp_path / "a" / "phlora_report.json").read_text())
    search = report["fidelity_target"]
    assert search["chosen"]["met"] and search["chosen"]["kl"] <= 0.01
    assert search["floor"] is None  # an absolute target: no floor measured, nothing relative to it
    assert report["policy"]["kind"] == "budget" and report["policy"]["budget_params"] == search["chosen"]["budget"]
    assert report["totals"]["adapter_parameters"] == search["chosen"]["params"]
    assert {"budget", "params", "kl", "top1", "met"} <= set(search["steps"][0])
    smaller = [s for s in search["steps"] if s["budget"] < search["chosen"]["budget"]]
    assert smaller and not max(smaller, key=lambda s: s["budget"])["met"]

    prompts = tmp_path / "p.txt"
    prompts.write_text("the red cat\none small bird\nking queen knight\n")
    code, out, err = run_cli(
        "convert", "--base", base, "--finetuned", ft, "--name", "t", "-m", tmp_path / "repo",
        "--target-top1", "0.9", "--prompts", prompts,
    )  # fmt: skip
    assert code == 0, err
    store = json.loads((tmp_path / "repo" / "tensorrt_llm" / "adapters" / "t" / "phlora_report.json").read_text())
    assert store["fidelity_target"]["chosen"]["top1"] >= 0.9
    assert store["fidelity_target"]["prompts"] == str(prompts)


def test_unreachable_target_is_an_option_error(pair, tmp_path: Path, run_cli) -> None:
    base, ft = pair
    code, _, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "a", "--target-kl", "1e-9", "--max-rank", "1"
    )
    assert code == 2
    assert "out of reach" in err and "raise --max-rank" in err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--target-kl", "0"], "KL target must be positive"),
        (["--target-kl", "-1"], "KL target must be positive"),
        (["--target-top1", "1.5"], "top-1 target must be a share"),
        (["--target-top1", "0"], "top-1 target must be a share"),
        (["--target-kl", "0.1", "--rank", "4"], "chooses the ranks itself"),
        (["--target-kl", "0.1", "--energy", "0.9"], "chooses the ranks itself"),
        (["--target-recovery", "0"], "recovery target must be a share"),
        (["--target-recovery", "1.2"], "recovery target must be a share"),
        (["--target-recovery", "-0.5"], "recovery target must be a share"),
        (["--target-recovery", "0.8", "--rank", "4"], "chooses the ranks itself"),
        (["--self-probes", "--budget-params", "1000"], "chooses the ranks itself"),
        (["--self-probes", "--prompts", "PROMPTS"], "two probe sets given"),
        (["--target-recovery", "0.8", "--prompts", "MISSING"], "prompts file not found"),
        (["--target-kl", "0.1", "--prompts", "MISSING"], "prompts file not found"),
    ],
)
def test_bad_target_options(pair, tmp_path: Path, run_cli, args: list[str], match: str) -> None:
    base, ft = pair
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    args = [str(prompts) if a == "PROMPTS" else str(tmp_path / "missing.txt") if a == "MISSING" else a for a in args]
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "a", *args)
    assert code == 2, err
    assert match in err
    assert not (tmp_path / "a").exists()


def test_fidelity_target_validation() -> None:
    with pytest.raises(OptionError, match="needs a bound"):
        FidelityTarget()
    with pytest.raises(OptionError, match="bad search settings"):
        FidelityTarget(max_kl=0.1, tolerance=0)
    assert FidelityTarget(max_kl=0.1, min_top1=0.9).met(0.05, 0.95)
    assert not FidelityTarget(max_kl=0.1, min_top1=0.9).met(0.05, 0.85)


@pytest.fixture(scope="module")
def hidden(hidden_finetune: tuple[Path, Path, list[int]]) -> tuple[Path, Path, list[int]]:
    """A fine-tune whose change the generic prompts cannot see (a cycle over trigger tokens)."""
    return hidden_finetune


def test_generic_prompts_that_cannot_see_the_finetune_are_refused(hidden, tmp_path: Path, run_cli) -> None:
    from phlora_nim.jobs.probe_checks import MIN_GAP_KL

    base, ft, _ = hidden
    code, _, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "a", "--target-kl", "0.05", "--prompts",
        "generic",
    )  # fmt: skip
    assert code == 2, err
    assert "already meets the fidelity target" in err and "KL(fine-tuned ‖ base)" in err
    assert "--self-probes" in err and "--prompts" in err
    assert not (tmp_path / "a").exists()
    # A recovery target on the same prompts: the gap itself is below the floor.
    code, _, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "b", "--target-recovery", "0.8",
        "--prompts", "generic",
    )  # fmt: skip
    assert code == 2, err
    assert f"≥ {MIN_GAP_KL} nats/token" in err and "generic, shipped" in err


def test_an_adapter_chosen_on_probes_that_miss_the_change_is_refused(hidden) -> None:
    """Probes whose gap is real but not what the fine-tune learned (here the generic prompts, past the
    gap check): the search picks an adapter the fine-tune's own held-out samples show keeps nothing."""
    from phlora_nim.converters.checkpoint import open_checkpoint
    from phlora_nim.converters.extract import ExtractOptions, plan_extraction, run_extraction
    from phlora_nim.converters.rank_policy import search_policy
    from phlora_nim.jobs.fidelity import WeightPatcher
    from phlora_nim.jobs.probe_checks import check_on_own_samples
    from phlora_nim.jobs.target_kl import (
        GENERIC,
        _floors,
        _probes,
        measure_floor,
        search_budget,
    )

    base, ft, _ = hidden
    target = FidelityTarget(min_recovery=0.5, prompts=GENERIC)
    probes = _probes(base, ft, target)
    assert probes.check is not None and probes.source.startswith("(generic")
    patcher = WeightPatcher(probes.search.base_model)

    def measure(adapter):
        scores = probes.search.scores(patcher.apply(adapter))
        return scores.kl, scores.top1

    options = ExtractOptions(policy=search_policy(None))
    with open_checkpoint(base) as b, open_checkpoint(ft) as f:
        result = run_extraction(plan_extraction(b, f, options), b, f, options)
        from_checkpoints = measure_floor(probes.search, result, b, f)
    # The floor from the fine-tuned model in memory is the one the checkpoints' deltas give.
    floors = _floors(patcher, probes, result.plan.targets, save_biases=False)
    assert (floors[0].kl, floors[0].top1) == pytest.approx(from_checkpoints, rel=1e-4, abs=1e-6)
    base_m = measure(None)
    floor = (floors[0].kl, floors[0].top1)
    budget, chosen, steps = search_budget(result, options.policy, target, measure, base=base_m, floor=floor)
    step = next(s for s in reversed(steps) if s.budget == budget)
    assert step.met  # on the probes it was chosen on, the adapter looks fine …
    with pytest.raises(InputError, match=r"keeps little of what the fine-tune changed.*held-out samples") as info:
        check_on_own_samples(patcher, probes, chosen, step, base_m, floors, target)
    assert "drop --prompts" in str(info.value) and "greedy continuations" in str(info.value)  # … on its own, not


def test_check_informative_names_the_numbers() -> None:
    from phlora_nim.jobs.probe_checks import check_informative

    with pytest.raises(InputError, match=r"already meets.*KL\(fine-tuned ‖ base\) 0\.01 nats/token, top-1 90\.00%"):
        check_informative(FidelityTarget(max_kl=0.05), 0.01, 0.9, source="p.txt", tokens=100)
    with pytest.raises(InputError, match=r"barely tell.*found base model alone: KL\(fine-tuned ‖ base\) 0\.005"):
        check_informative(FidelityTarget(min_recovery=0.9), 0.005, 0.5, source="p.txt", tokens=100)
    check_informative(FidelityTarget(min_recovery=0.9), 0.5, 0.5, source="p.txt", tokens=100)  # informative


def test_recovery_with_self_probes_keeps_the_hidden_behaviour(hidden, tmp_path: Path, run_cli) -> None:
    from phlora_nim.demo.toy_models import greedy_continuation

    base, ft, trigger = hidden
    out = tmp_path / "a"
    code, stdout, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", out, "--target-recovery", "0.8", "--no-plot"
    )  # the fine-tune's own samples are the default probes
    assert code == 0, err
    assert "recovery" in stdout and "self-probes" in " ".join(stdout.split())
    assert re.search(r"checked on \d+ held-out samples of the fine-tune", " ".join(stdout.split()))
    search = json.loads((out / "phlora_report.json").read_text())["fidelity_target"]
    assert search["target"]["min_recovery"] == 0.8 and search["prompts"].startswith("(self-probes)")
    check = search["check_on_own_samples"]
    assert check["checked"] and check["passed"]
    assert check["recovery"] >= check["min_share"] * check["recovery_on_probes"]
    assert search["decomposed_to_ranks"][0] == 16 and search["search_timings"]["evaluations"] >= 2
    chosen, base_alone = search["chosen"], search["base_alone"]
    assert chosen["params"] > 0 and chosen["met"]
    assert min(chosen["recovery_kl"], chosen["recovery_top1"]) >= 0.8
    assert base_alone["kl"] > 0.02 and chosen["kl"] < base_alone["kl"]
    assert {"recovery_kl", "recovery_top1", "decisive", "recovery_decisive"} <= set(search["steps"][0])
    assert search["decisive_positions"] >= 0 and search["decisive_p"] == 0.9
    prompt = [1, trigger[3]]
    want = greedy_continuation(ft, prompt, 8)
    assert greedy_continuation(base, prompt, 8) != want  # the behaviour is the fine-tune's, not the base's
    assert greedy_continuation(base, prompt, 8, adapter=out) == want

    # verify: recovery printed beside the absolute figures, and gated.
    code, stdout, err = run_cli(
        "verify", "--base", base, "--finetuned", ft, "--adapter", out, "--max-kl", "10", "--min-recovery", "0.01"
    )
    printed = " ".join(stdout.split())  # rich wraps lines
    assert "recovery of the reachable base→fine-tune gap" in printed and "raw recovery of the whole gap" in printed
    assert "base model alone passes" in err  # --max-kl 10 is met by the base alone
    assert code in (0, 1)
    code, _, err = run_cli("verify", "--base", base, "--finetuned", ft, "--adapter", out, "--min-recovery", "1")
    assert code == 1 and "--min-recovery 1" in " ".join(err.split()) and "reachable gap" in err


@pytest.mark.parametrize("value", ["0", "1.5", "-1"])
def test_bad_min_recovery(hidden, tmp_path: Path, run_cli, value: str) -> None:
    base, ft, _ = hidden
    code, _, err = run_cli("verify", "--base", base, "--finetuned", ft, "--adapter", tmp_path, "--min-recovery", value)
    assert code == 2 and "recovery gate must be a share" in err


@pytest.fixture(scope="module")
def norm_pair(pair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The linear fine-tune with its final norm also changed: a gap no LoRA adapter can close."""
    import torch
    from transformers import AutoModelForCausalLM

    from phlora_nim.demo.toy_models import save_tokenizer

    base, ft = pair
    model = AutoModelForCausalLM.from_pretrained(ft)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.6)
    out = tmp_path_factory.mktemp("norm") / "norm-ft"
    model.save_pretrained(out)
    save_tokenizer(out, model.config.vocab_size)
    return base, out


def test_recovery_is_relative_to_the_floor_the_linear_deltas_reach(norm_pair, tmp_path: Path, run_cli) -> None:
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.converters.checkpoint import open_checkpoint
    from phlora_nim.converters.extract import ExtractOptions, plan_extraction, run_extraction
    from phlora_nim.converters.rank_policy import recovery, search_policy
    from phlora_nim.jobs.fidelity import generic_prompts_path, probe_for_checkpoints
    from phlora_nim.jobs.target_kl import measure_floor, search_budget

    base, ft = norm_pair
    options = ExtractOptions(policy=search_policy(None), exact=True)
    probe = probe_for_checkpoints(base, ft, read_prompts(generic_prompts_path()))
    with open_checkpoint(base) as b, open_checkpoint(ft) as f:
        result = run_extraction(plan_extraction(b, f, options), b, f, options)
        floor = measure_floor(probe, result, b, f)
    base_m = probe.measure(None)
    full = probe.measure(result.adapter)
    # The norm's change is out of every adapter's reach: the floor is well above zero, and the
    # full-rank adapter sits on it (the floor is exactly base + every linear delta).
    assert floor[0] > 1e-3 and floor[0] < base_m[0] / 2
    assert full[0] == pytest.approx(floor[0], rel=1e-3, abs=1e-6) and full[1] == pytest.approx(floor[1])
    raw = recovery(*full, *base_m)
    assert min(raw) < 0.97  # the raw share of the whole gap caps below 1 …
    assert min(recovery(*full, *base_m, *floor)) > 0.999  # … the share of the reachable gap does not
    goal = (1 + min(raw)) / 2
    target = FidelityTarget(min_recovery=goal)
    with pytest.raises(OptionError, match="out of reach"):
        search_budget(result, options.policy, target, probe.measure, base=base_m)  # the raw rule
    budget, chosen, steps = search_budget(result, options.policy, target, probe.measure, base=base_m, floor=floor)
    step = next(s for s in steps if s.budget == budget)
    assert step.met and min(step.recovery_kl, step.recovery_top1) >= goal
    assert step.raw_recovery_kl < step.recovery_kl
    assert chosen.adapter.num_parameters() < result.adapter.num_parameters()  # not simply everything

    # The CLI: the floor and the reachable share in the report, raw and relative recovery per step.
    out = tmp_path / "a"
    code, stdout, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", out, "--target-recovery", f"{goal:.4f}", "--no-plot",
        "--prompts", "generic",
    )  # fmt: skip
    assert code == 0, err
    assert "reachable" in " ".join(stdout.split())
    search = json.loads((out / "phlora_report.json").read_text())["fidelity_target"]
    assert search["floor"]["kl"] == pytest.approx(floor[0], rel=0.05)
    assert search["floor"]["reachable_kl"] == pytest.approx(1 - floor[0] / base_m[0], rel=0.05)
    assert search["chosen"]["met"] and search["chosen"]["raw_recovery_kl"] < search["chosen"]["recovery_kl"]
    assert {"raw_recovery_kl", "raw_recovery_top1"} <= set(search["steps"][0])


@pytest.mark.parametrize(
    ("base", "floor", "match"),
    [
        ((0.5, 0.5), (0.49, 0.6), r"too small.*floor \(base \+ every linear delta.*KL 0\.49.*reachable gap 0\.01"),
        ((0.05, 0.9), (0.045, 0.95), r"KL\(fine-tuned ‖ base\) − KL\(fine-tuned ‖ floor\) ≥ 0\.02"),
    ],
)
def test_a_reachable_gap_below_the_floor_is_refused(base, floor, match: str) -> None:
    from phlora_nim.jobs.probe_checks import check_reachable

    with pytest.raises(InputError, match=match):
        check_reachable(base, floor, source="p.txt", tokens=100)
    check_reachable((0.5, 0.5), (0.1, 0.9), source="p.txt", tokens=100)  # reachable gap 0.4: informative


def test_recovery_rule() -> None:
    from phlora_nim.converters.rank_policy import recovery

    assert recovery(0.25, 0.8, 1.0, 0.6) == pytest.approx((0.75, 0.5))  # raw: the floor is a perfect match
    assert recovery(0.25, 0.8, 1.0, 0.6, 0.5, 0.9) == pytest.approx((1.5, 2 / 3))
    assert recovery(0.5, 0.9, 1.0, 0.6, 0.5, 0.9) == pytest.approx((1.0, 1.0))  # at the floor
    assert recovery(0.5, 0.9, 0.5, 0.9, 0.5, 0.9) == (1.0, 1.0)  # no reachable gap at all
    t = FidelityTarget(min_recovery=0.9)
    assert not t.met(0.54, 0.88, (1.0, 0.6)) and t.met(0.54, 0.88, (1.0, 0.6), (0.5, 0.9))


@pytest.mark.parametrize(
    ("kl", "top1", "decisive", "met"),
    [
        (0.01, 0.99, 0.90, False),  # the whole gap closed but a tenth of the decisive choices lost: a facts adapter
        (0.50, 0.60, 0.99, True),  # diffuse drift left, every decisive choice kept: a skill's small adapter
        (0.50, 0.60, None, False),  # no decisive choices to hold to: KL / top-1 recovery, 50 % / 20 %
        (0.01, 0.99, None, True),
    ],
)
def test_recovery_holds_to_the_decisive_choices_where_there_are_enough(
    kl: float, top1: float, decisive: float | None, met: bool
) -> None:
    from phlora_nim.converters.rank_policy import kept_share

    t = FidelityTarget(min_recovery=0.98)
    base, floor = (1.0, 0.5), (0.0, 1.0)
    assert t.met(kl, top1, base, floor, decisive) is met
    assert (t.margin(kl, top1, base, floor, decisive) >= 0) is met
    want = decisive if decisive is not None else min(1 - kl, 2 * top1 - 1)
    assert kept_share(kl, top1, base, floor, decisive) == pytest.approx(want)


def test_decisive_recovery_is_relative_to_the_floor() -> None:
    from phlora_nim.converters.rank_policy import decisive_recovery

    assert decisive_recovery(0.9, 1.0) == pytest.approx(0.9)
    assert decisive_recovery(0.9, 0.95) == pytest.approx(0.9 / 0.95)
    assert decisive_recovery(1.0, 0.95) == 1.0  # past the floor counts as the floor
    assert decisive_recovery(0.0, 0.0) == 1.0  # the floor makes none either: nothing an adapter can keep
