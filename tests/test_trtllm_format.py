"""TensorRT-LLM LoRA tensors: layout, scaling, fused modules, tensor parallelism, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS
from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.engines.trtllm_legacy.tensors import (
    adapter_to_trtllm,
    check_engine,
    load_trtllm,
    save_trtllm,
    trtllm_to_adapter,
)
from phlora_nim.jobs import adapter_jobs as jobs


@pytest.fixture(scope="module")
def adapters(model_pairs, tmp_path_factory):
    """Rank-4 adapters of a plain, a fused and an MoE family, plus their configs."""
    out = {}
    for family in ("llama", "phi3", "mixtral"):
        base, ft = model_pairs(family)
        folder = tmp_path_factory.mktemp(f"{family}-adapter") / "a"
        jobs.extract(base, ft, folder, ExtractOptions(policy=RankPolicy(energy=0.6, max_rank=4)), plot=False)
        out[family] = (load_peft(folder), json.loads((base / "config.json").read_text()))
    return out


def _rows(lora):
    w = torch.from_numpy(np.asarray(lora.weights, dtype=np.float32))[0]
    return w, lora.config[0]


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
def test_round_trip_is_exact_in_float32(family: str, adapters, tmp_path: Path) -> None:
    adapter, config = adapters[family]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    save_trtllm(lora, tmp_path)
    back = trtllm_to_adapter(load_trtllm(tmp_path))
    assert back.modules.keys() == adapter.modules.keys()
    for name, w in adapter.modules.items():
        assert torch.allclose(back.modules[name].delta(), w.delta(), atol=1e-6), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_in_storage_dtype(dtype: str, adapters, tmp_path: Path) -> None:
    adapter, config = adapters["llama"]
    save_trtllm(adapter_to_trtllm(adapter, config=config, dtype=dtype), tmp_path)
    raw = np.load(tmp_path / "model.lora_weights.npy")
    if dtype == "bfloat16":
        assert raw.dtype == np.dtype("V2")  # what TensorRT-LLM itself writes for bfloat16
    back = trtllm_to_adapter(load_trtllm(tmp_path))
    tol = 1e-2 if dtype == "bfloat16" else 2e-3
    for name, w in adapter.modules.items():
        ref = w.delta()
        assert (back.modules[name].delta() - ref).norm() <= tol * ref.norm(), name


def test_rows_hold_scaled_factors_and_module_ids(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)

    def lw(r: int, out: int, inp: int, alpha: float) -> LoraWeights:
        return LoraWeights(a=torch.randn(r, inp, generator=gen), b=torch.randn(out, r, generator=gen), alpha=alpha)

    adapter = LoraAdapter(
        modules={
            "model.layers.0.mlp.gate_proj": lw(4, 96, 64, 16.0),
            "model.layers.0.mlp.up_proj": lw(2, 96, 64, 3.0),
            "model.layers.1.self_attn.q_proj": lw(3, 64, 64, 6.0),
        },
        use_rslora=True,
    )
    lora = adapter_to_trtllm(adapter, dtype="float32")
    weights, config = _rows(lora)
    # 3 rows plus zero rows for attn_k and attn_v beside layer 1's q_proj (attention takes all three)
    assert config.dtype == np.int32 and lora.weights.shape == (1, 5, 4 * (96 + 64))
    by_key = {(int(m), int(layer)): (i, int(r)) for i, (m, layer, r) in enumerate(config)}
    for path, module, layer in (
        ("model.layers.0.mlp.gate_proj", "mlp_h_to_4h", 0),  # gate_proj → 5, not 7
        ("model.layers.0.mlp.up_proj", "mlp_gate", 0),
        ("model.layers.1.self_attn.q_proj", "attn_q", 1),
    ):
        i, r = by_key[(TRTLLM_MODULE_IDS[module], layer)]
        w = adapter.modules[path]
        assert r == w.rank
        out, inp = w.b.shape[0], w.a.shape[1]
        a = weights[i, : r * inp].reshape(r, inp)
        b = weights[i, r * inp : r * (inp + out)].reshape(out, r)
        assert torch.count_nonzero(weights[i, r * (inp + out) :]) == 0  # zero padding
        assert torch.allclose(b @ a, w.delta(use_rslora=True), atol=1e-5)  # alpha/sqrt(r) folded in


def _cache_shard(b: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The contiguous block of B rows the TensorRT-LLM cache gives one tensor-parallel rank."""
    step = b.shape[0] // tp
    return b[rank * step : (rank + 1) * step]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_modules_at_tensor_parallelism(tp: int, adapters) -> None:
    adapter, config = adapters["phi3"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32", tp=tp)
    weights, rows = _rows(lora)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // heads
    for i, (_module_id, _layer, r) in enumerate(rows):
        meta = lora.rows[i]
        (path,) = meta.modules
        inp, out = meta.in_dim, meta.out_dim
        a = weights[i, : r * inp].reshape(r, inp)
        b = weights[i, r * inp : r * (inp + out)].reshape(out, r)
        delta = adapter.modules[path].delta()
        if meta.trtllm == "attn_qkv":
            blocks = torch.split(delta, [heads * d, kv * d, kv * d])
        elif meta.part is not None:  # gate_up_proj as mlp_h_to_4h (gate half) + mlp_gate (up half), split apart
            part, parts = meta.part
            blocks = (delta.chunk(parts)[part],)
        else:
            blocks = (delta,)
            if meta.trtllm not in ("attn_dense", "mlp_4h_to_h"):
                raise AssertionError(meta)
            continue
        for rank in range(tp):
            expected = torch.cat([blk.chunk(tp)[rank] for blk in blocks])
            assert torch.allclose(_cache_shard(b, tp, rank) @ a, expected, atol=1e-5), (path, rank)


def test_moe_rows_stack_experts(adapters) -> None:
    adapter, config = adapters["mixtral"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    weights, rows = _rows(lora)
    experts = config["num_local_experts"]
    moe = [i for i, (m, _, _) in enumerate(rows) if m == TRTLLM_MODULE_IDS["moe_h_to_4h"]]
    assert len(moe) == config["num_hidden_layers"]
    i = moe[0]
    r, meta = int(rows[i][2]), lora.rows[i]
    inp, out = meta.in_dim, meta.out_dim
    a = weights[i, : experts * r * inp].reshape(experts, r, inp)
    b = weights[i, experts * r * inp : experts * r * (inp + out)].reshape(experts, out, r)
    for e, path in enumerate(meta.modules):
        assert path.endswith(f"experts.{e}.w1")
        assert torch.allclose(b[e] @ a[e], adapter.modules[path].delta(), atol=1e-5)


def _engine(**over) -> dict:
    cfg = {
        "pretrained_config": {"dtype": "float16", "num_hidden_layers": 2},
        "build_config": {
            "lora_config": {
                "max_lora_rank": 4,
                "lora_target_modules": [
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_dense",
                    "mlp_h_to_4h",
                    "mlp_4h_to_h",
                    "mlp_gate",
                ],
            },
            "plugin_config": {"lora_plugin": "float16"},
        },
    }
    for key, value in over.items():
        section, field = key.split("__")
        cfg[section if section == "pretrained_config" else "build_config"].setdefault(section, {})
        target = cfg["pretrained_config"] if section == "pretrained_config" else cfg["build_config"][section]
        target[field] = value
    return cfg


def test_engine_accepts_matching_adapter(adapters) -> None:
    adapter, config = adapters["llama"]
    check_engine(adapter_to_trtllm(adapter, config=config), _engine(), where="engine/config.json")


@pytest.mark.parametrize(
    ("over", "dtype", "match"),
    [
        ({"plugin_config__lora_plugin": None}, "float16", "built without LoRA"),
        ({}, "bfloat16", "same data type as base model"),
        ({"lora_config__max_lora_rank": 2}, "float16", "Invalid low_rank"),
        ({"lora_config__lora_target_modules": ["attn_q", "attn_v"]}, "float16", "not enabled for this model"),
        ({"pretrained_config__num_hidden_layers": 1}, "float16", "range \\[0, numModelLayers\\)"),
    ],
)
def test_engine_rejects(over: dict, dtype: str, match: str, adapters) -> None:
    adapter, config = adapters["llama"]
    with pytest.raises(InputError, match=match):
        check_engine(adapter_to_trtllm(adapter, config=config, dtype=dtype), _engine(**over), where="engine")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: (d / "model.lora_weights.npy").unlink(), "file missing"),
        (lambda d: (d / "model.lora_config.npy").write_bytes(b"\x93NUMPY garbage"), "corrupt or truncated"),
        (
            lambda d: (d / "model.lora_weights.npy").write_bytes((d / "model.lora_weights.npy").read_bytes()[:200]),
            "corrupt or truncated",
        ),
        (lambda d: np.save(d / "model.lora_config.npy", np.zeros((1, 3, 3), dtype=np.int64)), "must be int32"),
        (lambda d: np.save(d / "model.lora_config.npy", np.zeros((1, 2, 3), dtype=np.int32)), "same size"),
        (lambda d: (d / "phlora_trtllm.json").write_text("{broken"), "unreadable sidecar"),
        (lambda d: (d / "phlora_trtllm.json").write_text('{"rows": [7]}'), r"rows\[0\]: unreadable row description"),
        (lambda d: (d / "phlora_trtllm.json").write_text('{"rows": [{"modules": []}]}'), "unreadable row description"),
    ],
)
def test_bad_npy_files(make, match: str, adapters, tmp_path: Path) -> None:
    adapter, config = adapters["llama"]
    save_trtllm(adapter_to_trtllm(adapter, config=config), tmp_path)
    make(tmp_path)
    with pytest.raises(InputError, match=match):
        load_trtllm(tmp_path)


