"""A PEFT folder with mixed ranks computes the same update under every loader that reads it.

Each loader's scaling rule, restated from its source (no loader code is copied):

- PEFT: ``LoraModel._create_and_replace`` (src/peft/tuners/lora/model.py) takes r and alpha from
  ``rank_pattern`` / ``alpha_pattern`` (``get_pattern_key``, src/peft/utils/other.py) or the globals;
  ``LoraLayer.update_layer`` (layer.py) sets ``scaling = alpha / r`` (``/ sqrt(r)`` with rsLoRA); the
  tensors must have rank r.
- vLLM: ``PEFTHelper.__post_init__`` (vllm/lora/peft_helper.py) sets one
  ``vllm_lora_scaling_factor = lora_alpha / r`` from the globals; ``from_dict`` drops
  ``rank_pattern`` / ``alpha_pattern`` silently; ``validate_legal`` refuses ``r > max_lora_rank``.
- TensorRT-LLM, current: ``LoraManager.load_from_hf`` (tensorrt_llm/_torch/peft/lora/manager.py)
  reads only ``r``, ``lora_alpha``, ``use_rslora`` and scales each module by
  ``lora_alpha / tensor_rank`` (the rank of its lora_A), folded into B.
- TensorRT-LLM, older (``examples/hf_lora_convert.py`` ``convert_hf_model``, old ``lora_manager.py``):
  ``lora_alpha / r`` from the globals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.formats.peft import load_peft, save_peft
from phlora_nim.converters.scale_rules import pattern_key

Rule = tuple[str, object]


def _peft_scale(cfg: dict, name: str, a: torch.Tensor) -> float:
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rk, ak = pattern_key(ranks, name), pattern_key(alphas, name)
    r = ranks[rk] if rk is not None else cfg["r"]
    alpha = alphas[ak] if ak is not None else cfg["lora_alpha"]
    if a.shape[0] != r:  # PEFT builds lora_A with rank r: loading another shape is a size mismatch
        raise RuntimeError(f"size mismatch for {name}: checkpoint rank {a.shape[0]}, model rank {r}")
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _vllm_scale(cfg: dict, name: str, a: torch.Tensor) -> float:
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])


def _trtllm_scale(cfg: dict, name: str, a: torch.Tensor) -> float:
    rank = a.shape[0]
    return cfg["lora_alpha"] / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


RULES = {"peft": _peft_scale, "vllm": _vllm_scale, "trtllm": _trtllm_scale, "trtllm-old": _vllm_scale}


def _deltas_under(rule, folder: Path) -> dict[str, torch.Tensor]:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        out[name] = rule(cfg, name, a) * (b.double() @ a.double())
    return out


def _mixed_adapter(use_rslora: bool = False) -> LoraAdapter:
    gen = torch.Generator().manual_seed(3)

    def lw(r: int, out: int, inp: int, alpha: float) -> LoraWeights:
        return LoraWeights(a=torch.randn(r, inp, generator=gen), b=torch.randn(out, r, generator=gen), alpha=alpha)

    return LoraAdapter(
        modules={
            "model.layers.0.self_attn.q_proj": lw(8, 64, 64, 8.0),
            "model.layers.0.self_attn.v_proj": lw(8, 32, 64, 16.0),
            "model.layers.0.mlp.down_proj": lw(3, 64, 96, 3.0),
            "model.layers.1.self_attn.q_proj": lw(5, 64, 64, 2.5),
            "model.layers.1.mlp.gate_proj": lw(1, 96, 64, 7.0),
        },
        use_rslora=use_rslora,
    )


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("loader", sorted(RULES))
def test_mixed_ranks_reproduce_the_update_under_every_loader(loader: str, use_rslora: bool, tmp_path: Path) -> None:
    adapter = _mixed_adapter(use_rslora)
    save_peft(adapter, tmp_path)
    got = _deltas_under(RULES[loader], tmp_path)
    assert got.keys() == adapter.modules.keys()
    for name, w in adapter.modules.items():
        want = w.delta(use_rslora=use_rslora).double()
        assert torch.allclose(got[name], want, atol=1e-5 * want.abs().max()), (loader, name)


def test_portable_config_has_one_rank_and_no_patterns(tmp_path: Path) -> None:
    save_peft(_mixed_adapter(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and not cfg["use_rslora"]
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    # vLLM refuses r > max_lora_rank: the folder needs an engine whose max rank is the largest module's.
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {8}


def test_reading_back_recovers_true_ranks_and_update(tmp_path: Path) -> None:
    adapter = _mixed_adapter(use_rslora=True)
    save_peft(adapter, tmp_path)
    back = load_peft(tmp_path)
    assert back.ranks() == adapter.ranks()
    for name, w in adapter.modules.items():
        assert torch.allclose(back.modules[name].delta(use_rslora=back.use_rslora), w.delta(use_rslora=True), atol=1e-4)


def test_third_party_patterns_still_load(tmp_path: Path) -> None:
    """A folder as PEFT's own ``save_pretrained`` writes it with patterns (not our portable form)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    a4, b4 = torch.randn(4, 16, generator=gen), torch.randn(16, 4, generator=gen)
    a2, b2 = torch.randn(2, 16, generator=gen), torch.randn(16, 2, generator=gen)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a4,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b4,
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": a2,
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": b2,
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = load_peft(tmp_path)
    assert adapter.ranks() == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 2}
    assert torch.allclose(adapter.modules["model.layers.0.self_attn.v_proj"].delta(), 3.0 * (b2 @ a2))
    assert torch.allclose(adapter.modules["model.layers.0.self_attn.q_proj"].delta(), 2.0 * (b4 @ a4))


@pytest.mark.slow
def test_real_peft_merges_the_fine_tune_update(tmp_path: Path) -> None:
    """Real PEFT on a tiny Llama: merged weights minus base weights equal every module's update."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    adapter = _mixed_adapter()
    save_peft(adapter, tmp_path)
    merged = PeftModel.from_pretrained(base, str(tmp_path)).merge_and_unload()
    after = dict(merged.named_parameters())
    for name, w in adapter.modules.items():
        key = f"{name}.weight"
        assert torch.allclose(after[key] - before[key], w.delta(), atol=1e-5), name
