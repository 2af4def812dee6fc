"""Every supported family, really fine-tuned: extraction, PEFT loading, exactness at full rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phlora_nim.converters.architecture import find_map
from phlora_nim.converters.checkpoint import open_checkpoint
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.converters.rank_policy import VLLM_RANKS, RankPolicy
from phlora_nim.demo.toy_models import FAMILIES, training_batch
from phlora_nim.jobs import adapter_jobs as jobs
from phlora_nim.jobs.verify import reconstruction_errors

# transformers ≥ 5 fuses Mixtral experts into 3-D parameters at load time, so PEFT cannot attach
# LoRA to w1/w2/w3 in memory; the adapter is checked against the checkpoint deltas instead.
PEFT_LOADABLE = [f for f in FAMILIES if f != "mixtral"]


def _logits(model, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=training_batch(vocab, batch=2, length=16, seed=9)).logits.float()


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Each toy family: the architecture map it must get and the modules that map must find in every layer.
EXPECTED_MAPS = {
    "llama": ("llama", LLAMA_LIKE),
    "mistral": ("llama", LLAMA_LIKE),
    "qwen2": ("qwen2", LLAMA_LIKE),
    "qwen3": ("qwen2", LLAMA_LIKE),
    "gemma": ("gemma", LLAMA_LIKE),
    "gemma2": ("gemma", LLAMA_LIKE),
    "phi3": ("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "mixtral": ("mixtral", ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate")),
}


def test_every_family_has_an_expected_map() -> None:
    assert set(EXPECTED_MAPS) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_map_covers_every_linear_module(family: str, model_pairs) -> None:
    """The family's own map, and every linear weight of every decoder layer (each 2-D ``.weight``:
    Mixtral's experts' w1/w2/w3 and its router gate too) matched by the spec named after it."""
    _base, ft = model_pairs(family)
    ckpt = open_checkpoint(ft)
    amap = find_map(ckpt.config)
    family_map, modules = EXPECTED_MAPS[family]
    assert amap is not None and amap.family == family_map
    layers = ckpt.config["num_hidden_layers"]
    linear = [
        n
        for n in ckpt.names()
        if n.startswith("model.layers.") and n.endswith(".weight") and len(ckpt.info(n).shape) == 2
    ]
    found: dict[int, set[str]] = {layer: set() for layer in range(layers)}
    for name in linear:
        module = name[: -len(".weight")]
        hit = amap.match(module)
        assert hit is not None, f"{family}: no spec of map {amap.family!r} matches the linear weight {name}"
        spec, layer = hit
        assert spec.name == module.rsplit(".", 1)[1], f"{name} matched by spec {spec.name!r}"
        assert layer is not None and 0 <= layer < layers
        in_dim, out_dim = amap.dims(spec, ckpt.config)
        assert ckpt.info(name).shape == (out_dim, in_dim), name
        assert spec.trtllm_id is not None
        found[layer].add(spec.name)
    assert all(names == set(modules) for names in found.values()), found
    if family == "mixtral":  # every expert of every layer: 4 attention, the router gate, w1/w2/w3 per expert
        experts = ckpt.config["num_local_experts"]
        assert len(linear) == layers * (5 + 3 * experts)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_adapter_reproduces_finetune(family: str, model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs(family)
    out = tmp_path / "full"
    report = jobs.extract(
        base, ft, out, ExtractOptions(policy=RankPolicy(energy=1.0, max_rank=512), non_linear_deltas="save")
    )
    assert report["totals"]["min_energy_kept"] > 0.999999
    rec = reconstruction_errors(base, ft, out)
    assert rec["max_relative_error"] < 1e-4
    if family not in PEFT_LOADABLE:
        return
    from peft import PeftModel

    ft_model = _load(ft)
    adapted = PeftModel.from_pretrained(_load(base), str(out)).eval()
    vocab = ft_model.config.vocab_size
    assert torch.allclose(_logits(adapted, vocab), _logits(ft_model, vocab), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", PEFT_LOADABLE)
def test_low_rank_adapter_loads_in_peft_and_moves_toward_finetune(family: str, model_pairs, tmp_path: Path) -> None:
    from peft import PeftModel

    base, ft = model_pairs(family)
    out = tmp_path / "r8"
    jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(rank=8)))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert cfg["modules_to_save"] is None  # servable as is: linear modules only
    base_model = _load(base)
    vocab = base_model.config.vocab_size
    base_logits = _logits(base_model, vocab)
    adapted = PeftModel.from_pretrained(base_model, str(out)).eval()
    ft_logits = _logits(_load(ft), vocab)
    # The adapter must change the base model, toward the fine-tune.
    assert (_logits(adapted, vocab) - ft_logits).norm() < (base_logits - ft_logits).norm()


def test_error_falls_monotonically_with_rank(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    previous: dict[str, float] = {}
    for rank in (1, 2, 4, 8, 16, 32):
        report = jobs.extract(base, ft, tmp_path / f"r{rank}", ExtractOptions(policy=RankPolicy(rank=rank)), plot=False)
        errors = {m["name"]: m["relative_error"] for m in report["modules"]}
        for name, err in errors.items():
            assert err <= previous.get(name, 1.0) + 1e-9, (name, rank)
        previous = errors


def test_randomized_matches_exact_on_real_deltas(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    fast = jobs.extract(base, ft, tmp_path / "fast", ExtractOptions(policy=RankPolicy(rank=6)), plot=False)
    exact = jobs.extract(
        base, ft, tmp_path / "exact", ExtractOptions(policy=RankPolicy(rank=6), exact=True), plot=False
    )
    for f, e in zip(fast["modules"], exact["modules"], strict=True):
        assert f["energy_kept"] / e["energy_kept"] >= 0.999


def test_energy_policy_meets_threshold(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("qwen2")
    report = jobs.extract(base, ft, tmp_path / "e", ExtractOptions(policy=RankPolicy(energy=0.8, max_rank=64)))
    for m in report["modules"]:
        assert m["energy_kept"] >= 0.8 - 1e-9
        # Smallest such rank: one less would not do.
        curve = m["energy_curve"]
        assert m["rank"] == 1 or curve[m["rank"] - 2] < 0.8
    # Qwen2's attention biases changed: measured and dropped, not silently ignored.
    biases = [x for x in report["extras"] if x["kind"] == "bias"]
    assert biases and all(x["action"] == "dropped" and x["delta_energy"] > 0 for x in biases)


def test_budget_policy_spends_budget_with_heterogeneous_ranks(model_pairs, tmp_path: Path) -> None:
    from peft import PeftModel

    base, ft = model_pairs("llama")
    budget = 20_000
    out = tmp_path / "b"
    report = jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(budget_params=budget, max_rank=32)))
    spent = report["totals"]["adapter_parameters"]
    assert spent <= budget
    smallest_step = min(m["shape"][0] + m["shape"][1] for m in report["modules"])
    assert budget - spent < smallest_step
    cfg = json.loads((out / "adapter_config.json").read_text())
    ranks = {m["name"]: m["rank"] for m in report["modules"] if m["rank"]}
    assert len(set(ranks.values())) > 1  # heterogeneous ranks, kept in the report
    # Written portably: one rank (the largest), scale folded, no patterns; PEFT loads every tensor.
    assert cfg["r"] == cfg["lora_alpha"] == max(ranks.values()) and not cfg["rank_pattern"]
    model = PeftModel.from_pretrained(_load(base), str(out))
    for name in ranks:
        assert model.get_submodule("base_model.model." + name).r["default"] == cfg["r"]
    # Reading it back trims the zero padding: the true ranks again.
    assert load_peft(out).ranks() == ranks


def test_snap_ranks_vllm(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    report = jobs.extract(
        base, ft, tmp_path / "s", ExtractOptions(policy=RankPolicy(energy=0.5, max_rank=40, snap="vllm")), plot=False
    )
    assert all(m["rank"] in VLLM_RANKS or m["rank"] == min(m["shape"]) for m in report["modules"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtype(dtype: str, model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    out = tmp_path / dtype
    jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(rank=4), dtype=dtype), plot=False)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as h:
        assert {h.get_tensor(k).dtype for k in h.keys()} == {getattr(torch, dtype)}  # noqa: SIM118


def test_sharded_bin_and_single_file_inputs_agree(model_pairs, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, ft = model_pairs("llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(ft)).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((ft / "config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(str(ft / "model.safetensors")), binary / "pytorch_model.bin")
    reports = []
    for i, source in enumerate((ft, sharded, binary, ft / "model.safetensors")):
        base_src = base / "model.safetensors" if source.name.endswith(".safetensors") else base
        r = jobs.extract(base_src, source, tmp_path / f"o{i}", ExtractOptions(policy=RankPolicy(rank=4)), plot=False)
        reports.append([round(m["energy_kept"], 6) for m in r["modules"]])
    assert all(r == reports[0] for r in reports)


def test_extra_save_writes_modules_to_save(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("qwen2")
    out = tmp_path / "save"
    jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(rank=4), non_linear_deltas="save"), plot=False)
    adapter = load_peft(out)
    assert "lm_head.weight" in adapter.modules_to_save and "model.embed_tokens.weight" in adapter.modules_to_save
    assert "model.layers.0.self_attn.q_proj" in adapter.lora_biases
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and "lm_head" in cfg["modules_to_save"]


def test_reconstruction_error_counts_a_bias_change_the_adapter_drops(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("qwen2")
    full = RankPolicy(energy=1.0, max_rank=512)
    errors = {}
    for mode in ("save", "drop"):
        jobs.extract(base, ft, tmp_path / mode, ExtractOptions(policy=full, non_linear_deltas=mode), plot=False)
        errors[mode] = reconstruction_errors(base, ft, tmp_path / mode)["per_module"]
    q = "model.layers.0.self_attn.q_proj"
    assert errors["save"][q] < 1e-4  # full rank and the bias change carried: exact
    assert errors["drop"][q] > 1e-3  # the same weights, the bias change left out: counted
    assert errors["drop"]["model.layers.0.self_attn.o_proj"] < 1e-4  # no bias there


def test_outputs_and_report(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("gemma")
    out = tmp_path / "g"
    report = jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(rank=4)), command="phlora-nim extract …")
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "phlora_report.json",
        "energy.png",
    }
    assert (out / "energy.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / "phlora_report.json").read_text())
    assert on_disk["command"] == "phlora-nim extract …" and on_disk["family"] == "gemma"
    m = on_disk["modules"][0]
    assert {"name", "shape", "rank", "energy_kept", "relative_error", "top_singular_values"} <= set(m)
    assert report["totals"]["energy_kept_total"] <= report["totals"]["energy_kept_linear"]
    assert set(report["timings"]) >= {"load_s", "decompose_s", "total_s"}


def test_zero_deltas_are_skipped_and_reported(model_pairs, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    base, ft = model_pairs("llama")
    frozen = tmp_path / "frozen"
    shutil.copytree(ft, frozen)
    tensors = load_file(str(frozen / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj"
    tensors[f"{name}.weight"] = load_file(str(base / "model.safetensors"))[f"{name}.weight"]
    save_file(tensors, str(frozen / "model.safetensors"), metadata={"format": "pt"})
    report = jobs.extract(base, frozen, tmp_path / "a", ExtractOptions(policy=RankPolicy(rank=4)), plot=False)
    zero = [m for m in report["modules"] if m["zero_delta"]]
    assert [m["name"] for m in zero] == [name] and zero[0]["rank"] == 0
    assert report["totals"]["zero_delta_modules"] == 1
    assert name not in load_peft(tmp_path / "a").modules


def test_vocabulary_resize_is_saved_with_extra_save(model_pairs, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    base, ft = model_pairs("llama")
    grown = tmp_path / "grown"
    shutil.copytree(ft, grown)
    tensors = load_file(str(grown / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = torch.cat([tensors[key], torch.randn(4, tensors[key].shape[1])])
    save_file(tensors, str(grown / "model.safetensors"), metadata={"format": "pt"})
    report = jobs.extract(
        base, grown, tmp_path / "a", ExtractOptions(policy=RankPolicy(rank=4), non_linear_deltas="save"), plot=False
    )
    resized = {x["name"]: x for x in report["extras"] if x["resized"]}
    assert set(resized) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(x["action"] == "saved" for x in resized.values())
    saved = load_peft(tmp_path / "a").modules_to_save
    assert saved["model.embed_tokens.weight"].shape[0] == 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(dtype: torch.dtype, tmp_path: Path) -> None:
    from phlora_nim.demo.toy_models import make_pair

    base, ft = make_pair("llama", tmp_path / "pair", steps=6, dtype=dtype)
    out = tmp_path / "a"
    report = jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(energy=1.0, max_rank=512)), plot=False)
    assert report["dtype"] == str(dtype).removeprefix("torch.")  # auto: the fine-tune's dtype
    assert report["totals"]["min_energy_kept"] > 0.999999
    # Full rank in float32 compute reproduces the half-precision delta up to its storage rounding.
    rec = reconstruction_errors(base, ft, out)
    assert rec["max_relative_error"] < (1e-2 if dtype == torch.bfloat16 else 2e-3)
