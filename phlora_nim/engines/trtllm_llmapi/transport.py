"""What the router sends an ``llmapi`` replica per request: the adapter by id, name and path.

The adapter is named by ``lora_id`` (UINT64 ``[1]``: the registry's content-derived task id, stable
and never given to other weights, below 2^31 and so below the engine's 2^63), ``lora_name`` and
``lora_path`` (BYTES ``[1]``: the folder as the Triton server sees it, from the registry). No weights
travel and there is no miss protocol: the engine reads the path at first use and after an eviction.
The model has ``max_batch_size: 0``, so every input has exactly the dims of ``config.pbtxt``.

Requests from the OpenAI front are built whole (:func:`text_request`): ``text_input`` plus the
``sampling_param_*`` inputs. Requests from the gRPC front keep the client's inputs and get the
LoRA inputs appended to their bytes (:func:`lora_suffix`), as the router does for other engines.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tritonclient.grpc import service_pb2

from phlora_nim.engines.trtllm_llmapi.interface import MODEL_NAME
from phlora_nim.triton.wire import RAW_TAG, varint

LORA_INPUTS = ("lora_id", "lora_name", "lora_path", "lora_ckpt_source")
LORA_ID_LIMIT = 2**63


@dataclass(frozen=True)
class LoraRef:
    """One adapter as the engine is told about it."""

    lora_id: int
    name: str
    path: str

    def __post_init__(self) -> None:
        if not 0 < self.lora_id < LORA_ID_LIMIT:
            raise ValueError(f"lora_id {self.lora_id} outside (0, 2^63)")


def _raw(chunk: bytes) -> bytes:
    return RAW_TAG + varint(len(chunk)) + chunk


def lora_suffix(ref: LoraRef, *, raw: bool) -> bytes:
    """Bytes to append to a serialized ``ModelInferRequest``: its LoRA inputs (protobuf appends repeated fields).

    ``raw``: the request carries ``raw_input_contents`` (Triton refuses a mix of raw and typed inputs).
    """
    extra = service_pb2.ModelInferRequest()
    ids = extra.inputs.add(name="lora_id", datatype="UINT64", shape=[1])
    name = extra.inputs.add(name="lora_name", datatype="BYTES", shape=[1])
    path = extra.inputs.add(name="lora_path", datatype="BYTES", shape=[1])
    if not raw:
        ids.contents.uint64_contents.append(ref.lora_id)
        name.contents.bytes_contents.append(ref.name.encode())
        path.contents.bytes_contents.append(ref.path.encode())
        return extra.SerializeToString()
    pieces = [
        struct.pack("<Q", ref.lora_id),
        struct.pack("<I", len(ref.name.encode())) + ref.name.encode(),
        struct.pack("<I", len(ref.path.encode())) + ref.path.encode(),
    ]
    return extra.SerializeToString() + b"".join(_raw(p) for p in pieces)


def text_request(
    prompt: str,
    *,
    max_tokens: int,
    lora: LoraRef | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    model: str = MODEL_NAME,
    request_id: str = "",
) -> service_pb2.ModelInferRequest:
    """A whole request for the llmapi model (the OpenAI front's path): typed contents, no raw bytes."""
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)

    def add(name: str, datatype: str, field: str, values: list) -> None:
        t = req.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        getattr(t.contents, field).extend(values)

    add("text_input", "BYTES", "bytes_contents", [prompt.encode("utf-8")])
    add("sampling_param_max_tokens", "INT32", "int_contents", [int(max_tokens)])
    if temperature is not None:
        add("sampling_param_temperature", "FP32", "fp32_contents", [float(temperature)])
    if top_p is not None:
        add("sampling_param_top_p", "FP32", "fp32_contents", [float(top_p)])
    if top_k is not None:
        add("sampling_param_top_k", "INT32", "int_contents", [int(top_k)])
    if seed is not None:
        add("sampling_param_seed", "UINT64", "uint64_contents", [int(seed)])
    if stop:
        add("sampling_param_stop", "BYTES", "bytes_contents", [s.encode() for s in stop])
    add("return_finish_reason", "BOOL", "bool_contents", [True])
    if lora is not None:
        req.MergeFromString(lora_suffix(lora, raw=False))
    return req


def text_of(response: service_pb2.ModelInferResponse) -> tuple[str, str | None]:
    """(``text_output``, ``finish_reason`` or None) of an llmapi response."""
    values: dict[str, bytes] = {}
    names = [o.name for o in response.outputs]
    for i, out in enumerate(response.outputs):
        if response.raw_output_contents:
            raw = response.raw_output_contents[i]
            (n,) = struct.unpack_from("<I", raw, 0)
            values[out.name] = raw[4 : 4 + n]
        elif out.contents.bytes_contents:
            values[out.name] = out.contents.bytes_contents[0]
    if "text_output" not in values:
        raise ValueError(f"no text_output in the answer (outputs: {names})")
    reason = values.get("finish_reason")
    return values["text_output"].decode("utf-8"), None if reason is None else reason.decode()
