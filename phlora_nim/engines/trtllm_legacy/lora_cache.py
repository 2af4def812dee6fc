"""TensorRT-LLM's LoRA contract on the serving side: validation, task-id cache, eviction.

Requests carry ``lora_task_id`` and, on first use of an id, ``lora_weights`` ``[1, N, D]`` and
``lora_config`` ``[1, N, 3]``. This module checks those tensors the way the TensorRT-LLM runtime
does, with its error texts (clients and routers match on them), and keeps adapters in an LRU cache
bounded in bytes where adapters in use are never evicted.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phlora_nim.core.dtypes import DTYPES, dtype_name_of
from phlora_nim.engines.trtllm_legacy.contract import (
    CONFIG_FILE,
    MAP_AT,
    WEIGHTS_FILE,
    LoraRequestError,
    cache_full_message,
    decode_row,
    dtype_mismatch_message,
    incompatible_dtypes_message,
    module_name,
    not_found_message,
    pages_exhausted_message,
    read_runtime_npy,
    row_problems,
    tensor_problems,
)

log = logging.getLogger("phlora_nim.engines.trtllm_legacy.lora_cache")

__all__ = [
    "CacheFullError",
    "LoraCache",
    "LoraRequestError",
    "LoraTask",
    "ModuleShape",
    "cache_full_message",
    "not_found_message",
    "prefetch_folders",
    "read_prefetch_folder",
    "unpack_task",
]


class CacheFullError(LoraRequestError):
    """No room for an adapter: every cached adapter is in use (back-pressure, not a client error)."""


@dataclass(frozen=True)
class ModuleShape:
    """A LoRA-able module of the served model: TensorRT-LLM module id and its dims."""

    module_id: int
    in_dim: int
    out_dim: int


@dataclass(frozen=True)
class LoraTask:
    """One adapter, unpacked: per (module id, layer), A ``[r, in]`` and B ``[out, r]`` (scale folded)."""

    task_id: int
    factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    nbytes: int

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.factors.values()), default=0)


def _as_torch(array: np.ndarray) -> torch.Tensor:
    if dtype_name_of(array) == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def unpack_task(
    task_id: int,
    weights: np.ndarray,
    config: np.ndarray,
    *,
    modules: dict[tuple[int, int], ModuleShape],
    num_layers: int,
    dtype: str,
    max_rank: int,
    validate: bool = True,
) -> LoraTask:
    """Check ``lora_weights`` / ``lora_config`` as the runtime does and split rows into A and B.

    Args:
        modules: the served model's LoRA-able modules keyed by (module id, layer).
        num_layers: decoder layers of the served model.
        dtype: the model dtype (LoRA weights must match it).
        max_rank: the largest rank accepted.
        validate: False for prefetched adapters (TensorRT-LLM checks nothing there either).

    Raises:
        LoraRequestError: with TensorRT-LLM's message.
    """
    weights = np.asarray(weights)
    config = np.asarray(config)
    if weights.ndim == 2 and config.ndim == 2:  # in-process callers may leave out the batch dim
        weights, config = weights[None], config[None]
    if not validate and dtype_name_of(weights) != dtype:
        # LoraCache::copyToPages → BufferManager::copy checks only that the dtypes agree
        raise LoraRequestError(incompatible_dtypes_message(str(dtype_name_of(weights) or weights.dtype), dtype))
    if validate:
        if dtype_name_of(weights) != dtype:
            raise LoraRequestError(dtype_mismatch_message(dtype, weights.dtype))
        if config.ndim == 3 and config.shape[2] == 4 and bool(np.any(config[..., 3])):
            raise LoraRequestError("DoRA adapters (is_dora = 1) are not supported by this model")
        problems = tensor_problems(weights, config)
        if problems:
            raise LoraRequestError(problems[0])
    if weights.ndim == 3 and weights.shape[0] == 1:
        weights = weights[0]
    if config.ndim == 3 and config.shape[0] == 1:
        config = config[0]

    by_id = {key[0]: shape for key, shape in modules.items()}

    def dims(module_id: int, layer: int) -> tuple[int, int] | None:
        # "enabled" is per module type; the layer is checked on its own
        shape = modules.get((module_id, layer)) or by_id.get(module_id)
        return None if shape is None else (shape.in_dim, shape.out_dim)

    # Unvalidated (prefetch) rows still need a module to land in.
    problems = row_problems(
        config,
        int(weights.shape[1]) if validate else sys.maxsize,
        dims=dims,
        num_layers=num_layers if validate else None,
        max_rank=max_rank if validate else None,
    )
    if problems and validate:
        raise LoraRequestError(problems[0].message)
    if problems:  # LoraCache::put looks the module up with unordered_map::at
        p = problems[0]
        raise LoraRequestError(f"{MAP_AT} (row {p.row}: lora module {p.module} is not in the engine)")
    values = _as_torch(weights).to(DTYPES[dtype].torch)
    factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    nbytes = 0
    for i in range(config.shape[0]):
        module_id, layer, rank = (int(x) for x in config[i, :3])
        shape = modules.get((module_id, layer))
        if shape is None:  # unvalidated (prefetch): the runtime skips layers it does not hold
            continue
        a, b = decode_row(values[i], rank=rank, in_dim=shape.in_dim, out_dim=shape.out_dim)
        a, b = a[0].clone(), b[0].clone()
        if module_name(module_id) == "mlp_gate_up":  # TensorRT-LLM order [up; gate]; the HF module [gate; up]
            half = shape.out_dim // 2
            b = torch.cat([b[half:], b[:half]], dim=0)
        factors[(module_id, layer)] = (a, b)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return LoraTask(task_id=task_id, factors=factors, nbytes=nbytes)


class LoraCache:
    """LRU of adapters by task id, bounded in bytes; adapters in use are never evicted.

    Example:
        >>> cache = LoraCache(capacity_bytes=64 << 20)
        >>> cache.lookup(7)  # doctest: +SKIP
        LoraRequestError: LoRA task 7 not found in cache. Please send LoRA weights with request
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._tasks: OrderedDict[int, LoraTask] = OrderedDict()
        self._in_use: dict[int, int] = {}
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(t.nbytes for t in self._tasks.values())

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._tasks

    def task_ids(self) -> list[int]:
        """Cached ids, least recently used first."""
        return list(self._tasks)

    def lookup(self, task_id: int) -> LoraTask:
        """The cached adapter (marked most recently used), or TensorRT-LLM's miss error."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                raise LoraRequestError(not_found_message(task_id))
            self._tasks.move_to_end(task_id)
            return task

    def insert(self, task: LoraTask) -> LoraTask:
        """Add an adapter, evicting least recently used ones not in use; fail as the runtime fails otherwise.

        ``LoraCache::claimPagesWithEvict``: with nothing evictable, ``Cache is full``; when evicting
        every adapter not in use still leaves too little room, they are all gone and the claim fails
        the ``pageIds.has_value()`` assertion. An id already cached keeps its weights (the runtime
        ignores weights sent again).
        """
        with self._lock:
            if task.task_id in self._tasks:
                self._tasks.move_to_end(task.task_id)
                return self._tasks[task.task_id]
            evicted = 0
            while self.used_bytes + task.nbytes > self.capacity_bytes:
                victim = next((tid for tid in self._tasks if not self._in_use.get(tid)), None)
                if victim is None:
                    message = pages_exhausted_message if evicted else cache_full_message
                    raise CacheFullError(message(task.task_id))
                del self._tasks[victim]
                evicted += 1
                self.evictions += 1
                log.debug("evicted LoRA task %d", victim)
            self._tasks[task.task_id] = task
            return task

    def pin(self, task_id: int) -> None:
        """Mark an adapter in use (never evicted) until :meth:`unpin`; calls nest."""
        with self._lock:
            self._in_use[task_id] = self._in_use.get(task_id, 0) + 1

    def unpin(self, task_id: int) -> None:
        with self._lock:
            self._in_use[task_id] -= 1
            if not self._in_use[task_id]:
                del self._in_use[task_id]


def prefetch_folders(folder: Path) -> list[tuple[int, Path]]:
    """``(task_id, path)`` of every numeric sub-folder holding the npy pair (as TensorRT-LLM reads them)."""
    found = []
    if Path(folder).is_dir():
        for sub in sorted(Path(folder).iterdir()):
            if sub.is_dir() and sub.name.isdigit() and (sub / WEIGHTS_FILE).exists():
                found.append((int(sub.name), sub))
    return found


def read_prefetch_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``lora_weights`` and ``lora_config`` of one prefetch folder, read as the runtime reads them.

    Raises:
        LoraRequestError: what the runtime's npy reader says (``numpy data type 'V2' not supported``
            for bfloat16, which it cannot read at all).
    """
    return read_runtime_npy(Path(folder) / WEIGHTS_FILE), read_runtime_npy(Path(folder) / CONFIG_FILE)
