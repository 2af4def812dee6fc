"""Vision-language fine-tunes (LLaVA-style, built small from a config and really fine-tuned on text and
images): the language model's adapter by default, the tower's and projector's share of the delta reported,
their adapters on request, PEFT's logits on text and on an image, and ``verify`` on both.

Naming facts: transformers 5 builds LLaVA as ``model.language_model`` / ``model.vision_tower`` /
``model.multi_modal_projector`` (``transformers/conversion_mapping.py``, "llava"); PEFT 0.22 matches tower
and projector adapter keys only by those names (checked below); vLLM maps them back to its own
(``vllm/model_executor/models/llava.py``: ``hf_to_vllm_mapper``, ``supports_tower_connector_lora``,
``get_mm_mapping``) and applies tower/connector LoRA only with ``enable_tower_connector_lora``
(``vllm/config/lora.py``).
"""

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
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.demo.toy_vlm import image_batch, make_llava_pair, tiny_llava_config
from phlora_nim.jobs import adapter_jobs as jobs
from phlora_nim.jobs.verify import merged, verify_adapter

PARTS = ("language_model", "vision_tower", "multi_modal_projector")


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaVA, its fine-tune, the default adapter (through the CLI) and an all-parts adapter."""
    import transformers
    from typer.testing import CliRunner

    from phlora_nim.cli.app import app

    transformers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("llava")
    base, ft = make_llava_pair(root, steps=12, linear_only=True)
    default = root / "default"
    result = CliRunner().invoke(
        app, ["extract", "--base", str(base), "--finetuned", str(ft), "--out", str(default), "--no-plot"]
    )
    assert result.exit_code == 0, result.output
    (root / "default.out").write_text(result.output)
    every = root / "every"
    jobs.extract(
        base, ft, every, ExtractOptions(policy=RankPolicy(energy=1.0, max_rank=512), components=PARTS), plot=False
    )
    return {"base": base, "ft": ft, "default": default, "every": every, "stdout": root / "default.out"}


def _model(path: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()


def test_map_reads_the_checkpoint_under_transformers_names(llava) -> None:
    ckpt = open_checkpoint(llava["ft"])
    amap = find_map(ckpt.config)
    assert amap is not None and amap.family == "llava"
    with safe_open(str(llava["ft"] / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert any(k.startswith("language_model.model.") for k in stored)  # the checkpoint's own layout
    assert {amap.to_checkpoint(n) for n in ckpt.names()} == stored
    matched = [n for n in ckpt.names() if n.endswith(".weight") and amap.match(n.removesuffix(".weight"))]
    assert {amap.component(n).name for n in matched} == set(PARTS)
    for name in matched:
        spec, _ = amap.match(name.removesuffix(".weight"))
        in_dim, out_dim = amap.dims(spec, ckpt.config)
        assert ckpt.info(name).shape == (out_dim, in_dim), name


def test_language_model_adapter_by_default_with_the_other_parts_reported(llava) -> None:
    report = json.loads((llava["default"] / "phlora_report.json").read_text())
    parts = report["totals"]["components"]
    assert parts["language_model"]["in_adapter"] and parts["language_model"]["adapter_modules"] == 14
    for name in ("vision_tower", "multi_modal_projector"):
        assert not parts[name]["in_adapter"] and parts[name]["kept_energy"] == 0.0
        assert parts[name]["share_of_delta"] > 0.005  # the fine-tune did change them
    assert sum(p["share_of_delta"] for p in parts.values()) <= 1.0 + 1e-9
    modules = load_peft(llava["default"]).modules
    assert modules and all(m.startswith("model.language_model.layers.") for m in modules)
    stdout = " ".join(llava["stdout"].read_text().split())
    assert "vision_tower:" in stdout and "not in the adapter (--components to include it)" in stdout
    report = json.loads((llava["every"] / "phlora_report.json").read_text())
    every = report["totals"]["components"]
    assert every["vision_tower"]["adapter_modules"] == 12 and every["multi_modal_projector"]["adapter_modules"] == 2
    # At full rank the tower's linear modules (all that was trained) are kept whole.
    tower_linear = sum(m["delta_energy"] for m in report["modules"] if m["name"].startswith("model.vision_tower."))
    assert every["vision_tower"]["kept_energy"] == pytest.approx(tower_linear, rel=1e-6)
    assert every["vision_tower"]["delta_energy"] == pytest.approx(tower_linear, rel=1e-6)


@pytest.mark.parametrize("adapter", ["default", "every"])
def test_peft_applies_the_adapter_on_text_and_on_an_image(adapter: str, llava) -> None:
    from peft import PeftModel

    base_model = _model(llava["base"])
    config = tiny_llava_config()
    image = image_batch(config, batch=2, seed=5)
    text = {"input_ids": image["input_ids"][:, -10:]}
    lora = load_peft(llava[adapter])
    with merged(base_model, lora) as reference:
        expected = {"text": _logits(reference, text), "image": _logits(reference, image)}
    adapted = PeftModel.from_pretrained(base_model, str(llava[adapter])).eval()
    for kind, inputs in (("text", text), ("image", image)):
        got = _logits(adapted, inputs)
        assert torch.allclose(got, expected[kind], atol=2e-5, rtol=1e-5), (kind, (got - expected[kind]).abs().max())


def test_full_adapter_of_every_part_is_the_finetune_on_images(llava) -> None:
    """Only linear weights were trained: a full-rank adapter of every part gives the fine-tune's logits."""
    from peft import PeftModel

    image = image_batch(tiny_llava_config(), batch=2, seed=5)
    adapted = PeftModel.from_pretrained(_model(llava["base"]), str(llava["every"])).eval()
    expected = _logits(_model(llava["ft"]), image)
    assert torch.allclose(_logits(adapted, image), expected, atol=1e-4, rtol=1e-4)


