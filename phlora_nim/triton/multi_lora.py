"""A causal LM serving many LoRA adapters at once on CPU: the generic runtime of phlora-nim's reference models.

A batch may mix requests for different adapters (and none). Every LoRA-able ``nn.Linear`` of the
base model is wrapped once; in a forward pass each row gets its own adapter's delta, computed as
S-LoRA / Punica do: the rows' A and B are gathered (zero-padded to the batch's largest rank, which
leaves the product unchanged) and applied with two batched matmuls. One forward per decoding step
for the whole batch, with a KV cache — never a model copy per adapter, never a merge.

An adapter is any object with ``factors``: ``{key: (A [r, in], B [out, r])}`` (scale folded into B),
keyed as the engine that wraps the model chose (:meth:`MultiLoraModel.wrap`). Which linears are
wrapped and what an adapter file becomes are each engine's business; nothing here names an engine.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from phlora_nim.core.dtypes import DTYPES
from phlora_nim.triton.limits import EngineLimits


class Adapter(Protocol):
    """What a request's adapter must offer: its factors per wrapped-module key."""

    @property
    def factors(self) -> dict[Any, tuple[torch.Tensor, torch.Tensor]]: ...


class _BatchLora:
    """Per forward pass: for each module key, the rows that have an adapter there and their factors."""

    def __init__(self, tasks: Sequence[Adapter | None], dtype: torch.dtype) -> None:
        self.stacks: dict[Hashable, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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

    A linear may take several module keys, each on a block of its outputs (Phi-3's fused
    ``gate_up_proj``: one key on the gate half, another on the up half).
    """

    def __init__(self, base: nn.Linear, parts: list[tuple[Hashable, slice]], state: _LoraState) -> None:
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
    lora: Adapter | None = None
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


def lora_targets(model: nn.Module) -> list[tuple[str, nn.Linear, list[tuple[str, int, slice]]]]:
    """Every linear the architecture map gives LoRA rows: ``(path, linear, [(row name, layer, output block)])``.

    A fused linear has one row per part, each on its block of outputs (Phi-3's ``gate_up_proj``: the
    gate half, then the up half). Row names are the map's (TensorRT-LLM's module names); how a row
    becomes an adapter key is the engine's business.

    Raises:
        ValueError: no architecture map for the model, or no linear it names.
    """
    from phlora_nim.converters.architecture import find_map

    config = model.config.to_dict()
    amap = find_map(config)
    if amap is None:
        raise ValueError(f"no architecture map for model_type {config.get('model_type')!r}")
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        hit = amap.match(path)
        if hit is None or hit[1] is None or not hit[0].trtllm_rows:
            continue
        names = hit[0].trtllm_rows
        width = module.out_features // len(names)
        found.append((path, module, [(n, hit[1], slice(k * width, (k + 1) * width)) for k, n in enumerate(names)]))
    if not found:
        raise ValueError(f"no LoRA-able linear modules recognised in {type(model).__name__}")
    return found


class MultiLoraModel:
    """A causal LM whose wrapped linears add each batch row's own adapter delta, and batched generation."""

    def __init__(self, model: nn.Module, *, dtype: str, limits: EngineLimits | None = None) -> None:
        self.model = model.eval()
        self.dtype = dtype
        self._state = _LoraState()
        self._lock = threading.Lock()
        config = model.config.to_dict()
        self.limits = limits or EngineLimits.from_parameters({}, config)
        self.num_layers = int(config["num_hidden_layers"])
        # transformers ≥ 5.2x names the KV cache argument ``cache``; earlier releases ``past_key_values``.
        params = inspect.signature(type(model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @staticmethod
    def load_causal_lm(base: Any, *, dtype: str) -> nn.Module:
        """The base checkpoint with transformers (eager attention: exact on CPU)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype].torch, attn_implementation="eager")

    def wrap(self, targets: list[tuple[str, nn.Linear, list[tuple[Hashable, slice]]]]) -> None:
        """Replace each ``(module path, linear, [(key, output block)])`` by a :class:`MultiLoraLinear`."""
        for path, module, parts in targets:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, MultiLoraLinear(module, parts, self._state))

    @contextmanager
    def _adapters(self, tasks: Sequence[Adapter | None]) -> Iterator[None]:
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
