"""bench/fidelity.py's code on a toy model: sweep from one decomposition, probe, served path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from phlora_nim.converters.rank_policy import RankPolicy, search_policy
from phlora_nim.testing.finetunes import make_linear_finetune

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def linear_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A toy Llama and a fine-tune of its linear weights only (a full-rank adapter is exact)."""
    return make_linear_finetune(tmp_path_factory.mktemp("fid"), steps=20, seed=5)


def _ceiling(base: Path, ft: Path, **kw):
    from phlora_nim.converters.checkpoint import open_checkpoint
    from phlora_nim.converters.extract import ExtractOptions, plan_extraction, run_extraction

    options = ExtractOptions(policy=search_policy(None), exact=True, **kw)
    with open_checkpoint(base) as b, open_checkpoint(ft) as f:
        return run_extraction(plan_extraction(b, f, options), b, f, options)


def test_truncating_one_decomposition_equals_extracting_at_that_policy(linear_pair) -> None:
    from phlora_nim.converters.checkpoint import open_checkpoint
    from phlora_nim.converters.extract import ExtractOptions, plan_extraction, reassign, run_extraction

    base, ft = linear_pair
    result = _ceiling(base, ft)
    for policy in (RankPolicy(rank=3), RankPolicy(energy=0.8), RankPolicy(budget_params=9000)):
        options = ExtractOptions(policy=policy, exact=True)
        with open_checkpoint(base) as b, open_checkpoint(ft) as f:
            direct = run_extraction(plan_extraction(b, f, options), b, f, options).adapter
        cut = reassign(result, policy).adapter
        assert cut.ranks() == direct.ranks()
        for name, w in direct.modules.items():
            assert torch.allclose(cut.modules[name].delta(), w.delta(), atol=1e-5)


def test_probe_full_rank_adapter_is_the_finetune_and_merge_restores_weights(linear_pair) -> None:
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.jobs.fidelity import generic_prompts_path, probe_for_checkpoints
    from phlora_nim.jobs.verify import merged

    base, ft = linear_pair
    probe = probe_for_checkpoints(base, ft, read_prompts(generic_prompts_path())[:8], continuation=6)
    assert probe.tokens == sum(len(c) for c in probe.continuations)
    before = {k: v.clone() for k, v in probe.base_model.state_dict().items()}
    full = _ceiling(base, ft).adapter
    kl, top1 = probe.measure(full)
    assert kl < 1e-6 and top1 == 1.0
    base_kl, _ = probe.measure(None)
    assert base_kl > 1e-3
    after = probe.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with merged(probe.base_model, full):
        assert not all(torch.equal(before[k], after[k]) for k in before)


def test_shared_prefix_cache_gives_the_same_log_probs(linear_pair) -> None:
    from transformers import AutoModelForCausalLM

    from phlora_nim.jobs.verify import common_prefix, log_probs

    model = AutoModelForCausalLM.from_pretrained(linear_pair[1]).eval()
    prefix = [5, 9, 11, 4, 30, 7]
    seqs = [[*prefix, 12, 13, 14], [*prefix, 40, 41], [*prefix, 50, 51, 52, 53, 54]]
    starts = [7, 6, 8]
    assert common_prefix(seqs, starts) == 6
    plain = log_probs(model, seqs, starts=starts, batch_size=2)
    cached = log_probs(model, seqs, starts=starts, batch_size=2, shared_prefix=6)
    for a, b in zip(plain, cached, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)


