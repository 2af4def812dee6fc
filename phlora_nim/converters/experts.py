"""MoE experts in both layouts: per-expert 2-D modules (checkpoints, adapters) and fused 3-D tensors.

Adapters are always written per expert, in the original checkpoint names (``…experts.3.w1``): that is
what PEFT (which fuses them itself on load for transformers ≥ 5), vLLM and TensorRT-LLM read. Two
places meet the fused layout instead, both described by an architecture map's ``fused`` and
``memory_renames`` entries (data, not code):

- a checkpoint saved with 3-D expert tensors: :func:`expert_views` shows it as per-expert tensors, each
  read as a slice of the stored tensor;
- the model transformers builds in memory: :func:`memory_slot` finds where a checkpoint module lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phlora_nim.converters.architecture import ArchitectureMap
from phlora_nim.core.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorView:
    """A stored tensor, or the 2-D slice ``[expert, rows]`` of a 3-D one, under another name."""

    source: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class MemorySlot:
    """Where a checkpoint module's weight lives in the model transformers builds.

    ``parameter`` is the full parameter name; for a fused expert tensor, ``expert`` indexes its first
    dimension and the rows are part ``part`` of ``parts`` equal blocks.
    """

    parameter: str
    expert: int | None = None
    part: int = 0
    parts: int = 1

    def view(self, model: Any) -> torch.Tensor:
        """The weight itself (a view into the model's parameter: writing to it changes the model)."""
        module_path, _, attr = self.parameter.rpartition(".")
        tensor = getattr(model.get_submodule(module_path), attr)
        if self.expert is None:
            return tensor
        block = tensor[self.expert]
        size = block.shape[0] // self.parts
        return block[self.part * size : (self.part + 1) * size]


def expert_views(
    shapes: dict[str, tuple[int, ...]], amap: ArchitectureMap | None, *, where: str
) -> dict[str, TensorView]:
    """Per-expert names for a checkpoint stored in the fused layout; empty when it is not.

    Every fused tensor ``[E, rows, in]`` becomes ``E × parts`` views ``[rows / parts, in]`` named as the
    original checkpoint names them; every other tensor gets its original name back (``memory_renames``
    undone). Names are mapped to the view standing for them.

    Raises:
        InputError: a fused tensor that is not 3-D or whose rows do not split into its parts.
    """
    if amap is None or not amap.fused:
        return {}
    views: dict[str, TensorView] = {}
    found = False
    for name, shape in shapes.items():
        rule, match = next(((f, m) for f in amap.fused if (m := f.pattern.fullmatch(name))), (None, None))
        if rule is None or match is None:
            views[amap.to_checkpoint(name)] = TensorView(source=name)
            continue
        found = True
        if len(shape) != 3 or shape[1] % len(rule.parts):
            raise InputError(
                "fused expert tensor has an unexpected shape",
                where=f"{where} {name}",
                expected=f"[experts, rows, in] with rows divisible by {len(rule.parts)} ({', '.join(rule.parts)})",
                found=str(list(shape)),
                fix="pass a checkpoint saved by transformers for this architecture",
            )
        size = shape[1] // len(rule.parts)
        for expert in range(shape[0]):
            for k, part in enumerate(rule.parts):
                view_name = part.format(layer=match["layer"], expert=expert) + ".weight"
                views[view_name] = TensorView(source=name, expert=expert, rows=(k * size, (k + 1) * size))
    return views if found else {}


def memory_slot(amap: ArchitectureMap | None, module: str) -> MemorySlot:
    """Where the checkpoint module ``module`` (a path without ``.weight``) lives in memory."""
    if amap is not None:
        for rule in amap.fused:
            for k, pattern in enumerate(rule.part_patterns()):
                m = pattern.fullmatch(module)
                if m is not None:
                    return MemorySlot(
                        parameter=rule.tensor.format(layer=m["layer"]),
                        expert=int(m["expert"]),
                        part=k,
                        parts=len(rule.parts),
                    )
        module = amap.to_memory(module)
    return MemorySlot(parameter=f"{module}.weight")


def renamed_views(names: list[str], amap: ArchitectureMap | None) -> dict[str, TensorView]:
    """Every tensor under the name transformers gives it in memory, for a family whose adapters are written
    in those names (``adapter_names: memory``, e.g. vision-language models, whose tower and projector keys
    PEFT matches only by their in-memory names); empty when no name changes."""
    if amap is None or amap.adapter_names != "memory":
        return {}
    if any(amap.to_checkpoint(n) != n for n in names):
        return {}  # saved in the in-memory layout already
    views = {amap.to_memory(n): TensorView(source=n) for n in names}
    return views if any(v.source != k for k, v in views.items()) else {}
