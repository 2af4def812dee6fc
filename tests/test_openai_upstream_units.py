"""Units of the router's OpenAI-speaking upstreams: replica order, residency, KServe ↔ OpenAI translation.

The whole path runs against real vLLM servers in ``tests/test_vllm_router.py``; these pin the rules.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from phlora_nim.engines.registry import engine
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.errors import RequestError
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.upstreams.kserve_text import choice_of, completion_body, infer_response
from phlora_nim.router.upstreams.openai_delivery import EngineError, engine_error
from phlora_nim.router.upstreams.openai_pool import OpenAIPool, Residency, base_url, error_text


def _pool(tmp_path: Path, policy: str = "adapter-aware") -> OpenAIPool:
    config = RouterConfig(
        tmp_path, upstreams=("http://10.0.0.1:8000", "http://10.0.0.2:8000"), engine="vllm", routing_policy=policy
    )
    pool = OpenAIPool(config, engine("vllm").openai_facts(), RouterMetrics(), policy=policy)  # type: ignore[arg-type]
    from phlora_nim.router.upstreams.openai_pool import OpenAIReplica

    for address in config.upstreams:
        replica = OpenAIReplica(address, timeout=5)
        replica.healthy = True
        pool.replicas[address] = replica
    return pool


def test_a_replica_holding_the_adapter_comes_first(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    a, b = pool.replicas.values()
    b.resident.add("support", 1, own=True)
    assert pool.ordered("support")[0] is b
    a.resident.add("legal", 2, own=True)
    assert pool.ordered("legal")[0] is a


def test_a_cold_adapter_goes_to_the_least_busy_replica(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    a, b = pool.replicas.values()
    a.in_flight = 3
    assert pool.ordered("cold")[0] is b
    a.in_flight, b.in_flight = 0, 3
    assert pool.ordered("cold")[0] is a


def test_a_busy_holder_spills_to_another_replica(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    a, b = pool.replicas.values()
    a.resident.add("hot", 1, own=True)
    a.in_flight = 8  # far above (1 + ε) × the mean load
    assert pool.ordered("hot")[0] is b


def test_a_replica_whose_lora_slots_are_taken_comes_after_one_with_room(tmp_path: Path) -> None:
    """vLLM batches at most --max-loras adapters at once: a third adapter on a full replica waits."""
    pool = _pool(tmp_path)  # max_loras 0: residency_capacity (8) slots
    a, b = pool.replicas.values()
    a.resident.add("new", 1, own=True)
    for name in [f"x{i}" for i in range(8)]:
        a.resident.add(name, 2, own=True)
        a.running[name] = 1
    a.in_flight = b.in_flight = 8  # equal loads: the slots decide
    assert pool.ordered("new")[0] is b
    assert pool.ordered("x3")[0] is a  # x3 runs on a already: no new slot needed there


def test_round_robin_ignores_residency(tmp_path: Path) -> None:
    pool = _pool(tmp_path, "round-robin")
    a, _ = pool.replicas.values()
    a.resident.add("support", 1, own=True)
    firsts = {pool.ordered("support")[0].address for _ in range(4)}
    assert len(firsts) == 2


def test_residency_unloads_least_recent_own_loads_only(tmp_path: Path) -> None:
    held = Residency()
    held.add("static", None, own=False)  # listed by the replica, not loaded by the router
    held.add("a", 1, own=True)
    held.add("b", 2, own=True)
    held.touch("a")
    held.add("c", 3, own=True)
    assert held.surplus(3, keep="c") == ["b"]  # "static" is not ours to unload; "a" was used after "b"
    assert held.surplus(2, keep="c") == ["b", "a"]
    assert held.surplus(10, keep="c") == []


def test_served_path_is_the_store_as_replicas_see_it(tmp_path: Path) -> None:
    from phlora_nim.repository.registry import AdapterEntry

    entry = AdapterEntry(
        name="support", task_id=7, digest="d", ranks={}, modules=[], dtype="float32", sources={}, created=""
    )
    pool = _pool(tmp_path)
    assert pool.served_path(entry) == str(tmp_path.resolve() / "tensorrt_llm" / "adapters" / "support")
    config = RouterConfig(tmp_path, upstreams=("h:1",), engine="vllm", adapter_store=Path("/models/store"))
    other = OpenAIPool(config, engine("vllm").openai_facts(), RouterMetrics())
    assert other.served_path(entry) == "/models/store/support"


def test_upstream_addresses_and_engine_error_texts() -> None:
    import httpx

    assert base_url("10.0.0.1:8000") == "http://10.0.0.1:8000" and base_url("https://x:1/") == "https://x:1"
    vllm = httpx.Response(400, json={"error": {"message": "LoRA rank 32 is greater than max_lora_rank 16."}})
    sglang = httpx.Response(400, json={"success": False, "error_message": "not loaded"})
    assert error_text(vllm).startswith("LoRA rank 32") and error_text(sglang) == "not loaded"
    error = engine_error(500, {"error": {"message": "boom", "type": "InternalServerError"}}, "x")
    assert isinstance(error, EngineError) and error.status == 502 and error.code == grpc.StatusCode.INTERNAL
    assert engine_error(404, {"message": "The model `x` does not exist."}, "x").code == grpc.StatusCode.NOT_FOUND


def _request(**inputs: tuple[str, list]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="support")
    for name, (datatype, values) in inputs.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        if datatype == "BYTES":
            tensor.contents.bytes_contents.extend(values)
        elif datatype == "INT32":
            tensor.contents.int_contents.extend(values)
        elif datatype == "FP32":
            tensor.contents.fp32_contents.extend(values)
        elif datatype == "BOOL":
            tensor.contents.bool_contents.extend(values)
    return request


def test_kserve_inputs_become_an_openai_completion() -> None:
    body, ids = completion_body(
        _request(
            text_input=("BYTES", [b"Hello"]),
            max_tokens=("INT32", [16]),
            temperature=("FP32", [0.0]),
            stop_words=("BYTES", [b"\n", b""]),
            ignore_eos=("BOOL", [True]),
        )
    )
    assert body == {"prompt": "Hello", "max_tokens": 16, "temperature": 0.0, "stop": ["\n"], "ignore_eos": True}
    assert not ids
    body, ids = completion_body(_request(input_ids=("INT32", [1, 2, 3])))
    assert body == {"prompt": [1, 2, 3]} and ids


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ({}, "missing input"),
        ({"lora_task_id": ("INT32", [1])}, "router's to set"),
        ({"text_input": ("BYTES", [b"a", b"b"])}, "one prompt per request"),
        ({"text_input": ("BYTES", [b"\xff"])}, "not UTF-8"),
        ({"text_input": ("BYTES", [b"a"]), "beam_width": ("INT32", [2])}, "is not taken"),
    ],
)
def test_kserve_inputs_refused_clearly(inputs: dict, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        completion_body(_request(**inputs))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.message


def test_an_openai_answer_becomes_a_kserve_response() -> None:
    text, ids = choice_of({"choices": [{"text": "hi", "token_ids": [5, 6]}]})
    response = infer_response(service_pb2.ModelInferRequest(model_name="m", id="7"), text, ids)
    assert [o.name for o in response.outputs] == ["text_output", "output_ids"] and response.id == "7"
    assert np.frombuffer(response.raw_output_contents[1], dtype="<i4").tolist() == [5, 6]
    assert response.raw_output_contents[0] == b"\x02\x00\x00\x00hi"
