"""``tensorrt_llm/1/model.yaml``: the ``LLM()`` arguments of the ``llmapi`` model, with a LoRA config
that covers every adapter of the repository.

Source: NVIDIA/TensorRT-LLM ``triton_backend/all_models/llmapi/tensorrt_llm/1/model.yaml`` (``model``,
``backend: pytorch``, ``tensor_parallel_size``, ``pipeline_parallel_size``, ``triton_config`` with
``max_batch_size`` and ``decoupled``; ``model.py`` passes every other key to ``LLM()``) and
``tensorrt_llm/_torch/peft/lora/config.py`` ``LoraConfig`` (``max_lora_rank``, ``lora_target_modules``,
``max_loras``, ``max_cpu_loras``, ``swap_gate_up_proj_lora_b_weight``). TensorRT-LLM skips a module
outside ``lora_target_modules`` with only a warning, and sizes its workspace by ``max_lora_rank``: both
must cover every adapter, which :func:`plan` checks or widens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from phlora_nim.core.atomic import atomic_write_text
from phlora_nim.core.errors import InputError, OptionError

FILE_NAME = "model.yaml"


@dataclass(frozen=True)
class LlmapiConfig:
    """What phlora-nim writes into ``model.yaml`` (other keys found there are kept as they are)."""

    model: str
    lora_target_modules: tuple[str, ...]
    max_lora_rank: int
    max_loras: int = 8
    max_cpu_loras: int = 32
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    swap_gate_up_proj_lora_b_weight: bool = True
    extra: tuple[tuple[str, Any], ...] = ()  # keys phlora-nim does not manage, in order

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_cpu_loras < self.max_loras:
            raise OptionError(
                "LoRA cache sizes out of range",
                where="--max-loras / --max-cpu-loras",
                expected="1 ≤ max_loras ≤ max_cpu_loras",
                found=f"max_loras={self.max_loras}, max_cpu_loras={self.max_cpu_loras}",
                fix="raise --max-cpu-loras to at least --max-loras",
            )
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise OptionError(
                "parallel sizes must be ≥ 1",
                where="--tp-size / --pp-size",
                found=f"{self.tensor_parallel_size} / {self.pipeline_parallel_size}",
            )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.model,
            "backend": "pytorch",
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "lora_config": {
                "max_lora_rank": self.max_lora_rank,
                "lora_target_modules": list(self.lora_target_modules),
                "max_loras": self.max_loras,
                "max_cpu_loras": self.max_cpu_loras,
                "swap_gate_up_proj_lora_b_weight": self.swap_gate_up_proj_lora_b_weight,
            },
            "triton_config": {"max_batch_size": 0, "decoupled": False},
        }
        for key, value in self.extra:
            data.setdefault(key, value)
        return data


def render(config: LlmapiConfig) -> str:
    head = (
        "# TensorRT-LLM LLM() arguments for the llmapi model (written by phlora-nim convert).\n"
        "# lora_config covers every adapter of this repository; convert widens it when new adapters need it.\n"
    )
    return head + yaml.safe_dump(config.to_dict(), sort_keys=False)


def write(path: Path, config: LlmapiConfig) -> None:
    atomic_write_text(path, render(config))


def read(path: Path) -> LlmapiConfig:
    """Read a ``model.yaml`` (ours or an operator's).

    Raises:
        InputError: not YAML, or no ``model`` / ``lora_config``.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(
            f"cannot read model.yaml ({exc})", where=str(path), fix="restore or rewrite the file"
        ) from None
    if not isinstance(data, dict) or "model" not in data:
        raise InputError(
            "not an llmapi model.yaml", where=str(path), expected="a mapping with model:", fix="rewrite it"
        )
    lora = data.get("lora_config") or {}
    known = {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size", "lora_config", "triton_config"}
    return LlmapiConfig(
        model=str(data["model"]),
        lora_target_modules=tuple(lora.get("lora_target_modules") or ()),
        max_lora_rank=int(lora.get("max_lora_rank", 64)),
        max_loras=int(lora.get("max_loras") or 8),
        max_cpu_loras=int(lora.get("max_cpu_loras") or max(32, int(lora.get("max_loras") or 8))),
        tensor_parallel_size=int(data.get("tensor_parallel_size", 1)),
        pipeline_parallel_size=int(data.get("pipeline_parallel_size", 1)),
        swap_gate_up_proj_lora_b_weight=bool(lora.get("swap_gate_up_proj_lora_b_weight", True)),
        extra=tuple((k, v) for k, v in data.items() if k not in known),
    )


@dataclass(frozen=True)
class Need:
    """What one adapter needs of ``lora_config``."""

    name: str
    modules: frozenset[str]
    rank: int


def uncovered(config: LlmapiConfig, needs: Iterable[Need]) -> list[str]:
    """One line per adapter the config does not cover (modules outside the list, rank above the max)."""
    lines = []
    for need in needs:
        missing = sorted(need.modules - set(config.lora_target_modules))
        if missing:
            lines.append(
                f"{need.name}: modules {', '.join(missing)} not in lora_target_modules "
                f"[{', '.join(config.lora_target_modules)}] (TensorRT-LLM would skip them with only a warning)"
            )
        if need.rank > config.max_lora_rank:
            lines.append(f"{need.name}: rank {need.rank} > max_lora_rank {config.max_lora_rank}")
    return lines


def plan(
    existing: LlmapiConfig | None, fresh: LlmapiConfig, needs: list[Need], *, fixed: bool = False
) -> tuple[LlmapiConfig, list[str]]:
    """The config to write and what changed, covering ``needs`` (this run's and earlier adapters).

    ``existing``: the repository's current model.yaml (None: first run). ``fresh``: settings from this
    run's flags. ``fixed``: the operator's model.yaml must be used as is (coverage is checked, not widened).

    Raises:
        InputError: ``fixed`` and an adapter is not covered (one line per adapter, with the numbers).
    """
    base = existing if existing is not None else fresh
    if existing is not None and not fixed:
        base = replace(
            existing,
            model=fresh.model,
            max_loras=fresh.max_loras,
            max_cpu_loras=fresh.max_cpu_loras,
            tensor_parallel_size=fresh.tensor_parallel_size,
            pipeline_parallel_size=fresh.pipeline_parallel_size,
        )
    gaps = uncovered(base, needs)
    if fixed:
        if gaps:
            raise InputError(
                "model.yaml's lora_config does not cover the adapters",
                where=f"{FILE_NAME} lora_config",
                expected="every adapter module in lora_target_modules and every rank ≤ max_lora_rank",
                found="; ".join(gaps),
                fix="widen lora_config (or drop --model-yaml and let convert widen it), then run again",
            )
        return base, []
    modules = set(base.lora_target_modules if existing is not None else ())
    for need in needs:
        modules |= need.modules
    rank = max([base.max_lora_rank if existing is not None else 1, *(n.rank for n in needs)])
    wanted = replace(base, lora_target_modules=tuple(sorted(modules)), max_lora_rank=rank)
    notes = []
    if existing is not None:
        added = sorted(modules - set(existing.lora_target_modules))
        if added:
            notes.append(
                f"model.yaml: lora_target_modules widened by {', '.join(added)} "
                f"(now {', '.join(wanted.lora_target_modules)}); restart the Triton replicas to apply it"
            )
        if rank > existing.max_lora_rank:
            notes.append(
                f"model.yaml: max_lora_rank raised {existing.max_lora_rank} → {rank}; "
                "restart the Triton replicas to apply it"
            )
    return wanted, notes
