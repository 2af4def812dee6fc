"""NVIDIA NIM adapter store: ``STORE/<adapter-name>/`` folders, one per adapter.

NIM serves every folder of ``NIM_PEFT_SOURCE`` under the folder's name (the OpenAI ``model``
field). Each folder holds the PEFT pair, ``adapter_model.bin`` as well as the safetensors file
(NIM 1.x on the TensorRT-LLM backend reads only ``.bin``), and optionally the TensorRT-LLM npy pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.formats.peft import save_peft
from phlora_nim.core.errors import InputError
from phlora_nim.engines.trtllm_legacy.tensors import adapter_to_trtllm, save_trtllm


def save_nim_adapter(
    adapter: LoraAdapter,
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
    with_trtllm: bool = False,
    trtllm_dtype: str = "float16",
    config: dict[str, Any] | None = None,
) -> None:
    """Fill one adapter folder of a NIM store (the folder must exist; callers make it atomic).

    Raises:
        InputError: the adapter carries full tensors (modules_to_save), which NIM rejects.
    """
    if adapter.modules_to_save:
        raise InputError(
            "NIM rejects adapters with modules_to_save",
            where=", ".join(sorted(adapter.modules_to_save)[:3]),
            expected="LoRA factors of linear modules only",
            fix="re-extract with --extra drop (the default)",
        )
    save_peft(adapter, folder, dtype=dtype, write_bin=True)
    if with_trtllm:
        save_trtllm(adapter_to_trtllm(adapter, config=config, dtype=trtllm_dtype), folder)
