"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions``, checked before anything runs.

Policy for fields, deliberately stricter than vLLM (which logs and ignores what it does not know):

- OpenAI fields the front honours are typed strictly (no ``"5"`` for 5, no ``true`` for 1).
- OpenAI fields it cannot honour are refused with a 400 naming the field unless they hold their
  neutral value (``logprobs: null``, ``tools: []``, ``presence_penalty: 0``...): the engine gives no
  logprobs here, there are no tools, no penalties in the model's inputs. Never silently dropped.
- Extras that vLLM takes through ``extra_body`` and the front honours: ``top_k``, ``min_tokens``
  (when the engine model declares a ``min_tokens`` input), ``ignore_eos``, ``return_token_ids``.
- Any other field is unknown: 400 ``unknown_parameter`` (the SDK sends only known fields, so an
  unknown one is a typo or a feature the client expects and would not get).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from phlora_nim.router.openai.errors import ApiError, bad_request, unsupported

_STRICT = ConfigDict(extra="forbid", strict=True)
MAX_STOPS = 16
SEED_LIMIT = 1 << 64


def _null(value: Any) -> bool:
    return value is None


def _zero(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0)


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _false(value: Any) -> bool:
    return value is None or value is False


# field → (accepted when, why it cannot be honoured otherwise)
_COMMON_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (_zero, "the engine model takes no penalty inputs; send 0 or leave it out"),
    "presence_penalty": (_zero, "the engine model takes no penalty inputs; send 0 or leave it out"),
    "logit_bias": (_empty, "the engine model takes no logit bias"),
}
COMPLETION_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_COMMON_REFUSED,
    "logprobs": (_null, "the engine returns no log probabilities"),
    "suffix": (lambda v: v in (None, ""), "insertion (suffix) is not served"),
}
CHAT_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_COMMON_REFUSED,
    "logprobs": (_false, "the engine returns no log probabilities"),
    "top_logprobs": (_null, "the engine returns no log probabilities"),
    "tools": (_empty, "tool calling is not served"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not served"),
    "parallel_tool_calls": (_null, "tool calling is not served"),
    "functions": (_empty, "function calling is not served"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not served"),
    "response_format": (lambda v: v in (None, {"type": "text"}), "structured output is not served"),
    "audio": (_null, "audio output is not served"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is served"),
    "prediction": (_null, "predicted outputs are not served"),
    "reasoning_effort": (_null, "the model has no reasoning settings"),
    "web_search_options": (_null, "web search is not served"),
    "verbosity": (_null, "the model has no verbosity setting"),
    "store": (_false, "completions are not stored"),
    "metadata": (_empty, "completions are not stored, so they take no metadata"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier"),
}


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by both endpoints."""

    model_config = _STRICT

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    user: str | None = None  # an end-user id for the caller's own records: no effect on the answer
    # vLLM's extras (extra_body)
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    return_token_ids: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> _Generation:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        stops = self.stops
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOPS} non-empty strings")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Generation):
    prompt: Prompt
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise ValueError("prompt: must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of = n is served (no selection among candidates)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates take it (text parts joined, as vLLM's ``string`` format)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # not affecting the answer: identifiers for the caller's records and a caching hint
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) before the older ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _where(loc: tuple[Any, ...]) -> str:
    """A field path for people: ``messages[0].content`` (union member names dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    where = _where(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        return bad_request(
            f"unknown field '{where}': not a field this server honours (its extras beyond OpenAI's: "
            "top_k, min_tokens, ignore_eos, return_token_ids)",
            param=where,
            code="unknown_parameter",
        )
    message = str(first["msg"])
    if first["type"] == "value_error":  # our own checks: "field: what is wrong"
        message = message.removeprefix("Value error, ")
        where = message.split(":", 1)[0]
        return bad_request(message, param=where)
    found = first.get("input")
    shown = repr(found) if not isinstance(found, dict | list) else type(found).__name__
    if len(shown) > 60:
        shown = shown[:60] + "…"
    return bad_request(f"{where or 'body'}: {message} (found {shown})", param=where or None)


def parse_request(body: Any, model: type[_Generation], refused: dict[str, tuple[Callable[[Any], bool], str]]) -> Any:
    """A checked request from a decoded JSON body.

    Raises:
        ApiError: 400 naming the first field at fault.
    """
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, found {type(body).__name__}", code="invalid_json")
    body = dict(body)
    for name, (accepted, why) in refused.items():
        if name in body:
            value = body.pop(name)
            if not accepted(value):
                raise unsupported(name, why)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
