"""The in-memory LoRA adapter every format reads into and writes from."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class LoraWeights:
    """One module's LoRA factors, PEFT layout: ``a`` is ``[r, in]``, ``b`` is ``[out, r]``.

    The module's update is ``scale · b @ a`` with ``scale = alpha / r`` (``alpha / √r`` with rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def scale(self, *, use_rslora: bool = False) -> float:
        return self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)

    def delta(self, *, use_rslora: bool = False) -> torch.Tensor:
        """The dense update ``scale · B @ A`` in float32."""
        return self.scale(use_rslora=use_rslora) * (self.b.float() @ self.a.float())


@dataclass
class LoraAdapter:
    """A LoRA adapter: factors per module path (e.g. ``model.layers.0.self_attn.q_proj``).

    ``modules_to_save`` holds full tensors that replace base tensors (PEFT's modules_to_save),
    ``lora_biases`` the bias *changes* of LoRA-targeted modules, as added to the base bias (PEFT
    stores ``lora_B.bias`` and scales it like the update; :func:`~phlora_nim.converters.formats.peft.load_peft`
    applies that scale on reading, and ``save_peft`` writes at scale 1).
    """

    modules: dict[str, LoraWeights]
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_biases: dict[str, torch.Tensor] = field(default_factory=dict)
    # The embedding and the head in modules_to_save are one tensor in the model (tied): PEFT keeps them tied.
    ensure_weight_tying: bool = False

    def ranks(self) -> dict[str, int]:
        return {name: w.rank for name, w in self.modules.items()}

    def default_rank(self) -> int:
        """The most common rank (PEFT's ``r``; the rest go to ``rank_pattern``)."""
        counts = Counter(w.rank for w in self.modules.values())
        return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if counts else 0

    def leaf_names(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def num_parameters(self) -> int:
        return sum(w.a.numel() + w.b.numel() for w in self.modules.values())


def adapter_digest(adapter: LoraAdapter) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in a canonical order.

    The registry keys task ids on it (``RegistryState.add``), so identical weights get one id.
    """
    h = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    for name, w in adapter.modules.items():
        tensors[f"{name}.lora_A"] = w.a
        tensors[f"{name}.lora_B"] = w.b
        tensors[f"{name}.scale"] = torch.tensor([w.scale(use_rslora=adapter.use_rslora)], dtype=torch.float64)
    tensors.update({f"{k}.bias": v for k, v in adapter.lora_biases.items()})
    tensors.update({f"{k}.saved": v for k, v in adapter.modules_to_save.items()})
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
