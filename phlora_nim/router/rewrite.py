"""Reading and rewriting KServe v2 ``ModelInferRequest`` messages for the LoRA protocol.

The router picks the adapter (model name, then the ``lora_adapter`` parameter, then the
``phlora-adapter`` metadata), points the request at the upstream model and appends
``lora_task_id`` (UINT64 ``[1, 1]``) and, when a replica lacks the adapter, ``lora_weights``
(``[1, N, D]`` in the engine dtype) and ``lora_config`` (INT32 ``[1, N, 3]``). Appended tensors
follow the request's encoding: raw bytes when it uses ``raw_input_contents``, typed ``contents``
otherwise; FP16 and BF16 have no typed field, so a request carrying weights is turned into raw
bytes as a whole (Triton refuses a mix).
"""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

LORA_INPUTS = ("lora_task_id", "lora_weights", "lora_config")
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


class RequestError(Exception):
    """A request the router refuses or cannot serve: a gRPC status code and its message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
                f"input '{tensor.name}' is set by the router: choose an adapter by model name, "
                f"the '{ADAPTER_PARAMETER}' parameter or '{ADAPTER_METADATA}' metadata instead",
            )
        if "shared_memory_region" in tensor.parameters:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{tensor.name}' uses shared memory, which cannot cross the router: send the data inline",
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


def retarget(request: service_pb2.ModelInferRequest, model: str) -> service_pb2.ModelInferRequest:
    """Aim ``request`` at ``model`` and drop the ``lora_adapter`` parameter (in place; returns it)."""
    request.model_name = model
    if ADAPTER_PARAMETER in request.parameters:
        del request.parameters[ADAPTER_PARAMETER]
    return request


def strip_lora(request: service_pb2.ModelInferRequest) -> None:
    """Remove LoRA inputs appended by :func:`add_lora` (they are always last), in place."""
    keep = len(request.inputs)
    while keep and request.inputs[keep - 1].name in LORA_INPUTS:
        keep -= 1
    if keep == len(request.inputs):
        return
    del request.inputs[keep:]
    if len(request.raw_input_contents) > keep:
        del request.raw_input_contents[keep:]


def _to_raw(tensor: service_pb2.ModelInferRequest.InferInputTensor) -> bytes:
    if tensor.datatype == "BYTES":
        items = tensor.contents.bytes_contents
        return b"".join(struct.pack("<I", len(b)) + b for b in items)
    spec = _CONTENTS.get(tensor.datatype)
    if spec is None:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{tensor.name}': datatype {tensor.datatype} has no typed contents; send it as raw bytes",
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


def _append(request: service_pb2.ModelInferRequest, name: str, datatype: str, shape: tuple[int, ...]) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(shape)


def add_lora(request: service_pb2.ModelInferRequest, task_id: int, tensors: LoraTensors | None = None) -> None:
    """Set ``lora_task_id`` (and with ``tensors`` the weights and config) on ``request`` in place.

    LoRA inputs set by an earlier call are replaced, so one request can be sent id-only, then again
    with weights.
    """
    strip_lora(request)
    if tensors is not None:
        if tensors.task_id != task_id:
            raise ValueError(f"tensors of task {tensors.task_id} appended to task {task_id}")
        make_raw(request)
    raw = bool(request.raw_input_contents) or (tensors is not None)
    _append(request, "lora_task_id", "UINT64", (1, 1))
    if raw:
        request.raw_input_contents.append(struct.pack("<Q", task_id))
    else:
        request.inputs[-1].contents.uint64_contents.append(task_id)
    if tensors is not None:
        _append(request, "lora_weights", tensors.datatype, tensors.weights_shape)
        request.raw_input_contents.append(tensors.weights)
        _append(request, "lora_config", "INT32", tensors.config_shape)
        request.raw_input_contents.append(tensors.config)
