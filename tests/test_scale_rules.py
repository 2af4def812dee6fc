"""Each engine's scale rule, applied to the folders we write, against what real PEFT computes.

The rules are data in ``phlora_nim.converters.scale_rules``, restated from (no code copied):
PEFT ``LoraModel._create_and_replace`` (huggingface/peft src/peft/tuners/lora/model.py) with
``get_pattern_key`` (src/peft/utils/other.py); TensorRT-LLM ``LoraManager.load_from_hf``
(NVIDIA/TensorRT-LLM tensorrt_llm/lora_manager.py: ``scale = lora_alpha / effective_rank``, the
rank of that module's lora_A, patterns never read); vLLM ``PEFTHelper.__post_init__``
(vllm-project/vllm vllm/lora/peft_helper.py, before 0.32: one ``lora_alpha / r``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.formats.peft import load_peft, save_peft, stored_parameters
from phlora_nim.converters.scale_rules import ENGINE_LAYOUT, LAYOUTS, READ_BY, RULES

# Ranks that differ per module, alphas that are not the rank, a bias change: every fold is exercised.
SHAPES = {
    "model.layers.0.self_attn.q_proj": (8, 64, 64, 8.0),
    "model.layers.0.self_attn.v_proj": (8, 64, 32, 16.0),
    "model.layers.0.mlp.down_proj": (3, 96, 64, 3.0),
    "model.layers.1.self_attn.q_proj": (5, 64, 64, 2.5),
    "model.layers.1.mlp.gate_proj": (1, 64, 96, 7.0),
    "model.layers.1.mlp.up_proj": (8, 64, 96, 4.0),
}


def _adapter(use_rslora: bool = False) -> LoraAdapter:
    gen = torch.Generator().manual_seed(5)
    modules = {
        name: LoraWeights(a=torch.randn(r, i, generator=gen), b=torch.randn(o, r, generator=gen), alpha=alpha)
        for name, (r, i, o, alpha) in SHAPES.items()
    }
    bias = {"model.layers.1.self_attn.q_proj": torch.randn(64, generator=gen)}
    return LoraAdapter(modules=modules, use_rslora=use_rslora, lora_biases=bias)


def _under_rule(engine: str, folder: Path) -> dict[str, torch.Tensor]:
    """Every module's update as ``engine`` computes it from the folder: its scale times B·A."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[name] = RULES[engine].scale(cfg, name, int(a.shape[0])) * (b.double() @ a.double())
    return out


INPUTS = torch.randn(5, 96, generator=torch.Generator().manual_seed(9))


def _x(name: str) -> torch.Tensor:
    return INPUTS[:, : SHAPES[name][1]]


