"""Pruning equals direct extraction; PEFT adapters (ours and third-party) round-trip exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import load_peft, save_peft
from phlora_nim.converters.prune import adapter_factors, prune_adapter
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.jobs import adapter_jobs as jobs


def _updates(folder: Path) -> dict[str, torch.Tensor]:
    adapter = load_peft(folder)
    return {n: w.delta(use_rslora=adapter.use_rslora) for n, w in adapter.modules.items()}


@pytest.mark.parametrize("low", [1, 3, 8])
def test_prune_equals_direct_extraction(low: int, model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    jobs.extract(base, ft, tmp_path / "r16", ExtractOptions(policy=RankPolicy(rank=16), exact=True), plot=False)
    jobs.extract(base, ft, tmp_path / "direct", ExtractOptions(policy=RankPolicy(rank=low), exact=True), plot=False)
    jobs.prune(tmp_path / "r16", tmp_path / "pruned", RankPolicy(rank=low))
    direct, pruned = _updates(tmp_path / "direct"), _updates(tmp_path / "pruned")
    assert direct.keys() == pruned.keys()
    for name in direct:
        assert torch.allclose(pruned[name], direct[name], atol=1e-5), name


def test_core_svd_equals_dense_svd() -> None:
    gen = torch.Generator().manual_seed(0)
    w = LoraWeights(a=torch.randn(6, 40, generator=gen), b=torch.randn(30, 6, generator=gen), alpha=12.0)
    f = adapter_factors(w)
    dense = torch.linalg.svdvals(w.delta().double())
    assert torch.allclose(f.S.double(), dense[:6], rtol=1e-5)
    a, b = f.lora(6)
    assert torch.allclose(b @ a, w.delta(), atol=1e-4)


def test_prune_by_energy_never_grows_ranks() -> None:
    gen = torch.Generator().manual_seed(1)
    adapter = LoraAdapter(
        modules={
            f"m{i}": LoraWeights(a=torch.randn(4, 20, generator=gen), b=torch.randn(16, 4, generator=gen), alpha=8.0)
            for i in range(3)
        }
    )
    pruned, records = prune_adapter(adapter, RankPolicy(energy=0.7))
    for rec in records:
        assert rec["rank"] <= rec["old_rank"] and rec["energy_kept"] >= 0.7
    assert all(w.alpha == w.rank for w in pruned.modules.values())


def test_third_party_peft_adapter_round_trips_with_patterns(tmp_path: Path) -> None:
    """An adapter built by PEFT itself, with rank_pattern, alpha_pattern and rsLoRA."""
    from peft import LoraConfig, get_peft_model

    from phlora_nim.demo.toy_models import build_model

    model = build_model("llama")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
        init_lora_weights=False,  # random B: a non-trivial update
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "third")
    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight"):
            expected[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach()
    ours = _updates(tmp_path / "third")
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(ours[name], expected[name], atol=1e-6), name
    # Written back by us, then read by PEFT: the same updates.
    adapter = load_peft(tmp_path / "third")
    (tmp_path / "ours").mkdir()
    save_peft(adapter, tmp_path / "ours")
    # Scales folded into B (rsLoRA included), one rank, no patterns: what every loader reads alike.
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["use_rslora"] is False and written["r"] == written["lora_alpha"] == 4
    assert not written["rank_pattern"] and not written["alpha_pattern"]
    again = _updates(tmp_path / "ours")
    for name in expected:
        assert torch.allclose(again[name], expected[name], atol=1e-6), name


def test_prune_cli_on_third_party_adapter(run_cli, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from phlora_nim.demo.toy_models import build_model

    peft_model = get_peft_model(
        build_model("qwen2"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "src")
    code, out, err = run_cli("prune", tmp_path / "src", "--out", tmp_path / "dst", "--rank", "3")
    assert code == 0, err
    assert "wrote" in out
    cfg = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3
    report = json.loads((tmp_path / "dst" / "phlora_report.json").read_text())
    assert report["kind"] == "prune" and all(m["rank"] == 3 for m in report["modules"])


def _peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(ids).logits


def test_lora_bias_with_alpha_not_r_keeps_outputs_through_export_and_prune(tmp_path: Path) -> None:
    """PEFT scales ``lora_B.bias`` with the update (``LoraLayer`` Linear.forward in
    src/peft/tuners/lora/layer.py: ``lora_B(lora_A(dropout(x))) * scaling``, the bias inside lora_B).
    Re-written at scale 1 (export, prune), the bias must carry the old scale."""
    from peft import LoraConfig, get_peft_model

    from phlora_nim.demo.toy_models import build_model

    build_model("qwen2").save_pretrained(tmp_path / "base")  # q/k/v carry biases, as lora_bias needs
    peft_model = get_peft_model(
        build_model("qwen2"),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False),
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # nonzero B weights and biases
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "src")
    ids = torch.randint(3, 90, (2, 12), generator=gen)
    expected = _peft_logits(tmp_path / "base", tmp_path / "src", ids)
    base_only = build_model("qwen2")(ids).logits.detach()
    assert not torch.allclose(expected, base_only, atol=1e-3)  # the adapter (bias included) matters
    jobs.export(tmp_path / "src", tmp_path / "exported", fmt="peft")
    jobs.prune(tmp_path / "src", tmp_path / "pruned", RankPolicy(rank=4))
    for folder in ("exported", "pruned"):
        cfg = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["lora_bias"] is True
        got = _peft_logits(tmp_path / "base", tmp_path / folder, ids)
        assert torch.allclose(got, expected, atol=1e-5), (folder, float((got - expected).abs().max()))


def test_prune_to_rank_zero_drops_the_module_and_its_bias(tmp_path: Path) -> None:
    """A bias change exists in PEFT only as ``lora_B.bias`` of a LoRA module: a module pruned away
    takes its bias with it (the written adapter stays one that PEFT and load_peft read back)."""
    gen = torch.Generator().manual_seed(3)
    live = LoraWeights(a=torch.randn(2, 8, generator=gen), b=torch.randn(6, 2, generator=gen), alpha=2.0)
    empty = LoraWeights(a=torch.randn(2, 8, generator=gen), b=torch.zeros(6, 2), alpha=2.0)  # no update
    adapter = LoraAdapter(
        modules={"m.live": live, "m.empty": empty},
        lora_biases={"m.live": torch.ones(6), "m.empty": torch.full((6,), 2.0)},
    )
    pruned, records = prune_adapter(adapter, RankPolicy(energy=0.9))
    by_name = {r["name"]: r for r in records}
    assert by_name["m.empty"]["rank"] == 0 and by_name["m.empty"]["bias_dropped"] is True
    assert "bias_dropped" not in by_name["m.live"] and by_name["m.live"]["rank"] >= 1
    assert set(pruned.modules) == set(pruned.lora_biases) == {"m.live"}
    assert torch.equal(pruned.lora_biases["m.live"], adapter.lora_biases["m.live"])
    save_peft(pruned, tmp_path)
    assert set(load_peft(tmp_path).lora_biases) == {"m.live"}


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # q/v with a base bias, and without one
def test_verify_merges_the_bias_changes_as_peft_applies_them(family: str, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phlora_nim.demo.toy_models import build_model
    from phlora_nim.jobs.verify import merged

    build_model(family).save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        build_model(family),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False),
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "src")
    ids = torch.randint(3, 90, (2, 12), generator=gen)
    expected = _peft_logits(tmp_path / "base", tmp_path / "src", ids)
    adapter = load_peft(tmp_path / "src")
    assert adapter.lora_biases
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad(), merged(base, adapter) as model:
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # restored
