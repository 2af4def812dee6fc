"""How TensorRT-LLM's PyTorch backend reads an HF PEFT folder: the rule, restated (nothing copied).

Source: NVIDIA/TensorRT-LLM ``tensorrt_llm/_torch/peft/lora/manager.py`` ``LoraManager.load_from_hf``
(with ``preprocess_lora_weights``), ``loaders.py`` ``iterate_hf_lora`` / ``HF_LORA_PATTERN``, ``config.py``
``get_default_trtllm_modules_to_hf_modules`` / ``get_missing_qkv_modules_from_lora_modules`` /
``LoraConfig``:

1. ``adapter_model.safetensors`` (else ``.bin``) is read whole, with ``adapter_config.json``.
2. With ``swap_gate_up_proj_lora_b_weight`` (``LoraConfig`` default true), every
   ``gate_up_proj.lora_B.weight`` has its two row halves swapped.
3. Keys are ``<prefix>.<layer>.<block>.<module>.lora_{A,B}.weight``; any other key is a ``KeyError``
   (``unsupported key … from HF LoRA weights``) unless it names ``lm_head`` or ``embed_tokens`` (then
   ignored): a ``lora_B.bias`` or a ``modules_to_save`` norm breaks loading.
4. A module whose HF name has no TensorRT-LLM module is skipped with a warning; so is one whose
   TensorRT-LLM module is outside ``lora_target_modules`` (``LoRA module '…' not in target modules``).
5. Every module is scaled by the engine's scale rule, folded into B: the ``trtllm`` row of
   :data:`phlora_nim.converters.scale_rules.RULES`, where that rule is stated and cited.
6. When ``lora_target_modules`` holds some of ``attn_q``/``attn_k``/``attn_v``, the missing ones are
   filled with zeros (rank ``r``): no effect on outputs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phlora_nim.converters.scale_rules import RULES

log = logging.getLogger("phlora_nim.trtllm_llmapi")

TRTLLM_RULE = RULES["trtllm"]  # the HF loader's scale rule, stated and cited in scale_rules

# get_default_trtllm_modules_to_hf_modules (tensorrt_llm/_torch/peft/lora/config.py)
TRTLLM_TO_HF: dict[str, str] = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_qkv": "qkv_proj",
    "attn_dense": "o_proj",
    "mlp_h_to_4h": "gate_proj",
    "mlp_4h_to_h": "down_proj",
    "mlp_gate": "up_proj",
    "mlp_gate_up": "gate_up_proj",
    "moe_h_to_4h": "w1",
    "moe_4h_to_h": "w2",
    "moe_gate": "w3",
    "moe_router": "gate",
    "shared_expert_h_to_4h": "shared_expert.gate_proj",
    "shared_expert_4h_to_h": "shared_expert.down_proj",
    "shared_expert_gate": "shared_expert.up_proj",
    "mamba_in_proj": "in_proj",
    "mamba_out_proj": "out_proj",
    "moe_latent_fc1": "fc1_latent_proj",
    "moe_latent_fc2": "fc2_latent_proj",
}
HF_TO_TRTLLM: dict[str, str] = {hf: trt for trt, hf in TRTLLM_TO_HF.items()}
QKV = ("attn_q", "attn_k", "attn_v")

# The shape of HF_LORA_PATTERN for dense modules (loaders.py): prefix, layer, block, module, A|B.
# Matched from the start of the key only, as upstream's ``re.match``; MoE experts are out of scope here.
_KEY = re.compile(r"(.*)\.(\d+)\.(\w+)\.(\w+|\w+\.\w+)\.lora_(A|B)\.weight")


class LoaderError(ValueError):
    """What TensorRT-LLM's loader raises for this folder (its text, as the engine would report it)."""


