"""What the router answers when it refuses or cannot serve a request.

Client-supplied values (model and adapter names, input names, datatypes) are echoed only through
:func:`shown`, which truncates them: an error travels in gRPC trailers, which are limited (8 KiB by
default), and a 100 KB model name echoed back would turn the answer into ``RESOURCE_EXHAUSTED``.
Whole messages are capped too, since upstream texts (Triton's) may echo client values themselves.

Example:
    >>> shown("a" * 200, limit=8)
    "'aaaaaaaa…' (200 chars)"
"""

from __future__ import annotations

import grpc

SHOWN_LIMIT = 96  # characters of a client value echoed in an error
MESSAGE_LIMIT = 1024  # characters of any error message sent to a client


def shown(value: object, *, limit: int = SHOWN_LIMIT) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters with an ellipsis."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit] + '…'!r} ({len(text)} chars)"


def capped(message: str, *, limit: int = MESSAGE_LIMIT) -> str:
    """``message`` cut to ``limit`` characters (with an ellipsis)."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


class RequestError(Exception):
    """A request the router refuses or cannot serve: a gRPC status code and its message (capped)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = capped(message)
        super().__init__(message)
        self.code = code
        self.message = message


def unknown(name: str) -> RequestError:
    """NOT_FOUND for a model or adapter a caller may not see.

    One answer whether the name does not exist or belongs to another tenant (or is an internal
    model the router does not expose), so that names cannot be enumerated by probing.
    """
    return RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model or adapter {shown(name)}")
