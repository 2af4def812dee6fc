"""Pieces of the OpenAI front that need no server: tokenizer and chat templates against transformers,
incremental text and stop strings, the request field policy, the error mapping."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from phlora_nim.router.errors import RequestError
from phlora_nim.router.openai.decoding import ChoiceText, IncrementalDecoder, StopMatcher
from phlora_nim.router.openai.errors import ApiError, from_request_error
from phlora_nim.router.openai.schemas import (
    CHAT_REFUSED,
    COMPLETION_REFUSED,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from phlora_nim.router.openai.tokenizer import TemplateError, TextTokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] | tojson }}{% if loop.last %}{% break %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}"
)


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from phlora_nim.demo.toy_models import save_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def test_encode_decode_and_chat_template_match_transformers(toy_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    ours, theirs = TextTokenizer.load(toy_tokenizer), AutoTokenizer.from_pretrained(toy_tokenizer)
    for text in ("the red cat", "the <s> red </s> cat", "dog"):
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    messages = [{"role": "system", "content": "the ünïcode"}, {"role": "user", "content": "red cat"}]
    for prompt in (True, False):
        assert ours.render_chat(messages, add_generation_prompt=prompt) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )
    assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id, theirs.pad_token_id)
    with pytest.raises(TemplateError, match="no tools"):
        ours.render_chat([{"role": "tool", "content": "x"}])


def test_incremental_text_equals_a_whole_decode(toy_tokenizer: Path) -> None:
    tok = TextTokenizer.load(toy_tokenizer)
    ids = tok.encode("the red cat dog the red")
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.feed([i]) for i in ids]
    assert "".join(pieces) + decoder.finish() == tok.decode(ids)
    assert all(pieces)


@pytest.mark.parametrize(
    ("chunks", "stops", "expected", "stopped"),
    [
        (["the re", "d cat"], ["red"], "the ", True),
        (["ab", "cX", "Yd"], ["XY", "cZ"], "abc", True),
        (["hello wor", "ld"], ["world!"], "hello world", False),  # a prefix held back, then let out
        (["aaa"], ["b"], "aaa", False),
        (["xyz"], ["yz", "xy"], "", True),  # the earliest match wins
    ],
)
def test_stop_matcher(chunks: list[str], stops: list[str], expected: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(c) for c in chunks)
    if not matcher.stopped:
        out += matcher.flush()
    assert (out, matcher.stopped) == (expected, stopped)


def test_choice_counts_tokens_up_to_the_stop_and_finish_reasons(toy_tokenizer: Path) -> None:
    tok = TextTokenizer.load(toy_tokenizer)
    ids = tok.encode("the red cat dog")
    stopped = ChoiceText(tok, ["cat"], max_tokens=10)
    assert stopped.feed(ids) + stopped.end() == "the red "
    assert (len(stopped.tokens), stopped.finish_reason) == (3, "stop")
    full = ChoiceText(tok, [], max_tokens=4)
    assert full.feed(ids) == "the red cat dog" and full.finish_reason == "length"
    short = ChoiceText(tok, [], max_tokens=9)
    assert short.feed(ids) + short.end() == "the red cat dog" and short.finish_reason == "stop"  # the end token came


GOOD = {"model": "m", "prompt": "x"}
REFUSALS = [
    ({**GOOD, "logprobs": 2}, "'logprobs' is not supported", "logprobs"),
    ({**GOOD, "suffix": "!"}, "'suffix' is not supported", "suffix"),
    ({**GOOD, "logit_bias": {"5": 1}}, "logit bias", "logit_bias"),
    ({**GOOD, "temperature": 3}, "temperature", "temperature"),
    ({**GOOD, "top_p": 0}, "top_p", "top_p"),
    ({**GOOD, "stop": ["a"] * 17}, "stop: at most 16", "stop"),
    ({**GOOD, "stop": [""]}, "non-empty", "stop"),
    ({**GOOD, "best_of": 3}, "best_of", "best_of"),
    ({**GOOD, "prompt": []}, "must not be empty", "prompt"),
    ({**GOOD, "prompt": [[1], []]}, "must not be empty", "prompt"),
    ({**GOOD, "top_k": -2}, "top_k", "top_k"),
    ({**GOOD, "stream_options": {"include_usage": True, "extra": 1}}, "unknown field", "stream_options.extra"),
    ({**GOOD, "typo_field": 1}, "unknown field 'typo_field'", "typo_field"),
]


@pytest.mark.parametrize(("body", "match", "param"), REFUSALS, ids=[r[2] for r in REFUSALS])
def test_completion_field_policy(body: dict, match: str, param: str) -> None:
    with pytest.raises(ApiError, match=match) as info:
        parse_request(body, CompletionRequest, COMPLETION_REFUSED)
    assert info.value.status == 400 and info.value.param == param


def test_neutral_values_of_unsupported_fields_and_extras_are_accepted() -> None:
    body = {**GOOD, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u"}
    request = parse_request(
        {**body, "top_k": 5, "min_tokens": 2, "ignore_eos": True}, CompletionRequest, COMPLETION_REFUSED
    )
    assert (request.top_k, request.min_tokens, request.ignore_eos) == (5, 2, True)
    chat = parse_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "max_completion_tokens": 3,
            "max_tokens": 9,
        },
        ChatCompletionRequest,
        CHAT_REFUSED,
    )
    assert chat.token_limit == 3 and chat.messages[0].as_template_input()["content"] == "a"


@pytest.mark.parametrize(
    ("code", "status", "retry"),
    [
        (grpc.StatusCode.NOT_FOUND, 404, None),
        (grpc.StatusCode.UNAUTHENTICATED, 401, None),
        (grpc.StatusCode.INVALID_ARGUMENT, 400, None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "1"),
        (grpc.StatusCode.UNAVAILABLE, 503, "1"),
        (grpc.StatusCode.INTERNAL, 500, None),
    ],
)
def test_router_codes_map_to_http(code: grpc.StatusCode, status: int, retry: str | None) -> None:
    error = from_request_error(RequestError(code, "why"))
    assert error.status == status and error.headers().get("Retry-After") == retry
    assert error.body() == {"error": {"message": "why", "type": error.type, "param": None, "code": error.code}}
