"""OpenAI's error object and HTTP status for everything the front refuses or cannot serve.

The body is OpenAI's: ``{"error": {"message", "type", "param", "code"}}`` (the shape vLLM's server
answers too), so the ``openai`` SDK raises its own classes by status: 400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 413, 429 ``RateLimitError``, 5xx
``InternalServerError``. The router's gRPC codes map one to one, so both fronts refuse the same
requests for the same reasons; 429 and 503 carry ``Retry-After``.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from phlora_nim.router.errors import RequestError, capped

# gRPC code → (HTTP status, OpenAI error type, error code)
_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (500, "server_error", None),
}


class ApiError(Exception):
    """An answer in OpenAI's error shape.

    Args:
        status: the HTTP status.
        message: what was wrong, and how to fix it.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, when there is one.
        code: a short machine-readable code (``model_not_found``, ``unsupported_parameter``, ...).
        retry_after: seconds for ``Retry-After`` (429 / 503).
        grpc_code: the router's code for the same outcome (metrics count errors by it).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        grpc_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
    ) -> None:
        message = capped(message)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after
        self.grpc_code = grpc_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> str:
        """The error as one server-sent event (after streaming began the status is already 200)."""
        return f"data: {json.dumps(self.body())}\n\n"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """400 for a field the request got wrong."""
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, why: str) -> ApiError:
    """400 for a field the front cannot honour (never silently ignored)."""
    return ApiError(400, f"'{param}' is not supported: {why}", param=param, code="unsupported_parameter")


def from_request_error(exc: RequestError, *, retry_after: int = 1) -> ApiError:
    """The HTTP answer for one of the router's refusals."""
    status, kind, code = _BY_CODE.get(exc.code, (500, "server_error", None))
    wait = retry_after if status in (429, 503) else None
    return ApiError(status, exc.message, type=kind, code=code, retry_after=wait, grpc_code=exc.code)
