"""Router parts that need no server: routing, request rewriting, tenants, adapter tensors, options."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.errors import RequestError
from phlora_nim.router.lru import LruBytes, LruSet
from phlora_nim.router.rewrite import (
    LoraTensors,
    UpstreamRequest,
    batch_size,
    check_request,
    make_raw,
    retarget,
    retryable,
    select,
)
from phlora_nim.router.routing import choose_replicas, load_bound, rank_replicas
from phlora_nim.router.tenants import key_digest, load_tenants, parse_tenants
from phlora_nim.router.weights import AdapterFilesError, WeightStore
from phlora_nim.testing.standin import add_adapters

REPLICAS = [f"10.0.0.{i}:8001" for i in range(1, 6)]


# routing -------------------------------------------------------------------------------------
def test_rendezvous_is_stable_and_spreads() -> None:
    firsts = Counter(rank_replicas(f"adapter-{i}", REPLICAS)[0] for i in range(500))
    assert set(firsts) == set(REPLICAS)
    assert min(firsts.values()) > 500 / len(REPLICAS) / 2  # no replica starved
    assert rank_replicas("a", REPLICAS) == rank_replicas("a", list(reversed(REPLICAS)))


def test_rendezvous_moves_only_the_adapters_of_a_removed_replica() -> None:
    keys = [f"adapter-{i}" for i in range(300)]
    before = {k: rank_replicas(k, REPLICAS)[0] for k in keys}
    gone = REPLICAS[2]
    after = {k: rank_replicas(k, [r for r in REPLICAS if r != gone])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)


def test_bounded_load_spills_to_the_next_choice() -> None:
    first, second = rank_replicas("hot", REPLICAS)[:2]
    idle = dict.fromkeys(REPLICAS, 0)
    assert choose_replicas("hot", idle, spill_factor=0.25)[0] == first
    busy = dict(idle, **{first: 4})  # mean (4+1)/5 = 1, bound ceil(1.25) = 2
    assert load_bound(busy, 0.25) == 2
    order = choose_replicas("hot", busy, spill_factor=0.25)
    assert order[0] == second and order[-1] == first and sorted(order) == sorted(REPLICAS)
    even = dict.fromkeys(REPLICAS, 1)  # mean (5+1)/5, bound ceil(1.5) = 2: no spill
    assert choose_replicas("hot", even, spill_factor=0.25)[0] == first
    assert choose_replicas("hot", dict(idle, **{first: 1}), spill_factor=0.25)[0] == second  # bound 1
    assert choose_replicas("hot", dict(idle, **{first: 1}), spill_factor=4.0)[0] == first  # bound 2


def test_bounded_load_keeps_every_replica_under_the_bound() -> None:
    loads = dict.fromkeys(REPLICAS, 0)
    for _ in range(40):  # one hot adapter, requests never finishing
        chosen = choose_replicas("hot", loads, spill_factor=0.25)[0]
        assert loads[chosen] + 1 <= load_bound(loads, 0.25)
        loads[chosen] += 1
    assert max(loads.values()) <= np.ceil(1.25 * 40 / 5)


def test_base_requests_go_to_the_least_loaded() -> None:
    loads = {"a:1": 3, "b:1": 0, "c:1": 2}
    assert choose_replicas(None, loads, spill_factor=0.25)[0] == "b:1"
    firsts = {choose_replicas(None, dict.fromkeys(loads, 0), spill_factor=0.25)[0] for _ in range(9)}
    assert firsts == set(loads)  # ties rotate
    assert choose_replicas("x", {}, spill_factor=0.25) == []


def test_lru_containers() -> None:
    seen: LruSet[int] = LruSet(2)
    seen.add(1)
    seen.add(2)
    assert seen.touch(1)
    seen.add(3)
    assert list(seen) == [1, 3]
    cache: LruBytes[str, bytes] = LruBytes(10, len)
    cache.put("a", b"12345")
    cache.put("b", b"123456")
    assert "a" not in cache and cache.get("b") == b"123456" and cache.bytes == 6
    cache.put("huge", b"x" * 11)
    assert "huge" not in cache


# request rewriting ---------------------------------------------------------------------------
def _request(*, raw: bool, model: str = "ensemble") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="7")
    x = request.inputs.add(name="x", datatype="INT32", shape=[1, 3])
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    if raw:
        request.raw_input_contents.extend([np.array([1, 2, 3], "<i4").tobytes(), struct.pack("<I", 2) + b"hi"])
    else:
        x.contents.int_contents.extend([1, 2, 3])
        text.contents.bytes_contents.append(b"hi")
    return request


TENSORS = LoraTensors(
    task_id=42,
    datatype="FP16",
    weights=np.ones((1, 2, 4), "<f2").tobytes(),
    weights_shape=(1, 2, 4),
    config=np.zeros((1, 2, 3), "<i4").tobytes(),
    config_shape=(1, 2, 3),
)


def _sent(
    upstream: UpstreamRequest, task_id: int, tensors: LoraTensors | None = None, *, batch: int = 1
) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest.FromString(upstream.with_lora(task_id, tensors, batch=batch))


@pytest.mark.parametrize("raw", [True, False])
def test_task_id_follows_the_request_encoding(raw: bool) -> None:
    request = _sent(UpstreamRequest(_request(raw=raw)), 42)
    assert request.model_name == "ensemble" and request.id == "7"
    assert [t.name for t in request.inputs] == ["x", "text_input", "lora_task_id"]
    tid = request.inputs[2]
    assert tid.datatype == "UINT64" and list(tid.shape) == [1, 1]
    if raw:
        assert len(request.raw_input_contents) == 3 and request.raw_input_contents[2] == struct.pack("<Q", 42)
    else:
        assert not request.raw_input_contents and list(tid.contents.uint64_contents) == [42]


def test_weights_turn_a_contents_request_into_raw_bytes() -> None:
    request = _sent(UpstreamRequest(_request(raw=False)), 42, TENSORS)
    assert [t.name for t in request.inputs] == ["x", "text_input", "lora_task_id", "lora_weights", "lora_config"]
    assert all(not t.HasField("contents") for t in request.inputs)
    raw = request.raw_input_contents
    assert len(raw) == 5
    assert np.frombuffer(raw[0], "<i4").tolist() == [1, 2, 3]
    assert raw[1] == struct.pack("<I", 2) + b"hi"
    assert raw[3] == TENSORS.weights and list(request.inputs[3].shape) == [1, 2, 4]
    assert request.inputs[3].datatype == "FP16" and request.inputs[4].datatype == "INT32"
    assert _request(raw=True).raw_input_contents[:2] == raw[:2]


@pytest.mark.parametrize("raw", [True, False])
def test_attempts_leave_the_request_as_it_came(raw: bool) -> None:
    """An id-only attempt, a resend with weights, then the id alone again: each is built from the
    untouched request (never stacked), and the request is serialized once for all of them."""
    request = _request(raw=raw)
    before = request.SerializeToString()
    upstream = UpstreamRequest(request)
    assert [t.name for t in _sent(upstream, 42).inputs] == ["x", "text_input", "lora_task_id"]
    resend = _sent(upstream, 42, TENSORS)
    assert [t.name for t in resend.inputs] == ["x", "text_input", "lora_task_id", "lora_weights", "lora_config"]
    assert len(resend.raw_input_contents) == 5
    again = _sent(upstream, 42)
    assert [t.name for t in again.inputs] == ["x", "text_input", "lora_task_id"]
    assert len(again.raw_input_contents) == (3 if raw else 0)
    assert request.SerializeToString() == before  # the client's request is not rewritten
    assert upstream.plain() is upstream.plain()  # serialized once, shared by every attempt
    with pytest.raises(ValueError, match="tensors of task 42 appended to task 7"):
        upstream.with_lora(7, TENSORS)


@pytest.mark.parametrize(
    ("shapes", "max_batch", "expected"),
    [
        ([[2, 3], [2, 1]], 8, 2),
        ([[5, 3]], 0, 1),  # a model without batching: dim 0 is not a batch
        ([[], []], 8, 1),
        ([[2, 3], [3, 1]], 8, "inputs disagree on the batch size \\(dim 0\\): 'x' 2, 'text_input' 3"),
        ([[0, 3], [0, 1]], 8, "must be 1 to 8 for 'ensemble', found 0"),
        ([[2**40, 1], [2**40, 1]], 8, "must be 1 to 8 for 'ensemble', found 1099511627776"),
    ],
)
def test_batch_size_is_dim_0_of_every_input(shapes: list[list[int]], max_batch: int, expected: int | str) -> None:
    request = _request(raw=True)
    for tensor, shape in zip(request.inputs, shapes, strict=False):
        del tensor.shape[:]
        tensor.shape.extend(shape)
    if isinstance(expected, int):
        assert batch_size(request, max_batch_size=max_batch, model="ensemble") == expected
        assert len(_sent(UpstreamRequest(request), 42, TENSORS, batch=expected).raw_input_contents[3]) == (
            expected * len(TENSORS.weights)
        )
        return
    with pytest.raises(RequestError, match=expected) as info:
        batch_size(request, max_batch_size=max_batch, model="ensemble")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [(None, None, True), ("int64_param", 0, True), ("string_param", "", True), ("int64_param", 5, False),
     ("uint64_param", 5, False), ("string_param", "chat-1", False)],
)  # fmt: skip
def test_only_requests_outside_a_sequence_are_retried(field: str | None, value: object, expected: bool) -> None:
    request = _request(raw=True)
    if field is not None:
        setattr(request.parameters["sequence_id"], field, value)
    assert retryable(request) is expected


@pytest.mark.parametrize("raw", [True, False])
def test_received_bytes_are_forwarded_as_they_are(raw: bool) -> None:
    """A base-model request goes on as the very bytes received; an adapter's gets the upstream model's
    name appended (the last value wins) and its LoRA inputs, nothing re-serialized."""
    request = _request(raw=raw, model="support")
    wire = request.SerializeToString()
    assert UpstreamRequest(request, wire=wire).plain() is wire
    upstream = UpstreamRequest(request, wire=wire, model="ensemble")
    assert upstream.plain().startswith(wire)
    sent = service_pb2.ModelInferRequest.FromString(upstream.plain())
    expected = service_pb2.ModelInferRequest.FromString(wire)
    expected.model_name = "ensemble"
    assert sent == expected and request.model_name == "support"
    for tensors in (None, TENSORS):
        with_lora = _sent(upstream, 42, tensors)
        assert with_lora.model_name == "ensemble" and with_lora.id == "7"
        assert [t.name for t in with_lora.inputs][:3] == ["x", "text_input", "lora_task_id"]


def test_make_raw_covers_every_typed_field() -> None:
    request = service_pb2.ModelInferRequest()
    cases = {
        "BOOL": ("bool_contents", [True, False], np.bool_),
        "INT8": ("int_contents", [-1, 2], np.int8),
        "INT64": ("int64_contents", [-(2**40), 5], np.int64),
        "UINT16": ("uint_contents", [65535, 1], np.uint16),
        "UINT64": ("uint64_contents", [2**63, 1], np.uint64),
        "FP32": ("fp32_contents", [0.5, -2.0], np.float32),
        "FP64": ("fp64_contents", [0.1, 3.0], np.float64),
    }
    for datatype, (field, values, _) in cases.items():
        tensor = request.inputs.add(name=datatype, datatype=datatype, shape=[2])
        getattr(tensor.contents, field).extend(values)
    make_raw(request)
    for raw, (_, values, dtype) in zip(request.raw_input_contents, cases.values(), strict=True):
        assert np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).tolist() == np.array(values, dtype).tolist()


def test_selection_order_and_retarget() -> None:
    adapters = {"sup", "faq"}
    request = _request(raw=True, model="sup")
    request.parameters["lora_adapter"].string_param = "faq"
    chosen = select(request, adapters=adapters, metadata_adapter="other", upstream_model="ensemble")
    assert (chosen.adapter, chosen.source, chosen.model) == ("sup", "model_name", "ensemble")
    request.model_name = "ensemble"
    chosen = select(request, adapters=adapters, metadata_adapter="other", upstream_model="ensemble")
    assert (chosen.adapter, chosen.source) == ("faq", "parameter")
    del request.parameters["lora_adapter"]
    chosen = select(request, adapters=adapters, metadata_adapter="other", upstream_model="ensemble")
    assert (chosen.adapter, chosen.source) == ("other", "metadata")
    chosen = select(request, adapters=adapters, metadata_adapter=None, upstream_model="ensemble")
    assert (chosen.adapter, chosen.model) == (None, "ensemble")
    request.parameters["lora_adapter"].string_param = "faq"
    request.parameters["priority"].int64_param = 3
    out = retarget(request, "stream")
    assert out.model_name == "stream" and "lora_adapter" not in out.parameters and "priority" in out.parameters


def _malformed(kind: str) -> service_pb2.ModelInferRequest:
    request = _request(raw=True)
    if kind == "task_id":
        request.inputs.add(name="lora_task_id", datatype="UINT64", shape=[1, 1])
        request.raw_input_contents.append(struct.pack("<Q", 1))
    elif kind == "weights":
        request.inputs.add(name="lora_weights", datatype="FP16", shape=[1, 1, 1])
        request.raw_input_contents.append(b"\0\0")
    elif kind == "raw_count":
        request.raw_input_contents.append(b"extra")
    elif kind == "shm":
        request.inputs[0].parameters["shared_memory_region"].string_param = "r0"
    return request


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("task_id", "'lora_task_id' is set by the router"),
        ("weights", "'lora_weights' is set by the router"),
        ("raw_count", "raw_input_contents holds 3 entries for 2 inputs"),
        ("shm", "shared memory"),
    ],
)
def test_malformed_requests_are_invalid_arguments(kind: str, match: str) -> None:
    with pytest.raises(RequestError, match=match) as info:
        check_request(_malformed(kind))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("param", ["int64_param", "bool_param", "empty"])
def test_adapter_parameter_must_be_a_string(param: str) -> None:
    request = _request(raw=True)
    if param == "empty":
        request.parameters["lora_adapter"].string_param = ""
    else:
        setattr(request.parameters["lora_adapter"], param, 1)
    with pytest.raises(RequestError, match="must be a non-empty string") as info:
        select(request, adapters=set(), metadata_adapter=None, upstream_model="ensemble")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# tenants -------------------------------------------------------------------------------------
GOOD = """
tenants:
  - name: support
    keys: ["sha256:{digest}", "plain-key"]
    adapters: ["support-*"]
    max_in_flight: 2
  - name: ops
    keys: ["ops-key"]
    adapters: ["*"]
    base_models: []
