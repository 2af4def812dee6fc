"""Triton ``config.pbtxt`` files: built as Triton's own ``ModelConfig`` protobuf (shipped in
tritonclient), written as text, and parsed back before they replace the old file, so what lands on
disk is a config Triton accepts. Each engine's models are built in that engine's package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from phlora_nim.core.atomic import atomic_write_text
from phlora_nim.core.errors import InputError


def model_input(
    name: str,
    dtype: int,
    dims: list[int],
    *,
    optional: bool = False,
    ragged: bool = False,
    reshape: list[int] | None = None,
) -> mc.ModelInput:
    spec = mc.ModelInput(name=name, data_type=dtype, dims=dims, optional=optional, allow_ragged_batch=ragged)
    if reshape is not None:
        spec.reshape.shape.extend(reshape)
    return spec


def model_output(name: str, dtype: int, dims: list[int]) -> mc.ModelOutput:
    return mc.ModelOutput(name=name, data_type=dtype, dims=dims)


def set_parameters(config: mc.ModelConfig, values: dict[str, Any]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def parse_config(text: str, *, where: str) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` into Triton's ``ModelConfig``; a clear error when it is not one."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise InputError(
            f"not a valid Triton model config ({exc})",
            where=where,
            expected="text format of inference.ModelConfig",
        ) from None


def write_config(folder: Path, config: mc.ModelConfig) -> Path:
    """Write ``config.pbtxt`` atomically after checking it parses back to the same message."""
    text = text_format.MessageToString(config)
    path = Path(folder) / "config.pbtxt"
    if parse_config(text, where=str(path)) != config:
        raise RuntimeError(f"config for {config.name} does not round-trip through text format")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
