"""For tests of repositories written for the legacy TensorRT-LLM engine: a ``trtllm-build`` engine
config of the toy Llama, the ``convert`` arguments that use it, and a written model's config."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

LLAMA_TRTLLM_MODULES = ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]


def model_config(root: Path, model: str) -> mc.ModelConfig:
    """The ``config.pbtxt`` of ``model`` in the repository ``root``, parsed."""
    return text_format.Parse((root / model / "config.pbtxt").read_text(), mc.ModelConfig())


def engine_config(tmp_path: Path, **over: object) -> Path:
    """The toy Llama's engine ``config.json`` as trtllm-build records it; ``section__field=value`` overrides."""
    cfg = {
        "pretrained_config": {
            "dtype": "float32",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_size": 16,
            "intermediate_size": 128,
        },
        "build_config": {
            "plugin_config": {"lora_plugin": "float32"},
            "lora_config": {
                "max_lora_rank": 8,
                "lora_target_modules": LLAMA_TRTLLM_MODULES,
            },
        },
    }
    for key, value in over.items():
        section, field = key.split("__")
        target = cfg["build_config"][section] if section in ("lora_config", "plugin_config") else cfg[section]
        target[field] = value  # type: ignore[index]
    path = tmp_path / "engine" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def convert_args(base: Path, fts: list[Path], repo: Path, tmp_path: Path) -> list[object]:
    """``convert`` of up to three fine-tunes (support, legal, code) at rank 8 for a float16 legacy engine."""
    f16 = {"pretrained_config__dtype": "float16", "plugin_config__lora_plugin": "float16"}
    args: list[object] = ["convert", "--base", base, "-m", repo, "-r", "8", "--dtype", "float16"]
    args += ["--backend", "trtllm-legacy", "--engine-config", engine_config(tmp_path, **f16)]
    for ft, name in zip(fts, ("support", "legal", "code")[: len(fts)], strict=True):
        args += ["--finetuned", ft, "--name", name]
    return args
