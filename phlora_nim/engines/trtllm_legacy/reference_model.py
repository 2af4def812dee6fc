"""``tensorrt_llm`` on CPU: TensorRT-LLM's token-level model contract over
:mod:`phlora_nim.engines.trtllm_legacy.reference_engine`.

Inputs and outputs are those of TensorRT-LLM's ``tensorrt_llm`` model. With dynamic batching one
``execute`` receives requests for different adapters; they are generated together in one batch.
Per-request failures (LoRA misses, a full cache, bad LoRA tensors) come back as that request's
error with TensorRT-LLM's text, never as an exception. A request with batch size > 1 is split per
item, every input sliced on dim 0, as TensorRT-LLM does.

One client's request never fails another's: every item is checked against the engine's limits and
vocabulary before it joins a batch (INVALID_ARGUMENT, alone), a round holds at most
``max_num_tokens`` prompt tokens, and should a batched round still fail, each of its requests is
run again alone so that only the one that fails by itself is answered with the error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phlora_nim.engines.trtllm_legacy.lora_cache import CacheFullError, LoraRequestError
from phlora_nim.engines.trtllm_legacy.reference_engine import GenerationRequest, ReferenceEngine, engine_from_parameters
from phlora_nim.triton.limits import RequestRejected
from phlora_nim.triton.models.text import model_parameters

log = logging.getLogger("phlora_nim.reference")


@dataclass
class _Item:
    """One batch item of one Triton request, with the LoRA inputs it brought."""

    request: int
    gen: GenerationRequest
    position: int = 0
    task_id: int | None = None
    weights: np.ndarray | None = None
    config: np.ndarray | None = None
    streamed: int = 0  # tokens already sent on its stream (a rerun skips them: generation is deterministic)


@dataclass
class _Pending:
    """A Triton request's items and, once known, its error."""

    items: list[_Item] = field(default_factory=list)
    error: str | None = None
    stream: bool = False
    invalid: bool = False  # the error is the client's (INVALID_ARGUMENT), not the server's

    def reject(self, message: str) -> _Pending:
        self.error, self.invalid = message, True
        return self


def _scalar(value: np.ndarray | None, index: int, default: Any) -> Any:
    if value is None:
        return default
    flat = value.reshape(value.shape[0], -1) if value.ndim else value.reshape(1, 1)
    return flat[min(index, flat.shape[0] - 1), 0].item()


