"""The router in front of the real tritonserver (CPU), driven by real ``tritonclient.grpc`` clients.

The stand-in models in ``phlora_nim/testing/standin_repo`` implement TensorRT-LLM's LoRA cache protocol with a
2-adapter cache and answer ``y = x + offset``, each adapter's weights summing to its own offset: a
response computed with any other adapter (or none) shows.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from phlora_nim.repository.layout import prefetch_dir
from phlora_nim.router import RouterConfig, RouterThread
from phlora_nim.router.config import ANY_FREE_PORT
from phlora_nim.router.routing import rank_replicas
from phlora_nim.router.tenants import key_digest
from phlora_nim.testing.standin import STANDIN_REPO, add_adapters, remove_adapter, standin_repo
from phlora_nim.triton.launcher import LocalTriton

pytestmark = pytest.mark.timeout(60)

ADAPTERS = {
    "support-a": (100, "float16"),
    "support-b": (200, "bfloat16"),
    "legal": (300, "float32"),
    "faq": (400, "float16"),
    "ops": (500, "bfloat16"),
}
OFFSET = {name: offset for name, (offset, _) in ADAPTERS.items()}
X = [1, 2, 3]


# fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    add_adapters(root, ADAPTERS)
    return root


@contextlib.contextmanager
def standin(repo: Path = STANDIN_REPO, **kwargs: Any) -> Iterator[LocalTriton]:
    """tritonserver on a stand-in repository, killed at the end (a graceful stop can wait 30 s)."""
    server = LocalTriton(repo, **kwargs).start()
    try:
        yield server
    finally:
        kill(server)


@pytest.fixture(scope="module")
def triton() -> Iterator[LocalTriton]:
    with standin() as server:
        yield server


def config(root: Path, *upstreams: str, **kwargs: Any) -> RouterConfig:
    options: dict[str, Any] = {"port": 0, "metrics_port": 0, "health_interval": 0.5, "registry_interval": 0.2}
    options["expose_models"] = ("stream",)  # the decoupled stand-in, beside the upstream model
    options.update(kwargs)
    return RouterConfig(root, upstreams=upstreams, **options)


@pytest.fixture(scope="module")
def router(repo_root: Path, triton: LocalTriton) -> Iterator[RouterThread]:
    with RouterThread(config(repo_root, triton.grpc_url, metrics_port=ANY_FREE_PORT)) as running:
        yield running


@pytest.fixture
def client(router: RouterThread) -> Iterator[grpcclient.InferenceServerClient]:
    with contextlib.closing(grpcclient.InferenceServerClient(router.address)) as c:
        yield c


# helpers -------------------------------------------------------------------------------------
def inputs(values: list[int] = X, delay_ms: int | None = None) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", [1, len(values)], "INT32")
    x.set_data_from_numpy(np.array([values], np.int32))
    out = [x]
    if delay_ms is not None:
        d = grpcclient.InferInput("delay_ms", [1, 1], "INT32")
        d.set_data_from_numpy(np.array([[delay_ms]], np.int32))
        out.append(d)
    return out


def infer(client: grpcclient.InferenceServerClient, model: str, values: list[int] = X, **kwargs: Any) -> list[int]:
    return client.infer(model, inputs(values), **kwargs).as_numpy("y")[0].tolist()


def shifted(offset: int, values: list[int] = X) -> list[int]:
    return [v + offset for v in values]


def refused(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == str(code), info.value
    return str(info.value)


def served_by(tritons: list[LocalTriton], model: str = "ensemble") -> dict[str, int]:
    counts = {}
    for server in tritons:
        with contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url)) as c:
            stats = c.get_inference_statistics(model).model_stats[0]
            counts[server.grpc_url] = int(stats.inference_stats.success.count)
    return counts


@contextlib.contextmanager
def routed(cfg: RouterConfig) -> Iterator[tuple[RouterThread, grpcclient.InferenceServerClient]]:
    """A router on ``cfg`` and a client of it."""
    with RouterThread(cfg) as running, contextlib.closing(grpcclient.InferenceServerClient(running.address)) as c:
        yield running, c


def sample(router: RouterThread, name: str, **labels: str) -> float:
    return router.router.metrics.registry.get_sample_value(name, labels) or 0.0


# selection and pass-through ------------------------------------------------------------------
def test_adapter_by_model_name_parameter_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert infer(client, "support-a") == shifted(100)
    assert infer(client, "ensemble", parameters={"lora_adapter": "legal"}) == shifted(300)
    assert infer(client, "ensemble", headers={"phlora-adapter": "faq"}) == shifted(400)
    # precedence: model name, then parameter, then metadata
    both = {"parameters": {"lora_adapter": "legal"}, "headers": {"phlora-adapter": "faq"}}
    assert infer(client, "ops", **both) == shifted(500)
    assert infer(client, "ensemble", **both) == shifted(300)


def test_base_model_passes_through(client: grpcclient.InferenceServerClient) -> None:
    assert infer(client, "ensemble", [5, 6]) == [5, 6]


def test_typed_contents_requests(router: RouterThread, repo_root: Path) -> None:
    request = service_pb2.ModelInferRequest(model_name="support-b")
    request.inputs.add(name="x", datatype="INT32", shape=[1, 3]).contents.int_contents.extend(X)
    with grpc.insecure_channel(router.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):  # weights (the request becomes raw bytes), then the id alone in contents
            response = stub.ModelInfer(request, timeout=10)
            assert np.frombuffer(response.raw_output_contents[0], "<i4").tolist() == shifted(200)


def test_eviction_upstream_never_serves_the_wrong_adapter(
    router: RouterThread, client: grpcclient.InferenceServerClient, triton: LocalTriton
) -> None:
    misses = sample(router, "phlora_router_replica_cache_misses_total", replica=triton.grpc_url)
    for round_ in range(3):  # 5 adapters through a 2-adapter cache: every request evicts
        for i, name in enumerate(ADAPTERS):
            values = [round_, i, 7]
            assert infer(client, name, values) == shifted(OFFSET[name], values)
    assert sample(router, "phlora_router_replica_cache_misses_total", replica=triton.grpc_url) > misses
    # concurrent requests, adapters interleaved
    pending = [(name, [k, 1]) for k, name in enumerate(list(ADAPTERS) * 4)]
    results: queue.Queue[tuple[str, list[int], Any, Any]] = queue.Queue()
    for name, values in pending:
        client.async_infer(
            name, inputs(values), callback=lambda result, error, n=name, v=values: results.put((n, v, result, error))
        )
    for _ in pending:
        name, values, result, error = results.get(timeout=15)
        assert error is None, error
        assert result.as_numpy("y")[0].tolist() == shifted(OFFSET[name], values)


def test_batched_requests_carry_the_adapter_per_row(router: RouterThread, triton: LocalTriton) -> None:
    """TensorRT-LLM slices every input on dim 0: the LoRA inputs get one copy of the adapter per row."""
    rows = [[1, 2, 3], [10, 20, 30]]
    with contextlib.closing(grpcclient.InferenceServerClient(router.address)) as c:
        for name in ("support-a", "legal", "faq", "support-a"):  # weights sent, evicted, sent again, id alone
            x = grpcclient.InferInput("x", [2, 3], "INT32")
            x.set_data_from_numpy(np.array(rows, np.int32))
            got = c.infer(name, [x]).as_numpy("y").tolist()
            assert got == [shifted(OFFSET[name], row) for row in rows]
        assert c.infer("support-a", [x]).as_numpy("y").tolist() == [shifted(100, row) for row in rows]  # id only
        eight = grpcclient.InferInput("x", [8, 1], "INT32")
        eight.set_data_from_numpy(np.arange(8, dtype=np.int32).reshape(8, 1))
        assert c.infer("ops", [eight]).as_numpy("y").reshape(-1).tolist() == [500 + k for k in range(8)]
        nine = grpcclient.InferInput("x", [9, 1], "INT32")  # over max_batch_size 8: refused before any copy
        nine.set_data_from_numpy(np.zeros((9, 1), np.int32))
        assert "must be 1 to 8" in refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: c.infer("ops", [nine]))
    request = service_pb2.ModelInferRequest(model_name="support-b")  # typed contents, batch 2
    request.inputs.add(name="x", datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, 2, 3, 4])
    with grpc.insecure_channel(router.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert np.frombuffer(response.raw_output_contents[0], "<i4").tolist() == [201, 202, 203, 204]
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with contextlib.closing(grpcclient.InferenceServerClient(router.address)) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        x = grpcclient.InferInput("x", [2, 3], "INT32")
        x.set_data_from_numpy(np.array(rows, np.int32))
        c.async_stream_infer("stream", [x], parameters={"lora_adapter": "ops"})
        for k in range(3):
            result, error = results.get(timeout=20)
            assert error is None, error
            assert result.as_numpy("y").tolist() == [shifted(500 + k, row) for row in rows]
        c.stop_stream()


def test_batch_of_a_large_adapter_beyond_the_message_limit(triton: LocalTriton, tmp_path: Path) -> None:
    entry = add_adapters(tmp_path, {"wide": (600, "float16")})["wide"]
    weights = np.zeros((1, 2, 40_000), np.float16)  # 160 KB: 8 copies exceed a 1 MB message
    weights[0, 0, :600] = 1.0
    np.save(prefetch_dir(tmp_path, entry.task_id) / "model.lora_weights.npy", weights)
    with routed(config(tmp_path, triton.grpc_url, max_message_mb=1)) as (_, c):
        eight = grpcclient.InferInput("x", [8, 1], "INT32")
        eight.set_data_from_numpy(np.zeros((8, 1), np.int32))
        message = refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: c.infer("wide", [eight]))
        assert "one copy of its weights per row" in message and "at most 6 rows" in message
        four = grpcclient.InferInput("x", [4, 1], "INT32")
        four.set_data_from_numpy(np.zeros((4, 1), np.int32))
        assert c.infer("wide", [four]).as_numpy("y").reshape(-1).tolist() == [600] * 4  # weights sent
        assert c.infer("wide", [eight]).as_numpy("y").reshape(-1).tolist() == [600] * 8  # the id alone fits


# errors --------------------------------------------------------------------------------------
def test_unknown_adapter_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    assert "'nope'" in refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, "nope"))
    message = refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, "ensemble", parameters={"lora_adapter": "nope"}))
    assert "unknown model or adapter 'nope'" in message
    refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, "ensemble", headers={"phlora-adapter": "nope"}))


def test_malformed_requests_are_invalid_arguments(client: grpcclient.InferenceServerClient) -> None:
    task = grpcclient.InferInput("lora_task_id", [1, 1], "UINT64")
    task.set_data_from_numpy(np.array([[1]], np.uint64))
    message = refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.infer("support-a", [*inputs(), task]))
    assert "set by the router" in message
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.infer("ensemble", [*inputs(), task]))
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: infer(client, "ensemble", parameters={"lora_adapter": 3}))


def test_huge_client_values_are_cut_in_errors(router: RouterThread, client: grpcclient.InferenceServerClient) -> None:
    """A 100 KB name echoed whole would exceed gRPC's trailer limit (the client then sees RESOURCE_EXHAUSTED)."""
    huge = "m" * 100_000
    messages = [
        refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, huge)),
        refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, "ensemble", parameters={"lora_adapter": huge})),
        refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, "ensemble", headers={"phlora-adapter": huge[:6000]})),
        refused(grpc.StatusCode.NOT_FOUND, lambda: client.get_model_metadata(huge)),
        refused(grpc.StatusCode.NOT_FOUND, lambda: client.get_model_config(huge)),
    ]
    odd = grpcclient.InferInput(huge, [1, 3], "INT32")  # Triton's own message echoes the input name
    odd.set_data_from_numpy(np.array([X], np.int32))
    messages.append(refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.infer("support-a", [odd])))
    lora = grpcclient.InferInput("lora_weights" + huge, [1, 3], "INT32")
    lora.set_data_from_numpy(np.array([X], np.int32))
    messages.append(refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.infer("faq", [*inputs(), lora])))
    assert not client.is_model_ready(huge)
    for message in messages:
        assert len(message) < 1200 and "mmmm" in message, message[:300]
    got = stream(router.address, [("s", {"model": huge})], expect=1)
    assert "NOT_FOUND" in got["errors"][0] and len(got["errors"][0]) < 1200


