"""The OpenAI HTTP front's request parsing, fuzzed over JSON and over raw bytes.

Whatever body arrives (any bytes; malformed UTF-8; lone UTF-16 surrogates in strings; nesting far
past any real request; integers of thousands of digits, ``1e999``, ``NaN``; duplicate keys; valid
JSON that is no request), a malformed one gets exactly one 400 with OpenAI's error object, a well-formed
one a 4xx the router chose (an unknown model, here), never a 5xx or a reset connection; and while
it runs another client keeps being answered. The front here is the real router process's uvicorn
(``--engine vllm``), its replica an address where nothing listens: parsing must not need one.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phlora_nim.router.config import ANY_FREE_PORT, RouterConfig
from phlora_nim.router.openai.body import MAX_DEPTH, BodyError, decode_json
from phlora_nim.router.server import RouterThread
from phlora_nim.testing.standin import add_adapters, standin_repo

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = standin_repo(tmp_path_factory.mktemp("fuzz") / "repo")
    add_adapters(root, {"alpha": (100, "float16")})
    config = RouterConfig(
        root,
        upstreams=(f"http://127.0.0.1:{_closed_port()}",),
        engine="vllm",
        port=0,
        metrics_port=0,
        http_port=ANY_FREE_PORT,
        served_model_name="base",
        health_interval=5.0,
    )
    with RouterThread(config) as router:
        assert router.http_url is not None
        yield router.http_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def client(front: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=front, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def bystander(front: str) -> Iterator[list[int]]:
    """Another client asking ``/v1/models`` all along; its statuses, checked at the end."""
    statuses: list[int] = []
    stop = threading.Event()

    def ask() -> None:
        with httpx.Client(base_url=front, timeout=10) as c:
            while not stop.is_set():
                try:
                    statuses.append(c.get("/v1/models").status_code)
                except httpx.HTTPError:
                    statuses.append(-1)
                stop.wait(0.05)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    yield statuses
    stop.set()
    thread.join(timeout=10)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))


def _post(client: httpx.Client, body: bytes, path: str = "/v1/completions") -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def _is_error_object(answer: httpx.Response) -> bool:
    data = answer.json()
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and set(error) >= {"type", "param", "code"}


def _malformed(answer: httpx.Response) -> None:
    assert answer.status_code == 400, (answer.status_code, answer.text[:300])
    assert _is_error_object(answer), answer.text[:300]


# --------------------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@st.composite
def malformed_json(draw: st.DrawFn) -> bytes:
    """A request body broken one of the ways clients and attackers break them."""
    kind = draw(st.sampled_from(["surrogate", "bad_utf8", "deep", "huge_int", "huge_float", "constant", "dup", "cut"]))
    model = json.dumps(draw(st.text(max_size=10)))
    if kind == "surrogate":
        lone = draw(st.integers(0xD800, 0xDFFF))
        return f'{{"model": {model}, "prompt": "a\\u{lone:04x}b"}}'.encode()
    if kind == "bad_utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]))
        return b'{"model": "alpha", "prompt": "' + bad + b'"}'
    if kind == "deep":
        depth = draw(st.integers(MAX_DEPTH + 1, 50_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return f'{{"model": {model}, "prompt": {opener * depth}1{closer * depth}}}'.encode()
    if kind == "huge_int":
        digits = draw(st.integers(65, 20_000))
        return f'{{"model": {model}, "max_tokens": {"9" * digits}}}'.encode()
    if kind == "huge_float":
        number = draw(st.sampled_from(["1e999", "-1e400", "1" * 400 + ".5"]))
        return f'{{"model": {model}, "temperature": {number}}}'.encode()
    if kind == "constant":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return f'{{"model": {model}, "temperature": {constant}}}'.encode()
    if kind == "dup":
        return f'{{"model": {model}, "n": 1, "n": 2}}'.encode()
    whole = json.dumps({"model": "alpha", "prompt": draw(st.text(max_size=20))}).encode()
    return whole[: draw(st.integers(0, len(whole) - 1))]


# --------------------------------------------------------------------------- the decoder alone


@given(malformed_json())
@settings(max_examples=300, deadline=None)
def test_the_decoder_refuses_every_malformed_body_with_one_error(body: bytes) -> None:
    with pytest.raises(BodyError):
        decode_json(body)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_the_decoder_reads_every_ordinary_json_value(value: object) -> None:
    text = json.dumps(value)
    if any(f"\\ud{c}" in text for c in "89abcdef"):
        return  # lone surrogates from st.text(): refused on purpose (covered above)
    words = text.replace(",", " ").replace("[", " ").replace("]", " ").replace(":", " ").replace("}", " ").split()
    if any(len(w.lstrip("-")) > 64 for w in words if w.lstrip("-")[:1].isdigit()):
        return  # numbers past 64 digits: refused on purpose
    assert decode_json(text.encode()) == value


def test_the_decoder_keeps_a_bom_and_plain_unicode() -> None:
    assert decode_json('\ufeff{"prompt": "héllo ✓ 😀"}'.encode()) == {"prompt": "héllo ✓ 😀"}


# --------------------------------------------------------------------------- the running front


@FUZZ
@given(body=malformed_json(), chat=st.booleans())
def test_malformed_json_gets_one_400(client: httpx.Client, bystander: list[int], body: bytes, chat: bool) -> None:
    _malformed(_post(client, body, "/v1/chat/completions" if chat else "/v1/completions"))


@FUZZ
@given(body=st.binary(max_size=2048))
def test_any_bytes_get_a_4xx_error_object(client: httpx.Client, bystander: list[int], body: bytes) -> None:
    answer = _post(client, body)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert _is_error_object(answer)


@FUZZ
@given(value=json_values)
def test_well_formed_json_that_is_no_request_gets_a_4xx(
    client: httpx.Client, bystander: list[int], value: object
) -> None:
    body = json.dumps(value).encode()
    answer = _post(client, body)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert _is_error_object(answer)


def test_a_huge_body_is_413_and_the_front_goes_on(client: httpx.Client, bystander: list[int]) -> None:
    answer = _post(client, b'{"model": "alpha", "prompt": "' + b"a" * (5 << 20) + b'"}')
    assert answer.status_code == 413 and _is_error_object(answer)
    assert client.get("/v1/health/live").status_code == 200
