"""The TensorRT-LLM LoRA protocol, reduced to what the router sees (shared by the stand-in models).

A bounded LRU keyed by ``lora_task_id``; weights for a new id are stored (weights sent again for a
cached id are ignored, as the runtime does); an id-only request for an id not in the cache fails
with the runtime's message; a cache with no room fails with ``Cache is full`` (capacity 0), or with
the failed ``pageIds.has_value()`` assertion of an eviction that freed too few pages (capacity -1). What a request
computed proves which weights were applied: ``y = x + round(sum(lora_weights))``. A batched request
is resolved row by row, each row with its own slice (dim 0) of every LoRA input, as TensorRT-LLM
splits a batch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from phlora_nim.engines.trtllm_legacy.contract import (
    ROWS_MISMATCH,
    cache_full_message,
    not_found_message,
    pages_exhausted_message,
)


def read(request: Any, name: str) -> np.ndarray | None:
    """An input of a Triton Python-backend request as numpy (BF16 through torch), None when absent."""
    import triton_python_backend_utils as pb_utils  # only inside the Python backend

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    try:
        return tensor.as_numpy()
    except Exception:  # BF16: numpy has no bfloat16, read it through torch
        import torch.utils.dlpack

        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).float().numpy()


class LoraError(Exception):
    """A per-request failure, returned to the client as the request's error."""


class LoraCache:
    """Least-recently-used adapters by task id; each entry keeps the sum of its weights."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[int, float] = OrderedDict()

    def resolve(self, task_id: int | None, weights: np.ndarray | None, config: np.ndarray | None) -> float:
        """The offset this request adds to ``x`` (0 for the base model)."""
        if task_id is None:
            if weights is not None or config is not None:
                raise LoraError("lora_weights and lora_config need a lora_task_id")
            return 0.0
        if (weights is None) != (config is None):
            raise LoraError("lora_weights and lora_config must be sent together")
        if task_id in self.entries:  # weights sent again for a cached id are ignored
            self.entries.move_to_end(task_id)
            return self.entries[task_id]
        if weights is None:
            raise LoraError(not_found_message(task_id))
        if weights.shape[-2] != config.shape[-2]:
            raise LoraError(ROWS_MISMATCH)
        if self.capacity < 0:  # eviction freed too few pages: the runtime's failed assertion
            raise LoraError(pages_exhausted_message(task_id))
        if self.capacity == 0:
            raise LoraError(cache_full_message(task_id))
        total = float(np.round(np.asarray(weights, dtype=np.float64).sum()))
        self.entries[task_id] = total
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return total

    def offsets_of(self, request: Any, rows: int) -> np.ndarray:
        """Read a request's LoRA inputs and resolve them row by row: ``[rows, 1]`` offsets (raises
        :class:`LoraError`)."""
        task, weights, config = (read(request, n) for n in ("lora_task_id", "lora_weights", "lora_config"))
        for name, tensor in (("lora_task_id", task), ("lora_weights", weights), ("lora_config", config)):
            if tensor is not None and tensor.shape[0] != rows:
                raise LoraError(f"{name} has {tensor.shape[0]} rows for a batch of {rows}")
        return np.array(
            [
                [
                    self.resolve(
                        None if task is None else int(task[row].reshape(-1)[0]),
                        None if weights is None else weights[row : row + 1],
                        None if config is None else config[row : row + 1],
                    )
                ]
                for row in range(rows)
            ]
        )
