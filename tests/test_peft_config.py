"""The adapter_config.json we write is a typed value; real PEFT reads back every field we set."""

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
