"""Getting a request answered by an OpenAI-speaking replica: replica choice, adapter loads, failover.

Both fronts end here. The HTTP front passes the client's OpenAI body through (:meth:`open`), aimed
at the adapter the way the engine takes it (:meth:`OpenAIEngineFacts.aim`); the gRPC front's KServe
v2 requests become completion requests first (:mod:`kserve_text`, :meth:`unary`, :meth:`stream`).

For an adapter, replicas are tried in the pool's order (holding it first); a replica that does not
hold it loads it first (one load per replica and adapter, whoever asks). A replica refusing the
load is skipped (its reason kept); when every replica refused, the client gets the engines'
reasons (INVALID_ARGUMENT / 400). A replica that cannot be reached is taken out of rotation and the
request goes to the next, once, when nothing was sent to the client yet. An answer saying the
adapter is not loaded there (the engine lost it) has it loaded again and the request sent once more.
An engine's own error answer reaches the client with its status (5xx as 502: the engine failed, not
the router).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from tritonclient.grpc import service_pb2

from phlora_nim.engines.registry import engine
from phlora_nim.repository.registry import AdapterEntry
from phlora_nim.router.access import Plan
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.errors import RequestError, capped, shown
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.upstreams.kserve_text import choice_of, completion_body, infer_response
from phlora_nim.router.upstreams.openai_pool import LoadRefused, OpenAIPool, OpenAIReplica, Unreachable

log = logging.getLogger("phlora_nim.router")

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"

# An engine's HTTP status → the router's gRPC code (the gRPC front's answer for the same refusal).
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.PERMISSION_DENIED,  # the replica's key, not the client's: a set-up fault
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class EngineError(RequestError):
    """An engine's error answer: its HTTP status (5xx shown as 502) and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None) -> None:
        code = _CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)
        super().__init__(code, message)
        self.status = 502 if status >= 500 and status not in (501, 503, 504) else status
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param


def engine_error(status: int, body: Any, fallback: str) -> EngineError:
    """The :class:`EngineError` of an answer with ``status`` and decoded ``body``."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = body if isinstance(body, dict) else {}
    message = error.get("message") or error.get("error_message") or error.get("detail") or fallback
    kind, param = error.get("type"), error.get("param")
    return EngineError(
        status,
        capped(str(message)),
        type=kind if isinstance(kind, str) else None,
        param=param if isinstance(param, str) else None,
    )


def _status(code: object) -> int:
    """The HTTP status an in-band error names (vLLM puts it in ``code``), 500 when it names none."""
    return code if isinstance(code, int) and 400 <= code < 600 else 500


@dataclass
class Relayed:
    """A replica's answer: its status and, for a 200 stream, its server-sent lines; ``aclose`` ends it."""

    status: int
    replica: str
    body: Any = None  # decoded JSON of a whole answer (or of an error)
    text: str = ""
    lines: AsyncIterator[str] | None = None
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def aclose(self) -> None:
        await self._stack.aclose()

    def error(self) -> EngineError:
        return engine_error(self.status, self.body, self.text or f"HTTP {self.status}")


def rename_model(data: Any, model: str) -> Any:
    """An answer (or a streamed chunk) with ``model`` set to what the client named."""
    if isinstance(data, dict) and "model" in data:
        data["model"] = model
    return data


