"""The documents we write are typed values: adapter_config.json (real PEFT reads back every field) and the
extraction report (phlora_report.json, keys in their long-standing order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.formats.peft import CONFIG_NAME, peft_config, save_peft


def _adapter() -> LoraAdapter:
    def w(r: int) -> LoraWeights:
        return LoraWeights(a=torch.randn(r, 8), b=torch.randn(6, r), alpha=float(r))

    modules = {
        "model.layers.0.self_attn.q_proj": w(2),
        "model.layers.0.self_attn.v_proj": w(4),
        "model.layers.1.mlp.down_proj": w(4),
    }
    return LoraAdapter(
        modules=modules, base_model_name_or_path="base", lora_biases={"model.layers.0.self_attn.q_proj": torch.zeros(6)}
    )


@pytest.mark.parametrize("layout", ["padded", "mixed"])
def test_peft_reads_back_the_config_we_write(layout: str, tmp_path: Path) -> None:
    from peft import LoraConfig

    adapter = _adapter()
    config = peft_config(adapter, layout)  # type: ignore[arg-type]
    save_peft(adapter, tmp_path, layout=layout)  # type: ignore[arg-type]
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert written == config.to_json() and list(written) == list(config.to_json())
    read = LoraConfig.from_pretrained(str(tmp_path))
    assert (read.r, read.lora_alpha, read.lora_bias, read.use_rslora) == (
        config.r,
        config.lora_alpha,
        config.lora_bias,
        config.use_rslora,
    )
    assert sorted(read.target_modules) == ["down_proj", "q_proj", "v_proj"] == list(config.target_modules)
    assert dict(read.rank_pattern) == config.rank_pattern
    assert config.r == 4 and config.rank_pattern == (
        {"model.layers.0.self_attn.q_proj": 2} if layout == "mixed" else {}
    )


def test_the_extraction_report_writes_its_keys_in_order() -> None:
    """Optional sections only when present, after the fixed ones; totals keep their place when set again."""
    from phlora_nim.converters.extraction_report import ExtractionReport
    from phlora_nim.converters.rank_policy import RankPolicy

    report = ExtractionReport(
        created="t", command="c", base="b", finetuned="f", family="llama", policy=RankPolicy(rank=4), method="m",
        dtype="float32", extra="drop", warnings=("w",), belonging=None, totals={"layout": "padded", "modules": 2},
        timings={"load_s": 1.0}, modules=({"name": "q"},), extras=(),
    )  # fmt: skip
    fixed = ["format", "created", "command", "base", "finetuned", "family", "policy", "method", "dtype", "extra"]
    fixed += ["warnings", "belonging", "totals", "timings", "modules", "extras"]
    assert list(report.to_json()) == fixed
    assert report.to_json()["policy"] == {
        "kind": "rank", "rank": 4, "energy": None, "budget_params": None, "max_rank": None, "snap": None,
    }  # fmt: skip
    later = report.with_totals(layout="mixed").with_timings(total_s=2.0)
    assert list(later.to_json()["totals"].items()) == [("layout", "mixed"), ("modules", 2)]
    assert later.to_json()["timings"] == {"load_s": 1.0, "total_s": 2.0} and report.totals["layout"] == "padded"
    import dataclasses

    full = dataclasses.replace(later, loading="l", fidelity_target={"x": 1}, expert_serving={"vllm": []})
    assert list(full.to_json())[len(fixed) :] == ["expert_serving", "fidelity_target", "loading"]
    assert json.loads(json.dumps(full.to_json()))["loading"] == "l"
