"""Reading and rewriting KServe v2 ``ModelInferRequest`` messages for the LoRA protocol.

The router picks the adapter (model name, then the ``lora_adapter`` parameter, then the
``phlora-adapter`` metadata), points the request at the upstream model and appends
``lora_task_id`` (UINT64 ``[B, 1]``) and, when a replica lacks the adapter, ``lora_weights``
(``[B, N, D]`` in the engine dtype) and ``lora_config`` (INT32 ``[B, N, 3]``), B being the
request's batch size. Appended tensors follow the request's encoding: raw bytes when it uses
``raw_input_contents``, typed ``contents`` otherwise; FP16 and BF16 have no typed field, so a
request carrying weights is turned into raw bytes as a whole (Triton refuses a mix).
"""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from phlora_nim.engines.trtllm_llmapi.transport import LORA_INPUTS as LLMAPI_LORA_INPUTS
from phlora_nim.router.errors import RequestError, shown
from phlora_nim.triton.wire import RAW_TAG, varint

# The router sets these (a client naming a server path in lora_path would make replicas read it).
LORA_INPUTS = ("lora_task_id", "lora_weights", "lora_config", *LLMAPI_LORA_INPUTS)
ADAPTER_PARAMETER = "lora_adapter"
ADAPTER_METADATA = "phlora-adapter"

# Typed ``contents`` field and numpy dtype of every datatype that has one.
_CONTENTS: dict[str, tuple[str, type]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}


@dataclass(frozen=True)
class LoraTensors:
    """One adapter's tensors, ready to append: little-endian bytes in the upstream dtype."""

    task_id: int
    datatype: str  # FP16, BF16 or FP32
    weights: bytes
    weights_shape: tuple[int, ...]
    config: bytes
    config_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return len(self.weights) + len(self.config)


@dataclass(frozen=True)
class Selection:
    """Which adapter a request asked for, how, and the model to call upstream."""

    adapter: str | None
    source: str  # "model_name", "parameter", "metadata" or "none"
    model: str


def check_request(request: service_pb2.ModelInferRequest) -> None:
    """Refuse what the router cannot forward faithfully.

    Raises:
        RequestError: INVALID_ARGUMENT for client-supplied LoRA inputs (the router owns them),
            shared-memory inputs, or a ``raw_input_contents`` count that does not match the inputs.
    """
    for tensor in request.inputs:
        if tensor.name in LORA_INPUTS:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {shown(tensor.name)} is set by the router: choose an adapter by model name, "
                f"the '{ADAPTER_PARAMETER}' parameter or '{ADAPTER_METADATA}' metadata instead",
            )
        if "shared_memory_region" in tensor.parameters:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {shown(tensor.name)} uses shared memory, which cannot cross the router: send the data inline",
            )
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"raw_input_contents holds {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs",
        )


def adapter_parameter(request: service_pb2.ModelInferRequest) -> str | None:
    """The ``lora_adapter`` request parameter (None when absent).

    Raises:
        RequestError: INVALID_ARGUMENT when it is not a non-empty string.
    """
    if ADAPTER_PARAMETER not in request.parameters:
        return None
    param = request.parameters[ADAPTER_PARAMETER]
    if param.WhichOneof("parameter_choice") != "string_param" or not param.string_param:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"parameter '{ADAPTER_PARAMETER}' must be a non-empty string (the adapter name)",
        )
    return param.string_param


def select(
    request: service_pb2.ModelInferRequest,
    *,
    adapters: Container[str],
    metadata_adapter: str | None,
    upstream_model: str,
) -> Selection:
    """The adapter a request asks for, in order: model name, parameter, metadata.

    A model name that is an adapter sends the request to ``upstream_model``; an adapter named by
    parameter or metadata keeps the request's model (or ``upstream_model`` when it names none).
    """
    parameter = adapter_parameter(request)
    if request.model_name in adapters:
        return Selection(request.model_name, "model_name", upstream_model)
    model = request.model_name or upstream_model
    if parameter is not None:
        return Selection(parameter, "parameter", model)
    if metadata_adapter:
        return Selection(metadata_adapter, "metadata", model)
    return Selection(None, "none", request.model_name)