class OpenAIDelivery:
    """Sends requests to OpenAI-speaking replicas; the same interface as the Triton delivery for plans."""

    def __init__(self, *, config: RouterConfig, pool: OpenAIPool, metrics: RouterMetrics) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.facts = engine(config.engine).openai_facts()

    # one upstream call -------------------------------------------------------------------------
    def _aimed(self, replica: OpenAIReplica, entry: AdapterEntry | None, body: dict[str, Any]) -> bytes:
        base = replica.base or self.config.served_model_name or self.config.upstream_model
        aimed = self.facts.aim(
            body,
            base=base,
            adapter=entry.name if entry else None,
            lora_id=entry.task_id if entry else 0,
            path=self.pool.served_path(entry) if entry else "",
        )
        return json.dumps(aimed).encode()  # ASCII: no string can fail to encode

    async def _send(
        self,
        replica: OpenAIReplica,
        entry: AdapterEntry | None,
        route: str,
        body: dict[str, Any],
        *,
        stream: bool,
        timeout: float | None,
    ) -> Relayed:
        relayed = Relayed(status=0, replica=replica.address)
        stack = relayed._stack
        stack.enter_context(self.pool.busy(replica, entry.name if entry else None))
        request = replica.client.build_request(
            "POST",
            route,
            content=self._aimed(replica, entry, body),
            headers={"content-type": "application/json"},
            timeout=httpx.Timeout(timeout if timeout is not None else self.config.attempt_timeout, connect=5.0),
        )
        try:
            answer = await replica.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await stack.aclose()
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        except BaseException:  # cancelled (the client went away): the replica's count must not leak
            await stack.aclose()
            raise
        stack.push_async_callback(answer.aclose)
        relayed.status = answer.status_code
        if answer.status_code == 200 and stream:
            relayed.lines = answer.aiter_lines()
            return relayed
        try:
            raw = await answer.aread()
        except httpx.HTTPError as exc:
            await stack.aclose()
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            await stack.aclose()
            raise
        relayed.text = capped(raw.decode("utf-8", "replace"))
        try:
            relayed.body = json.loads(raw)
        except ValueError:
            relayed.body = None
        return relayed

    # the one path ------------------------------------------------------------------------------
    async def open(
        self,
        entry: AdapterEntry | None,
        route: str,
        body: dict[str, Any],
        *,
        stream: bool,
        retryable: bool = True,
        timeout: float | None = None,
    ) -> Relayed:
        """The first answer a replica gives to ``body`` for ``entry`` (None: the base model).

        The caller must ``aclose`` it. Engine error answers come back as they are (``status`` ≠ 200);
        what stopped every replica from answering raises.

        Raises:
            RequestError: UNAVAILABLE when no replica could be reached; INVALID_ARGUMENT, with the
                engines' reasons, when every replica refused to load the adapter.
        """
        key = entry.name if entry else None
        candidates = self.pool.ordered(key)
        if not candidates:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, f"no replica is ready ({len(self.pool.replicas)} known): retry later"
            )
        refused: list[LoadRefused] = []
        failed: list[str] = []
        for replica in candidates:
            if failed and not retryable:
                break
            try:
                if entry is not None:
                    await self.pool.ensure_loaded(replica, entry)
                relayed = await self._send(replica, entry, route, body, stream=stream, timeout=timeout)
                lost = (
                    entry is not None
                    and self.facts.loading is not None
                    and relayed.status != 200
                    and self.facts.is_not_resident(relayed.status, relayed.error().message)
                )
                if lost and entry is not None:
                    # The engine lost it (restarted, or unloaded by someone else): load, send once more.
                    await relayed.aclose()
                    replica.resident.discard(entry.name)
                    self.metrics.upstream_failures.labels(replica.address, "cache_miss").inc()
                    await self.pool.ensure_loaded(replica, entry)
                    relayed = await self._send(replica, entry, route, body, stream=stream, timeout=timeout)
                return relayed
            except LoadRefused as exc:
                refused.append(exc)
            except Unreachable as exc:
                self.pool.mark_down(replica, str(exc))
                self.metrics.upstream_failures.labels(replica.address, "unavailable").inc()
                failed.append(f"replica {replica.address} unavailable: {exc}")
                if len(failed) > 1:
                    break  # retried once already
                log.warning("retrying %s elsewhere: replica %s unavailable: %s", key, replica.address, exc)
        if refused and not failed:
            reasons = "; ".join(f"replica {r.replica}: {r.reason}" for r in refused)
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"adapter {shown(key)} could not be loaded on any replica: {reasons}"
            )
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "; ".join(failed) or "no replica could serve the request")

    # the gRPC front's KServe v2 requests ----------------------------------------------------
    def _completion(self, plan: Plan) -> tuple[dict[str, Any], bool]:
        body, ids = completion_body(plan.upstream.request)
        if ids and self.facts.token_ids_field:
            body[self.facts.token_ids_field] = True
        return body, ids

    async def unary(self, plan: Plan, remaining: Callable[[], float | None]) -> bytes:
        """The serialized ``ModelInferResponse`` of a KServe v2 request."""
        body, ids = self._completion(plan)
        relayed = await self.open(
            plan.entry, COMPLETIONS, body, stream=False, retryable=plan.retryable, timeout=remaining()
        )
        try:
            if relayed.status != 200:
                raise relayed.error()
            text, token_ids = choice_of(relayed.body if isinstance(relayed.body, dict) else {})
        finally:
            await relayed.aclose()
        request = plan.upstream.request
        return infer_response(request, text, token_ids if ids else None).SerializeToString()

    async def stream(
        self, plan: Plan, remaining: Callable[[], float | None]
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """``ModelStreamInfer`` answers of a KServe v2 request: one per streamed chunk."""
        body, ids = self._completion(plan)
        body["stream"] = True
        relayed = await self.open(
            plan.entry, COMPLETIONS, body, stream=True, retryable=plan.retryable, timeout=remaining()
        )
        request = plan.upstream.request
        try:
            if relayed.status != 200 or relayed.lines is None:
                raise relayed.error()
            async for line in relayed.lines:
                data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                    error = engine_error(_status(chunk["error"].get("code")), chunk, "engine error")
                    yield service_pb2.ModelStreamInferResponse(error_message=f"[{error.code}] {error.message}")
                    return
                text, token_ids = choice_of(chunk if isinstance(chunk, dict) else {})
                if not text and not token_ids:
                    continue
                answer = infer_response(request, text, token_ids if ids else None)
                yield service_pb2.ModelStreamInferResponse(infer_response=answer)
        finally:
            await relayed.aclose()
