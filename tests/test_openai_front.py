"""The router's OpenAI-compatible HTTP front, driven by the real ``openai`` SDK (sync, async, streaming).

Real fine-tunes → convert → the real tritonserver (CPU reference ``tensorrt_llm``) → the router with
``http_port`` → ``openai.OpenAI`` / ``openai.AsyncOpenAI``. Answers are compared with PEFT's greedy
decoding and with the same request through the router's gRPC front.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient

from phlora_nim.demo.toy_models import greedy_continuation
from phlora_nim.repository.layout import adapter_store_dir
from phlora_nim.router import RouterConfig, RouterThread
from phlora_nim.router.config import ANY_FREE_PORT
from phlora_nim.router.openai.tokenizer import TextTokenizer
from phlora_nim.triton.launcher import LocalTriton

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
PROMPT = "the red cat"
KEYS = {"alpha": "key-alpha", "beta": "key-beta", "tiny": "key-tiny"}
# legal's fine-tune ships its own chat template; the base has another one (support uses it)
LEGAL_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}the{% endif %}"
BASE_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _tenants(path: Path) -> Path:
    path.write_text(
        "tenants:\n"
        f"  - {{name: alpha, keys: [{KEYS['alpha']}], adapters: [support, spare]}}\n"
        f"  - {{name: beta, keys: [{KEYS['beta']}], adapters: [legal]}}\n"
        f"  - {{name: tiny, keys: [{KEYS['tiny']}], adapters: [support], max_in_flight: 1}}\n"
    )
    return path


@pytest.fixture(scope="module")
def checkpoints(llama_finetunes, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Copies of the session's toy Llama and fine-tunes, with chat templates: the base's, and legal's own."""
    import shutil

    root = tmp_path_factory.mktemp("openai-ckpt")
    base, fts = llama_finetunes
    base = Path(shutil.copytree(base, root / "base"))
    fts = [Path(shutil.copytree(ft, root / ft.name)) for ft in fts]
    (base / "chat_template.jinja").write_text(BASE_TEMPLATE)
    (fts[1] / "chat_template.jinja").write_text(LEGAL_TEMPLATE)
    return base, fts


def convert_repo(checkpoints: tuple[Path, list[Path]], repo: Path, names: tuple[str, ...], **settings: Any) -> Path:
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings

    base, fts = checkpoints
    job = ConvertJob(
        base=base,
        finetuned=tuple(fts[: len(names)]),
        names=names,
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=4)),
        settings=RepositorySettings(backend="trtllm-legacy-cpu", base=str(base), dtype="float32", **settings),
    )
    convert(job)
    return repo


@pytest.fixture(scope="module")
def stack(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("openai")
    base = checkpoints[0]
    repo = convert_repo(checkpoints, root / "repo", ("support", "legal", "spare"))
    with LocalTriton(repo) as triton:
        config = RouterConfig(
            repo,
            upstreams=(triton.grpc_url,),
            port=0,
            metrics_port=0,
            http_port=ANY_FREE_PORT,
            tenants=_tenants(root / "tenants.yaml"),
            registry_interval=0.2,
        )
        with RouterThread(config) as router:
            yield {"base": base, "repo": repo, "router": router, "url": router.http_url}


def client(stack: dict[str, Any], tenant: str = "alpha", **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"], api_key=KEYS[tenant], max_retries=0, timeout=60, **kwargs)


def expected_tokens(stack: dict[str, Any], model: str, prompt: list[int], n: int) -> list[int]:
    adapter = None if model == "base" else adapter_store_dir(stack["repo"], model)
    return greedy_continuation(stack["base"], prompt, n, adapter=adapter)


def grpc_text(stack: dict[str, Any], model: str, tokens: int, key: str) -> str:
    with grpcclient.InferenceServerClient(stack["router"].address) as c:
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
        limit = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        limit.set_data_from_numpy(np.array([[tokens]], dtype=np.int32))
        result = c.infer(model, [text, limit], headers={"authorization": f"Bearer {key}"}, client_timeout=60)
        return result.as_numpy("text_output").reshape(-1)[0].decode()


# the same tokens as PEFT and as the gRPC front ------------------------------------------------
@pytest.mark.parametrize(("model", "tenant"), [("support", "alpha"), ("legal", "beta"), ("base", "alpha")])
def test_completion_tokens_equal_peft_and_grpc(stack: dict[str, Any], model: str, tenant: str) -> None:
    tok = TextTokenizer.load(stack["base"])
    prompt = tok.encode(PROMPT)
    out = client(stack, tenant).completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = out.choices[0]
    want = expected_tokens(stack, model, prompt, 6)
    assert choice.token_ids == want  # type: ignore[attr-defined]
    assert choice.prompt_token_ids == prompt  # type: ignore[attr-defined]
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(want))
    assert choice.finish_reason == ("length" if len(want) == 6 else "stop")
    grpc_model = "ensemble" if model == "base" else model
    assert choice.text == grpc_text(stack, grpc_model, 6, KEYS[tenant]) == tok.decode(want)


def test_chat_uses_the_adapters_own_template_else_the_base_one(stack: dict[str, Any]) -> None:
    tok = TextTokenizer.load(stack["base"])
    messages = [{"role": "user", "content": PROMPT}]
    for model, tenant, template in (("legal", "beta", LEGAL_TEMPLATE), ("support", "alpha", BASE_TEMPLATE)):
        rendered = tok.encode(tok.render_chat(messages, template=template))
        out = client(stack, tenant).chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=5,
            temperature=0,  # type: ignore[arg-type]
        )
        want = expected_tokens(stack, model, rendered, 5)
        assert out.usage is not None and out.usage.prompt_tokens == len(rendered)
        assert out.choices[0].message.content == tok.decode(want)
        assert out.choices[0].message.role == "assistant"


