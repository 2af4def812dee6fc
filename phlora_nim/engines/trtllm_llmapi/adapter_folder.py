"""Writing an adapter as a PEFT folder that TensorRT-LLM's HF loader reads exactly (:mod:`.loader_rule`).

The portable folder of :func:`~phlora_nim.converters.formats.peft.save_peft` (every module at one rank
``R = r = lora_alpha``, scale folded into B, no patterns) already scales by 1 under the loader's
``lora_alpha / tensor rank``. Two things differ for this engine:

- ``gate_up_proj`` (Phi-3's fused MLP): the loader swaps the halves of ``lora_B`` (the legacy
  engines' ``[up; gate]`` layout) while the PyTorch backend's fused ``gate_up_proj`` keeps HF's
  ``[gate; up]`` (``modeling_phi3.py`` ``load_weights``; ``GatedMLP.splitted_gate_up_lora`` is
  ``[mlp_h_to_4h, mlp_gate]``). So the folder stores those halves pre-swapped: the loader's swap puts
  them back. (Such a folder is for this engine only: PEFT would read it swapped.)
- Bias deltas (``lora_B.bias``) and ``modules_to_save`` tensors have no place in the loader: it raises
  on the keys, or (``lm_head`` / ``embed_tokens``) ignores them per request. An adapter carrying them
  cannot be served exactly, and is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.formats.peft import WEIGHTS_NAME, portable_rank, save_peft
from phlora_nim.converters.scale_rules import Layout
from phlora_nim.core.errors import InputError, PhloraError, raise_all
from phlora_nim.engines.trtllm_llmapi.loader_rule import HF_TO_TRTLLM

FUSED_GATE_UP = "gate_up_proj"


def trtllm_module(path: str) -> str | None:
    """The TensorRT-LLM module of a module path as the loader maps it (``…self_attn.q_proj`` → ``attn_q``)."""
    parts = path.split(".")
    for name in (".".join(parts[-2:]), parts[-1]):
        if name in HF_TO_TRTLLM:
            return HF_TO_TRTLLM[name]
    return None


def check_servable(adapter: LoraAdapter, *, name: str) -> None:
    """Refuse what TensorRT-LLM's loader cannot apply exactly (collects every problem, raises one error).

    Raises:
        InputError: bias deltas, ``modules_to_save`` tensors, or modules the loader has no name for.
    """
    problems: list[PhloraError] = []
    if adapter.lora_biases:
        problems.append(
            InputError(
                "the fine-tune changes biases of LoRA modules; TensorRT-LLM's HF LoRA loader refuses lora_B.bias keys",
                where=f"adapter {name}",
                expected="no bias changes",
                found=", ".join(sorted(adapter.lora_biases)[:3]) + (" …" if len(adapter.lora_biases) > 3 else ""),
                fix="serve this adapter on vLLM or the legacy engine, or re-extract with --extra drop "
                "(bias changes measured and dropped; verify reports the difference)",
            )
        )
    if adapter.modules_to_save:
        problems.append(
            InputError(
                "the adapter replaces whole tensors (modules_to_save); TensorRT-LLM applies none per request",
                where=f"adapter {name}",
                expected="LoRA modules only",
                found=", ".join(sorted(adapter.modules_to_save)[:3]),
                fix="re-extract with --extra drop (full-tensor changes measured and dropped)",
            )
        )
    unknown = sorted({p for p in adapter.modules if trtllm_module(p) is None})
    if unknown:
        problems.append(
            InputError(
                "modules TensorRT-LLM's LoRA loader has no name for (it would skip them)",
                where=f"adapter {name}",
                expected="q/k/v/o_proj, qkv_proj, gate/up/down_proj, gate_up_proj, w1/w2/w3 …",
                found=", ".join(unknown[:3]),
                fix="restrict extraction to the attention and MLP projections (--target-modules)",
            )
        )
    raise_all(problems, summary=f"adapter {name} cannot be served on TensorRT-LLM exactly")


def modules_and_rank(adapter: LoraAdapter) -> tuple[set[str], int]:
    """The TensorRT-LLM modules the written folder carries and its tensor rank."""
    return {m for p in adapter.modules if (m := trtllm_module(p)) is not None}, portable_rank(adapter)


def save_for_trtllm(
    adapter: LoraAdapter, folder: Path, *, name: str, dtype: torch.dtype | None = None, layout: Layout = "padded"
) -> None:
    """Write ``adapter`` into the existing ``folder`` (callers make it atomic) for TensorRT-LLM's loader,
    in ``layout`` (the loader scales by ``lora_alpha`` / each module's tensor rank: both are exact)."""
    check_servable(adapter, name=name)
    save_peft(adapter, folder, dtype=dtype, layout=layout)
    path = Path(folder) / WEIGHTS_NAME
    tensors = load_file(str(path))
    fused = [k for k in tensors if f"{FUSED_GATE_UP}.lora_B.weight" in k]
    if fused:
        for key in fused:
            b = tensors[key]
            half = b.shape[0] // 2
            tensors[key] = torch.cat((b[half:], b[:half]), dim=0).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
