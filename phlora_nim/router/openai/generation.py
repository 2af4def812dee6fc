"""The HTTP front's call to the token-level engine model, through the router's one delivery path.

The front tokenizes in the router (each adapter with its own tokenizer: exact usage counts and
prompt-length checks) and sends token ids to TensorRT-LLM's ``tensorrt_llm`` model, with the inputs
that model declares (``config.pbtxt`` of TensorRT-LLM's ``inflight_batcher_llm``: ``input_ids``,
``input_lengths``, ``request_output_len``, ``end_id``, ``pad_id``, ``streaming``, ``temperature``,
``runtime_top_k``, ``runtime_top_p``, ``seed`` or ``random_seed``, ``min_tokens``). Requests go through
:class:`~phlora_nim.router.delivery.Delivery` like every gRPC request: replica choice, ``lora_task_id``,
weights resent on a cache miss, failover. A decoupled model streams its tokens (``ModelStreamInfer``);
otherwise one ``ModelInfer`` answer holds them all.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from phlora_nim.engines.trtllm_llmapi.transport import text_of, text_request
from phlora_nim.router.access import Plan
from phlora_nim.router.delivery import Delivery
from phlora_nim.router.errors import RequestError
from phlora_nim.router.openai.errors import unsupported
from phlora_nim.router.replicas import ModelInfo

# The engine's own refusals (TensorRT-LLM's LlmRequest::validate texts): the client's fault when in band.
_CLIENT_FAULTS = ("exceeds maximum input length", "mMaxNewTokens", "not within acceptable range", "mInputTokenIds")


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens, in OpenAI's terms (None: OpenAI's default)."""

    max_tokens: int
    temperature: float | None = None  # default 1; 0 = greedy
    top_p: float | None = None  # default 1
    top_k: int | None = None  # vLLM's extra; 0 / -1 = off
    seed: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _add(request: service_pb2.ModelInferRequest, name: str, array: np.ndarray, datatype: str, batched: bool) -> None:
    array = array if batched else array[0]
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())


def _seed_input(info: ModelInfo) -> str | None:
    return next((n for n in ("seed", "random_seed") if n in info.inputs), None)


def engine_request(
    model: str,
    info: ModelInfo,
    prompt: list[int],
    sampling: Sampling,
    *,
    end_id: int,
    pad_id: int,
    seed: int | None,
) -> service_pb2.ModelInferRequest:
    """The ``ModelInferRequest`` for one choice.

    Greedy decoding is sent as ``runtime_top_k`` 1 (TensorRT-LLM's greedy path, whatever its
    temperature rules); sampling sends ``runtime_top_p`` (TensorRT-LLM samples greedily when top-k
    and top-p are both 0, its defaults, where OpenAI's defaults sample from the whole distribution).

    Raises:
        ApiError: 400 for a setting the engine model declares no input for.
    """
    batched = info.max_batch_size > 0
    request = service_pb2.ModelInferRequest(model_name=model)

    def scalar(name: str, value: float | int | bool, dtype: type, datatype: str, field: str) -> None:
        if name not in info.inputs:
            raise unsupported(field, f"the engine model {model!r} declares no {name!r} input")
        _add(request, name, np.array([[value]], dtype=dtype), datatype, batched)

    _add(request, "input_ids", np.array([prompt], dtype=np.int32), "INT32", batched)
    _add(request, "input_lengths", np.array([[len(prompt)]], dtype=np.int32), "INT32", batched)
    _add(request, "request_output_len", np.array([[sampling.max_tokens]], dtype=np.int32), "INT32", batched)
    scalar("end_id", -1 if sampling.ignore_eos else end_id, np.int32, "INT32", "ignore_eos")
    scalar("pad_id", pad_id, np.int32, "INT32", "model")
    if info.decoupled:
        scalar("streaming", True, np.bool_, "BOOL", "stream")
    if sampling.greedy:
        scalar("runtime_top_k", 1, np.int32, "INT32", "temperature")
    else:
        if sampling.temperature not in (None, 1.0) or "temperature" in info.inputs:
            scalar(
                "temperature",
                1.0 if sampling.temperature is None else sampling.temperature,
                np.float32,
                "FP32",
                "temperature",
            )
        scalar("runtime_top_p", 1.0 if sampling.top_p is None else sampling.top_p, np.float32, "FP32", "top_p")
        if sampling.top_k is not None and sampling.top_k > 0:
            scalar("runtime_top_k", sampling.top_k, np.int32, "INT32", "top_k")
        name = _seed_input(info)
        if name is None:
            raise unsupported("seed", f"the engine model {model!r} declares no seed input")
        _add(request, name, np.array([[seed if seed is not None else 0]], dtype=np.uint64), "UINT64", batched)
    if sampling.min_tokens:
        scalar("min_tokens", sampling.min_tokens, np.int32, "INT32", "min_tokens")
    return request


