"""Request bodies as JSON, refusing what the rest of the front (and an engine behind it) must never see.

``json.loads`` alone lets through, or fails outside ``ValueError`` on: nesting deep enough to exhaust
the interpreter's stack (``RecursionError``), lone UTF-16 surrogates in strings (``"\\ud800"``, which
no UTF-8 encoder takes later), integers of thousands of digits, ``1e999`` (infinity), ``NaN`` and
``Infinity``, and duplicate keys (the last one silently wins). Each of these is one
:class:`BodyError` here, so the front answers one 400 and nothing else.

Example:
    >>> decode_json(b'{"model": "a", "n": 1}')
    {'model': 'a', 'n': 1}
    >>> decode_json(b'{"a": 1, "a": 2}')  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    BodyError: duplicate key 'a'
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from phlora_nim.router.openai.errors import ApiError, bad_request

if TYPE_CHECKING:
    from fastapi import Request

MAX_DEPTH = 64  # nesting of arrays and objects (chat messages need about 6)
MAX_DIGITS = 64  # digits of one number literal


class BodyError(ValueError):
    """A body that is not acceptable JSON; the message says why."""


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _depth_ok(text: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before parsing (brackets inside strings skipped)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            raise BodyError(f"nested deeper than {MAX_DEPTH} levels")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise BodyError(f"{name} is not JSON")


_INT_LIMIT = 10**MAX_DIGITS


def _values_ok(value: Any) -> None:
    """Refuse lone surrogates in any string (keys too: they cannot be encoded as UTF-8), integers of
    more than :data:`MAX_DIGITS` digits and numbers too large for a float (``1e999`` parses as infinity)."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise BodyError("a string holds a lone UTF-16 surrogate (not a character)") from None
        elif kind is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is int:
            if not -_INT_LIMIT < item < _INT_LIMIT:
                raise BodyError(f"a number of more than {MAX_DIGITS} digits")
        elif kind is float and not math.isfinite(item):
            raise BodyError("a number out of range")


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
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except BodyError:
        raise
    except (ValueError, RecursionError) as exc:
        raise BodyError(str(exc)) from None
    _values_ok(value)
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