@pytest.fixture(scope="module")
def peft_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[Path, dict]]:
    """Per (layout, rsLoRA source): the folder, and what real PEFT's LoRA layer adds to each module's
    output on fixed inputs (its forward minus its base layer's)."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    out = {}
    for layout in LAYOUTS:
        for rslora in (False, True):
            folder = tmp_path_factory.mktemp(f"{layout}-{rslora}")
            save_peft(_adapter(rslora), folder, layout=layout)
            torch.manual_seed(0)
            model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), str(folder)).eval()
            added = {}
            with torch.no_grad():
                for name in SHAPES:
                    layer = model.base_model.model.get_submodule(name)
                    added[name] = layer(_x(name)) - layer.base_layer(_x(name))
            out[(layout, rslora)] = (folder, added)
    return out


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_real_peft_applies_the_true_update(peft_outputs, layout: str, rslora: bool) -> None:
    _, added = peft_outputs[(layout, rslora)]
    adapter = _adapter(rslora)
    for name, w in adapter.modules.items():
        want = _x(name) @ w.delta(use_rslora=rslora).T + adapter.lora_biases.get(name, torch.zeros(()))
        assert torch.allclose(added[name], want, atol=1e-4), (layout, name)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("layout", "engine"), [(lay, e) for lay in LAYOUTS for e in RULES])
def test_each_engine_rule_on_each_layout_against_peft(peft_outputs, layout: str, engine: str, rslora: bool) -> None:
    """An engine meant to read a layout computes PEFT's outputs on every module; vLLM's global rule on
    the mixed folder does not, which is why vLLM gets the padded one."""
    folder, added = peft_outputs[(layout, rslora)]
    got = _under_rule(engine, folder)
    biases = _adapter(rslora).lora_biases
    same = all(
        torch.allclose(_x(n) @ got[n].float().T + biases.get(n, torch.zeros(())), added[n], atol=1e-4) for n in SHAPES
    )
    assert same == (engine in READ_BY[layout]), (layout, engine)  # type: ignore[index]
    assert layout == "padded" or same == (ENGINE_LAYOUT[engine] == "mixed")


def test_mixed_folder_holds_the_true_ranks_and_reads_back(tmp_path: Path) -> None:
    adapter = _adapter(use_rslora=True)
    sizes = {}
    for layout in LAYOUTS:
        folder = tmp_path / layout
        folder.mkdir()
        save_peft(adapter, folder, layout=layout)
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        factors = sum(t.numel() for k, t in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight")))
        assert factors == stored_parameters(adapter, layout)  # type: ignore[arg-type]
        sizes[layout] = (folder / "adapter_model.safetensors").stat().st_size
        back = load_peft(folder)
        assert back.ranks() == adapter.ranks()
        for name, w in adapter.modules.items():
            assert torch.allclose(
                back.modules[name].delta(use_rslora=back.use_rslora), w.delta(use_rslora=True), atol=1e-4
            )
        assert torch.allclose(
            next(iter(back.lora_biases.values())), next(iter(adapter.lora_biases.values())), atol=1e-5
        )
    cfg = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and not cfg["alpha_pattern"] and not cfg["use_rslora"]
    assert cfg["rank_pattern"] == {n: r for n, (r, *_) in SHAPES.items() if r != 8}
    assert stored_parameters(adapter, "mixed") == adapter.num_parameters() < stored_parameters(adapter, "padded")
    assert sizes["mixed"] < sizes["padded"]


def test_extract_reports_true_and_stored_sizes_for_each_layout(model_pairs, tmp_path: Path, run_cli) -> None:
    """Mixed ranks (--energy): the padded folder stores more than the adapter holds, the mixed one
    exactly that; the summary line and the report say both, and both folders give PEFT the same update."""
    base, ft = model_pairs("llama")
    reports = {}
    for layout in LAYOUTS:
        out = tmp_path / layout
        code, text, err = run_cli(
            "extract", "--base", base, "--finetuned", ft, "--out", out, "--energy", "0.6", "--layout", layout,
            "--no-plot",
        )  # fmt: skip
        assert code == 0, err
        reports[layout] = json.loads((out / "phlora_report.json").read_text())["totals"]
        t = reports[layout]
        assert f"{t['adapter_parameters']:,} parameters, {t['stored_parameters']:,} stored ({layout}" in text
        tensors = load_file(str(out / "adapter_model.safetensors"))
        factors = sum(v.numel() for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight")))
        assert factors == t["stored_parameters"] and t["layout"] == layout
    assert reports["mixed"]["min_rank"] < reports["mixed"]["max_rank"], "the test needs ranks that differ"
    assert reports["mixed"]["stored_parameters"] == reports["mixed"]["adapter_parameters"]
    assert reports["padded"]["stored_parameters"] > reports["padded"]["adapter_parameters"]
    padded, mixed = load_peft(tmp_path / "padded"), load_peft(tmp_path / "mixed")
    for name, w in padded.modules.items():
        assert torch.allclose(mixed.modules[name].delta(), w.delta(), atol=1e-5)


def test_unknown_layout_is_refused(model_pairs, tmp_path: Path, run_cli) -> None:
    base, ft = model_pairs("llama")
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "a", "--layout", "ragged")
    assert code == 2 and "--layout" in err and "padded or mixed" in err and not (tmp_path / "a").exists()
