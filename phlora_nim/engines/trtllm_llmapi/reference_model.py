"""phlora-nim's CPU reference of NVIDIA's ``llmapi`` ``tensorrt_llm`` model, for the Python backend of
the real ``tritonserver``.

Same ``config.pbtxt`` interface (:mod:`.interface`), same ``model.yaml`` (:mod:`.model_yaml`), same error
texts (``helpers.py`` ``get_lora_request_from_request``, wrapped by ``model.py`` as ``Error generating
request: …``). Adapters are PEFT folders read from ``lora_path`` with TensorRT-LLM's loader rule
(:mod:`.loader_rule`): a folder that is wrong for TensorRT-LLM is wrong here too. An LRU of
``lora_config.max_loras`` adapters keyed by ``lora_id``; an evicted adapter is read again from its path
on next use, as the engine does. A request's text is tokenized with the base's tokenizer
(``add_special_tokens``, as ``SamplingParams`` does by default), generation is greedy unless sampling
parameters ask otherwise, ``max_tokens`` defaults to 32 and the answer is the generated text only.
Generation runs on :class:`~phlora_nim.triton.multi_lora.MultiLoraModel` (one batched forward per step
for all requests of an ``execute``, mixing adapters).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from phlora_nim.engines.trtllm_llmapi import interface, model_yaml
from phlora_nim.engines.trtllm_llmapi.loader_rule import LoaderError, effective_targets, load_for_trtllm
from phlora_nim.triton.multi_lora import GenerationRequest, MultiLoraModel, lora_targets

log = logging.getLogger("phlora_nim.reference")


class RequestFailed(Exception):
    """A request the model answers with an error (the text as TensorRT-LLM's model would send it)."""


Key = tuple[str, int]  # (TensorRT-LLM module, layer)


@dataclass(frozen=True)
class LoadedLora:
    """An adapter as the model applies it: factors per wrapped (module, layer)."""

    lora_id: int
    factors: dict[Key, tuple[torch.Tensor, torch.Tensor]]


class LlmapiEngine(MultiLoraModel):
    """The base with every linear TensorRT-LLM applies LoRA to wrapped, keyed by (its module name, layer).

    A fused linear takes one key per part (the architecture map's TensorRT-LLM rows): Phi-3's
    ``gate_up_proj`` is ``mlp_h_to_4h`` on the gate half and ``mlp_gate`` on the up half.
    """

    def __init__(self, model: nn.Module, *, dtype: str) -> None:
        super().__init__(model, dtype=dtype)
        self.modules: dict[Key, tuple[int, int]] = {}  # (in, out) of each key's block
        targets = []
        for path, module, rows in lora_targets(model):
            for name, layer, block in rows:
                self.modules[(name, layer)] = (module.in_features, block.stop - block.start)
            targets.append((path, module, [((name, layer), block) for name, layer, block in rows]))
        self.wrap(targets)


@dataclass(frozen=True)
class LoraRequest:
    lora_id: int
    name: str
    path: str


class AdapterLru:
    """``max_loras`` adapters by ``lora_id``, least recently used evicted; misses load from the path."""

    def __init__(self, engine: LlmapiEngine, config: model_yaml.LlmapiConfig) -> None:
        self.engine = engine
        self.config = config
        self.targets = effective_targets(config.lora_target_modules)
        self.held: OrderedDict[int, LoadedLora] = OrderedDict()
        self.loads = 0  # folders read (first use and reloads after eviction)

    def get(self, req: LoraRequest) -> LoadedLora:
        task = self.held.get(req.lora_id)
        if task is not None:
            self.held.move_to_end(req.lora_id)
            return task
        task = self._load(req)
        self.loads += 1
        self.held[req.lora_id] = task
        while len(self.held) > self.config.max_loras:
            evicted, _ = self.held.popitem(last=False)
            log.info("LoRA %d evicted (max_loras %d)", evicted, self.config.max_loras)
        return task

    def _load(self, req: LoraRequest) -> LoadedLora:
        try:
            loaded = load_for_trtllm(
                Path(req.path),
                lora_target_modules=self.targets,
                swap_gate_up_proj_lora_b_weight=self.config.swap_gate_up_proj_lora_b_weight,
            )
        except (LoaderError, KeyError, OSError) as exc:
            raise RequestFailed(str(exc)) from None
        if loaded.max_rank > self.config.max_lora_rank:
            raise RequestFailed(
                f"LoRA rank {loaded.max_rank} of {req.path} exceeds "
                f"lora_config.max_lora_rank {self.config.max_lora_rank}"
            )
        factors: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        for (layer, module), (a, b) in loaded.factors.items():
            parts = [(module, b)]
            if (module, layer) not in self.engine.modules and module == "mlp_gate_up":
                half = b.shape[0] // 2  # the fused linear is wrapped as its gate and up halves
                parts = [("mlp_h_to_4h", b[:half]), ("mlp_gate", b[half:])]
            for name, rows in parts:
                dims = self.engine.modules.get((name, layer))
                if dims is None:
                    raise RequestFailed(f"LoRA module {name} of layer {layer} has no counterpart in the served model")
                if (a.shape[1], rows.shape[0]) != dims:
                    raise RequestFailed(
                        f"LoRA module {name} of layer {layer}: A [{a.shape[0]}, {a.shape[1]}], B [{rows.shape[0]}, "
                        f"{a.shape[0]}] do not fit the layer ({dims[0]} inputs, {dims[1]} outputs)"
                    )
                factors[(name, layer)] = (a, rows)
        return LoadedLora(lora_id=req.lora_id, factors=factors)


def _scalar(value: np.ndarray | None) -> Any:
    """``get_input_scalar_by_name``: a one-element tensor's item (None when absent)."""
    if value is None:
        return None
    if value.size != 1:
        raise RequestFailed("Expected a scalar tensor")
    item = value.reshape(-1)[0]
    return item.item() if hasattr(item, "item") and not isinstance(item, bytes | np.bytes_) else item


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | np.bytes_) else str(value)


