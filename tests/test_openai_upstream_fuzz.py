"""What an OpenAI-speaking replica answers is bytes from the network: whatever JSON it sends, the router
turns it into one answer or one error with a status, never an exception of its own."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from phlora_nim.router.upstreams.kserve_text import choice_of, infer_response
from phlora_nim.router.upstreams.openai_delivery import EngineError, engine_error

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# Answers shaped like completions, with every field possibly of the wrong type.
ANSWERS = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(st.fixed_dictionaries({}, optional={"text": JSON, "token_ids": JSON}) | JSON, max_size=3)
        | JSON,
        "model": JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(status=st.integers(min_value=400, max_value=599), body=JSON | ANSWERS)
def test_any_error_body_is_one_engine_error(status: int, body: object) -> None:
    error = engine_error(status, body, "fallback")
    assert isinstance(error, EngineError) and 400 <= error.status <= 599 and error.message
    assert error.code.name in {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "INTERNAL",
        "UNIMPLEMENTED",
        "DEADLINE_EXCEEDED",
        "FAILED_PRECONDITION",
    }


@settings(max_examples=300, deadline=None)
@given(answer=ANSWERS)
def test_any_answer_is_one_kserve_response(answer: dict) -> None:
    text, ids = choice_of(answer)
    request = service_pb2.ModelInferRequest(model_name="support", id="1")
    response = infer_response(request, text, ids)
    assert response.outputs[0].name == "text_output"
    assert len(response.outputs) == (2 if ids is not None else 1)


def test_the_expected_shape_is_read() -> None:
    answer = json.loads('{"choices": [{"text": "hi", "token_ids": [1, 2]}]}')
    assert choice_of(answer) == ("hi", [1, 2])
    assert choice_of({"choices": {"0": {"text": "x"}}}) == ("", None)  # a dict where a list belongs
    assert choice_of({"choices": [{"text": "x", "token_ids": [-1, "a"]}]}) == ("x", None)
