"""The dtypes phlora-nim writes and serves, one row each, in every vocabulary that names them.

One table (:data:`DTYPES`) and one parser (:func:`parse_dtype`) for every option and file field
that names a dtype: adapter storage (``extract`` / ``export`` / ``prune --dtype``), the engine's
dtype (``convert --engine-dtype``), the registry and the Triton configs. numpy only: the torch dtype
is resolved when it is asked for, so the router (which never imports torch) can use the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, overload

import ml_dtypes
import numpy as np

from phlora_nim.core.errors import OptionError

if TYPE_CHECKING:
    import torch

AUTO = "auto"  # adapter storage only: keep the fine-tune's own dtype


@dataclass(frozen=True)
class Dtype:
    """One dtype, as each consumer names it.

    Args:
        name: TensorRT-LLM's and torch's name (``pretrained_config.dtype``, ``--lora_plugin``).
        numpy: the numpy dtype of arrays holding it (``ml_dtypes.bfloat16`` for bfloat16).
        triton: Triton's ``DataType`` enum name in config.pbtxt.
        wire: the KServe v2 datatype string of a tensor on the wire (also safetensors' code but for F).
        npy_readable: whether TensorRT-LLM's npy reader (``lora_prefetch_dir``) can load it.
    """

    name: str
    numpy: np.dtype
    triton: str
    wire: str
    npy_readable: bool

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.name)

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def safetensors(self) -> str:
        """The safetensors header's code: the wire name with ``F`` for ``FP`` (``F16``, ``BF16``)."""
        return self.wire.replace("FP", "F")


# cpp/tensorrt_llm/runtime/utils/numpyUtils.cpp, typeFromNumpyDesc: "f2" and "f4" only, no bfloat16.
DTYPES: dict[str, Dtype] = {
    d.name: d
    for d in (
        Dtype("float16", np.dtype(np.float16), "TYPE_FP16", "FP16", True),
        Dtype("bfloat16", np.dtype(ml_dtypes.bfloat16), "TYPE_BF16", "BF16", False),
        Dtype("float32", np.dtype(np.float32), "TYPE_FP32", "FP32", True),
    )
}


@overload
def parse_dtype(name: str, where: str, *, auto: Literal[False] = False) -> Dtype: ...
@overload
def parse_dtype(name: str, where: str, *, auto: bool) -> Dtype | None: ...
def parse_dtype(name: str, where: str, *, auto: bool = False) -> Dtype | None:
    """The row named ``name``; with ``auto=True`` the word ``auto`` is accepted and gives None.

    Args:
        name: what the user wrote.
        where: the option or file field it came from (``--dtype``, ``registry.json adapters[x].dtype``).
        auto: whether ``auto`` (keep the source's own dtype) is allowed here.

    Raises:
        OptionError: any other name, saying where it came from and what is accepted.
    """
    if auto and name == AUTO:
        return None
    if name in DTYPES:
        return DTYPES[name]
    accepted = ", ".join(([AUTO] if auto else []) + list(DTYPES))
    raise OptionError(
        "unknown dtype",
        where=where,
        expected=f"one of {accepted}",
        found=repr(name),
        fix=f"pass one of {accepted}",
    )


def dtype_for_wire(datatype: str) -> Dtype | None:
    """The engine dtype a KServe datatype string (``FP16`` …) stands for, or None."""
    return next((d for d in DTYPES.values() if d.wire == datatype), None)


def dtype_name_of(array: np.ndarray) -> str | None:
    """The engine dtype name of an array; a 2-byte void (``np.save`` of bfloat16) counts as bfloat16."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return "bfloat16"
    return next((d.name for d in DTYPES.values() if d.numpy == array.dtype), None)


def as_engine_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` viewed as the engine dtype when it is stored as 2-byte void (bfloat16 or float16)."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return array.view(DTYPES[dtype].numpy if dtype in ("bfloat16", "float16") else ml_dtypes.bfloat16)
    return array