class RecordingHop(grpc.GenericRpcHandler):
    """A gRPC hop between the router and Triton: forwards every unary call as bytes and notes, for each
    ModelInfer, the seconds left before the deadline it arrived with (None: no deadline) and how long
    the call lived. The forward itself has no deadline, so the call ends early only if the router's
    deadline or cancellation ends it."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.infers: queue.Queue[tuple[float | None, float]] = queue.Queue()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method.endswith("/ModelStreamInfer"):
            return None
        forward = self.channel.unary_unary(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            started, left = time.monotonic(), context.time_remaining()
            if method.endswith("/ModelInfer"):
                deadline = None if left is None or left > 1e6 else left  # no deadline reads as a huge value
                context.add_callback(lambda: self.infers.put((deadline, time.monotonic() - started)))
            try:
                return forward(request)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())

        return grpc.unary_unary_rpc_method_handler(handle)


@contextlib.contextmanager
def recording_hop(target: str) -> Iterator[tuple[str, RecordingHop]]:
    from concurrent.futures import ThreadPoolExecutor

    hop = RecordingHop(target)
    server = grpc.server(ThreadPoolExecutor(max_workers=8), handlers=[hop])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", hop
    finally:
        server.stop(grace=None)
        hop.channel.close()


def test_deadline_reaches_upstream(repo_root: Path, triton: LocalTriton) -> None:
    """The client's 0.3 s deadline travels with the upstream call, which ends with it rather than after
    the 3 s the request takes in Triton."""
    with recording_hop(triton.grpc_url) as (address, hop), routed(config(repo_root, address)) as (_, c):
        started = time.monotonic()
        refused(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            lambda: c.infer("faq", inputs(delay_ms=3000), client_timeout=0.3),
        )
        assert time.monotonic() - started < 2.0
        left, lived = hop.infers.get(timeout=10)
    assert left is not None and left <= 0.3, f"the upstream call arrived with deadline {left} s, not the client's"
    assert lived < 2.0, f"the upstream call lived {lived:.1f} s: not cancelled at the deadline"


# model and server RPCs, health, reflection, metrics ------------------------------------------
def test_model_rpcs_for_adapters(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("legal") and client.is_model_ready("ensemble")
    assert not client.is_model_ready("nope")
    metadata = client.get_model_metadata("legal")
    assert metadata.name == "legal" and [t.name for t in metadata.inputs] == ["x", "delay_ms"]
    model_config = client.get_model_config("legal").config
    assert model_config.name == "legal" and model_config.max_batch_size == 8
    assert not {t.name for t in model_config.input} & {"lora_task_id", "lora_weights", "lora_config"}
    assert client.get_model_metadata("stream").name == "stream"
    refused(grpc.StatusCode.NOT_FOUND, lambda: client.get_model_metadata("nope"))
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"ensemble": "READY", "stream": "READY", **dict.fromkeys(ADAPTERS, "READY")}
    refused(grpc.StatusCode.UNIMPLEMENTED, client.get_server_metadata)


def test_health_and_reflection(router: RouterThread) -> None:
    with grpc.insecure_channel(router.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(router: RouterThread, client: grpcclient.InferenceServerClient) -> None:
    infer(client, "ops")
    with contextlib.suppress(InferenceServerException):
        infer(client, "ensemble", parameters={"lora_adapter": "nope"})
    port = router.router.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'phlora_router_requests_total{adapter="ops"}' in text
    assert 'phlora_router_request_seconds_bucket{adapter="ops",le="+Inf"}' in text
    assert 'phlora_router_in_flight{adapter="ops"} 0.0' in text
    assert 'phlora_router_errors_total{adapter="(unknown)",code="NOT_FOUND"}' in text
    assert 'phlora_router_all_errors_total{code="NOT_FOUND"}' in text
    assert "# TYPE phlora_router_upstream_failures_total counter" in text
    assert "phlora_router_replica_weight_sends_total{replica=" in text
    assert "phlora_router_adapters 5.0" in text and "phlora_router_healthy_replicas 1.0" in text
    sent = [ln for ln in text.splitlines() if ln.startswith("phlora_router_weight_bytes_sent_total{")]
    assert sent and all(float(ln.rsplit(" ", 1)[1]) > 0 for ln in sent)
    resident = [ln for ln in text.splitlines() if ln.startswith("phlora_router_replica_resident_adapters{")]
    assert resident and float(resident[0].rsplit(" ", 1)[1]) >= 1
    assert "# TYPE phlora_router_adapter_resends_total counter" in text


def test_cache_misses_are_no_client_errors(router: RouterThread, triton: LocalTriton) -> None:
    """Normal churn: an eviction is an upstream failure (Triton's TensorRT-LLM backend counts it in
    nv_inference_request_failure; this stand-in's Python backend does not), counted by the router
    apart from the per-code errors clients saw."""

    def misses() -> float:
        return sample(router, "phlora_router_upstream_failures_total", replica=triton.grpc_url, reason="cache_miss")

    def client_errors() -> float:
        return sum(sample(router, "phlora_router_all_errors_total", code=c.name) for c in grpc.StatusCode)

    with contextlib.closing(grpcclient.InferenceServerClient(router.address)) as c:
        for name in ADAPTERS:  # every adapter sent once: the router now believes each was sent
            assert infer(c, name) == shifted(OFFSET[name])
        before = (misses(), client_errors())
        for name in list(ADAPTERS) * 2:  # 5 adapters through a 2-adapter cache: misses all along
            assert infer(c, name) == shifted(OFFSET[name])
        missed = misses() - before[0]
        assert missed >= len(ADAPTERS)
        assert client_errors() == before[1]  # clients saw no error
        refused(grpc.StatusCode.NOT_FOUND, lambda: infer(c, "nope"))
        assert sample(router, "phlora_router_all_errors_total", code="NOT_FOUND") >= 1
        assert client_errors() == before[1] + 1


# registry changes ----------------------------------------------------------------------------
def test_registry_changes_apply_without_restart(
    repo_root: Path, client: grpcclient.InferenceServerClient, wait_until
) -> None:
    refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, "late"))
    add_adapters(repo_root, {"late": (700, "float16")})

    def served() -> bool:
        with contextlib.suppress(InferenceServerException):
            return infer(client, "late") == shifted(700)
        return False

    wait_until(served, timeout=5)
    remove_adapter(repo_root, "late")
    wait_until(lambda: not served(), timeout=5)
    refused(grpc.StatusCode.NOT_FOUND, lambda: infer(client, "late"))


def test_removed_adapter_files_never_show_a_path(
    triton: LocalTriton, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files gone before the registry poll noticed: NOT_FOUND or UNAVAILABLE, the path only in the log."""
    entries = add_adapters(tmp_path, {"gone": (700, "float16"), "lost": (800, "float16"), "bad": (900, "float16")})
    folder = {name: prefetch_dir(tmp_path, e.task_id) for name, e in entries.items()}
    with routed(config(tmp_path, triton.grpc_url, registry_interval=3600)) as (_, c):
        remove_adapter(tmp_path, "gone")  # `phlora-nim remove`: the entry, then the files
        shutil.rmtree(folder["gone"])
        message = refused(grpc.StatusCode.NOT_FOUND, lambda: infer(c, "gone"))
        assert "adapter 'gone' was removed" in message
        refused(grpc.StatusCode.NOT_FOUND, lambda: infer(c, "gone"))  # the registry was read again
        (folder["lost"] / "model.lora_weights.npy").unlink()  # still registered, files gone
        message += refused(grpc.StatusCode.UNAVAILABLE, lambda: infer(c, "lost"))
        np.save(folder["bad"] / "model.lora_config.npy", np.zeros((1, 3, 3), np.int32))
        message += refused(grpc.StatusCode.FAILED_PRECONDITION, lambda: infer(c, "bad"))
        assert str(tmp_path) not in message and "/" not in message.replace("'", ""), message
        assert str(folder["lost"]) in caplog.text and str(folder["bad"]) in caplog.text


# streaming -----------------------------------------------------------------------------------
def stream(
    address: str, requests: list[tuple[str, dict[str, Any]]], *, headers: dict[str, str] | None = None, expect: int
) -> dict[str, list[Any]]:
    """Send ``(request_id, kwargs)`` on one stream; collect ``expect`` results by request id."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    got: dict[str, list[Any]] = {}
    with contextlib.closing(grpcclient.InferenceServerClient(address)) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
        for request_id, kwargs in requests:
            c.async_stream_infer(
                kwargs.pop("model", "stream"), inputs(kwargs.pop("values", X)), request_id=request_id, **kwargs
            )
        for _ in range(expect):
            result, error = results.get(timeout=20)
            if error is not None:
                got.setdefault("errors", []).append(str(error))
            else:
                got.setdefault(result.get_response().id, []).append(result.as_numpy("y")[0].tolist())
        c.stop_stream()
    return got


def test_stream_with_adapters_and_eviction(router: RouterThread) -> None:
    names = list(ADAPTERS) * 2  # 5 adapters through a 2-adapter cache, on one stream
    requests = [(f"r{i}", {"parameters": {"lora_adapter": n}, "values": [i, 0]}) for i, n in enumerate(names)]
    got = stream(router.address, requests, expect=3 * len(names))
    assert "errors" not in got
    for i, name in enumerate(names):
        assert sorted(got[f"r{i}"]) == [shifted(OFFSET[name] + k, [i, 0]) for k in range(3)]


def test_stream_metadata_base_and_errors(router: RouterThread) -> None:
    requests = [("a", {}), ("b", {"model": "ops"}), ("c", {"model": "nosuch"})]
    got = stream(router.address, requests, headers={"phlora-adapter": "faq"}, expect=5)
    assert got["a"] == [shifted(400 + k) for k in range(3)]
    assert got["b"] == [shifted(500)]  # the model name wins: 'ops' on the upstream model, one response
    assert "NOT_FOUND" in got["errors"][0] and "'nosuch'" in got["errors"][0]
    got = stream(router.address, [("base", {}), ("bad", {"parameters": {"lora_adapter": "nope"}})], expect=4)
    assert got["base"] == [shifted(k) for k in range(3)]
    assert "NOT_FOUND" in got["errors"][0] and "nope" in got["errors"][0]


# tenants and TLS -----------------------------------------------------------------------------
TENANTS = """
tenants:
  - name: support
    keys: ["sha256:{digest}"]
    adapters: ["support-*"]
    base_models: ["ensemble"]
  - name: limited
    keys: ["limited-key"]
    adapters: ["*"]
    max_in_flight: 1
"""


@pytest.fixture(scope="module")
def tenant_router(
    repo_root: Path, triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterThread]:
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(TENANTS.format(digest=key_digest("support-secret")))
    with RouterThread(config(repo_root, triton.grpc_url, tenants=path)) as running:
        yield running


def test_tenants(tenant_router: RouterThread) -> None:
    support = {"authorization": "Bearer support-secret"}
    with contextlib.closing(grpcclient.InferenceServerClient(tenant_router.address)) as c:
        assert c.is_server_ready()  # probes need no key
        refused(grpc.StatusCode.UNAUTHENTICATED, lambda: infer(c, "support-a"))
        refused(grpc.StatusCode.UNAUTHENTICATED, lambda: infer(c, "support-a", headers={"authorization": "Bearer x"}))
        refused(grpc.StatusCode.UNAUTHENTICATED, lambda: c.get_model_repository_index())
        assert infer(c, "support-a", headers=support) == shifted(100)
        assert infer(c, "ensemble", headers=support) == X
        index = {m.name for m in c.get_model_repository_index(headers=support).models}
        assert index == {"ensemble", "support-a", "support-b"}
        assert not c.is_model_ready("legal", headers=support)
        refused(grpc.StatusCode.NOT_FOUND, lambda: c.get_model_metadata("legal", headers=support))
        assert c.get_model_metadata("support-b", headers=support).name == "support-b"
    with grpc.insecure_channel(tenant_router.address) as channel:  # a stream without a key fails as a whole
        request = service_pb2.ModelInferRequest(model_name="support-a")
        with pytest.raises(grpc.RpcError) as info:
            list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    requests = [
        ("ok", {"parameters": {"lora_adapter": "support-a"}}),
        ("no", {"parameters": {"lora_adapter": "legal"}}),
    ]
    got = stream(tenant_router.address, requests, headers=support, expect=4)
    assert got["ok"] == [shifted(100 + k) for k in range(3)] and "NOT_FOUND" in got["errors"][0]


def answers(call: Callable[[str], object], name: str) -> str:
    """What ``call(name)`` answers, as text (an error's code and message, or the value)."""
    try:
        return repr(call(name))
    except InferenceServerException as exc:
        return f"{exc.status()} {exc.message()}"


def test_another_tenants_names_look_missing(tenant_router: RouterThread) -> None:
    """Another tenant's adapter, or a base model outside the tenant's patterns, gets the very answer
    a name that does not exist gets: no RPC tells them apart, so names cannot be enumerated."""
    support = {"authorization": "Bearer support-secret"}
    with contextlib.closing(grpcclient.InferenceServerClient(tenant_router.address)) as c:
        probes: list[Callable[[str], object]] = [
            lambda n: infer(c, n, headers=support),
            lambda n: infer(c, "ensemble", headers=support, parameters={"lora_adapter": n}),
            lambda n: infer(c, "ensemble", headers={**support, "phlora-adapter": n}),
            lambda n: c.is_model_ready(n, headers=support),
            lambda n: c.get_model_metadata(n, headers=support),
            lambda n: c.get_model_config(n, headers=support),
        ]
        for hidden, missing in (("legal", "lebal"), ("stream", "streak")):
            for probe in probes:
                seen = answers(probe, hidden).replace(hidden, missing)
                assert seen == answers(probe, missing), seen
            assert "NOT_FOUND" in answers(probes[0], hidden)
    requests = [("a", {"parameters": {"lora_adapter": "legal"}}), ("b", {"parameters": {"lora_adapter": "lebal"}})]
    got = stream(tenant_router.address, requests, headers=support, expect=2)
    first, second = (e.replace("legal", "lebal") for e in got["errors"])
    assert first == second and "NOT_FOUND" in first


def test_tenant_in_flight_limit(tenant_router: RouterThread, wait_until) -> None:
    limited = {"authorization": "Bearer limited-key"}
    with contextlib.closing(grpcclient.InferenceServerClient(tenant_router.address)) as c:
        done: queue.Queue[tuple[Any, Any]] = queue.Queue()
        c.async_infer(
            "legal", inputs(delay_ms=1500), headers=limited, callback=lambda result, error: done.put((result, error))
        )
        wait_until(lambda: sample(tenant_router, "phlora_router_in_flight", adapter="legal") >= 1, timeout=5)
        message = refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: infer(c, "faq", headers=limited))
        assert "tenant 'limited'" in message
        result, error = done.get(timeout=10)
        assert error is None and result.as_numpy("y")[0].tolist() == shifted(300)
        assert infer(c, "faq", headers=limited) == shifted(400)


def test_tls_front(repo_root: Path, triton: LocalTriton, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    with RouterThread(config(repo_root, triton.grpc_url, tls_cert=cert, tls_key=key)) as running:
        secure = grpcclient.InferenceServerClient(running.address, ssl=True, root_certificates=str(cert))
        with contextlib.closing(secure):
            assert infer(secure, "faq") == shifted(400)


def test_upstream_by_dns(repo_root: Path, triton: LocalTriton) -> None:
    dns = f"localhost:{triton.grpc_port}"
    with routed(RouterConfig(repo_root, upstream_dns=dns, port=0, metrics_port=0, dns_interval=0.5)) as (running, c):
        assert f"127.0.0.1:{triton.grpc_port}" in running.router.pool.replicas
        assert infer(c, "legal") == shifted(300)


def internal_models_look_missing(
    running: RouterThread, c: grpcclient.InferenceServerClient, headers: dict[str, str]
) -> None:
    assert "'stream'" in refused(grpc.StatusCode.NOT_FOUND, lambda: infer(c, "stream", headers=headers))
    got = stream(running.address, [("s", {})], headers=headers, expect=1)  # the stream RPC too
    assert "NOT_FOUND" in got["errors"][0] and "'stream'" in got["errors"][0]
    adapter_on_it = {"parameters": {"lora_adapter": "faq"}}
    refused(grpc.StatusCode.NOT_FOUND, lambda: infer(c, "stream", headers=headers, **adapter_on_it))
    assert not c.is_model_ready("stream", headers=headers)
    refused(grpc.StatusCode.NOT_FOUND, lambda: c.get_model_metadata("stream", headers=headers))
    refused(grpc.StatusCode.NOT_FOUND, lambda: c.get_model_config("stream", headers=headers))
    assert {m.name for m in c.get_model_repository_index(headers=headers).models} == {"ensemble", *ADAPTERS}
    assert infer(c, "ensemble", headers=headers) == X and infer(c, "faq", headers=headers) == shifted(400)


def test_only_exposed_models_are_reachable(repo_root: Path, triton: LocalTriton, tmp_path: Path) -> None:
    """Without --expose-model only the upstream model and the adapters are reachable: internal models
    (here 'stream' stands for preprocessing / tensorrt_llm) look missing, tenants' '*' patterns included."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - {name: all, keys: [all-key], adapters: ['*']}\n")  # base_models: ['*']
    with routed(config(repo_root, triton.grpc_url, expose_models=())) as (running, c):
        internal_models_look_missing(running, c, {})
    with routed(config(repo_root, triton.grpc_url, expose_models=(), tenants=tenants)) as (running, c):
        internal_models_look_missing(running, c, {"authorization": "Bearer all-key"})
    with routed(config(repo_root, triton.grpc_url, expose_models=("str*",))) as (running, c):
        assert c.get_model_metadata("stream").name == "stream"


# many replicas -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair() -> Iterator[list[LocalTriton]]:
    servers: list[LocalTriton] = []
    try:
        servers.append(LocalTriton(STANDIN_REPO).start())
        servers.append(LocalTriton(STANDIN_REPO).start())
        yield servers  # a test may replace an entry (a restarted replica)
    finally:
        for server in servers:
            kill(server)


def kill(server: LocalTriton) -> None:
    """SIGKILL a tritonserver and its backend stubs (a crash; also a quick teardown)."""
    if server._process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server._process.pid, signal.SIGKILL)
    server.stop()


def test_affinity_across_replicas(repo_root: Path, pair: list[LocalTriton], wait_until) -> None:
    addresses = [s.grpc_url for s in pair]
    with routed(config(repo_root, *addresses)) as (running, c):
        used = set()
        for name in ADAPTERS:
            before = served_by(pair)
            for k in range(3):
                assert infer(c, name, [k]) == shifted(OFFSET[name], [k])
            # Triton updates its statistics just after answering: wait until all three are counted.
            wait_until(lambda before=before: sum(served_by(pair).values()) - sum(before.values()) >= 3)
            after = served_by(pair)
            expected = rank_replicas(name, addresses)[0]
            assert {a: after[a] - before[a] for a in addresses} == {a: 3 * (a == expected) for a in addresses}
            used.add(expected)
        # Which replicas the adapters land on follows from the (random) ports; the spread itself is
        # a property of rendezvous hashing, tested on fixed names in the unit tests.
        assert used <= set(addresses)
        sends = sum(sample(running, "phlora_router_replica_weight_sends_total", replica=a) for a in addresses)
        assert sends == len(ADAPTERS)  # weights sent once per adapter, ids alone afterwards


# capacity 0: "PEFT Cache is full"; -1: eviction freed too few pages and the runtime failed its
# pageIds.has_value() assertion (LoraCache::claimPagesWithEvict): back-pressure too, never INTERNAL.
@pytest.mark.parametrize("capacity", [0, -1], ids=["cache-full", "pages-exhausted"])
def test_full_cache_is_back_pressure(triton: LocalTriton, tmp_path: Path, capacity: int) -> None:
    with standin(standin_repo(tmp_path / "full", capacity=capacity)) as full:
        # An adapter whose first replica is the full one (the ranking follows from the random ports).
        upstreams = [full.grpc_url, triton.grpc_url]
        name = next(
            f"spill-{i}" for i in itertools.count() if rank_replicas(f"spill-{i}", upstreams)[0] == full.grpc_url
        )
        root = tmp_path / "adapters"
        add_adapters(root, {name: (700, "float16")})
        with routed(config(root, *upstreams)) as (running, c):
            assert infer(c, name) == shifted(700)  # spilled to the replica with room
        with routed(config(root, full.grpc_url)) as (running, c):
            message = refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: infer(c, name))
            assert "cache is full" in message
            got = stream(running.address, [("s", {"parameters": {"lora_adapter": name}})], expect=1)
            assert "RESOURCE_EXHAUSTED" in got["errors"][0]


def test_bf16_upstream(repo_root: Path, tmp_path: Path) -> None:
    with (
        standin(standin_repo(tmp_path / "bf16", weights_type="TYPE_BF16")) as bf16,
        routed(config(repo_root, bf16.grpc_url)) as (_, c),
    ):
        for name in ADAPTERS:  # fp16, bf16 and fp32 files, all sent as BF16
            assert infer(c, name) == shifted(OFFSET[name])


@contextlib.contextmanager
def stopped(server: LocalTriton) -> Iterator[None]:
    """tritonserver frozen with SIGSTOP (a hung replica: connections open, nothing answered), resumed after."""
    assert server._process is not None
    os.kill(server._process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server._process.pid, signal.SIGCONT)


def test_hung_replica_requests_move_to_another(repo_root: Path, pair: list[LocalTriton], wait_until) -> None:
    addresses = [s.grpc_url for s in pair]
    name = "legal"
    victim = next(s for s in pair if s.grpc_url == rank_replicas(name, addresses)[0])
    with routed(config(repo_root, *addresses, attempt_timeout=1.0, health_interval=2.0)) as (running, c):
        pool = running.router.pool
        assert infer(c, name) == shifted(300)  # weights now on the victim
        wait_until(lambda: pool.replicas[victim.grpc_url].healthy, timeout=10)

        def hung() -> float:
            return sample(running, "phlora_router_upstream_failures_total", replica=victim.grpc_url, reason="hung")

        for _attempt in range(3):
            # On 2 loaded cores a health check of the running victim can time out just before it is
            # stopped, so the request goes elsewhere without meeting the hang: then try again.
            before, downs = hung(), pool.replicas[victim.grpc_url].downs
            with stopped(victim):
                started = time.monotonic()
                assert infer(c, name, client_timeout=20) == shifted(300)
                seconds = time.monotonic() - started
            if hung() == before + 1:  # sent to the victim, found hung, retried elsewhere
                break
            wait_until(lambda: pool.replicas[victim.grpc_url].healthy, timeout=10)
        else:
            raise AssertionError("three requests in a row never reached the stopped victim")
        assert seconds < 8.0  # attempt timeout + probe, not the client's 20 s
        assert pool.replicas[victim.grpc_url].downs > downs  # its probe failed: taken out of rotation
        wait_until(lambda: pool.replicas[victim.grpc_url].healthy, timeout=10)
        with stopped(victim):  # a stream is moved too while nothing was delivered
            got = stream(running.address, [("s", {"parameters": {"lora_adapter": name}})], expect=3)
            assert got["s"] == [shifted(300 + k) for k in range(3)]
        wait_until(lambda: pool.replicas[victim.grpc_url].healthy, timeout=10)
        before = served_by(pair)
        # A slow request on a live replica stays there: it passes the probe, and is not run twice.
        slow = c.infer(name, inputs(delay_ms=2500), client_timeout=20).as_numpy("y")[0].tolist()
        assert slow == shifted(300)
        wait_until(lambda: sum(served_by(pair).values()) > sum(before.values()))
        assert pool.replicas[victim.grpc_url].healthy
        after = served_by(pair)
        assert {a: after[a] - before[a] for a in addresses} == {a: int(a == victim.grpc_url) for a in addresses}


def test_dead_replica_is_skipped_and_readded(repo_root: Path, pair: list[LocalTriton], wait_until) -> None:
    addresses = [s.grpc_url for s in pair]
    with RouterThread(config(repo_root, *addresses)) as running:
        pool = running.router.pool
        with contextlib.closing(grpcclient.InferenceServerClient(running.address)) as c:
            name = "support-a"
            victim_address = rank_replicas(name, addresses)[0]
            victim = next(s for s in pair if s.grpc_url == victim_address)
            assert infer(c, name) == shifted(100)
            kill(victim)
            started = time.monotonic()
            assert infer(c, name) == shifted(100)  # retried on the other replica
            assert time.monotonic() - started < 5.0  # no waiting for a timeout (shared CPUs: generous bound)
            assert not pool.replicas[victim_address].healthy
            assert sample(running, "phlora_router_replica_healthy", replica=victim_address) == 0
            assert c.is_server_ready()
            for _ in range(3):  # served by the survivor while the victim is out
                assert infer(c, name) == shifted(100)
            restarted = LocalTriton(STANDIN_REPO, grpc_port=victim.grpc_port).start()
            pair[pair.index(victim)] = restarted
            wait_until(lambda: pool.replicas[victim_address].healthy, timeout=10)
            before = served_by([restarted])[victim_address]
            assert infer(c, name) == shifted(100)  # back on its first choice, weights resent
            wait_until(lambda: served_by([restarted])[victim_address] == before + 1)  # stats land just after
