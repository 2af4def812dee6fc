"""How each engine scales a PEFT LoRA folder's modules, as data, and the folder layouts that follow.

A PEFT folder holds per module ``lora_A [r_m, in]`` and ``lora_B [out, r_m]``; the engine adds
``scale_m · B A`` to the module's output. Engines disagree on ``scale_m`` once tensor ranks differ
by module, so each rule is written down once here, from the upstream source named in its row, and
the writers fold whatever factor makes the rule give the true update (:func:`fold_factor`).

- **PEFT** (huggingface/peft, ``src/peft/tuners/lora/model.py`` ``LoraModel._create_and_replace``
  with ``get_pattern_key`` of ``src/peft/utils/other.py``; ``LoraLayer.update_layer`` in
  ``layer.py``): r and alpha from ``rank_pattern`` / ``alpha_pattern`` (regex over a dotted suffix
  of the module path) else the globals; ``scaling = alpha / r`` (``/ √r`` with rsLoRA); the tensors
  must have rank r or loading fails.
- **TensorRT-LLM** HF loader (NVIDIA/TensorRT-LLM, ``tensorrt_llm/lora_manager.py``
  ``LoraManager.load_from_hf``, and its PyTorch-backend twin ``tensorrt_llm/_torch/peft/lora/manager.py``
  ``LoraManager.load_from_hf`` used by the LLM API, ``trtllm-serve`` and the Triton ``llmapi`` model;
  both compute ``scale = lora_alpha / effective_rank`` with ``effective_rank = t_in.shape[rank_dim]``):
  ``lora_alpha / (rank of that module's lora_A)`` (``/ √rank`` with rsLoRA); of ``adapter_config.json``
  only ``r``, ``lora_alpha`` and ``use_rslora`` are read, ``rank_pattern`` / ``alpha_pattern`` ignored.
  This row is the one statement of that rule: the engine's CPU reference loader
  (``phlora_nim.engines.trtllm_llmapi.loader_rule``) scales by it.
- **vLLM** before 0.32 (vllm-project/vllm, ``vllm/lora/peft_helper.py`` ``PEFTHelper``): one
  ``lora_alpha / r`` from the globals for every module, the patterns dropped. 0.32 reads the patterns
  as PEFT does, but vLLM sizes every LoRA slot at ``max_lora_rank`` whatever the module's rank, so a
  padded folder costs it nothing and is what it gets (:data:`ENGINE_LAYOUT`).

Layouts (``--layout``):

- ``padded``: every module zero-padded to the largest rank R, its scale folded into B, config
  ``r = lora_alpha = R`` and no patterns: scale 1 under every rule. Stored size R·(in+out) per module.
- ``mixed``: every module at its own rank r_m, config ``r = lora_alpha = R0`` (the most common rank)
  with ``rank_pattern`` naming every other module's rank and no ``alpha_pattern``: PEFT then scales by
  ``R0 / r_m`` and so does TensorRT-LLM (``lora_alpha / tensor rank``); B carries ``r_m / R0`` times
  the module's own scale. Stored size = true size. Wrong under the pre-0.32 vLLM rule by ``r_m / R0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Layout = Literal["padded", "mixed"]
LAYOUTS: tuple[Layout, ...] = ("padded", "mixed")


@dataclass(frozen=True)
class ScaleRule:
    """One engine's scale rule for a PEFT folder.

    Attributes:
        engine: who applies it.
        reads_patterns: ``rank_pattern`` / ``alpha_pattern`` are honoured.
        divisor: what alpha is divided by: the config's r (``config``; the pattern's where read) or
            the module's tensor rank (``tensor``).
        rank_must_match: loading fails when a module's tensor rank is not the rank its config gives.
        source: the upstream file and function the rule was read from.
    """

    engine: str
    reads_patterns: bool
    divisor: Literal["config", "tensor"]
    rank_must_match: bool
    source: str

    def scale(self, config: Mapping[str, Any], module: str, tensor_rank: int) -> float:
        """The factor this engine multiplies ``module``'s ``B @ A`` by.

        Raises:
            ValueError: the engine would refuse the tensor (its rank is not the configured one).
        """
        ranks = (config.get("rank_pattern") or {}) if self.reads_patterns else {}
        alphas = (config.get("alpha_pattern") or {}) if self.reads_patterns else {}
        rk, ak = pattern_key(ranks, module), pattern_key(alphas, module)
        r = int(ranks[rk] if rk is not None else config["r"])
        alpha = float(alphas[ak] if ak is not None else config["lora_alpha"])
        if self.rank_must_match and tensor_rank != r:
            raise ValueError(f"{self.engine}: {module} has tensor rank {tensor_rank}, its config says {r}")
        divisor = r if self.divisor == "config" else tensor_rank
        return alpha / (math.sqrt(divisor) if config.get("use_rslora") else divisor)


RULES: dict[str, ScaleRule] = {
    "peft": ScaleRule(
        "peft", True, "config", True, "huggingface/peft src/peft/tuners/lora/model.py LoraModel._create_and_replace"
    ),
    "trtllm": ScaleRule(
        "trtllm",
        False,
        "tensor",
        False,
        "NVIDIA/TensorRT-LLM tensorrt_llm/lora_manager.py LoraManager.load_from_hf "
        "(and tensorrt_llm/_torch/peft/lora/manager.py LoraManager.load_from_hf)",
    ),
    "vllm": ScaleRule("vllm", False, "config", False, "vllm-project/vllm vllm/lora/peft_helper.py PEFTHelper (< 0.32)"),
}

# Which engines read each layout with the true update (checked in tests/test_scale_rules.py).
READ_BY: dict[Layout, tuple[str, ...]] = {"padded": ("peft", "trtllm", "vllm"), "mixed": ("peft", "trtllm")}
# The layout each engine is given: the smallest one it reads right, padded where it pads anyway.
ENGINE_LAYOUT: dict[str, Layout] = {"peft": "mixed", "trtllm": "mixed", "vllm": "padded"}


def layout_config(ranks: Mapping[str, int], layout: Layout) -> dict[str, Any]:
    """The ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` of a folder in ``layout`` whose
    modules have the true ``ranks`` (rsLoRA never: the scale is folded into B)."""
    if layout == "padded":
        top = max(ranks.values(), default=1)
        return {"r": top, "lora_alpha": top, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    common = most_common_rank(ranks)
    # Full module paths as keys: a suffix key such as "q_proj" would also match other layers' modules.
    pattern = {name: r for name, r in sorted(ranks.items()) if r != common}
    return {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": {}, "use_rslora": False}


def most_common_rank(ranks: Mapping[str, int]) -> int:
    """The most common rank (the larger on a tie), at least 1."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if counts else 1


def tensor_rank(true_rank: int, ranks: Mapping[str, int], layout: Layout) -> int:
    """The rank a module of ``true_rank`` is stored at in ``layout``."""
    return max(ranks.values(), default=1) if layout == "padded" else true_rank


def fold_factor(config: Mapping[str, Any], module: str, stored_rank: int, true_scale: float, layout: Layout) -> float:
    """What B is multiplied by so that every engine reading ``layout`` applies ``true_scale · B A``.

    Raises:
        AssertionError: the engines meant to read ``layout`` disagree on this module's scale (a bug
            in :func:`layout_config`, never user input).
    """
    scales = {RULES[e].scale(config, module, stored_rank) for e in READ_BY[layout]}
    assert max(scales) - min(scales) <= 1e-12 * max(scales), (module, scales)
    return true_scale / scales.pop()


def stored_parameters(shapes: Mapping[str, tuple[int, int, int]], layout: Layout) -> int:
    """Parameters a folder in ``layout`` holds for modules given as ``name → (rank, in, out)``."""
    ranks = {name: r for name, (r, _, _) in shapes.items()}
    return sum(tensor_rank(r, ranks, layout) * (i + o) for r, i, o in shapes.values())


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key matching ``module``, PEFT's rule.

    PEFT treats each key as a regex that must match a dotted suffix of the module path.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None
