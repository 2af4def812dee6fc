"""What we write for TensorRT-LLM is what its engine computes correctly, and the CPU reference
refuses what the real engine refuses (or would silently get wrong).

Upstream facts restated from the sources (nothing copied):
- ``LoraModule::createLoraModules`` (cpp/tensorrt_llm/runtime/loraModule.cpp): attn_dense is sized
  ``hidden × hidden`` even where o_proj takes num_heads × head_dim inputs.
- ``MLP.forward`` / ``GatedMLP.forward`` (tensorrt_llm/layers/mlp.py) assert "LoRA module
  'mlp_gate_up' is not supported"; ``fc_gate_lora`` takes the pair mlp_h_to_4h (gate) + mlp_gate (up)
  and concatenates ``[mlp_gate; mlp_h_to_4h]`` = [up; gate], the layout of the fused fc.
- ``typeFromNumpyDesc`` (cpp/tensorrt_llm/runtime/utils/numpyUtils.cpp) knows no bfloat16.
- ``PeftCacheManager::prefetchLoraWeights`` validates nothing; ``LoraCache::put`` looks the module up
  with ``unordered_map::at`` and ``BufferManager::copy`` insists on equal dtypes.
- ``Attention.forward`` (tensorrt_llm/layers/attention.py) needs q/k/v LoRA all or none;
  ``LoraManager.load_from_hf`` fills missing ones with zeros.
- ``LoraCache::copyToPages`` (loraCache.cpp) splits rows per TP rank without any notion of experts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.checkpoint import open_checkpoint
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS, TRTLLM_MODULES
from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.engines.trtllm_legacy.contract import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraRequestError,
    decode_row,
    encode_row,
    pack_rows,
)
from phlora_nim.engines.trtllm_legacy.tensors import (
    adapter_to_trtllm,
    check_engine,
    load_trtllm,
    save_trtllm,
    trtllm_to_adapter,
)
from phlora_nim.jobs import adapter_jobs as jobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def families(model_pairs, tmp_path_factory):
    """Full-rank adapters (they reproduce the fine-tune) of the families the rules are about."""
    out = {}
    for family in ("gemma", "phi3", "llama", "mixtral"):
        base, ft = model_pairs(family)
        folder = tmp_path_factory.mktemp(f"{family}-full") / "a"
        jobs.extract(base, ft, folder, ExtractOptions(policy=RankPolicy(energy=1.0, max_rank=512)), plot=False)
        out[family] = (base, ft, load_peft(folder), json.loads((base / "config.json").read_text()))
        out[f"{family}-folder"] = folder
    return out


def _modules(lora) -> list[str]:
    return [TRTLLM_MODULES[int(m)] for m in lora.config[0, :, 0]]


def _engine_config(config: dict, lora, **over) -> dict:
    """An engine config.json as trtllm-build writes it for this model and adapter."""
    pretrained = {
        "dtype": lora.dtype,
        "num_hidden_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "head_size": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        "intermediate_size": config["intermediate_size"],
        "mapping": {"tp_size": over.pop("tp", 1)},
    }
    if config.get("num_local_experts"):
        pretrained["moe"] = {"num_experts": config["num_local_experts"]}
    return {
        "version": "0.20.0",
        "pretrained_config": pretrained,
        "build_config": {
            "lora_config": {
                "max_lora_rank": 512,
                "lora_target_modules": over.pop("targets", sorted(set(_modules(lora)))),
            },
            "plugin_config": {"lora_plugin": lora.dtype},
        },
    }


# --- o_proj where heads × head_dim ≠ hidden -------------------------------------------------


def test_o_proj_is_left_out_with_the_energy_lost(families, caplog) -> None:
    _base, _ft, adapter, config = families["gemma"]
    assert config["num_attention_heads"] * config["head_dim"] != config["hidden_size"]
    with caplog.at_level(logging.WARNING):
        lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    assert "attn_dense" not in _modules(lora)
    o_proj = sorted(p for p in adapter.modules if p.endswith("o_proj"))
    assert list(lora.dropped) == o_proj and 0 < lora.dropped_energy < 1
    assert "o_proj" in caplog.text and f"{100 * lora.dropped_energy:.2f}%" in caplog.text
    with pytest.raises(OptionError, match=r"attn_dense .*hidden_size=64.* 96 inputs"):
        adapter_to_trtllm(adapter, config=config, dtype="float32", strict=True)
    # Llama's o_proj (heads × head_dim = hidden) is kept.
    llama = families["llama"]
    assert "attn_dense" in _modules(adapter_to_trtllm(llama[2], config=llama[3], dtype="float32"))


def test_energy_share_of_the_left_out_modules(families) -> None:
    _base, _ft, adapter, config = families["gemma"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    energy = {p: float(w.delta().double().pow(2).sum()) for p, w in adapter.modules.items()}
    assert lora.dropped_energy == pytest.approx(sum(energy[p] for p in lora.dropped) / sum(energy.values()), rel=1e-6)


def _gemma_engine(families):
    from phlora_nim.engines.trtllm_legacy.reference_engine import ReferenceEngine

    base, _ft, _adapter, config = families["gemma"]
    return ReferenceEngine.load(base, dtype="float32", max_lora_rank=512), config


def test_reference_reads_attn_dense_as_hidden_and_refuses_rows_laid_out_for_heads(families) -> None:
    engine, config = _gemma_engine(families)
    hidden, width = config["hidden_size"], config["num_attention_heads"] * config["head_dim"]
    shape = engine.modules[(TRTLLM_MODULE_IDS["attn_dense"], 0)]
    assert (shape.in_dim, shape.out_dim) == (hidden, hidden)  # the runtime's dims, not the layer's
    # A row laid out the way the layer wants it (A [r, nH·d]), as this project used to write it.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, width, generator=gen), torch.randn(hidden, 2, generator=gen)
    weights = pack_rows([encode_row([(a.numpy(), b.numpy())])], "float32")
    config_rows = np.array([[[TRTLLM_MODULE_IDS["attn_dense"], 0, 2]]], dtype=np.int32)
    with pytest.raises(LoraRequestError, match=r"attn_dense .*wrong delta"):
        engine.resolve(77, weights, config_rows)
    # What the converter writes now is taken.
    _base, _ft, adapter, _config = families["gemma"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    task = engine.resolve(78, lora.weights, lora.config)
    engine.release(task)


def test_check_engine_refuses_rows_laid_out_for_other_dims(families) -> None:
    _base, _ft, adapter, config = families["gemma"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    check_engine(lora, _engine_config(config, lora), where="engine")
    # The same adapter laid out for a model whose widths differ (another base model).
    other = dict(config, intermediate_size=config["intermediate_size"] * 2)
    with pytest.raises(InputError, match="other dims than the engine reads"):
        check_engine(lora, _engine_config(other, lora), where="engine")


# --- Phi-3 gate_up_proj ---------------------------------------------------------------------


def test_phi3_gate_up_becomes_the_pair_the_mlp_takes(families) -> None:
    base, ft, adapter, config = families["phi3"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    modules = _modules(lora)
    assert "mlp_gate_up" not in modules
    assert modules.count("mlp_h_to_4h") == modules.count("mlp_gate") == config["num_hidden_layers"]
    weights = torch.from_numpy(np.asarray(lora.weights, dtype=np.float32))[0]
    inter, hidden = config["intermediate_size"], config["hidden_size"]
    with open_checkpoint(base) as b0, open_checkpoint(ft) as b1:
        for layer in range(config["num_hidden_layers"]):
            name = f"model.layers.{layer}.mlp.gate_up_proj.weight"
            delta = b1.load(name).float() - b0.load(name).float()  # the fine-tune's fused [gate; up] delta
            got = {}
            for i, (module_id, row_layer, rank) in enumerate(lora.config[0]):
                if row_layer == layer and TRTLLM_MODULES[module_id] in ("mlp_h_to_4h", "mlp_gate"):
                    a, b = decode_row(weights[i], rank=int(rank), in_dim=hidden, out_dim=inter)
                    got[TRTLLM_MODULES[module_id]] = b[0] @ a[0]
            # fc_gate_lora: [mlp_gate; mlp_h_to_4h] = [up; gate] is added to the fused fc output [up; gate].
            fused_trt_order = torch.cat([got["mlp_gate"], got["mlp_h_to_4h"]])
            up, gate = delta[inter:], delta[:inter]
            assert torch.allclose(fused_trt_order, torch.cat([up, gate]), atol=1e-5), layer


def test_phi3_rows_round_trip_and_plan_names_the_pair(families, tmp_path: Path) -> None:
    _base, _ft, adapter, config = families["phi3"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32", tp=2)
    save_trtllm(lora, tmp_path)
    back = trtllm_to_adapter(load_trtllm(tmp_path))
    assert back.modules.keys() == adapter.modules.keys()
    for name, w in adapter.modules.items():
        assert torch.allclose(back.modules[name].delta(), w.delta(), atol=1e-5), name


def test_reference_phi3_serves_the_pair_like_the_fine_tune_and_refuses_mlp_gate_up(families) -> None:
    from phlora_nim.demo.toy_models import greedy_continuation
    from phlora_nim.engines.trtllm_legacy.reference_engine import GenerationRequest, ReferenceEngine

    base, _ft, adapter, config = families["phi3"]
    engine = ReferenceEngine.load(base, dtype="float32", max_lora_rank=512)
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    task = engine.resolve(5, lora.weights, lora.config)
    try:
        prompt = [3, 9, 14, 20, 7]
        got = engine.generate([GenerationRequest(input_ids=prompt, max_new_tokens=8, end_id=2, lora=task)])[0]
    finally:
        engine.release(task)
    assert got == greedy_continuation(base, prompt, 8, adapter=families["phi3-folder"])  # PEFT on the fused module
    # A fused mlp_gate_up row: the engine's MLP cannot take it, so it is not a module of the engine.
    a, b = torch.ones(1, config["hidden_size"]), torch.ones(2 * config["intermediate_size"], 1)
    weights = pack_rows([encode_row([(a.numpy(), b.numpy())])], "float32")
    rows = np.array([[[TRTLLM_MODULE_IDS["mlp_gate_up"], 0, 1]]], dtype=np.int32)
    with pytest.raises(LoraRequestError, match="lora module mlp_gate_up not enabled for this model"):
        engine.resolve(6, weights, rows)


# --- prefetch: bfloat16, modules the engine lacks -------------------------------------------


@pytest.fixture(scope="module")
def llama_engine(families):
    from phlora_nim.engines.trtllm_legacy.reference_engine import ReferenceEngine

    base = families["llama"][0]
    return ReferenceEngine.load(base, dtype="float32", max_lora_rank=512)


def _prefetch(root: Path, task_id: int, weights: np.ndarray, config: np.ndarray) -> Path:
    folder = root / str(task_id)
    folder.mkdir(parents=True)
    np.save(folder / WEIGHTS_FILE, weights)
    np.save(folder / CONFIG_FILE, config)
    return root


def test_reference_prefetch_fails_like_the_runtime(families, llama_engine, tmp_path: Path) -> None:
    _base, _ft, adapter, config = families["llama"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    assert llama_engine.prefetch(_prefetch(tmp_path / "ok", 11, lora.weights, lora.config)) == 1
    bf16 = adapter_to_trtllm(adapter, config=config, dtype="bfloat16")
    with pytest.raises(LoraRequestError, match="numpy data type 'V2' not supported"):
        llama_engine.prefetch(_prefetch(tmp_path / "bf16", 12, bf16.weights, bf16.config))
    f16 = adapter_to_trtllm(adapter, config=config, dtype="float16")
    with pytest.raises(LoraRequestError, match="Incompatible data types: float16 != float32"):
        llama_engine.prefetch(_prefetch(tmp_path / "f16", 13, f16.weights, f16.config))
    odd = lora.config.copy()
    odd[0, 0, 0] = TRTLLM_MODULE_IDS["cross_attn_q"]  # a module this engine does not have
    with pytest.raises(LoraRequestError, match="_Map_base::at"):
        llama_engine.prefetch(_prefetch(tmp_path / "odd", 14, lora.weights, odd))


def test_bfloat16_repositories_do_not_prefetch(tmp_path: Path) -> None:
    from phlora_nim.engines.trtllm_legacy.deploy import llm_config
    from phlora_nim.repository.registry import RegistryState
    from phlora_nim.repository.settings import RepositorySettings

    for backend in ("trtllm-legacy", "trtllm-legacy-cpu"):
        bf16 = RepositorySettings(backend=backend, base=str(tmp_path), dtype="bfloat16")
        assert bf16.lora_prefetch is False
        assert "lora_prefetch_dir" not in llm_config(bf16, RegistryState(), tmp_path).parameters
        f16 = RepositorySettings(backend=backend, base=str(tmp_path), dtype="float16")
        assert "lora_prefetch_dir" in llm_config(f16, RegistryState(), tmp_path).parameters
    saved = RepositorySettings(base=str(tmp_path), dtype="bfloat16")
    saved.save(tmp_path)
    assert RepositorySettings.load(tmp_path).lora_prefetch is False  # recorded for the router


# --- engine checks: tensor parallelism, q/k/v, experts --------------------------------------


def test_check_engine_refuses_another_tensor_parallelism(families) -> None:
    _base, _ft, adapter, config = families["llama"]
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    check_engine(lora, _engine_config(config, lora), where="engine")
    with pytest.raises(InputError, match=r"another tensor parallelism.*--tp 2"):
        check_engine(lora, _engine_config(config, lora, tp=2), where="engine")


def test_convert_for_tensorrtllm_needs_the_engine_config(tmp_path: Path) -> None:
    from phlora_nim.engines.trtllm_legacy.cache_settings import require_engine_config
    from phlora_nim.repository.settings import RepositorySettings

    def settings(backend: str) -> RepositorySettings:
        return RepositorySettings(backend=backend, base=str(tmp_path))

    require_engine_config(settings("trtllm-legacy-cpu"), None)
    require_engine_config(settings("trtllm-legacy"), tmp_path / "config.json")
    with pytest.raises(OptionError, match=r"--backend trtllm-legacy needs the engine's config\.json"):
        require_engine_config(settings("trtllm-legacy"), None)


def _partial_qkv() -> LoraAdapter:
    gen = torch.Generator().manual_seed(2)

    def lw(out: int, inp: int) -> LoraWeights:
        return LoraWeights(a=torch.randn(2, inp, generator=gen), b=torch.randn(out, 2, generator=gen), alpha=2.0)

    return LoraAdapter(
        modules={
            "model.layers.0.self_attn.q_proj": lw(64, 64),
            "model.layers.0.self_attn.v_proj": lw(32, 64),
            "model.layers.1.mlp.down_proj": lw(64, 96),
        }
    )


def test_missing_qkv_modules_get_zero_rows(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
    }
    adapter = _partial_qkv()
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    by_key = {(TRTLLM_MODULES[int(m)], int(layer)): (i, int(r)) for i, (m, layer, r) in enumerate(lora.config[0])}
    assert set(by_key) == {("attn_q", 0), ("attn_k", 0), ("attn_v", 0), ("mlp_4h_to_h", 1)}
    i, rank = by_key[("attn_k", 0)]
    assert rank == 1 and not np.asarray(lora.weights)[0, i].any()
    assert (lora.rows[i].in_dim, lora.rows[i].out_dim) == (64, 32)  # k's runtime dims (GQA)
    save_trtllm(lora, tmp_path)
    assert trtllm_to_adapter(load_trtllm(tmp_path)).modules.keys() == adapter.modules.keys()
    # An engine with only some of q/k/v cannot exist (attention asserts): refused as such.
    engine = _engine_config(config, lora, targets=["attn_q", "attn_v", "mlp_4h_to_h"])
    with pytest.raises(InputError, match="only some of attn_q/attn_k/attn_v"):
        check_engine(lora, engine, where="engine")


def test_expert_rows_are_refused_above_tp_1(families) -> None:
    _base, _ft, adapter, config = families["mixtral"]
    with pytest.raises(OptionError, match=r"cannot split expert \(MoE\) LoRA rows.*--tp 2"):
        adapter_to_trtllm(adapter, config=config, dtype="float32", tp=2)
    lora = adapter_to_trtllm(adapter, config=config, dtype="float32")
    engine = _engine_config(config, lora, tp=2)
    with pytest.raises(InputError, match="cannot split expert"):
        check_engine(lora, engine, where="engine")
    # Attention-only adapters of an MoE model are fine at TP 2.
    attention = LoraAdapter(modules={p: w for p, w in adapter.modules.items() if "self_attn" in p})
    assert "moe_h_to_4h" not in _modules(adapter_to_trtllm(attention, config=config, dtype="float32", tp=2))