"""


def test_tenants_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(GOOD.format(digest=key_digest("s3cret")))
    table = load_tenants(path)
    support = table.authenticate("Bearer s3cret")
    assert support is not None and support.name == "support" and support.max_in_flight == 2
    assert table.authenticate("bearer plain-key") is support
    assert support.allows_adapter("support-billing") and not support.allows_adapter("legal")
    assert support.allows_base_model("ensemble")
    ops = table.authenticate("Bearer ops-key")
    assert ops is not None and ops.allows_adapter("legal") and not ops.allows_base_model("ensemble")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        assert table.authenticate(header) is None


BAD_TENANTS = [
    ("tenants: [", "not valid YAML"),
    ("- a\n- b\n", "a top-level mapping with a non-empty list `tenants:`"),
    ("tenants: []\n", "a top-level mapping with a non-empty list"),
    ("tenants:\n  - 3\n", r"tenants\[0\]: invalid tenants file; expected a mapping"),
    ("tenants:\n  - keys: [k]\n", r"tenants\[0\].name: invalid tenants file; expected a non-empty string"),
    ("tenants:\n  - name: a\n", r"tenant 'a'.keys: .*expected a non-empty list of keys"),
    ("tenants:\n  - name: a\n    keys: [sha256:abc]\n", "sha256: followed by 64 hex digits"),
    ("tenants:\n  - name: a\n    keys: [k]\n    adapters: support-*\n", r"tenant 'a'.adapters: .*glob patterns"),
    ("tenants:\n  - name: a\n    keys: [k]\n    max_in_flight: 0\n", r"max_in_flight: .*a positive integer; found 0"),
    ("tenants:\n  - name: a\n    keys: [k]\n    adapter: [x]\n", r"unknown \['adapter'\]"),
    ("tenants:\n  - {name: a, keys: [k]}\n  - {name: a, keys: [j]}\n", "a name used once"),
    ("tenants:\n  - {name: a, keys: [k]}\n  - {name: b, keys: [k]}\n", "a key also held by tenant 'a'"),
]


@pytest.mark.parametrize(("text", "match"), BAD_TENANTS)
def test_bad_tenants_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_tenants(path)
    assert str(path) in str(info.value)


def test_tenants_problems_are_reported_together() -> None:
    data = {"tenants": [{"name": "a", "keys": []}, {"name": "b", "keys": ["k"], "max_in_flight": "x"}]}
    with pytest.raises(InputError, match=r"\(2 problems\)"):
        parse_tenants(data, where="t.yaml")


def test_missing_tenants_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the tenants file"):
        load_tenants(tmp_path / "nope.yaml")


# adapter tensors -----------------------------------------------------------------------------
@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP32"])
def test_weights_are_converted_to_the_upstream_dtype(tmp_path: Path, stored: str, datatype: str) -> None:
    entry = add_adapters(tmp_path, {"a": (300, stored)})["a"]
    store = WeightStore(tmp_path, max_bytes=1 << 20)
    tensors = store.get(entry, datatype)
    np_type = {"FP16": np.float16, "BF16": ml_dtypes.bfloat16, "FP32": np.float32}[datatype]
    weights = np.frombuffer(tensors.weights, np_type).reshape(tensors.weights_shape)
    assert tensors.weights_shape == (1, 2, 8) and tensors.config_shape == (1, 2, 3)
    assert float(weights.astype(np.float64).sum()) == 300.0
    assert store.get(entry, datatype) is tensors and store.loads == 1


def test_broken_adapter_files_are_told_from_missing_ones(tmp_path: Path) -> None:
    entry = add_adapters(tmp_path, {"a": (100, "float16")})["a"]
    folder = tmp_path / "tensorrt_llm" / "lora_prefetch" / str(entry.task_id)
    np.save(folder / "model.lora_config.npy", np.zeros((1, 3, 3), np.int32))
    with pytest.raises(
        AdapterFilesError, match="Expected dim1 lora_weights and lora_keys to have the same size"
    ) as info:
        WeightStore(tmp_path, max_bytes=1 << 20).get(entry, "FP16")
    assert not info.value.missing and str(folder) in info.value.detail  # the path: for the log
    (folder / "model.lora_weights.npy").unlink()
    with pytest.raises(AdapterFilesError, match="TensorRT-LLM LoRA file missing") as info:
        WeightStore(tmp_path, max_bytes=1 << 20).get(entry, "FP16")
    assert info.value.missing


def test_fp32_weights_overflowing_fp16_are_refused(tmp_path: Path) -> None:
    entry = add_adapters(tmp_path, {"a": (100, "float32")})["a"]
    folder = tmp_path / "tensorrt_llm" / "lora_prefetch" / str(entry.task_id)
    np.save(folder / "model.lora_weights.npy", np.full((1, 2, 8), 1e6, np.float32))
    with pytest.raises(AdapterFilesError, match="overflow float16"):
        WeightStore(tmp_path, max_bytes=1 << 20).get(entry, "FP16")


# options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give exactly one way to find the Triton replicas.*found neither"),
        ({"upstreams": ("a:1",), "upstream_dns": "b:2"}, "found both"),
        ({"upstreams": ("triton",)}, "--upstream: not a host:port address"),
        ({"upstream_dns": "triton:99999"}, "--upstream-dns: not a host:port"),
        ({"upstreams": ("a:1",), "spill_factor": -1.0}, "--spill-factor"),
        ({"upstreams": ("a:1",), "health_interval": 0}, "--health-interval: must be positive"),
        ({"upstreams": ("a:1",), "attempt_timeout": -1.0}, "--attempt-timeout: must be positive"),
        ({"upstreams": ("a:1",), "tls_cert": Path("/nonexistent.pem")}, "TLS needs a certificate and its key"),
        ({"upstreams": ("a:1",), "tenants": Path("/nonexistent.yaml")}, "--tenants: file not found"),
    ],
)
def test_router_options_are_checked(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(OptionError, match=match):
        RouterConfig(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_a_readiness_answer_older_than_a_mark_down_does_not_put_the_replica_back(tmp_path: Path) -> None:
    """A health check that started before the replica was taken out of rotation must not undo that."""
    import asyncio

    from phlora_nim.router.metrics import RouterMetrics
    from phlora_nim.router.replicas import ReplicaPool

    class SlowReadyStub:
        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def ServerReady(self, request: object, timeout: float) -> service_pb2.ServerReadyResponse:
            await self.release.wait()
            return service_pb2.ServerReadyResponse(ready=True)

    async def scenario() -> bool:
        pool = ReplicaPool(RouterConfig(tmp_path, upstreams=("127.0.0.1:1",)), RouterMetrics())
        await pool.refresh_members()  # nothing listens on port 1: the first check fails at once
        replica = pool.replicas["127.0.0.1:1"]
        replica.stub = stub = SlowReadyStub()  # type: ignore[assignment]
        replica.healthy = True
        check = asyncio.ensure_future(pool.check(replica))
        await asyncio.sleep(0)  # the check is waiting for its answer …
        pool.mark_down(replica, "no answer in 1 s")  # … when a call finds the replica hung
        stub.release.set()
        await check
        healthy = replica.healthy
        await pool.stop()
        return healthy

    assert asyncio.run(scenario()) is False


# The runtime's own texts (TensorRT-LLM cpp/tensorrt_llm/runtime/loraCache.cpp
# LoraCache::claimPagesWithEvict, batch_manager/peftCacheManager.cpp PeftCacheManager::addRequestPeft,
# common/assert.h TLLM_CHECK), as the tensorrt_llm backend puts them in an error response.
@pytest.mark.parametrize(
    "text, full",
    [
        ("[TensorRT-LLM][ERROR] PEFT Cache is full. Could not store taskId=77", True),
        ("Cache is full. There are no done tasks to evict", True),
        (
            "[TensorRT-LLM][ERROR] Assertion failed: pageIds.has_value() "
            "(/src/tensorrt_llm/cpp/tensorrt_llm/runtime/loraCache.cpp:318)",
            True,
        ),
        ("[TensorRT-LLM][ERROR] Assertion failed: Expected layerId to be in the range", False),
        ("LoRA task 77 not found in cache. Please send LoRA weights with request", False),
    ],
)
def test_every_cache_full_text_is_back_pressure(text: str, full: bool) -> None:
    from phlora_nim.engines.trtllm_legacy.contract import FULL, MISS, is_cache_full
    from phlora_nim.router.delivery import _CacheFull, _Missed, _verdict

    assert is_cache_full(text) is full
    # Another replica, else RESOURCE_EXHAUSTED; never INTERNAL. The id-only call (expecting MISS)
    # is back-pressure too: loading a host-cached adapter into a full GPU cache fails the same way.
    assert _verdict(text, FULL) is (_CacheFull if full else None)
    missed = _Missed if "not found in cache" in text else None
    assert _verdict(text, MISS) is (_CacheFull if full else missed)
    assert _verdict(text, "") is None