def parse(data: bytes) -> service_pb2.ModelInferRequest:
    """A request as received on the wire.

    Raises:
        RequestError: INVALID_ARGUMENT when the bytes are no ``ModelInferRequest``.
    """
    try:
        return service_pb2.ModelInferRequest.FromString(data)
    except DecodeError:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid ModelInferRequest") from None


def retarget(request: service_pb2.ModelInferRequest, model: str) -> service_pb2.ModelInferRequest:
    """Aim ``request`` at ``model`` and drop the ``lora_adapter`` parameter (in place; returns it)."""
    request.model_name = model
    if ADAPTER_PARAMETER in request.parameters:
        del request.parameters[ADAPTER_PARAMETER]
    return request


def _to_raw(tensor: service_pb2.ModelInferRequest.InferInputTensor) -> bytes:
    if tensor.datatype == "BYTES":
        items = tensor.contents.bytes_contents
        return b"".join(struct.pack("<I", len(b)) + b for b in items)
    spec = _CONTENTS.get(tensor.datatype)
    if spec is None:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {shown(tensor.name)}: datatype {shown(tensor.datatype)} has no typed contents; "
            "send it as raw bytes",
        )
    field, dtype = spec
    return np.asarray(getattr(tensor.contents, field), dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def make_raw(request: service_pb2.ModelInferRequest) -> None:
    """Move every input's typed ``contents`` into ``raw_input_contents`` (in place)."""
    if request.raw_input_contents or not request.inputs:
        return
    raw = [_to_raw(t) for t in request.inputs]
    for tensor in request.inputs:
        tensor.ClearField("contents")
    request.raw_input_contents.extend(raw)


def batch_size(request: service_pb2.ModelInferRequest, *, max_batch_size: int, model: str) -> int:
    """Rows of a request: dim 0, shared by all its inputs (1 for a model without batching).

    Raises:
        RequestError: INVALID_ARGUMENT when inputs disagree on dim 0 or it is outside
            1..``max_batch_size`` (checked here, before any LoRA input is built that large).
    """
    if max_batch_size <= 0:
        return 1
    sizes = [(t.name, int(t.shape[0])) for t in request.inputs if len(t.shape)]
    if not sizes:
        return 1
    if len({b for _, b in sizes}) > 1:
        found = ", ".join(f"{shown(n)} {b}" for n, b in sizes[:4])
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"inputs disagree on the batch size (dim 0): {found}")
    batch = sizes[0][1]
    if not 1 <= batch <= max_batch_size:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"batch size (dim 0 of the inputs) must be 1 to {max_batch_size} for {shown(model)}, found {batch}",
        )
    return batch


def retryable(request: service_pb2.ModelInferRequest) -> bool:
    """Whether sending the request again elsewhere is safe: not part of a stateful sequence."""
    if "sequence_id" not in request.parameters:
        return True
    param = request.parameters["sequence_id"]
    kind = param.WhichOneof("parameter_choice")
    return kind is None or not getattr(param, kind)  # 0 or "" means no sequence, as in Triton


_varint = varint
_RAW_TAG = RAW_TAG  # raw_input_contents, length-delimited


_MODEL_TAG = _varint((service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["model_name"].number << 3) | 2)


def _model_field(model: str) -> bytes:
    """``model_name`` on the wire: appended to a message, it replaces the name before it."""
    encoded = model.encode()
    return _MODEL_TAG + _varint(len(encoded)) + encoded


def _raw_entry(chunk: bytes, repeat: int) -> list[bytes]:
    """Wire-format pieces of one ``raw_input_contents`` entry holding ``chunk`` ``repeat`` times."""
    return [_RAW_TAG, _varint(len(chunk) * repeat), *([chunk] * repeat)]


