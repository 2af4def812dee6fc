"""The HTTP front in front of OpenAI-speaking replicas: the client's request, passed through.

The engine does the work (sampling, ``n``, ``seed``, ``stop``, ``logprobs``, streaming, usage), so the
body goes through as the client wrote it, with ``model`` aimed at the adapter the way the engine
takes it; the router checks the caller and the name (the router's :class:`Access`), admits it (its
:class:`Admission`: one slot per choice) and picks the replica (its OpenAI delivery, which loads
the adapter where needed). Answers come back with ``model`` as the client named it; an engine's
error keeps its status and OpenAI error object (a 5xx becomes 502: the engine failed); a stream is
passed on event by event, begun only once the engine answered 200.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from phlora_nim.router.access import request_label
from phlora_nim.router.errors import RequestError
from phlora_nim.router.openai.body import read_json
from phlora_nim.router.openai.completions import Call, Completions
from phlora_nim.router.openai.disconnect import cancel_on_disconnect
from phlora_nim.router.openai.errors import ApiError, bad_request
from phlora_nim.router.upstreams.openai_delivery import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EngineError,
    Relayed,
    rename_model,
)


def _api_error(completions: Completions, exc: RequestError) -> ApiError:
    if isinstance(exc, EngineError):
        return ApiError(exc.status, exc.message, type=exc.type, param=exc.param, grpc_code=exc.code)
    return completions.api_error(exc)


def _slots(body: dict[str, Any], *, chat: bool, limit: int) -> int:
    """Choices the request asks for (prompts × ``n``), for admission; a malformed ``n`` is the engine's to refuse."""
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    prompt = body.get("prompt")
    prompts = 1
    if not chat and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompts = len(prompt)
    if prompts * n > limit:
        raise bad_request(
            f"n: {prompts} prompt(s) × n = {n} asks for {prompts * n} choices, more than the {limit} this server "
            "gives per request: send fewer",
            param="n",
        )
    return prompts * n


def _count_usage(completions: Completions, label: str, data: Any) -> None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict):
        for key, counter in (
            ("prompt_tokens", completions.metrics.prompt_tokens),
            ("completion_tokens", completions.metrics.generation_tokens),
        ):
            value = usage.get(key)
            if isinstance(value, int) and value >= 0:
                counter.labels(label).inc(value)


async def _events(
    completions: Completions, relayed: Relayed, model: str, call: Call, stack: contextlib.AsyncExitStack
) -> AsyncIterator[str]:
    """The engine's server-sent events, ``model`` renamed; the slot and the upstream call end with it."""
    code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED  # unless it ends otherwise
    first = True
    try:
        assert relayed.lines is not None
        async for line in relayed.lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data != "[DONE]":
                try:
                    chunk = json.loads(data)
                except ValueError:
                    chunk = None
                if chunk is not None:
                    if first:
                        first = False
                        elapsed = time.perf_counter() - call.started
                        completions.metrics.time_to_first_token.labels(call.label).observe(elapsed)
                    _count_usage(completions, call.label, chunk)
                    data = json.dumps(rename_model(chunk, model))
            yield f"data: {data}\n\n"
        code = None
    finally:
        await stack.aclose()
        completions.record(call, code)


async def relay(completions: Completions, request: Request, *, chat: bool) -> Response:
    """One ``/v1/completions`` or ``/v1/chat/completions`` request, through to a replica."""
    core = completions.core
    assert core.relay is not None
    call = Call()
    stack = contextlib.AsyncExitStack()
    try:
        tenant = core.access.authenticate({"authorization": request.headers.get("authorization", "")})
        body = await read_json(request, core.config.max_body_mb * 2**20)
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("model: the name of a model or adapter (see GET /v1/models)", param="model")
        entry = core.access.resolve(model, tenant, base_model=completions.directory.base_model)
        call.label = request_label(entry.name if entry else None, completions.directory.base_model)
        slots = _slots(body, chat=chat, limit=core.config.max_choices)
        stream = body.get("stream") is True
        adapter = entry.name if entry else None
        stack.enter_context(core.admission.admit(tenant, call.label, adapter=adapter, slots=slots))
        route = CHAT_COMPLETIONS if chat else COMPLETIONS
        opening = core.relay.open(entry, route, body, stream=stream)
        # A whole answer is read inside open(): a client that goes away cancels it (and the engine's work).
        relayed = await (opening if stream else cancel_on_disconnect(request, opening))
        stack.push_async_callback(relayed.aclose)
        if relayed.status != 200:
            raise relayed.error()
        if stream:
            events = _events(completions, relayed, model, call, stack)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        _count_usage(completions, call.label, relayed.body)
        answer = rename_model(relayed.body, model)
        await stack.aclose()
        completions.record(call, None)
        return JSONResponse(answer)
    except RequestError as exc:
        error = _api_error(completions, exc)
    except ApiError as exc:
        error = exc
    except BaseException:
        await stack.aclose()
        completions.record(call, grpc.StatusCode.CANCELLED)
        raise
    await stack.aclose()
    completions.record(call, error.grpc_code)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())