def test_stop_strings_cut_exactly_and_count_tokens_to_the_stop(stack: dict[str, Any]) -> None:
    tok = TextTokenizer.load(stack["base"])
    want = expected_tokens(stack, "support", tok.encode(PROMPT), 8)
    words = tok.decode(want).split(" ")
    stop = words[2]
    out = client(stack).completions.create(
        model="support", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop, "zzz"]
    )
    assert out.choices[0].text == " ".join(words[:2]) + " "
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_streaming_matches_the_whole_answer_and_ends_with_usage_and_done(stack: dict[str, Any]) -> None:
    c = client(stack)
    whole = c.completions.create(model="support", prompt=PROMPT, max_tokens=6, temperature=0)
    chunks = list(
        c.completions.create(
            model="support",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    chat = list(
        c.chat.completions.create(
            model="support", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0, stream=True
        )
    )
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason is not None
    with httpx.stream(
        "POST",
        f"{stack['url']}/completions",
        headers={"Authorization": f"Bearer {KEYS['alpha']}"},
        json={"model": "support", "prompt": PROMPT, "max_tokens": 3, "stream": True},
        timeout=60,
    ) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_async_client_fan_out_and_seeds(stack: dict[str, Any]) -> None:
    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=stack["url"], api_key=KEYS["alpha"], max_retries=0) as c:
            asks = [
                c.completions.create(model="support", prompt=PROMPT, max_tokens=5, n=3, seed=7, temperature=1.0)
                for _ in range(2)
            ]
            asks.append(c.completions.create(model="support", prompt=[PROMPT, "a dog"], max_tokens=4, temperature=0))
            return await asyncio.gather(*asks)

    first, again, batch = asyncio.run(run())
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices}) > 1  # seed + index: the choices differ
    assert first.usage.completion_tokens == sum(len(c.text.split()) for c in first.choices)  # one word a token
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text != batch.choices[1].text


# models, tenants, registry --------------------------------------------------------------------
def test_models_per_tenant_with_adapter_cards(stack: dict[str, Any]) -> None:
    alpha = {m.id: m for m in client(stack, "alpha").models.list()}
    beta = {m.id: m for m in client(stack, "beta").models.list()}
    assert list(alpha) == ["base", "spare", "support"] and list(beta) == ["base", "legal"]
    card = alpha["support"].model_dump()
    assert card["parent"] == "base" and card["root"] == "support" and alpha["base"].model_dump()["parent"] is None
    info = card["phlora"]
    assert info["rank"] == 4 and info["parameters"] > 0 and 0 < info["energy_kept"] <= 1
    assert info["source_finetune"] == "ft-0" and info["registered"]  # a folder name, never a server path
    with pytest.raises(openai.NotFoundError) as other:
        client(stack, "alpha").models.retrieve("legal")
    with pytest.raises(openai.NotFoundError) as missing:
        client(stack, "alpha").completions.create(model="no-such", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError) as hidden:
        client(stack, "alpha").completions.create(model="legal", prompt=PROMPT)
    assert hidden.value.body["message"].replace("legal", "X") == missing.value.body["message"].replace("no-such", "X")
    assert other.value.status_code == 404


def test_removed_adapter_disappears_without_restart(stack: dict[str, Any], wait_until) -> None:
    from phlora_nim.jobs.maintenance import remove_adapter

    c = client(stack)
    assert c.completions.create(model="spare", prompt=PROMPT, max_tokens=2, temperature=0).choices
    remove_adapter(stack["repo"], "spare", grace=60)
    wait_until(lambda: "spare" not in [m.id for m in c.models.list()])
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="spare", prompt=PROMPT, max_tokens=2)