class UpstreamRequest:
    """A checked request aimed at the upstream model, as bytes to send.

    Protobuf parsers append repeated fields found later in a message and keep the last value of a
    scalar one, so the request sent upstream is built by appending to the bytes the client sent:
    the upstream model's name when it differs, then per attempt the LoRA inputs. A request is thus
    forwarded without being re-serialized (a base-model request: the very bytes received), the
    client's message is never changed after planning, and its payload is copied at most once per
    attempt; adapter weights are framed by hand so they are copied once too.

    Args:
        request: the client's request, parsed and checked.
        wire: the bytes it was parsed from (None: serialize ``request``, e.g. after removing a parameter).
        model: the model to aim at, when not the request's own.

    Example:
        >>> upstream = UpstreamRequest(service_pb2.ModelInferRequest(model_name="support"), model="ensemble")
        >>> sent = service_pb2.ModelInferRequest.FromString(upstream.with_lora(7, batch=2))
        >>> sent.model_name, [(t.name, list(t.shape)) for t in sent.inputs]
        ('ensemble', [('lora_task_id', [2, 1])])
    """

    def __init__(
        self, request: service_pb2.ModelInferRequest, *, wire: bytes | None = None, model: str | None = None
    ) -> None:
        self.request = request
        self.model = model or request.model_name
        self._wire = wire
        self._parts: list[bytes] | None = None
        self._as_raw: list[bytes] | None = None

    def _base(self) -> list[bytes]:
        """Pieces of the request aimed at :attr:`model` (joined only when sent: one copy)."""
        if self._parts is None:
            base = self.request.SerializeToString() if self._wire is None else self._wire
            self._parts = [base] if self.model == self.request.model_name else [base, _model_field(self.model)]
        return self._parts

    @property
    def nbytes(self) -> int:
        """Size of the request as sent, without LoRA inputs."""
        return sum(len(part) for part in self._base())

    def plain(self) -> bytes:
        """The request aimed at :attr:`model`, as bytes (a base-model request: the bytes received)."""
        parts = self._base()
        if len(parts) > 1:
            self._parts = parts = [b"".join(parts)]
        return parts[0]

    def _raw_base(self) -> list[bytes]:
        """The request with every input in ``raw_input_contents`` (Triton refuses a mix with weights)."""
        if self.request.raw_input_contents or not self.request.inputs:
            return self._base()
        if self._as_raw is None:
            copy = service_pb2.ModelInferRequest()
            copy.CopyFrom(self.request)  # typed contents: small by nature, copying them is cheap
            copy.model_name = self.model
            make_raw(copy)
            self._as_raw = [copy.SerializeToString()]
        return self._as_raw

    def with_lora(self, task_id: int, tensors: LoraTensors | None = None, *, batch: int = 1) -> bytes:
        """The serialized request with ``lora_task_id`` (and ``tensors``) for ``batch`` rows.

        TensorRT-LLM splits a batched request per row and slices every input on dim 0, so each
        LoRA input carries one copy of the adapter per row: ``lora_task_id`` ``[batch, 1]``,
        ``lora_weights`` ``[batch, N, D]``, ``lora_config`` ``[batch, N, 3]``.
        """
        if tensors is not None and tensors.task_id != task_id:
            raise ValueError(f"tensors of task {tensors.task_id} appended to task {task_id}")
        raw = tensors is not None or bool(self.request.raw_input_contents)
        extra = service_pb2.ModelInferRequest()
        ids = extra.inputs.add(name="lora_task_id", datatype="UINT64", shape=[batch, 1])
        if not raw:
            ids.contents.uint64_contents.extend([task_id] * batch)
            return b"".join([*self._base(), extra.SerializeToString()])
        pieces = _raw_entry(struct.pack("<Q", task_id), batch)
        if tensors is not None:
            extra.inputs.add(name="lora_weights", datatype=tensors.datatype, shape=[batch, *tensors.weights_shape[1:]])
            extra.inputs.add(name="lora_config", datatype="INT32", shape=[batch, *tensors.config_shape[1:]])
            pieces += _raw_entry(tensors.weights, batch) + _raw_entry(tensors.config, batch)
        base = self._raw_base() if tensors is not None else self._base()
        return b"".join([*base, extra.SerializeToString(), *pieces])