def choice_seed(sampling: Sampling, index: int) -> int | None:
    """The seed of choice ``index``: the request's plus the index (reproducible, distinct per choice), else random."""
    if sampling.greedy:
        return None
    if sampling.seed is not None:
        return (sampling.seed + index) % (1 << 64)
    return random.getrandbits(63)


def _output_ids(response: service_pb2.ModelInferResponse) -> list[int]:
    """Beam 0 of ``output_ids`` (``[batch, beams, tokens]``), cut at ``sequence_length``."""
    names = [o.name for o in response.outputs]
    if "output_ids" not in names:
        return []
    i = names.index("output_ids")
    ids = np.frombuffer(response.raw_output_contents[i], dtype="<i4")
    shape = list(response.outputs[i].shape)
    width = shape[-1] if shape else len(ids)
    ids = ids[:width]
    if "sequence_length" in names:
        j = names.index("sequence_length")
        length = np.frombuffer(response.raw_output_contents[j], dtype="<i4")
        if length.size:
            ids = ids[: int(length[0])]
    return [int(x) for x in ids]


def _in_band(message: str) -> RequestError:
    code = grpc.StatusCode.INVALID_ARGUMENT if any(t in message for t in _CLIENT_FAULTS) else grpc.StatusCode.INTERNAL
    return RequestError(code, message)


async def generated_tokens(
    delivery: Delivery, plan: Plan, info: ModelInfo, remaining: Callable[[], float | None]
) -> AsyncIterator[list[int]]:
    """The new token ids of ``plan``, piece by piece as the engine sends them.

    Raises:
        RequestError: the router's refusals and the upstream's errors.
    """
    if not info.decoupled:
        answer = await delivery.unary(plan, remaining)
        yield _output_ids(service_pb2.ModelInferResponse.FromString(answer))
        return
    async with contextlib.aclosing(delivery.stream(plan, remaining)) as responses:
        async for response in responses:
            if response.error_message:
                raise _in_band(response.error_message)
            ids = _output_ids(response.infer_response)
            if ids:
                yield ids


# The llmapi model (TensorRT-LLM ≥ 1.3): text in, text out ------------------------------------


def takes_text(info: ModelInfo) -> bool:
    """Whether the engine model takes text (``text_input``: the llmapi model) rather than token ids."""
    return "text_input" in info.inputs


def text_engine_request(
    model: str, info: ModelInfo, text: str, sampling: Sampling, *, seed: int | None
) -> service_pb2.ModelInferRequest:
    """The llmapi model's request for one choice: the rendered prompt text and ``sampling_param_*`` inputs.

    The adapter's ``lora_id`` / ``lora_name`` / ``lora_path`` are added by the delivery, as for gRPC clients.

    Raises:
        ApiError: 400 for a setting the model has no input for (``min_tokens``, ``ignore_eos``) or streaming
            from a decoupled model (not offered on this path).
    """
    if sampling.min_tokens:
        raise unsupported("min_tokens", f"the engine model {model!r} declares no min_tokens input")
    if sampling.ignore_eos:
        raise unsupported("ignore_eos", f"the engine model {model!r} declares no end_id input")
    if info.decoupled:
        raise unsupported("model", f"the engine model {model!r} is decoupled; serve it with decoupled: False")
    if sampling.greedy:
        return text_request(text, max_tokens=sampling.max_tokens, top_k=1, model=model)
    return text_request(
        text,
        max_tokens=sampling.max_tokens,
        temperature=1.0 if sampling.temperature is None else sampling.temperature,
        top_p=1.0 if sampling.top_p is None else sampling.top_p,
        top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else None,
        seed=seed if seed is not None else 0,
        model=model,
    )


async def generated_text_tokens(
    delivery: Delivery, plan: Plan, encode: Callable[[str], list[int]], remaining: Callable[[], float | None]
) -> AsyncIterator[list[int]]:
    """The new token ids of an llmapi answer: its ``text_output``, tokenized as the front counts tokens."""
    answer = await delivery.unary(plan, remaining)
    text, _ = text_of(service_pb2.ModelInferResponse.FromString(answer))
    yield encode(text)