# refusals: one clear 4xx each, nobody else affected -------------------------------------------
BAD: list[tuple[str, Any, int, str]] = [
    ("malformed JSON", b'{"model": "support", "prompt": ', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("wrong type", {"model": "support", "prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens"),
    ("bool for int", {"model": "support", "prompt": PROMPT, "n": True}, 400, "^n: "),
    ("huge n", {"model": "support", "prompt": PROMPT, "n": 10_000}, 400, "choices"),
    ("huge max_tokens", {"model": "support", "prompt": PROMPT, "max_tokens": 10**9}, 400, "context of 128"),
    ("zero max_tokens", {"model": "support", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("unknown field", {"model": "support", "prompt": PROMPT, "best_friend": 1}, 400, "unknown field 'best_friend'"),
    ("logprobs", {"model": "support", "prompt": PROMPT, "logprobs": 1}, 400, "'logprobs' is not supported"),
    ("penalty", {"model": "support", "prompt": PROMPT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("prompt too long", {"model": "support", "prompt": "the " * 200}, 400, "maximum input length"),
    ("empty prompt", {"model": "support", "prompt": ""}, 400, "no tokens"),
    ("token out of vocabulary", {"model": "support", "prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ("negative seed", {"model": "support", "prompt": PROMPT, "seed": -1}, 400, "seed"),
    ("stream_options without stream", {"model": "support", "prompt": PROMPT, "stream_options": {}}, 400, "stream"),
    ("missing model", {"prompt": PROMPT}, 400, "model"),
    ("10 MB body", b'{"model": "support", "prompt": "' + b"a" * 10_000_000 + b'"}', 413, "larger than"),
    ("unknown model", {"model": "nope", "prompt": PROMPT}, 404, "unknown model"),
]
CHAT_BAD: list[tuple[str, Any, int, str]] = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool calling"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("no messages", {"messages": []}, 400, "messages"),
    ("response_format", {"response_format": {"type": "json_object"}}, 400, "structured output"),
]


def _post(stack: dict[str, Any], path: str, body: Any, key: str | None = KEYS["alpha"]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{stack['url']}{path}", content=content, headers=headers, timeout=60)


def _refused(response: httpx.Response, status: int, match: str) -> dict[str, Any]:
    import re

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(match, error["message"]), error
    return error


@pytest.mark.parametrize(("case", "body", "status", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests(stack: dict[str, Any], case: str, body: Any, status: int, match: str) -> None:
    _refused(_post(stack, "/completions", body), status, match)


@pytest.mark.parametrize(("case", "extra", "status", "match"), CHAT_BAD, ids=[b[0] for b in CHAT_BAD])
def test_bad_chat_requests(stack: dict[str, Any], case: str, extra: Any, status: int, match: str) -> None:
    body = {"model": "support", "messages": [{"role": "user", "content": PROMPT}], **extra}
    _refused(_post(stack, "/chat/completions", body), status, match)


def test_refusals_do_not_disturb_other_clients(stack: dict[str, Any]) -> None:
    async def run() -> list[Any]:
        async with httpx.AsyncClient(base_url=stack["url"], timeout=60) as http:
            auth = {"Authorization": f"Bearer {KEYS['alpha']}"}
            good = {"model": "support", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
            bad = [b for _, b, _, _ in BAD if not (isinstance(b, bytes) and len(b) > 1000)]
            calls = [http.post("/completions", json=good, headers=auth) for _ in range(4)]
            calls += [
                http.post("/completions", content=b if isinstance(b, bytes) else json.dumps(b).encode(), headers=auth)
                for b in bad
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(run())
    good = answers[:4]
    assert all(r.status_code == 200 for r in good) and len({r.json()["choices"][0]["text"] for r in good}) == 1
    assert all(400 <= r.status_code < 500 for r in answers[4:])


def test_keys_back_pressure_and_no_replica(stack: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack["url"], api_key="wrong", max_retries=0).models.list()
    _refused(_post(stack, "/completions", {"model": "support", "prompt": PROMPT}, key=None), 401, "API key")
    _refused(_post(stack, "/completions", {"model": "support", "prompt": PROMPT}, key="wrong"), 401, "API key")
    # tiny may have 1 request in flight: n = 2 needs 2 slots
    response = _post(stack, "/completions", {"model": "support", "prompt": PROMPT, "n": 2}, key=KEYS["tiny"])
    _refused(response, 429, "in flight")
    assert response.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        client(stack, "tiny").completions.create(model="support", prompt=PROMPT, n=2)
    # a router whose only replica is down (its port bound, never listening: nothing can answer there)
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))
        dead = RouterConfig(
            stack["repo"],
            upstreams=(f"127.0.0.1:{down.getsockname()[1]}",),
            port=0,
            metrics_port=0,
            http_port=ANY_FREE_PORT,
            health_interval=0.5,
        )
        with RouterThread(dead) as router:
            url = router.http_url
            assert httpx.get(f"{url[:-3]}/v1/health/ready").status_code == 503
            assert httpx.get(f"{url[:-3]}/v1/health/live").status_code == 200
            answer = httpx.post(f"{url}/completions", json={"model": "support", "prompt": PROMPT, "stream": True})
            _refused(answer, 503, "replica")
            assert int(answer.headers["retry-after"]) >= 1


def test_health_and_metrics(stack: dict[str, Any]) -> None:
    root = stack["url"][: -len("/v1")]
    assert httpx.get(f"{root}/v1/health/ready").json()["replicas_ready"] == 1
    assert httpx.get(f"{root}/health").status_code == 200
    client(stack).completions.create(model="support", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(f"{root}/metrics").text
    registry = stack["router"].router.metrics.registry
    assert registry.get_sample_value("phlora_router_prompt_tokens_total", {"adapter": "support"}) >= 3
    assert registry.get_sample_value("phlora_router_generation_tokens_total", {"adapter": "support"}) >= 3
    assert registry.get_sample_value("phlora_router_time_to_first_token_seconds_count", {"adapter": "support"}) >= 1
    assert 'vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""}' in text
    assert "vllm:num_requests_running 0.0" in text


# a decoupled engine: tokens stream as they come, a client that leaves cancels --------------------
def test_decoupled_engine_streams_token_by_token_and_disconnect_cancels(
    checkpoints, tmp_path: Path, wait_until
) -> None:
    base = checkpoints[0]
    repo = convert_repo(checkpoints, tmp_path / "repo", ("streamer",), decoupled=True)
    tok = TextTokenizer.load(base)
    want = greedy_continuation(base, tok.encode(PROMPT), 6, adapter=adapter_store_dir(repo, "streamer"))
    with LocalTriton(repo) as triton:
        config = RouterConfig(repo, upstreams=(triton.grpc_url,), port=0, metrics_port=0, http_port=ANY_FREE_PORT)
        with RouterThread(config) as router:
            c = openai.OpenAI(base_url=router.http_url, api_key="none", max_retries=0, timeout=60)
            chunks = list(
                c.completions.create(model="streamer", prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
            )
            texts = [ch.choices[0].text for ch in chunks if ch.choices[0].text]
            assert len(texts) == len(want) > 1 and "".join(texts) == tok.decode(want)
            whole = c.completions.create(model="streamer", prompt=PROMPT, max_tokens=6, temperature=0)
            assert whole.choices[0].text == "".join(texts)
            # read one chunk, hang up: the router cancels its upstream call
            with httpx.stream(
                "POST",
                f"{router.http_url}/completions",
                timeout=60,
                json={
                    "model": "streamer",
                    "prompt": PROMPT,
                    "max_tokens": 120,
                    "ignore_eos": True,
                    "stream": True,
                    "temperature": 0,
                },
            ) as raw:
                next(raw.iter_lines())
            registry = router.router.metrics.registry
            wait_until(
                lambda: (
                    (
                        registry.get_sample_value(
                            "phlora_router_errors_total", {"adapter": "streamer", "code": "CANCELLED"}
                        )
                        or 0
                    )
                    >= 1
                )
            )
            pool = router.router.pool
            wait_until(lambda: all(r.in_flight == 0 for r in pool.replicas.values()))


def test_an_error_after_streaming_began_is_one_error_event_then_done(stack: dict[str, Any]) -> None:
    """A failure after the first chunk went out (here raised after it by a wrapper of the real event
    source): one error event, then [DONE]; the SDK raises it as ``APIError``."""
    router = stack["router"].router
    completions = router.http.front.completions
    original = completions.events

    async def failing(job: Any, call: Any) -> Any:
        from phlora_nim.router.errors import RequestError

        async with contextlib.aclosing(original(job, call)) as events:
            async for event in events:
                yield event
                raise RequestError(__import__("grpc").StatusCode.UNAVAILABLE, "replica went away")

    completions.events = failing  # type: ignore[method-assign]
    try:
        with httpx.stream(
            "POST",
            f"{stack['url']}/completions",
            headers={"Authorization": f"Bearer {KEYS['alpha']}"},
            json={"model": "support", "prompt": PROMPT, "max_tokens": 4, "stream": True},
        ) as raw:
            lines = [line for line in raw.iter_lines() if line]
        assert raw.status_code == 200
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["message"] == "replica went away"
        assert lines[-1] == "data: [DONE]" and sum("error" in line for line in lines) == 1
        with pytest.raises(openai.APIError, match="replica went away"):
            list(client(stack).completions.create(model="support", prompt=PROMPT, max_tokens=4, stream=True))
    finally:
        completions.events = original  # type: ignore[method-assign]