class ReferenceLlmModel:
    """Triton Python-backend model with TensorRT-LLM's LoRA contract."""

    pb: Any = None  # triton_python_backend_utils, set by model.py

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        self.engine: ReferenceEngine = engine_from_parameters(model_parameters(args))

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _parse(self, index: int, request: Any) -> _Pending:
        pending = _Pending()
        ids = self._input(request, "input_ids")
        if ids is None:
            return pending.reject("missing required input input_ids")
        ids = ids.reshape(ids.shape[0], -1)
        lengths = self._input(request, "input_lengths")
        out_len = self._input(request, "request_output_len")
        end_id, pad_id = self._input(request, "end_id"), self._input(request, "pad_id")
        temperature, top_k = self._input(request, "temperature"), self._input(request, "runtime_top_k")
        top_p = self._input(request, "runtime_top_p")
        seed = self._input(request, "seed")  # v0.20+ name; random_seed before
        seed = self._input(request, "random_seed") if seed is None else seed
        streaming = self._input(request, "streaming")
        task_ids = self._input(request, "lora_task_id")
        weights, lconfig = self._input(request, "lora_weights"), self._input(request, "lora_config")
        pending.stream = bool(_scalar(streaming, 0, False))
        if pending.stream and not self.decoupled:
            return pending.reject("Streaming is only supported if model is deployed using decoupled mode.")
        for b in range(ids.shape[0]):
            n = int(_scalar(lengths, b, ids.shape[1]))
            if not 0 <= n <= ids.shape[1]:
                return pending.reject(f"input_lengths {n} out of range [0, {ids.shape[1]}]")
            gen = GenerationRequest(
                input_ids=[int(x) for x in ids[b, :n]],
                max_new_tokens=int(_scalar(out_len, b, 16)),
                end_id=int(_scalar(end_id, b, -1)),
                pad_id=int(_scalar(pad_id, b, 0)),
                temperature=float(_scalar(temperature, b, 1.0)),
                top_k=int(_scalar(top_k, b, 0)),
                top_p=float(_scalar(top_p, b, 0.0)),
                seed=int(_scalar(seed, b, 0)),
            )
            try:
                gen.max_new_tokens = self.engine.limits.check(gen.input_ids, gen.max_new_tokens, gen.end_id)
            except RequestRejected as exc:
                return pending.reject(str(exc))
            pending.items.append(
                _Item(
                    index,
                    gen,
                    position=b,
                    task_id=None if task_ids is None else int(_scalar(task_ids, b, 0)),
                    weights=None if weights is None else weights[b : b + 1],
                    config=None if lconfig is None else lconfig[b : b + 1],
                )
            )
        return pending

    def _tensors(self, tokens: list[list[int]], pad_id: int) -> list[Any]:
        width = max((len(t) for t in tokens), default=0)
        ids = np.full((len(tokens), 1, max(width, 1)), pad_id, dtype=np.int32)
        for i, t in enumerate(tokens):
            ids[i, 0, : len(t)] = t
        lengths = np.array([[len(t)] for t in tokens], dtype=np.int32)
        return [self.pb.Tensor("output_ids", ids), self.pb.Tensor("sequence_length", lengths)]

    def _error(self, message: str, *, invalid: bool = False) -> Any:
        code = self.pb.TritonError.INVALID_ARG if invalid else self.pb.TritonError.INTERNAL
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def _resolve_round(self, todo: list[_Item], pending: list[_Pending]) -> tuple[list[_Item], list[_Item]]:
        """Resolve adapters for as many items as the LoRA cache holds at once; defer the rest.

        An adapter that does not fit while this round's adapters are pinned waits for the next
        round (TensorRT-LLM's scheduler likewise holds such requests back); alone, it is an error.
        """
        batch: list[_Item] = []
        deferred: list[_Item] = []
        budget = self.engine.limits.max_num_tokens
        for it in todo:
            if pending[it.request].error is not None:
                continue
            if batch and len(it.gen.input_ids) > budget:  # max_num_tokens: the next round takes it
                deferred.append(it)
                continue
            try:
                it.gen.lora = self.engine.resolve(it.task_id, it.weights, it.config)
                batch.append(it)
                budget -= len(it.gen.input_ids)
            except CacheFullError as exc:
                if batch:
                    deferred.append(it)
                else:
                    pending[it.request].error = str(exc)
            except LoraRequestError as exc:
                pending[it.request].error = str(exc)
        run = [it for it in batch if pending[it.request].error is None]
        for it in batch:
            if pending[it.request].error is not None:
                self.engine.release(it.gen.lora)
        return run, [it for it in deferred if pending[it.request].error is None]

    def _run_round(
        self,
        items: list[_Item],
        pending: list[_Pending],
        per_request: list[dict[int, list[int]]],
        senders: list[Any] | None,
    ) -> None:
        """Generate one round; if it fails, each request again alone, so only the culprit fails."""

        seen = [0] * len(items)

        def stream(row: int, new: list[int], items: list[_Item] = items) -> None:
            item = items[row]
            seen[row] += len(new)
            if senders is not None and pending[item.request].stream and seen[row] > item.streamed:
                senders[item.request].send(self.pb.InferenceResponse(output_tensors=self._tensors([new], 0)))
                item.streamed = seen[row]

        try:
            results = self.engine.generate([it.gen for it in items], on_tokens=stream if senders else None)
        except Exception as exc:  # a model failure fails requests, never the server
            groups: dict[int, list[_Item]] = {}
            for it in items:
                groups.setdefault(it.request, []).append(it)
            if len(groups) == 1:
                log.exception("generation failed")
                for it in items:
                    pending[it.request].error = pending[it.request].error or f"generation failed: {exc}"
                return
            log.warning("a batch of %d requests failed (%s): running each alone", len(groups), exc)
            for group in groups.values():
                self._run_round(group, pending, per_request, senders)
            return
        for it, out in zip(items, results, strict=True):
            per_request[it.request][it.position] = out

    def execute(self, requests: list[Any]) -> list[Any] | None:
        pending = [self._parse(i, r) for i, r in enumerate(requests)]
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if self.decoupled else 0
        per_request: list[dict[int, list[int]]] = [{} for _ in requests]
        todo = [it for p in pending if p.error is None for it in p.items]
        while todo:
            items, todo = self._resolve_round(todo, pending)
            try:
                self._run_round(items, pending, per_request, senders)
            finally:
                for it in items:
                    self.engine.release(it.gen.lora)
        responses = []
        for i, p in enumerate(pending):
            if p.error is not None:
                response = self._error(p.error, invalid=p.invalid)
            elif p.stream:  # tokens already went out; close the stream
                response = None
            else:
                response = self.pb.InferenceResponse(
                    output_tensors=self._tensors(
                        [per_request[i][k] for k in sorted(per_request[i])], p.items[0].gen.pad_id
                    )
                )
            if senders is not None:
                if response is None:
                    senders[i].send(flags=final)
                else:
                    senders[i].send(response, flags=final)
            else:
                responses.append(response)
        return None if senders is not None else responses

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
