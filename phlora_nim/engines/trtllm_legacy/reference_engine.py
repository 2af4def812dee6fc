"""CPU reference for TensorRT-LLM's ``tensorrt_llm`` model: one base model, many LoRA adapters.

A batch may mix requests for different adapters (and none). Every LoRA-able ``nn.Linear`` of the
base model is wrapped once; in a forward pass each row gets its own adapter's delta, computed as
S-LoRA / Punica do: the rows' A and B are gathered (zero-padded to the batch's largest rank, which
leaves the product unchanged) and applied with two batched matmuls. One forward per decoding step
for the whole batch, with a KV cache — never a model copy per adapter, never a merge.

Example:
    >>> engine = ReferenceEngine.load(Path("ckpt/base"), dtype="float32")  # doctest: +SKIP
    >>> task = engine.resolve(task_id=7, weights=w, config=c)  # doctest: +SKIP
    >>> engine.generate([GenerationRequest(input_ids=[5, 6, 7], max_new_tokens=8, lora=task)])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from phlora_nim.converters.architecture import find_map
from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS
from phlora_nim.engines.trtllm_legacy.contract import LoraRequestError, hf_runtime_dims, module_name
from phlora_nim.engines.trtllm_legacy.lora_cache import (
    LoraCache,
    LoraTask,
    ModuleShape,
    prefetch_folders,
    read_prefetch_folder,
    unpack_task,
)
from phlora_nim.triton.limits import EngineLimits
from phlora_nim.triton.multi_lora import GenerationRequest, MultiLoraModel, lora_targets

__all__ = ["GenerationRequest", "ReferenceEngine", "engine_from_parameters"]  # GenerationRequest: re-exported

log = logging.getLogger("phlora_nim.reference")


class ReferenceEngine(MultiLoraModel):
    """The base model with every LoRA-able linear wrapped, a LoRA cache, and batched generation."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: str,
        max_lora_rank: int = 64,
        cache_bytes: int = 1 << 30,
        limits: EngineLimits | None = None,
    ) -> None:
        super().__init__(model, dtype=dtype, limits=limits)
        self.max_lora_rank = max_lora_rank
        self.cache = LoraCache(cache_bytes)
        self._layer_dims: dict[tuple[int, int], tuple[int, int]] = {}  # the wrapped layer's own (in, out)
        self.modules = self._wrap(model.config.to_dict())
        if not self.modules:
            raise ValueError(f"no LoRA-able linear modules recognised in {type(model).__name__}")

    @classmethod
    def load(
        cls,
        base: Path,
        *,
        dtype: str = "float32",
        max_lora_rank: int = 64,
        cache_bytes: int = 1 << 30,
        prefetch_dir: Path | None = None,
        limit_parameters: dict[str, str] | None = None,
    ) -> ReferenceEngine:
        """Load the base checkpoint with transformers and preload ``prefetch_dir`` (unvalidated, as TensorRT-LLM).

        ``limit_parameters``: ``max_input_len`` / ``max_seq_len`` / ``max_num_tokens`` (see :class:`EngineLimits`).
        """
        model = cls.load_causal_lm(base, dtype=dtype)
        limits = EngineLimits.from_parameters(limit_parameters or {}, model.config.to_dict())
        engine = cls(model, dtype=dtype, max_lora_rank=max_lora_rank, cache_bytes=cache_bytes, limits=limits)
        if prefetch_dir is not None:
            engine.prefetch(Path(prefetch_dir))
        return engine

    def _wrap(self, config: dict[str, Any]) -> dict[tuple[int, int], ModuleShape]:
        """Wrap every LoRA-able linear; the dims a row is read with are the runtime's, not the layer's.

        ``LoraModule::createLoraModules`` sizes modules from the model config (attn_dense is
        ``hidden × hidden`` even where o_proj takes nH·d inputs), and the cache reads rows by those
        dims; :meth:`unpack` refuses rows the layer cannot apply as written.
        """
        amap = find_map(config)
        if amap is None:
            raise ValueError(f"no architecture map for model_type {config.get('model_type')!r}")
        runtime = hf_runtime_dims(amap.resolved_config(config))
        found: dict[tuple[int, int], ModuleShape] = {}
        targets = []
        for path, module, rows in lora_targets(self.model):
            parts = []
            for name, layer, block in rows:
                key = (TRTLLM_MODULE_IDS[name], layer)
                width = block.stop - block.start
                in_dim, out_dim = runtime.get(name, (module.in_features, width))
                found[key] = ModuleShape(key[0], in_dim, out_dim)
                self._layer_dims[key] = (module.in_features, width)
                parts.append((key, block))
            targets.append((path, module, parts))
        self.wrap(targets)
        return found

    def prefetch(self, folder: Path) -> int:
        """Load every ``<task_id>/`` npy pair of a prefetch folder into the cache; returns the count.

        As ``PeftCacheManager::prefetchLoraWeights``: files are read by the runtime's npy reader
        (no bfloat16), nothing is validated, and any failure stops the model from loading.

        Raises:
            LoraRequestError: the runtime's message (``numpy data type 'V2' not supported``,
                ``Incompatible data types``, ``_Map_base::at``), prefixed with the folder.
        """
        count = 0
        for task_id, sub in prefetch_folders(folder):
            try:
                weights, config = read_prefetch_folder(sub)
                self.cache.insert(self.unpack(task_id, weights, config, validate=False))
            except LoraRequestError as exc:
                raise LoraRequestError(f"lora_prefetch_dir {sub}: {exc}") from None
            count += 1
        return count

    def unpack(self, task_id: int, weights: np.ndarray, config: np.ndarray, *, validate: bool = True) -> LoraTask:
        """Rows → factors as the runtime reads them; rows the layer cannot apply as read are refused.

        Raises:
            LoraRequestError: the runtime's message, or (where the runtime would silently apply a
                wrong delta, e.g. attn_dense laid out for nH·d ≠ hidden) one saying so.
        """
        task = unpack_task(
            task_id,
            weights,
            config,
            modules=self.modules,
            num_layers=self.num_layers,
            dtype=self.dtype,
            max_rank=self.max_lora_rank,
            validate=validate,
        )
        for key, (a, b) in task.factors.items():
            layer_in, layer_out = self._layer_dims[key]
            if a.shape[1] != layer_in or b.shape[0] != layer_out:
                raise LoraRequestError(
                    f"lora module {module_name(key[0])} (layer {key[1]}): TensorRT-LLM reads this row as "
                    f"A [{a.shape[0]}, {a.shape[1]}], B [{b.shape[0]}, {a.shape[0]}] but the layer maps {layer_in} "
                    f"inputs to {layer_out} outputs; the runtime would apply a wrong delta without an error"
                )
        return task

    def resolve(
        self, task_id: int | None, weights: np.ndarray | None = None, config: np.ndarray | None = None
    ) -> LoraTask | None:
        """The adapter a request asks for, under TensorRT-LLM's protocol (pinned until :meth:`release`).

        Weights + config with a new id are validated and cached; an id already cached keeps its
        weights; an id alone must be cached.

        Raises:
            LoraRequestError: TensorRT-LLM's message (miss, cache full, bad tensors).
        """
        if task_id is None:
            if weights is not None or config is not None:
                raise LoraRequestError("lora_weights and lora_config need a lora_task_id")
            return None
        if (weights is None) != (config is None):
            raise LoraRequestError("lora_weights and lora_config must be sent together")
        if weights is None or task_id in self.cache:
            task = self.cache.lookup(task_id)
        else:
            task = self.cache.insert(self.unpack(task_id, weights, config))  # type: ignore[arg-type]
        self.cache.pin(task.task_id)
        return task

    def release(self, task: LoraTask | None) -> None:
        if task is not None:
            self.cache.unpin(task.task_id)


def engine_from_parameters(params: dict[str, str]) -> ReferenceEngine:
    """Build the engine from the ``tensorrt_llm`` config's parameters (see ``model_repository``)."""
    prefetch = params.get("lora_prefetch_dir") or None
    engine = ReferenceEngine.load(
        Path(params["base_model"]),
        dtype=params.get("dtype", "float32"),
        max_lora_rank=int(params.get("max_lora_rank", "64")),
        cache_bytes=int(params.get("lora_cache_host_memory_bytes", str(1 << 30))),
        prefetch_dir=Path(prefetch) if prefetch else None,
        limit_parameters=params,
    )
    log.info(
        "reference model ready: %s, %s, %d LoRA modules, %d prefetched adapters",
        json.dumps({k: params.get(k) for k in ("base_model", "dtype", "max_lora_rank")}),
        engine.limits,
        len(engine.modules),
        len(engine.cache.task_ids()),
    )
    return engine
