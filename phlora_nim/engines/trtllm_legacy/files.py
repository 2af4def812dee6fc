"""The TensorRT-LLM npy pair on disk: :class:`TrtllmLora`, :func:`save_trtllm`, :func:`load_trtllm`.

numpy only (no torch), so the router can read adapters without loading torch; the layout rules
and the conversion from a LoRA adapter are in :mod:`phlora_nim.engines.trtllm_legacy.tensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phlora_nim.core.dtypes import as_engine_array, dtype_name_of
from phlora_nim.core.errors import InputError, PhloraError, raise_all
from phlora_nim.core.json_files import read_json
from phlora_nim.engines.trtllm_legacy.contract import CONFIG_FILE, META_FILE, WEIGHTS_FILE, tensor_problems

__all__ = ["TrtllmLora", "TrtllmRow", "load_trtllm", "save_trtllm"]


@dataclass(frozen=True)
class TrtllmRow:
    """What the sidecar says of one row: enough to read it back exactly.

    Args:
        modules: the adapter's module paths in the row (one per expert; none for a zero q/k/v row).
        in_dim, out_dim: the dims the row is laid out with (per expert; per part of B).
        trtllm: the TensorRT-LLM module name (``attn_q``, ``moe_h_to_4h``, …).
        splits: row blocks of a fused module's B, in TensorRT-LLM order (for TP interleaving).
        part: ``(k, n)`` when a module's B is written as ``n`` rows and this is the ``k``-th.
    """

    modules: tuple[str, ...]
    in_dim: int
    out_dim: int
    trtllm: str
    splits: tuple[int, ...] | None = None
    part: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"modules": list(self.modules), "in": self.in_dim, "out": self.out_dim}
        data["trtllm"] = self.trtllm
        data["splits"] = list(self.splits) if self.splits is not None else None
        if self.part is not None:
            data["part"] = list(self.part)
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> TrtllmRow:
        """A row as :meth:`to_json` wrote it.

        Raises:
            InputError: a row that is not such an object.
        """
        try:
            splits, part = data.get("splits"), data.get("part")
            return cls(
                modules=tuple(str(m) for m in data["modules"]),
                in_dim=int(data["in"]),
                out_dim=int(data["out"]),
                trtllm=str(data["trtllm"]),
                splits=tuple(int(x) for x in splits) if splits else None,
                part=(int(part[0]), int(part[1])) if part else None,
            )
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(
                f"unreadable row description ({type(exc).__name__}: {exc})",
                where=where,
                expected='{"modules": [...], "in": N, "out": N, "trtllm": NAME}',
                found=repr(data)[:80],
                fix="export the adapter again",
            ) from None


@dataclass(frozen=True)
class TrtllmLora:
    """The npy pair plus the sidecar metadata describing each row."""

    weights: np.ndarray  # [1, N, D]
    config: np.ndarray  # [1, N, 3] int32
    rows: tuple[TrtllmRow, ...]
    dtype: str
    tp: int
    dropped: tuple[str, ...] = ()  # modules left out: the runtime would apply them wrongly
    dropped_energy: float = 0.0  # their share of the adapter's update energy ‖ΔW‖²

    @property
    def num_rows(self) -> int:
        return int(self.config.shape[1])


def save_trtllm(lora: TrtllmLora, folder: Path, *, source: str | None = None) -> None:
    """Write the npy pair (and the sidecar) into an existing folder."""
    folder = Path(folder)
    np.save(folder / WEIGHTS_FILE, lora.weights)  # bfloat16 is written as descr '<V2', as TensorRT-LLM does
    np.save(folder / CONFIG_FILE, lora.config)
    meta: dict[str, Any] = {"format": "phlora-trtllm/1", "dtype": lora.dtype, "tp": lora.tp, "source": source}
    if lora.dropped:
        meta["left_out"] = {"modules": list(lora.dropped), "energy_share": lora.dropped_energy}
    meta["rows"] = [row.to_json() for row in lora.rows]
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def load_trtllm(folder: Path, *, dtype: str | None = None, mmap: bool = False) -> TrtllmLora:
    """Read and validate the npy pair (bfloat16 arrive as ``<V2`` and are viewed back).

    Args:
        folder: holding ``model.lora_weights.npy`` and ``model.lora_config.npy``.
        dtype: for a ``<V2`` file without sidecar: the 2-byte float it holds (default bfloat16).
        mmap: map the files read-only instead of reading them (serving: pages come in on use).
    """
    folder = Path(folder)
    arrays = []
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = folder / name
        if not path.exists():
            raise InputError(
                "TensorRT-LLM LoRA file missing",
                where=str(path),
                expected=f"{WEIGHTS_FILE} and {CONFIG_FILE}",
                found="no such file",
                fix="export with `phlora-nim export --format trtllm`",
            )
        try:
            arrays.append(np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None))
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(
                f"corrupt or truncated npy file ({exc})",
                where=str(path),
                expected="an array written by numpy.save",
                fix="re-export the adapter",
            ) from None
    weights, config = arrays
    meta_path = folder / META_FILE
    meta = read_json(meta_path, what="sidecar", fix="export the adapter again") if meta_path.exists() else {}
    weights = as_engine_array(weights, dtype or meta.get("dtype", "bfloat16"))
    problems: list[PhloraError] = [InputError(text, where=str(folder)) for text in tensor_problems(weights, config)]
    raise_all(problems, summary=f"{folder} is not a valid TensorRT-LLM LoRA")
    return TrtllmLora(
        weights=weights,
        config=config,
        rows=tuple(TrtllmRow.from_json(r, where=f"{meta_path} rows[{i}]") for i, r in enumerate(meta.get("rows", ()))),
        dtype=str(dtype_name_of(weights)),
        tp=int(meta.get("tp", 1)),
    )
