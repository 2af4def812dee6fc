"""KServe v2 inference requests as OpenAI completion requests, and the answers back.

A gRPC client of an OpenAI-speaking upstream sends what it sends to a TensorRT-LLM ensemble or
``tensorrt_llm`` model: ``text_input`` (BYTES) or ``input_ids`` (INT32/INT64) as the prompt,
``max_tokens`` (or ``request_output_len``), and optionally ``temperature``, ``top_p``, ``top_k``,
``seed`` (or ``random_seed``), ``stop_words`` / ``stop`` (BYTES), ``min_tokens``, ``ignore_eos``
(BOOL). The answer holds ``text_output`` (BYTES) and, where the engine returns token ids,
``output_ids`` (INT32). Unknown inputs are refused (never silently dropped).
"""

from __future__ import annotations

import struct
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from phlora_nim.router.errors import RequestError, shown
from phlora_nim.router.rewrite import _CONTENTS, LORA_INPUTS

_NUMBERS = {
    "max_tokens": "max_tokens",
    "request_output_len": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "runtime_top_p": "top_p",
    "top_k": "top_k",
    "runtime_top_k": "top_k",
    "seed": "seed",
    "random_seed": "seed",
    "min_tokens": "min_tokens",
}
_INTEGRAL = {"max_tokens", "top_k", "seed", "min_tokens"}
_IGNORED = {"stream", "streaming", "input_lengths", "end_id", "pad_id", "exclude_input_in_output"}
TEXT_INPUTS = ("text_input", "input_ids", *_NUMBERS, "stop_words", "stop", "ignore_eos", *sorted(_IGNORED))


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _bytes_items(raw: bytes) -> list[bytes]:
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise _invalid("a BYTES tensor's raw contents are truncated")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise _invalid("a BYTES tensor's raw contents are truncated")
        items.append(raw[at : at + size])
        at += size
    return items


def _values(request: service_pb2.ModelInferRequest, index: int) -> list[Any]:
    """The flat values of input ``index`` (raw or typed contents)."""
    tensor = request.inputs[index]
    raw = request.raw_input_contents[index] if len(request.raw_input_contents) > index else None
    if tensor.datatype == "BYTES":
        return _bytes_items(raw) if raw is not None else list(tensor.contents.bytes_contents)
    spec = _CONTENTS.get(tensor.datatype)
    if spec is None:
        raise _invalid(f"input {shown(tensor.name)}: datatype {shown(tensor.datatype)} is not taken here")
    field, dtype = spec
    if raw is not None:
        if len(raw) % np.dtype(dtype).itemsize:
            raise _invalid(f"input {shown(tensor.name)}: raw contents are not a whole number of {tensor.datatype}")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).tolist()
    return list(getattr(tensor.contents, field))


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(f"input {name}: not UTF-8 text") from None


def completion_body(request: service_pb2.ModelInferRequest) -> tuple[dict[str, Any], bool]:
    """The OpenAI ``/v1/completions`` body of ``request`` (model left for the router to set), and
    whether the caller wants token ids back (it sent ``input_ids``).

    Raises:
        RequestError: INVALID_ARGUMENT for a missing prompt, a batch of more than one row or an
            input this front does not take.
    """
    if len(request.raw_input_contents) not in (0, len(request.inputs)):
        raise _invalid("raw_input_contents must hold one entry per input, or none")
    body: dict[str, Any] = {}
    ids = False
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in LORA_INPUTS:
            raise _invalid(f"input {name} is the router's to set: name the adapter as the model instead")
        if name in _IGNORED:
            continue
        values = _values(request, i)
        if name == "text_input":
            if len(values) != 1:
                raise _invalid(f"text_input: one prompt per request, got {len(values)}")
            body["prompt"] = _text(values[0], name)
        elif name == "input_ids":
            if not values or not all(isinstance(v, int) for v in values):
                raise _invalid("input_ids: a non-empty list of token ids (INT32 or INT64)")
            body["prompt"] = [int(v) for v in values]
            ids = True
        elif name in _NUMBERS:
            if len(values) != 1:
                raise _invalid(f"input {name}: one value, got {len(values)}")
            key = _NUMBERS[name]
            body[key] = int(values[0]) if key in _INTEGRAL else float(values[0])
        elif name in ("stop_words", "stop"):
            body["stop"] = [_text(v, name) for v in values if v]
        elif name == "ignore_eos":
            body["ignore_eos"] = bool(values[0]) if values else False
        else:
            taken = ", ".join(TEXT_INPUTS[:12])
            raise _invalid(f"input {shown(name)} is not taken by this model (it takes {taken}, ...)")
    if "prompt" not in body:
        raise _invalid("missing input: text_input (BYTES) or input_ids (INT32)")
    return body, ids


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def infer_response(
    request: service_pb2.ModelInferRequest, text: str, token_ids: list[int] | None
) -> service_pb2.ModelInferResponse:
    """One answer: ``text_output`` [1] and, when known, ``output_ids`` [n]."""
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    out = response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(_bytes_tensor([text.encode("utf-8")]))
    del out
    if token_ids is not None:
        response.outputs.add(name="output_ids", datatype="INT32", shape=[len(token_ids)])
        response.raw_output_contents.append(np.asarray(token_ids, dtype="<i4").tobytes())
    return response


def choice_of(answer: dict[str, Any]) -> tuple[str, list[int] | None]:
    """Text and token ids of the first choice of a completion (or a streamed chunk of one)."""
    # An engine's answer is bytes from the network: anything but the expected shape reads as empty.
    choices = answer.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    text = first.get("text") or ""
    ids = first.get("token_ids")
    valid = isinstance(ids, list) and all(type(i) is int and 0 <= i < 2**31 for i in ids)
    return (text if isinstance(text, str) else ""), (list(ids) if valid else None)
