"""The FastAPI application of the HTTP front: OpenAI's routes, health and metrics.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions``; ``GET /health`` and ``/v1/health/ready`` (200 while at least one
Triton replica is ready, else 503), ``/v1/health/live``; ``GET /metrics`` (the router's Prometheus
metrics). Keys: ``Authorization: Bearer KEY``, checked against the router's tenants (the file the
gRPC front uses); health and metrics take none, as probes and scrapers carry none.

Bodies are read by hand rather than bound by FastAPI: a size cap before parsing (413), one OpenAI
error for malformed JSON, and the field policy of :mod:`schemas`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from phlora_nim.router.errors import RequestError, unknown
from phlora_nim.router.openai import responses
from phlora_nim.router.openai.body import read_json
from phlora_nim.router.openai.completions import Call, Completions, Job
from phlora_nim.router.openai.disconnect import cancel_on_disconnect
from phlora_nim.router.openai.errors import ApiError, bad_request
from phlora_nim.router.openai.relay import relay
from phlora_nim.router.openai.schemas import (
    CHAT_REFUSED,
    COMPLETION_REFUSED,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from phlora_nim.router.tenants import Tenant

T = TypeVar("T")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


class HttpFront:
    """The routes' logic on the router's objects."""

    def __init__(self, completions: Completions) -> None:
        self.completions = completions
        self.config = completions.config
        self.access = completions.access
        self.directory = completions.directory
        self.pool = completions.core.pool
        self.metrics = completions.metrics

    def authenticate(self, request: Request) -> Tenant | None:
        return self.access.authenticate({"authorization": request.headers.get("authorization", "")})

    async def whole(self, job: Job, tenant: Tenant | None, call: Call) -> Response:
        texts = [""] * (len(job.prompts) * job.n)
        with self.completions.admit(job, tenant, call):
            async with contextlib.aclosing(self.completions.events(job, call)) as events:
                async for index, text in events:
                    texts[index] += text
        self.completions.record(call, None)
        return JSONResponse(responses.whole(job, texts))

    async def _sse(self, job: Job, call: Call, stack: contextlib.ExitStack) -> AsyncIterator[str]:
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED  # unless it ends otherwise
        began = False
        try:
            async with (
                contextlib.aclosing(self.completions.events(job, call)) as events,
                contextlib.aclosing(responses.chunks(job, events)) as chunks,
            ):
                async for chunk in chunks:
                    began = True
                    yield chunk
            code = None
            yield responses.DONE
        except (ApiError, RequestError) as exc:
            error = exc if isinstance(exc, ApiError) else self.completions.api_error(exc)
            code = error.grpc_code
            if not began:
                raise error from None  # nothing sent yet: the client gets the HTTP status
            yield error.sse()
            yield responses.DONE
        finally:
            stack.close()
            self.completions.record(call, code)

    async def stream(self, job: Job, tenant: Tenant | None, call: Call) -> Response:
        """A streamed answer, begun only once its first chunk exists (errors before it keep their status)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.completions.admit(job, tenant, call))
        sse = self._sse(job, call, stack)
        first = await sse.__anext__()

        async def body() -> AsyncIterator[str]:
            async with contextlib.aclosing(sse):
                yield first
                async for chunk in sse:
                    yield chunk

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def generate(self, request: Request, *, chat: bool) -> Response:
        if self.completions.core.relay is not None:  # OpenAI-speaking replicas take the request as it is
            return await relay(self.completions, request, chat=chat)
        call = Call()
        try:
            tenant = self.authenticate(request)
            body = await read_json(request, self.config.max_body_mb * 2**20)
            if chat:
                parsed = parse_request(body, ChatCompletionRequest, CHAT_REFUSED)
                job = await self.completions.chat_job(parsed, tenant, call)
            else:
                parsed = parse_request(body, CompletionRequest, COMPLETION_REFUSED)
                job = await self.completions.completion_job(parsed, tenant, call)
            if parsed.stream:
                return await self.stream(job, tenant, call)
            return await cancel_on_disconnect(request, self.whole(job, tenant, call))
        except RequestError as exc:
            error = self.completions.api_error(exc)
        except ApiError as exc:
            error = exc
        except asyncio.CancelledError:
            self.completions.record(call, grpc.StatusCode.CANCELLED)
            raise
        self.completions.record(call, error.grpc_code)
        return error_response(error)

    async def models(self, request: Request) -> Response:
        try:
            tenant = self.authenticate(request)
        except RequestError as exc:
            return error_response(self.completions.api_error(exc))
        max_len = None
        with contextlib.suppress(RequestError):
            max_len = self.directory.limits(await self.pool.model_info(self.config.llm_model)).max_seq_len
        return JSONResponse({"object": "list", "data": self.directory.cards(tenant, max_model_len=max_len)})

    async def model(self, request: Request, model_id: str) -> Response:
        listing = await self.models(request)
        if listing.status_code != 200:
            return listing
        for card in json.loads(bytes(listing.body))["data"]:
            if card["id"] == model_id:
                return JSONResponse(card)
        return error_response(self.completions.api_error(unknown(model_id)))

    def ready(self) -> Response:
        healthy = len(self.pool.healthy())
        body = {
            "status": "ready" if healthy else "not ready",
            "replicas_ready": healthy,
            "replicas": len(self.pool.replicas),
        }
        return JSONResponse(body, status_code=200 if healthy else 503)


def create_app(front: HttpFront) -> FastAPI:
    """The ASGI application (no OpenAPI pages: the API is OpenAI's)."""
    app = FastAPI(title="phlora-nim", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(
            ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind, code=code)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(bad_request(str(exc)))

    async def completions(request: Request) -> Response:
        return await front.generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await front.generate(request, chat=True)

    async def models(request: Request) -> Response:
        return await front.models(request)

    async def model(request: Request, model_id: str) -> Response:
        return await front.model(request, model_id)

    async def ready() -> Response:
        return front.ready()

    async def live() -> Response:
        return JSONResponse({"status": "live"})

    async def metrics() -> Response:
        return PlainTextResponse(front.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"])
    for path in ("/health", "/v1/health/ready"):
        app.add_api_route(path, ready, methods=["GET"])
    app.add_api_route("/v1/health/live", live, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