def lora_request(inputs: dict[str, np.ndarray]) -> LoraRequest | None:
    """``get_lora_request_from_request``'s checks and texts (restated)."""
    lora_id, name, path = (_scalar(inputs.get(k)) for k in ("lora_id", "lora_name", "lora_path"))
    if lora_id is None and name is None and path is None:
        return None
    if lora_id is None or name is None or path is None:
        raise RequestFailed(interface.LORA_TOGETHER)
    source = _scalar(inputs.get("lora_ckpt_source"))
    source = "hf" if source is None else _text(source)
    if source not in interface.LORA_CKPT_SOURCES:
        raise RequestFailed(interface.ckpt_source_invalid(source))
    path_text = _text(path)
    if not os.path.exists(path_text):
        raise RequestFailed(interface.lora_path_missing(path_text))
    if source != "hf":
        raise RequestFailed("the CPU reference reads HF PEFT folders only (lora_ckpt_source 'hf')")
    return LoraRequest(int(lora_id), _text(name), path_text)


class LlmapiReferenceModel:
    """The Triton Python-backend model (``model.py`` subclasses it and sets :attr:`pb`)."""

    pb: Any = None  # triton_python_backend_utils

    def initialize(self, args: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        yaml_path = Path(os.environ.get("LLM_CONFIG_PATH", str(version_dir / model_yaml.FILE_NAME)))
        if not yaml_path.is_absolute():
            yaml_path = version_dir / yaml_path
        self.config = model_yaml.read(yaml_path)
        dtype = dict(self.config.extra).get("dtype", "float32")
        dtype = "float32" if dtype in ("auto", None) else str(dtype)
        model = LlmapiEngine.load_causal_lm(Path(self.config.model), dtype=dtype)
        self.engine = LlmapiEngine(model, dtype=dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        eos = self.tokenizer.eos_token_id
        self.end_id = int(eos) if eos is not None else -1
        self.adapters = AdapterLru(self.engine, self.config)
        model_config = json.loads(args["model_config"])
        self.decoupled = bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))
        log.info(
            "llmapi reference ready: %s, lora_target_modules %s, max_lora_rank %d, max_loras %d",
            self.config.model,
            list(self.config.lora_target_modules),
            self.config.max_lora_rank,
            self.config.max_loras,
        )

    def _inputs(self, request: Any) -> dict[str, np.ndarray]:
        out = {}
        for t in interface.INPUTS:
            tensor = self.pb.get_input_tensor_by_name(request, t.name)
            if tensor is not None:
                out[t.name] = tensor.as_numpy()
        return out

    def _parse(self, request: Any) -> tuple[GenerationRequest, dict[str, bool]]:
        inputs = self._inputs(request)
        text = inputs.get("text_input")
        if text is None:
            raise RequestFailed("text_input is missing from the request")
        if text.ndim > 1:
            raise RequestFailed("The current implementation only supports text_input being a 1D tensor.")
        if _scalar(inputs.get("streaming")) and not self.decoupled:
            raise RequestFailed("Streaming is only supported in decoupled mode.")
        lora = lora_request(inputs)

        def param(name: str, default: Any) -> Any:
            value = _scalar(inputs.get(f"sampling_param_{name}"))
            return default if value is None else value

        ids = self.tokenizer.encode(_text(text.reshape(-1)[0]), add_special_tokens=True)
        gen = GenerationRequest(
            input_ids=ids,
            max_new_tokens=int(param("max_tokens", interface.DEFAULT_MAX_TOKENS)),
            end_id=self.end_id,
            temperature=float(param("temperature", 1.0)),
            top_k=int(param("top_k", 0)),
            top_p=float(param("top_p", 0.0)),
            seed=int(param("seed", 0)),
        )
        gen.max_new_tokens = self.engine.limits.check(gen.input_ids, gen.max_new_tokens, gen.end_id)
        if lora is not None:
            gen.lora = self.adapters.get(lora)
        flags = {k: bool(_scalar(inputs.get(k))) for k in ("return_finish_reason", "return_stop_reason")}
        return gen, flags

    def _error(self, message: str) -> Any:
        # model.py sends pb_utils.TritonError(f"Error generating request: {e}") (default code).
        return self.pb.InferenceResponse(
            output_tensors=[], error=self.pb.TritonError(interface.GENERATE_PREFIX + message)
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        todo: list[tuple[int, GenerationRequest, dict[str, bool]]] = []
        for i, request in enumerate(requests):
            try:
                gen, flags = self._parse(request)
                todo.append((i, gen, flags))
            except Exception as exc:  # every failure is that request's answer, as upstream's model.py
                responses[i] = self._error(str(exc))
        if todo:
            try:
                outputs = self.engine.generate([g for _, g, _ in todo])
            except Exception as exc:
                log.exception("generation failed")
                outputs = None
                for i, _, _ in todo:
                    responses[i] = self._error(str(exc))
            for (i, gen, flags), ids in zip(todo, outputs or [], strict=False):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                tensors = [self.pb.Tensor("text_output", np.asarray([text.encode("utf-8")], dtype=np.object_))]
                if flags["return_finish_reason"]:
                    reason = "length" if len(ids) >= gen.max_new_tokens else "stop"
                    tensors.append(self.pb.Tensor("finish_reason", np.asarray([reason.encode()], dtype=np.object_)))
                if flags["return_stop_reason"]:
                    tensors.append(self.pb.Tensor("stop_reason", np.asarray([b"None"], dtype=np.object_)))
                responses[i] = self.pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
