"""Adapter tensors read from the repository, converted to the upstream dtype, kept in memory.

The npy pair of an adapter (``prefetch_dir(root, task_id)``) is memory-mapped, checked, converted
to the dtype the upstream model declares for ``lora_weights`` and kept as ready-to-send bytes in an
LRU bounded by bytes. bfloat16 files hold ``<V2`` (2-byte void) and are viewed back as
``ml_dtypes.bfloat16`` (or float16 when the registry says so).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import grpc
import numpy as np

from phlora_nim.core.dtypes import DTYPES, dtype_for_wire
from phlora_nim.core.errors import InputError
from phlora_nim.engines.trtllm_legacy.contract import CONFIG_FILE, WEIGHTS_FILE
from phlora_nim.engines.trtllm_legacy.files import load_trtllm
from phlora_nim.repository.layout import prefetch_dir
from phlora_nim.repository.registry import AdapterEntry
from phlora_nim.router.errors import RequestError
from phlora_nim.router.lru import LruBytes
from phlora_nim.router.rewrite import LoraTensors


def read_lora_tensors(folder: Path, *, stored_dtype: str, datatype: str, task_id: int) -> LoraTensors:
    """Memory-map and check one adapter's npy pair, converted to ``datatype`` (FP16, BF16, FP32).

    Raises:
        InputError: a missing or malformed file, or values that overflow the target dtype.
    """
    lora = load_trtllm(folder, dtype=stored_dtype, mmap=True)  # the converters' own checks
    weights, config = lora.weights, lora.config
    engine = dtype_for_wire(datatype)
    assert engine is not None, datatype  # AdapterWeights.get refuses other datatypes
    target = engine.numpy
    with np.errstate(over="ignore"):  # checked just below
        converted = np.ascontiguousarray(weights, dtype=target)
    if converted.dtype != weights.dtype and not np.isfinite(converted.astype(np.float32)).all():
        raise InputError(
            f"lora_weights overflow {engine.name}, the upstream model's dtype",
            where=str(folder / WEIGHTS_FILE),
            fix="export the adapter in the engine's dtype",
        )
    return LoraTensors(
        task_id=task_id,
        datatype=datatype,
        weights=converted.astype(target.newbyteorder("<"), copy=False).tobytes(),
        weights_shape=tuple(int(d) for d in weights.shape),
        config=np.ascontiguousarray(config, dtype="<i4").tobytes(),
        config_shape=tuple(int(d) for d in config.shape),
    )


class AdapterFilesError(Exception):
    """An adapter's tensor files cannot be used.

    ``detail`` names the files (server paths): for the router's log only, never for clients.
    ``missing``: absent or unreadable (e.g. removed with ``phlora-nim remove``), else malformed.
    """

    def __init__(self, entry: AdapterEntry, detail: str, *, missing: bool) -> None:
        super().__init__(detail)
        self.entry = entry
        self.detail = detail
        self.missing = missing


class WeightStore:
    """Converted adapter tensors by (task id, datatype), at most ``max_bytes`` in memory (thread-safe)."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = Path(root)
        self._cache: LruBytes[tuple[int, str], LoraTensors] = LruBytes(max_bytes, lambda t: t.nbytes)
        self._lock = threading.Lock()
        self.loads = 0

    @property
    def bytes(self) -> int:
        return self._cache.bytes

    def get(self, entry: AdapterEntry, datatype: str) -> LoraTensors:
        """The tensors of ``entry`` in ``datatype`` (read on a miss; call from a worker thread).

        Raises:
            AdapterFilesError: the files are missing, unreadable or malformed.
            RequestError: FAILED_PRECONDITION when the datatype is not one TensorRT-LLM takes.
        """
        if dtype_for_wire(datatype) is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the upstream model's lora_weights input is {datatype}; expected FP16, BF16 or FP32",
            )
        key = (entry.task_id, datatype)
        with self._lock:
            found = self._cache.get(key)
        if found is not None:
            return found
        folder = prefetch_dir(self.root, entry.task_id)
        try:
            tensors = read_lora_tensors(folder, stored_dtype=entry.dtype, datatype=datatype, task_id=entry.task_id)
        except (InputError, OSError, ValueError) as exc:
            # Removed (or being removed) while registered, or unreadable: a problem of the moment.
            gone = not all(os.access(folder / name, os.R_OK) for name in (WEIGHTS_FILE, CONFIG_FILE))
            missing = gone or isinstance(exc, OSError)
            raise AdapterFilesError(entry, f"adapter {entry.name!r}: {exc}", missing=missing) from None
        with self._lock:
            self.loads += 1
            self._cache.put(key, tensors)
        return tensors

    def forget(self, task_ids: set[int]) -> None:
        """Drop the tensors of adapters no longer registered."""
        with self._lock:
            for task_id in task_ids:
                for datatype in (d.wire for d in DTYPES.values()):
                    self._cache.pop((task_id, datatype))