def test_forced_exact_match_equals_greedy_generation(linear_pair) -> None:
    """One teacher-forced pass says whether greedy decoding yields a continuation exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phlora_nim.jobs.fidelity import FidelityProbe, greedy_generate
    from phlora_nim.testing.fidelity_tasks import exact_match, task_probe, toy_task

    base, ft = linear_pair
    tok = AutoTokenizer.from_pretrained(ft)
    model = AutoModelForCausalLM.from_pretrained(ft).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    prompts = [[3 + i, 7 + 2 * i, 4] for i in range(12)]
    own = greedy_generate(model, prompts, 4, pad_id=0, eos_id=2)
    own = [[*c, 2] if len(c) < 4 else c for c in own]
    probe = FidelityProbe.build(base_model, model, prompts, continuations=own)
    assert probe.measure_all(None, model=model)[2] == 1.0
    wrong = [[*c[:-1], (c[-1] + 1) % 96] for c in own]
    probe = FidelityProbe.build(base_model, model, prompts, continuations=wrong)
    assert probe.measure_all(None, model=model)[2] == 0.0
    words = [tok.convert_ids_to_tokens(i) for i in range(3, 15)]
    task = toy_task(words, "shift0", 0, n_test=24)
    gen, _ = exact_match(model, tok, task.test, task.max_new_tokens)
    assert task_probe(base_model, model, tok, task).measure_all(None, model=model)[2] == gen


def test_tasks_are_split_without_overlap() -> None:
    from phlora_nim.testing.fidelity_tasks import addition_task, spelled_digits_task

    for make in (addition_task, spelled_digits_task):
        task = make(n_test=64)
        assert len(task.test) == 64 and not set(task.test) & set(task.train)
    assert ("Spell 407 in words.", "four zero seven") in set(spelled_digits_task().train + spelled_digits_task().test)


@pytest.mark.slow
def test_bench_tiny_runs_end_to_end_and_served_answers_equal_peft(tmp_path: Path) -> None:
    code = _bench().main(["--tiny", "--work", str(tmp_path), "--threads", "1"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "fidelity.png").stat().st_size > 1000
    rows = results["rows"]
    assert {r["method"] for r in rows} == {"svd", "whitened"}
    assert {r["label"] for r in rows if r["method"] == "svd"} >= {"rank 1", "rank 4", "rank 16", "energy 0.5"}
    assert any(r["pruned"] for r in rows)
    for task in ("shift1", "shift2"):
        svd = sorted(
            (r for r in rows if r["task"] == task and r["method"] == "svd" and not r["pruned"]),
            key=lambda r: r["params"],
        )
        assert svd[0]["energy_kept"] < svd[-1]["energy_kept"]
        acc = results["accuracy"][task]
        assert acc["finetuned"] >= acc["base"]
        assert acc["finetuned"] == acc["finetuned_generated"] and acc["base"] == acc["base_generated"]
    served = results["served"]
    assert served and {r["adapter"] for r in served} == {
        "shift1-svd",
        "shift2-svd",
        "shift1-whitened",
        "shift2-whitened",
    }
    assert all(r["same_tokens"] for r in served), served
    assert code == 0


def _bench():
    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "bench" / "fidelity.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_bench_target_comparison_runs_the_cli_search_on_each_probe_set(linear_pair) -> None:
    """``bench/fidelity.py --target-only`` on a linear-only fine-tune (every target reachable): each
    probe set's choice meets the recovery on its own probes, and the table names each row."""
    from transformers import AutoTokenizer

    from phlora_nim.testing.fidelity_tasks import toy_task

    base, ft = linear_pair
    tok = AutoTokenizer.from_pretrained(ft)
    task = toy_task([tok.convert_ids_to_tokens(i) for i in range(3, 15)], "shift1", 1, n_test=8)
    out = _bench().target_comparison(base, ft, task, [0.9], 64)
    assert set(out["chosen"]) == {"recovery 0.9 / generic", "recovery 0.9 / self", "recovery 0.9 / task"}
    for row in out["chosen"].values():
        assert row["base_kl"] > 0 and row["tokens"] > 0
        # Linear-only: base + every linear delta is the fine-tune, so the whole gap is reachable.
        assert row["floor"]["kl"] < 1e-4 and row["floor"]["reachable_kl"] > 0.999
        if "refused" in row:
            assert any(k in row["refused"] for k in ("barely tell", "out of reach")), row
            continue
        assert min(row["recovery_kl"], row["recovery_top1"]) >= 0.9 and row["params"] > 0
        assert row["raw_recovery_kl"] == pytest.approx(row["recovery_kl"], abs=1e-3)
        assert 0 <= row["accuracy"] <= 1
        if out["needed"]:
            assert row["ratio"] == pytest.approx(row["params"] / out["needed"]["params"])
    assert any("params" in row for row in out["chosen"].values())  # linear-only: the cap reaches the fine-tune
    if out["needed"]:
        assert out["needed"]["accuracy"] >= out["needed_accuracy"] - 1e-9
    table = _bench().target_table({"shift1": out})
    assert table.count("| shift1 | recovery ≥ 0.9 /") == 3 and "reachable share (KL / top-1)" in table
