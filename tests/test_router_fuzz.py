"""Fuzzed inference requests through the router in front of the real tritonserver (CPU).

Random model names, ``lora_adapter`` parameters, inputs (names, datatypes, shapes, typed contents
and raw bytes in any mix), ``raw_input_contents`` counts and ``phlora-adapter`` metadata go to the
router as raw ``ModelInferRequest`` messages. Whatever comes in, the router answers with a status it
chose on purpose or one Triton gave, never a Python exception of its own (gRPC reports those as
``UNKNOWN``), and it keeps serving afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from phlora_nim.router import RouterConfig, RouterThread
from phlora_nim.testing.standin import add_adapters, standin_repo
from phlora_nim.triton.launcher import LocalTriton

pytestmark = pytest.mark.timeout(120)

ADAPTERS = {
    "alpha": (100, "float16"),
    "beta": (200, "bfloat16"),
    "gamma": (300, "float32"),
}
BASE = "ensemble"
TIMEOUT = 10.0

# What a fuzzed request may get. INTERNAL only with a message from Triton (checked separately).
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
}
DECOUPLED = "ModelInfer RPC doesn't support models with decoupled transaction policy"
# Signs of an exception raised inside the router's own Python code (grpc aio turns an unhandled one
# into UNKNOWN "Unexpected <class ...>"; a bad response into "Failed to serialize").
ROUTER_FAILURE_SIGNS = ("Traceback", "Unexpected <class", "Exception calling application", "serialize", "Error(")


# fixtures ------------------------------------------------------------------------------------
def kill(server: LocalTriton) -> None:
    """SIGKILL a tritonserver and its backend stubs (a quick teardown)."""
    if server._process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server._process.pid, signal.SIGKILL)
    server.stop()


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    add_adapters(root, ADAPTERS)
    return root


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    # a 1-adapter cache: fuzzed requests naming different adapters keep evicting, so the weights path runs too
    repo = standin_repo(tmp_path_factory.mktemp("standin"), capacity=1)
    server = LocalTriton(repo).start()
    try:
        yield server
    finally:
        kill(server)


def config(root: Path, upstream: str, **kwargs: Any) -> RouterConfig:
    options: dict[str, Any] = {"port": 0, "metrics_port": 0, "health_interval": 0.5, "registry_interval": 0.2}
    options["expose_models"] = ("stream",)
    options.update(kwargs)
    return RouterConfig(root, upstreams=(upstream,), **options)


@pytest.fixture(scope="module")
def router(repo_root: Path, triton: LocalTriton) -> Iterator[RouterThread]:
    with RouterThread(config(repo_root, triton.grpc_url)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(router: RouterThread) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(router.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


# strategies ----------------------------------------------------------------------------------
odd_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
model_names = st.one_of(
    st.sampled_from([*ADAPTERS, BASE, "stream", "nope", "", " alpha", "ALPHA", "ensemble/1", "alpha\x00"]),
    odd_text,
)
adapter_names = st.one_of(st.sampled_from([*ADAPTERS, "nope", "", BASE]), odd_text)
input_names = st.one_of(
    st.sampled_from(["x", "x", "x", "lora_task_id", "lora_weights", "lora_config", "y", "", "X"]), odd_text
)
datatypes = st.one_of(
    st.sampled_from(
        ["INT32", "INT32", "INT8", "INT64", "UINT64", "UINT8", "FP16", "BF16", "FP32", "FP64", "BOOL", "BYTES"]
    ),
    st.sampled_from(["", "int32", "FOO", "TYPE_INT32", "INT32 "]),
    odd_text,
)
dims = st.sampled_from([-7, -1, 0, 1, 1, 2, 3, 4, 2**31, 2**40, 2**62, -(2**63)])
shapes = st.lists(dims, max_size=4)
wide_ints = st.integers(-(2**40), 2**40)
CONTENT_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}


@st.composite
def parameter_values(draw: st.DrawFn) -> tuple[str, Any]:
    return draw(
        st.one_of(
            st.tuples(st.just("string_param"), adapter_names),
            st.tuples(st.just("int64_param"), st.integers(-(2**63), 2**63 - 1)),
            st.tuples(st.just("bool_param"), st.booleans()),
            st.tuples(st.just("uint64_param"), st.integers(0, 2**64 - 1)),
            st.tuples(st.just("double_param"), st.floats()),
        )
    )


def add_tensor(draw: st.DrawFn, request: service_pb2.ModelInferRequest, raw: list[bytes], mode: str) -> None:
    """A random input: odd name, datatype and shape, data as raw bytes, typed contents or both."""
    tensor = request.inputs.add(name=draw(input_names), datatype=draw(datatypes))
    tensor.shape.extend(draw(shapes))
    if mode in ("raw", "mixed"):
        raw.append(draw(st.binary(max_size=64)))
    if mode in ("contents", "mixed"):
        field = draw(st.sampled_from(sorted(CONTENT_FIELDS)))
        getattr(tensor.contents, field).extend(draw(st.lists(CONTENT_FIELDS[field], max_size=6)))


@st.composite
def infer_requests(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    """A well-formed request (INT32 ``x`` [1, n] for an adapter or the base model), then 0–4 random changes."""
    request = service_pb2.ModelInferRequest(model_name=draw(st.sampled_from([*ADAPTERS, BASE])))
    request.id = draw(ascii_text)
    mode = draw(st.sampled_from(["raw", "contents"]))
    values = draw(st.lists(st.integers(-1000, 1000), min_size=1, max_size=6))
    x = request.inputs.add(name="x", datatype="INT32", shape=[1, len(values)])
    raw: list[bytes] = []
    if mode == "raw":
        raw.append(np.array(values, "<i4").tobytes())
    else:
        x.contents.int_contents.extend(values)
    changes = [
        "model_name", "model_version", "parameter", "parameter", "tensor", "tensor", "tensor_mixed",
        "x_datatype", "x_shape", "x_contents", "raw_skew", "lora_input",
    ]  # fmt: skip
    for change in draw(st.lists(st.sampled_from(changes), max_size=4)):
        if change == "model_name":
            request.model_name = draw(model_names)
        elif change == "model_version":
            request.model_version = draw(st.sampled_from(["1", "2", "-1", "x", "01"]))
        elif change == "parameter":
            name = draw(st.one_of(st.sampled_from(["lora_adapter"] * 3 + ["sequence_id", "priority"]), odd_text))
            field, value = draw(parameter_values())
            setattr(request.parameters[name], field, value)
        elif change == "tensor":
            add_tensor(draw, request, raw, mode)
        elif change == "tensor_mixed":
            add_tensor(draw, request, raw, "mixed")
        elif change == "x_datatype":
            x.datatype = draw(datatypes)
        elif change == "x_shape":
            del x.shape[:]
            x.shape.extend(draw(shapes))
        elif change == "x_contents":
            field = draw(st.sampled_from(sorted(CONTENT_FIELDS)))
            getattr(x.contents, field).extend(draw(st.lists(CONTENT_FIELDS[field], max_size=6)))
        elif change == "raw_skew":
            if raw and draw(st.booleans()):
                raw.pop()
            else:
                raw.append(struct.pack("<Q", draw(st.integers(0, 2**64 - 1))))
        else:  # a LoRA input of the client's own, as TensorRT-LLM would take it
            name = draw(st.sampled_from(["lora_task_id", "lora_weights", "lora_config"]))
            tensor = request.inputs.add(name=name, datatype=draw(st.sampled_from(["UINT64", "FP16", "INT32"])))
            tensor.shape.extend([1, 1])
            if mode == "raw":
                raw.append(struct.pack("<Q", draw(st.integers(0, 2**64 - 1))))
            else:
                tensor.contents.uint64_contents.append(draw(st.integers(0, 2**64 - 1)))
    request.raw_input_contents.extend(raw)
    return request


metadata_values = st.one_of(st.none(), st.sampled_from([*ADAPTERS, "nope", "", BASE]), ascii_text)


def call_metadata(adapter: str | None) -> tuple[tuple[str, str], ...]:
    return () if adapter is None else (("phlora-adapter", adapter),)


# checks --------------------------------------------------------------------------------------
def check_status(code: grpc.StatusCode, details: str, request: service_pb2.ModelInferRequest) -> None:
    assert code in ALLOWED or code == grpc.StatusCode.UNIMPLEMENTED, f"{code}: {details!r} for {request}"
    for sign in ROUTER_FAILURE_SIGNS:
        assert sign not in details, f"{code}: {details!r} for {request}"
    if code == grpc.StatusCode.UNIMPLEMENTED:  # Triton's answer for a decoupled model, passed on
        assert details == DECOUPLED, details
        return
    if code == grpc.StatusCode.INTERNAL:
        # the router makes no INTERNAL of its own: it passes on what Triton answered
        assert details and not details.startswith("[StatusCode."), details


def valid_adapter_answers(router: RouterThread) -> None:
    with contextlib.closing(grpcclient.InferenceServerClient(router.address)) as client:
        assert client.is_server_live() and client.is_server_ready()
        for name, (offset, _) in ADAPTERS.items():
            x = grpcclient.InferInput("x", [1, 3], "INT32")
            x.set_data_from_numpy(np.array([[1, 2, 3]], np.int32))
            assert client.infer(name, [x]).as_numpy("y")[0].tolist() == [1 + offset, 2 + offset, 3 + offset]


# tests ---------------------------------------------------------------------------------------
# Each fuzzing test checks afterwards that the router it fuzzed still serves: a separate "after"
# test could run on another xdist worker, against a router that was never fuzzed.
@settings(max_examples=150, deadline=None)
@given(request=infer_requests(), adapter=metadata_values)
def _fuzz_unary(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest, adapter: str | None
) -> None:
    sent = service_pb2.ModelInferRequest()
    sent.CopyFrom(request)
    try:
        response = stub.ModelInfer(sent, timeout=TIMEOUT, metadata=call_metadata(adapter))
    except grpc.RpcError as exc:
        event(f"{exc.code().name}: {(exc.details() or '')[:70]}")
        check_status(exc.code(), exc.details() or "", request)
    else:
        event("OK")
        assert isinstance(response, service_pb2.ModelInferResponse)


@settings(max_examples=20, deadline=None)
@given(requests=st.lists(infer_requests(), min_size=1, max_size=3), adapter=metadata_values)
def _fuzz_stream(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, requests: list[service_pb2.ModelInferRequest], adapter: str | None
) -> None:
    sent = []
    for request in requests:
        copy = service_pb2.ModelInferRequest()
        copy.CopyFrom(request)
        copy.model_name = "stream" if request.model_name == BASE else request.model_name
        sent.append(copy)
    responses = list(stub.ModelStreamInfer(iter(sent), timeout=TIMEOUT, metadata=call_metadata(adapter)))
    # the stream itself ends OK (an RpcError would raise above); each request's failure comes in band
    assert responses, "no answer at all"
    for response in responses:
        for sign in ROUTER_FAILURE_SIGNS:
            assert sign not in response.error_message, response.error_message


def test_fuzzed_unary_requests_never_crash_the_router(
    router: RouterThread, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    _fuzz_unary(stub)  # runs every example (hypothesis calls it with the drawn arguments)
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5).ready
    valid_adapter_answers(router)


def test_fuzzed_stream_requests_answer_in_band(
    router: RouterThread, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    _fuzz_stream(stub)
    valid_adapter_answers(router)


def test_oversized_request_is_resource_exhausted(repo_root: Path, triton: LocalTriton) -> None:
    with RouterThread(config(repo_root, triton.grpc_url, max_message_mb=1)) as small:
        with grpc.insecure_channel(small.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            n = 300_000  # 1.2 MB of INT32 > 1 MB
            request = service_pb2.ModelInferRequest(model_name="alpha")
            request.inputs.add(name="x", datatype="INT32", shape=[1, n])
            request.raw_input_contents.append(np.arange(n, dtype="<i4").tobytes())
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
        valid_adapter_answers(small)
