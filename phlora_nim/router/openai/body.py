"""Request bodies as JSON, refusing what the rest of the front (and an engine behind it) must never see.

``json.loads`` alone lets through, or fails outside ``ValueError`` on: nesting deep enough to exhaust
the interpreter's stack (``RecursionError``), lone UTF-16 surrogates in strings (``"\\ud800"``, which
no UTF-8 encoder takes later), integers of thousands of digits, ``1e999`` (infinity), ``NaN`` and
``Infinity``, and duplicate keys (the last one silently wins). Each of these is one
:class:`BodyError` here, so the front answers one 400 and nothing else.

Example:
    >>> decode_json(b'{"model": "a", "n": 1}')
    {'model': 'a', 'n': 1}
    >>> decode_json(b'{"a": 1, "a": 2}')
    Traceback (most recent call last):
    ...
    phlora_nim.router.openai.body.BodyError: duplicate key 'a'
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from phlora_nim.router.openai.errors import ApiError, bad_request

if TYPE_CHECKING:
    from fastapi import Request

MAX_DEPTH = 64  # nesting of arrays and objects (chat messages need about 6)
MAX_DIGITS = 64  # digits of one number literal


class BodyError(ValueError):
    """A body that is not acceptable JSON; the message says why."""


def _depth_ok(text: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before parsing (brackets inside strings skipped)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise BodyError(f"nested deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise BodyError(f"a number of more than {MAX_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_DIGITS + 8:
        raise BodyError(f"a number of more than {MAX_DIGITS} digits")
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"number {text[:32]} is out of range")
    return value


def _constant(name: str) -> Any:
    raise BodyError(f"{name} is not JSON")


def _strings_ok(value: Any) -> None:
    """Refuse lone surrogates in any string (keys too): they cannot be encoded as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BodyError("a string holds a lone UTF-16 surrogate (not a character)") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def decode_json(raw: bytes | bytearray) -> Any:
    """The JSON value of ``raw`` (UTF-8, a BOM allowed).

    Raises:
        BodyError: not UTF-8, not JSON, or one of the cases in the module docstring.
    """
    try:
        text = bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BodyError(f"the body is not UTF-8 (byte {exc.start})") from None
    _depth_ok(text)
    try:
        value = json.loads(
            text, object_pairs_hook=_pairs, parse_int=_int, parse_float=_float, parse_constant=_constant
        )
    except BodyError:
        raise
    except (ValueError, RecursionError) as exc:
        raise BodyError(str(exc)) from None
    _strings_ok(value)
    return value


async def read_json(request: Request, limit: int) -> Any:
    """The decoded JSON body, at most ``limit`` bytes.

    Raises:
        ApiError: 413 for a larger body, 400 for one that is not JSON.
    """
    too_large = ApiError(413, f"the request body is larger than {limit // 2**20} MiB", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    try:
        return decode_json(body)
    except BodyError as exc:
        raise bad_request(f"the body is not valid JSON ({exc})", code="invalid_json") from None
