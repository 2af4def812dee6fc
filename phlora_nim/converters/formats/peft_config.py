"""The ``adapter_config.json`` phlora-nim writes, as a typed value (what it reads from others' folders is
checked field by field in ``formats/peft.py``: any PEFT release's config may come in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phlora_nim.converters.scale_rules import Layout, layout_config


@dataclass(frozen=True)
class PeftAdapterConfig:
    """A plain LoRA adapter's config, as PEFT, vLLM and TensorRT-LLM's HF loader read it.

    The scaling fields (``r``, ``lora_alpha``, the patterns, ``use_rslora``) come from the folder's
    layout (:func:`~phlora_nim.converters.scale_rules.layout_config`); the fields after them are the
    same in every folder phlora-nim writes.
    """

    task_type: str | None
    base_model_name_or_path: str | None
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    # Bias deltas of LoRA targets ride in lora_B's bias (PEFT's lora_bias), scaled like the update: by 1,
    # so they are written as the changes they are.
    lora_bias: bool = False
    ensure_weight_tying: bool = False  # written only when set: older PEFT releases do not know the field

    @classmethod
    def of(
        cls,
        *,
        ranks: dict[str, int],
        layout: Layout,
        task_type: str | None,
        base_model_name_or_path: str | None,
        target_modules: list[str],
        modules_to_save: list[str] | None,
        lora_bias: bool,
        ensure_weight_tying: bool,
    ) -> PeftAdapterConfig:
        """The config of a folder in ``layout`` whose modules have the true ``ranks``."""
        scaling = layout_config(ranks or {"": 1}, layout)
        return cls(
            task_type=task_type,
            base_model_name_or_path=base_model_name_or_path,
            r=scaling["r"],
            lora_alpha=scaling["lora_alpha"],
            rank_pattern=dict(scaling["rank_pattern"]),
            alpha_pattern=dict(scaling["alpha_pattern"]),
            use_rslora=scaling["use_rslora"],
            target_modules=tuple(target_modules),
            modules_to_save=tuple(modules_to_save) if modules_to_save else None,
            lora_bias=lora_bias,
            ensure_weight_tying=ensure_weight_tying,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in the order PEFT itself writes them."""
        tying = {"ensure_weight_tying": True} if self.ensure_weight_tying else {}
        return tying | {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "target_modules": list(self.target_modules),
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "bias": "none",
            "lora_bias": self.lora_bias,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "fan_in_fan_out": False,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