def test_verify_checks_text_and_image_prompts(llava) -> None:
    default = verify_adapter(llava["base"], llava["ft"], llava["default"])
    every = verify_adapter(llava["base"], llava["ft"], llava["every"])
    for result in (default, every):
        assert "logits_skipped" not in result, result.get("logits_skipped")
        assert result["image_logits"]["tokens"] > 0 and result["logits"]["tokens"] > 0
        assert result["image_logits"]["mean_kl"] < result["image_logits"]["base_mean_kl"]
    # The tower and the projector change what an image does, not what text does.
    assert every["image_logits"]["floor_mean_kl"] < 1e-6 < default["image_logits"]["floor_mean_kl"]
    assert every["logits"]["floor_mean_kl"] == pytest.approx(default["logits"]["floor_mean_kl"], abs=1e-6)


def test_unknown_component_is_one_clear_error(llava, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "a"
    code, _, err = run_cli(
        "extract", "--base", llava["base"], "--finetuned", llava["ft"], "--out", out, "--components", "audio_tower"
    )
    assert code == 2 and "unknown component 'audio_tower'" in err and "vision_tower" in err
    assert "Traceback" not in err and not out.exists()


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen2-VL and a changed copy (every linear weight of its language model, vision blocks and
    merger moved by seeded noise): the map, the names and PEFT's loading are what is checked here."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2},
        image_token_id=120,
        video_token_id=121,
        vision_start_token_id=122,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    root = tmp_path_factory.mktemp("qwen2-vl")
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("layers." in name or "visual." in name) and "embed" not in name:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "finetuned")
    return root / "base", root / "finetuned"


def test_qwen2_vl_map_and_language_model_adapter_through_peft(qwen2_vl, tmp_path: Path) -> None:
    from peft import PeftModel

    base, ft = qwen2_vl
    ckpt = open_checkpoint(ft)
    amap = find_map(ckpt.config)
    assert amap is not None and amap.family == "qwen2_vl"
    matched = [n for n in ckpt.names() if n.endswith(".weight") and amap.match(n.removesuffix(".weight"))]
    assert {amap.component(n).name for n in matched} == set(PARTS)
    two_d = [n for n in ckpt.names() if len(ckpt.info(n).shape) == 2 and "embed" not in n and "lm_head" not in n]
    assert set(two_d) == set(matched)  # every linear weight is mapped
    for name in matched:
        spec, _ = amap.match(name.removesuffix(".weight"))
        in_dim, out_dim = amap.dims(spec, ckpt.config)
        assert ckpt.info(name).shape == (out_dim, in_dim), name
    report = jobs.extract(base, ft, tmp_path / "a", ExtractOptions(policy=RankPolicy(rank=8)), plot=False)
    parts = report["totals"]["components"]
    assert parts["language_model"]["in_adapter"] and not parts["vision_tower"]["in_adapter"]
    assert parts["vision_tower"]["share_of_delta"] > 0.05 and parts["multi_modal_projector"]["share_of_delta"] > 0
    lora = load_peft(tmp_path / "a")
    assert lora.modules and all(m.startswith("model.language_model.layers.") for m in lora.modules)
    from transformers import AutoModelForImageTextToText

    base_model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32).eval()
    ids = {"input_ids": torch.randint(3, 110, (2, 12), generator=torch.Generator().manual_seed(3))}
    with merged(base_model, lora) as reference:
        expected = _logits(reference, ids)
    adapted = PeftModel.from_pretrained(base_model, str(tmp_path / "a")).eval()
    assert torch.allclose(_logits(adapted, ids), expected, atol=2e-5, rtol=1e-5)
    skipped = verify_adapter(base, ft, tmp_path / "a")
    assert "LLaVA-style models only" in skipped["logits_skipped"] and skipped["reconstruction"]["modules"] == 14
