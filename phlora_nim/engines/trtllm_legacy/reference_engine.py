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

import inspect
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from phlora_nim.converters.architecture import find_map
from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS
from phlora_nim.core.dtypes import DTYPES
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

log = logging.getLogger("phlora_nim.reference")


class _BatchLora:
    """Per forward pass: for each (module id, layer), the rows that have an adapter there and their factors."""

    def __init__(self, tasks: list[LoraTask | None], dtype: torch.dtype) -> None:
        self.stacks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        keys = {k for t in tasks if t is not None for k in t.factors}
        for key in keys:
            rows = [i for i, t in enumerate(tasks) if t is not None and key in t.factors]
            pairs = [tasks[i].factors[key] for i in rows]  # type: ignore[union-attr]
            rank = max(a.shape[0] for a, _ in pairs)
            a_all = torch.zeros(len(rows), rank, pairs[0][0].shape[1], dtype=dtype)
            b_all = torch.zeros(len(rows), pairs[0][1].shape[0], rank, dtype=dtype)
            for j, (a, b) in enumerate(pairs):
                a_all[j, : a.shape[0]] = a
                b_all[j, :, : b.shape[1]] = b
            self.stacks[key] = (torch.tensor(rows), a_all.transpose(1, 2), b_all.transpose(1, 2))


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus, for each batch row, that row's ``x Aᵀ Bᵀ``.

    A linear may take several TensorRT-LLM modules, each on a block of its outputs (Phi-3's
    ``gate_up_proj``: ``mlp_h_to_4h`` on the gate half, ``mlp_gate`` on the up half).
    """

    def __init__(self, base: nn.Linear, parts: list[tuple[tuple[int, int], slice]], state: _LoraState) -> None:
        super().__init__()
        self.base = base
        self.parts = parts
        self._state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self._state.batch
        if batch is None:
            return y
        for key, block in self.parts:
            stack = batch.stacks.get(key)
            if stack is None:
                continue
            rows, a_t, b_t = stack
            delta = torch.bmm(torch.bmm(x[rows], a_t), b_t)
            if block.stop - block.start != y.shape[-1]:
                full = delta.new_zeros((*delta.shape[:-1], y.shape[-1]))
                full[..., block] = delta
                delta = full
            y = y.index_add(0, rows, delta)
        return y


class _LoraState:
    batch: _BatchLora | None = None


@dataclass
class GenerationRequest:
    """One sequence to continue. Greedy unless sampling is asked for (TensorRT-LLM's defaults)."""

    input_ids: list[int]
    max_new_tokens: int
    end_id: int = -1
    pad_id: int = 0
    lora: LoraTask | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1 or (self.top_k <= 0 and self.top_p <= 0.0)


def _choose(logits: torch.Tensor, reqs: list[GenerationRequest], generators: list[torch.Generator | None]) -> list[int]:
    picks = logits.argmax(dim=-1).tolist()
    for i, req in enumerate(reqs):
        if req.greedy:
            continue
        scores = logits[i].float() / max(req.temperature, 1e-5)
        if req.top_k > 0:
            kth = torch.topk(scores, min(req.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if 0.0 < req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < req.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        picks[i] = int(torch.multinomial(probs / probs.sum(), 1, generator=generators[i]).item())
    return picks


class ReferenceEngine:
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
        self.model = model.eval()
        self.dtype = dtype
        self.max_lora_rank = max_lora_rank
        self.cache = LoraCache(cache_bytes)
        self._state = _LoraState()
        self._lock = threading.Lock()
        self._layer_dims: dict[tuple[int, int], tuple[int, int]] = {}  # the wrapped layer's own (in, out)
        config = model.config.to_dict()
        self.limits = limits or EngineLimits.from_parameters({}, config)
        self.num_layers = int(config["num_hidden_layers"])
        self.modules = self._wrap(config)
        # transformers ≥ 5.2x names the KV cache argument ``cache``; earlier releases ``past_key_values``.
        params = inspect.signature(type(model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
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
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype].torch, attn_implementation="eager")
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
        for path, module in self.model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            hit = amap.match(path)
            if hit is None or hit[1] is None or not hit[0].trtllm_rows:
                continue
            names = hit[0].trtllm_rows
            width = module.out_features // len(names)
            parts = []
            for k, name in enumerate(names):
                key = (TRTLLM_MODULE_IDS[name], hit[1])
                in_dim, out_dim = runtime.get(name, (module.in_features, width))
                found[key] = ModuleShape(key[0], in_dim, out_dim)
                self._layer_dims[key] = (module.in_features, width)
                parts.append((key, slice(k * width, (k + 1) * width)))
            targets.append((path, module, parts))
        for path, module, parts in targets:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, MultiLoraLinear(module, parts, self._state))
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

    @contextmanager
    def _adapters(self, tasks: list[LoraTask | None]) -> Iterator[None]:
        self._state.batch = _BatchLora(tasks, DTYPES[self.dtype].torch) if any(tasks) else None
        try:
            yield
        finally:
            self._state.batch = None

    @torch.inference_mode()
    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[list[int]]:
        """Continue every request in one batch; returns the generated ids (end id excluded).

        Args:
            on_tokens: called after each step with (row, new token ids) for rows that produced one.
        """
        if not requests:
            return []
        with self._lock, self._adapters([r.lora for r in requests]):
            return self._generate(requests, on_tokens)

    def _generate(
        self, reqs: list[GenerationRequest], on_tokens: Callable[[int, list[int]], None] | None
    ) -> list[list[int]]:
        from transformers import DynamicCache

        n, width = len(reqs), max(len(r.input_ids) for r in reqs)
        ids = torch.full((n, width), 0, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's last prompt token is at the end
            ids[i, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
            mask[i, width - len(r.input_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [None if r.greedy else torch.Generator().manual_seed(int(r.seed)) for r in reqs]
        outputs: list[list[int]] = [[] for _ in reqs]
        done = [r.max_new_tokens <= 0 for r in reqs]
        cache = {self._cache_arg: DynamicCache()}  # filled in place by every forward
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache)
        for _ in range(max(r.max_new_tokens for r in reqs)):
            picks = _choose(out.logits[:, -1, :], reqs, generators)
            for i, tok in enumerate(picks):
                if done[i]:
                    continue
                if tok == reqs[i].end_id:
                    done[i] = True
                    continue
                outputs[i].append(tok)
                if on_tokens:
                    on_tokens(i, [tok])
                done[i] = len(outputs[i]) >= reqs[i].max_new_tokens
            if all(done):
                break
            step = torch.tensor([[t] for t in picks], dtype=torch.long)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=step, attention_mask=mask, position_ids=positions, **cache)
        return outputs


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