@dataclass
class LoadedAdapter:
    """An adapter as the engine holds it: per (layer, TensorRT-LLM module), A ``[r, in]`` and B ``[out, r]``
    with the scale folded into B (and ``gate_up_proj``'s B halves as the loader left them)."""

    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    skipped: list[str] = field(default_factory=list)  # TensorRT-LLM modules dropped with a warning

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.factors.values()), default=0)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors``, else ``adapter_model.bin`` (``get_model_path(dir, "adapter_model")``)."""
    st, binf = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if binf.is_file():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise LoaderError(f"adapter_model file does not exist in {folder}")


def module_of(key: str) -> tuple[int, str] | None:
    """(layer, HF module name as the loader resolves it) for a LoRA key, or None if the key is no LoRA key."""
    m = _KEY.match(key)
    if m is None:
        return None
    block, module = m.group(3), m.group(4)
    name = f"{block}.{module}"
    if name not in HF_TO_TRTLLM:
        name = module
        if name not in HF_TO_TRTLLM and "." in name and not name.startswith(("shared_expert.", "shared_experts.")):
            name = name.rsplit(".", 1)[-1]
    return int(m.group(2)), name


def load_for_trtllm(
    folder: Path,
    *,
    lora_target_modules: list[str] | tuple[str, ...],
    swap_gate_up_proj_lora_b_weight: bool = True,
) -> LoadedAdapter:
    """Read a PEFT folder as ``LoraManager.load_from_hf`` does (see the module docstring).

    Args:
        folder: the adapter folder (``lora_path``).
        lora_target_modules: the engine's ``lora_config.lora_target_modules`` (TensorRT-LLM names).
        swap_gate_up_proj_lora_b_weight: the engine's ``lora_config`` flag (upstream default true).

    Raises:
        LoaderError: with the text TensorRT-LLM's loader would raise.
    """
    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise LoaderError(f"{config_file} does not exist")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    tensors = read_tensors(folder)
    if swap_gate_up_proj_lora_b_weight:
        for key, value in list(tensors.items()):
            if "gate_up_proj.lora_B.weight" in key:
                half = value.shape[0] // 2
                tensors[key] = torch.cat((value[half:], value[:half]), dim=0)
    found, paths = _by_module(tensors)
    targets = list(lora_target_modules)
    out = LoadedAdapter(factors={})
    for (layer, module), pair in sorted(found.items()):
        if module not in targets:
            log.warning("LoRA module '%s' not in target modules %s, skipping.", module, targets)
            if module not in out.skipped:
                out.skipped.append(module)
            continue
        missing = [
            what
            for side, what in (("in", "'in' matrix (lora_A equivalent)"), ("out", "'out' matrix (lora_B equivalent)"))
            if side not in pair
        ]
        if missing:
            raise LoaderError(
                f"Layer {layer} is missing required {' and '.join(missing)} for {module} in LoRA weights from "
                f"directory {folder}. LoRA adapters must contain both 'in' and 'out' matrices for all layers. "
                "Please check if the LoRA checkpoint is complete or was corrupted during loading."
            )
        a, b = pair["in"], pair["out"]
        scale = TRTLLM_RULE.scale(config, paths[(layer, module)], tensor_rank=int(a.shape[0]))
        out.factors[(layer, module)] = (a.float(), b.float() * scale)
    return out


def _by_module(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[tuple[int, str], dict[str, torch.Tensor]], dict[tuple[int, str], str]]:
    """``{(layer, TensorRT-LLM module): {"in": A, "out": B}}`` as ``iterate_hf_lora`` groups the keys, and
    each one's module path (``model.layers.0.self_attn.q_proj``: what a pattern would be matched against).

    Raises:
        LoaderError: ``unsupported key … from HF LoRA weights`` for a key that is no LoRA weight.
    """
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    paths: dict[tuple[int, str], str] = {}
    unsupported: set[str] = set()
    for key, value in tensors.items():
        hit = module_of(key)
        if hit is None:
            if "lm_head" not in key and "embed_tokens" not in key:
                raise LoaderError(f"unsupported key {key} from HF LoRA weights")
            continue
        layer, hf_name = hit
        if hf_name not in HF_TO_TRTLLM:
            if hf_name not in unsupported:
                log.warning(
                    "Skipping unsupported LoRA module '%s'. LoRA weights for this module will be ignored.", hf_name
                )
                unsupported.add(hf_name)
            continue
        at = (layer, HF_TO_TRTLLM[hf_name])
        found.setdefault(at, {})["in" if key.endswith("lora_A.weight") else "out"] = value
        paths[at] = key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
    return found, paths


def effective_targets(modules: list[str] | tuple[str, ...]) -> list[str]:
    """``lora_target_modules`` plus the q/k/v modules the engine adds (zero-filled) when some are present."""
    extra = [m for m in QKV if m not in modules] if any(m in modules for m in QKV) else []
    return [*modules, *extra]


def trtllm_modules_of(folder: Path) -> tuple[set[str], int]:
    """The TensorRT-LLM modules a folder carries and its largest tensor rank (for model.yaml coverage)."""
    modules: set[str] = set()
    rank = 0
    for key, value in read_tensors(Path(folder)).items():
        hit = module_of(key)
        if hit is None or hit[1] not in HF_TO_TRTLLM:
            continue
        modules.add(HF_TO_TRTLLM[hit[1]])
        if key.endswith("lora_A.weight"):
            rank = max(rank, int(value.shape[0]))
    return modules, rank