def test_bad_options(adapters) -> None:
    adapter, _config = adapters["llama"]
    with pytest.raises(OptionError, match="unknown dtype"):
        adapter_to_trtllm(adapter, dtype="int8")
    with pytest.raises(OptionError, match="≥ 1"):
        adapter_to_trtllm(adapter, tp=0)
    saved = LoraAdapter(modules=adapter.modules, modules_to_save={"lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(InputError, match="cannot apply"):
        adapter_to_trtllm(saved)


def test_bfloat16_values_survive_v2_storage(tmp_path: Path) -> None:
    adapter = LoraAdapter(
        modules={
            "model.layers.0.self_attn.q_proj": LoraWeights(
                a=torch.full((1, 4), 1.5), b=torch.full((4, 1), -0.25), alpha=1.0
            )
        }
    )
    save_trtllm(adapter_to_trtllm(adapter, dtype="bfloat16"), tmp_path)
    lora = load_trtllm(tmp_path)
    assert lora.weights.dtype == ml_dtypes.bfloat16 and lora.dtype == "bfloat16"
    assert float(np.asarray(lora.weights, dtype=np.float32)[0, 0, 0]) == 1.5


def test_rank_and_cache_full_texts_are_the_runtimes() -> None:
    # loraUtils.cpp loraValidateRequestTensors; peftCacheManager.cpp PeftCacheManager::addRequestPeft.
    from phlora_nim.engines.trtllm_legacy.contract import cache_full_message, rank_message

    assert rank_message(96, 64) == "Invalid low_rank (96). low_rank must be smaller than mMaxLowRank (64)"
    assert cache_full_message(12) == "PEFT Cache is full. Could not store taskId=12"


def test_layout_takes_the_family_map_from_the_extraction_plan(model_pairs, adapters) -> None:
    """``--target-modules`` chooses targets, but the rows still follow the family's map, as planned."""
    from phlora_nim.converters.architecture import builtin_maps
    from phlora_nim.converters.checkpoint import open_checkpoint
    from phlora_nim.converters.extract import plan_extraction

    base, ft = model_pairs("llama")
    options = ExtractOptions(policy=RankPolicy(rank=2), target_modules=r".*\.(q_proj|v_proj)")
    plan = plan_extraction(open_checkpoint(base), open_checkpoint(ft), options)
    assert plan.family == "custom" and plan.architecture is not None and plan.architecture.family == "llama"
    adapter, config = adapters["llama"]
    planned = adapter_to_trtllm(adapter, architecture=plan.architecture, dtype="float32")
    inferred = adapter_to_trtllm(adapter, config=config, dtype="float32")
    assert np.array_equal(planned.config, inferred.config) and planned.rows == inferred.rows
    # The map given is the map used: another family's does not fit these modules.
    phi3 = next(m for m in builtin_maps() if m.family == "phi3")
    with pytest.raises(InputError, match="no TensorRT-LLM LoRA module"):
        adapter_to_trtllm(adapter, architecture=phi3, dtype="float32")
