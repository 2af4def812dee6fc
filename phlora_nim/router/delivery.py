"""Getting a planned request answered by a replica: failover, the LoRA protocol and residency bookkeeping.

One path serves both unary and streaming inference; a :class:`Transport` says how to send bytes to
a replica and read its answers. For an adapter, a replica believed to hold it gets the id alone; a
``not found in cache`` answer (it evicted the adapter) sends the request once more with the
weights. A full LoRA cache (``Cache is full``, or the runtime's failed ``pageIds.has_value()``
assertion when eviction frees too few pages) moves the request to the next replica, and when every
replica is full the client gets ``RESOURCE_EXHAUSTED``, never ``INTERNAL``. A replica that is
unavailable, or hung (see :mod:`watchdog`), is taken out of rotation and the request is retried
once on another, when nothing was delivered to the client yet and the request is not part of a
stateful sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from tritonclient.grpc import service_pb2

from phlora_nim.engines.trtllm_legacy.contract import FULL, MISS, is_cache_full  # the runtime's texts
from phlora_nim.router.access import Plan
from phlora_nim.router.catalog import AdapterCatalog
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.errors import RequestError, shown
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.replicas import Replica, ReplicaPool
from phlora_nim.router.rewrite import LoraTensors, batch_size
from phlora_nim.router.watchdog import Watchdog
from phlora_nim.router.weights import AdapterFilesError, WeightStore

log = logging.getLogger("phlora_nim.router")
T = TypeVar("T")


class _CacheFull(Exception):
    """The replica's LoRA cache has no room now: try another one."""


class _Missed(Exception):
    """The replica no longer holds the adapter: send the weights."""


def _verdict(text: str, expect: str) -> type[Exception] | None:
    """What an upstream error text means for a call expecting ``expect`` (MISS or FULL; "" = nothing)."""
    if not expect or not text:
        return None
    if is_cache_full(text):  # either call: the id-only one too fails so when the GPU cache has no room
        return _CacheFull
    return _Missed if expect == MISS and MISS in text else None


class _Hung(Exception):
    """The replica stopped answering and failed a readiness probe; the call was cancelled."""


@dataclass
class _Attempt:
    delivered: bool = False  # something went back to the client: the request can no longer move


class Transport(Protocol[T]):
    """How one kind of call reaches a replica."""

    def send(self, replica: Replica, payload: bytes, timeout: float | None, dog: Watchdog) -> AsyncIterator[T]:
        """The replica's answers, the call watched by ``dog``; call-level failures raise ``grpc.aio.AioRpcError``."""
        ...

    def error_of(self, answer: T) -> str:
        """An answer's in-band error text ('' for none)."""
        ...


class Unary:
    """``ModelInfer``: one answer, kept as the upstream's bytes."""

    async def send(
        self, replica: Replica, payload: bytes, timeout: float | None, dog: Watchdog
    ) -> AsyncIterator[bytes]:
        call = replica.model_infer_raw(payload, timeout=timeout)
        dog.watch(call)
        yield await call

    def error_of(self, answer: bytes) -> str:
        return ""


class Streaming:
    """``ModelStreamInfer`` with one request: any number of answers, errors in band."""

    async def send(
        self, replica: Replica, payload: bytes, timeout: float | None, dog: Watchdog
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        call = replica.model_stream_raw(timeout=timeout)
        dog.watch(call)
        try:
            await call.write(payload)
            await call.done_writing()
            async for answer in call:
                dog.answered()
                yield answer
        finally:
            call.cancel()

    def error_of(self, answer: service_pb2.ModelStreamInferResponse) -> str:
        return answer.error_message


UNARY = Unary()
STREAMING = Streaming()


class Delivery:
    """Sends planned requests to replicas and keeps the residency mirror and its metrics current.

    Every method takes ``remaining``: seconds left before the client's deadline (None: no
    deadline), raising ``RequestError`` DEADLINE_EXCEEDED once it has passed.
    """

    def __init__(
        self,
        *,
        config: RouterConfig,
        catalog: AdapterCatalog,
        pool: ReplicaPool,
        store: WeightStore,
        metrics: RouterMetrics,
        refresh_registry: Callable[[], object],
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.refresh_registry = refresh_registry
        self.max_message_bytes = config.max_message_bytes

    async def unary(self, plan: Plan, remaining: Callable[[], float | None]) -> bytes:
        """The upstream's serialized ``ModelInferResponse``."""
        # Read to the end, not just the first answer: the bookkeeping after it must run.
        answers = [answer async for answer in self.deliver(plan, UNARY, remaining)]
        if len(answers) != 1:
            raise RequestError(grpc.StatusCode.INTERNAL, f"the upstream call gave {len(answers)} answers, not 1")
        return answers[0]

    def stream(
        self, plan: Plan, remaining: Callable[[], float | None]
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        return self.deliver(plan, STREAMING, remaining)

    # failover ---------------------------------------------------------------------------------
    def _candidates(self, plan: Plan) -> list[Replica]:
        replicas = self.pool.ordered(plan.key)
        if not replicas:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"no Triton replica is ready ({len(self.pool.replicas)} known): retry later",
            )
        return replicas

    async def deliver(
        self, plan: Plan, transport: Transport[T], remaining: Callable[[], float | None]
    ) -> AsyncIterator[T]:
        """Answers to ``plan`` from the first replica that takes it.

        Raises:
            RequestError: the upstream's status (its message), UNAVAILABLE when no replica could
                serve, RESOURCE_EXHAUSTED when every replica's LoRA cache was full.
        """
        candidates = self._candidates(plan)
        batch = await self._batch(plan)
        retried, full = False, []
        while candidates:
            replica = candidates.pop(0)
            attempt = _Attempt()
            try:
                async with contextlib.aclosing(
                    self._on(replica, plan, batch, transport, remaining, attempt)
                ) as answers:
                    async for answer in answers:
                        yield answer
                return
            except _CacheFull:
                full.append(replica.address)
                self.metrics.upstream_failures.labels(replica.address, "cache_full").inc()
            except (grpc.aio.AioRpcError, _Hung) as exc:
                hung = isinstance(exc, _Hung)
                if isinstance(exc, _Hung):
                    code = grpc.StatusCode.UNAVAILABLE
                    details = f"no answer in {self.config.attempt_timeout:g} s and its readiness probe failed"
                else:
                    code, details = exc.code(), exc.details() or exc.code().name
                    if code != grpc.StatusCode.UNAVAILABLE or attempt.delivered:
                        raise RequestError(code, details) from None
                    self.pool.mark_down(replica, details)
                self.metrics.upstream_failures.labels(replica.address, "hung" if hung else "unavailable").inc()
                if attempt.delivered or retried or not candidates or not plan.retryable:
                    raise RequestError(code, f"replica {replica.address} unavailable: {details}") from None
                retried = True
                log.warning("retrying %s elsewhere: replica %s unavailable: %s", plan.label, replica.address, details)
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the LoRA cache is full on every replica tried ({', '.join(full)}): retry later",
        )

    # one replica ------------------------------------------------------------------------------
    async def _on(
        self,
        replica: Replica,
        plan: Plan,
        batch: int,
        transport: Transport[T],
        remaining: Callable[[], float | None],
        attempt: _Attempt,
    ) -> AsyncIterator[T]:
        """Answers from ``replica``: the id alone when it should hold the adapter, else the weights."""
        with self.pool.busy(replica):
            if plan.entry is None:
                async with contextlib.aclosing(
                    self._send(transport, replica, plan.upstream.plain(), remaining, attempt, expect="")
                ) as answers:
                    async for answer in answers:
                        yield answer
                return
            task_id = plan.entry.task_id
            if replica.resident.touch(task_id):
                try:
                    payload = plan.upstream.with_lora(task_id, batch=batch)
                    async with contextlib.aclosing(
                        self._send(transport, replica, payload, remaining, attempt, expect=MISS)
                    ) as answers:
                        async for answer in answers:
                            yield answer
                    return
                except _Missed:
                    pass
                self._resident(replica, task_id, held=False)
                self.metrics.cache_misses.labels(replica.address).inc()
                self.metrics.upstream_failures.labels(replica.address, "cache_miss").inc()
                self.metrics.adapter_resends.labels(plan.label).inc()
                log.debug("adapter %s evicted on %s: sending weights", plan.label, replica.address)
            tensors = await self._tensors(plan)
            self._check_size(plan, tensors, batch)
            payload = plan.upstream.with_lora(task_id, tensors, batch=batch)
            self.metrics.weight_sends.labels(replica.address).inc()
            self.metrics.weight_bytes.labels(plan.label).inc(tensors.nbytes)
            failed = False
            async with contextlib.aclosing(
                self._send(transport, replica, payload, remaining, attempt, expect=FULL)
            ) as answers:
                async for answer in answers:
                    failed = failed or bool(transport.error_of(answer))
                    yield answer
            if not failed:
                self._resident(replica, task_id, held=True)

    async def _send(
        self,
        transport: Transport[T],
        replica: Replica,
        payload: bytes,
        remaining: Callable[[], float | None],
        attempt: _Attempt,
        *,
        expect: str,
    ) -> AsyncIterator[T]:
        """One upstream call; ``expect`` (MISS or FULL) as its first answer raises :class:`_Missed` /
        :class:`_CacheFull` instead of reaching the client (a full cache, on either call)."""
        missed = False
        dog = Watchdog(self.config.attempt_timeout, lambda: self.pool.probe(replica))
        try:
            async with contextlib.aclosing(transport.send(replica, payload, remaining(), dog)) as answers:
                async for answer in answers:
                    verdict = None if attempt.delivered else _verdict(transport.error_of(answer), expect)
                    if verdict is _CacheFull:
                        raise _CacheFull
                    if verdict is _Missed:
                        missed = True  # read on: the upstream call ends by itself after its final answer
                    if missed:
                        continue
                    attempt.delivered = True
                    yield answer
        except grpc.aio.AioRpcError as exc:
            verdict = None if attempt.delivered else _verdict(exc.details() or "", expect)
            if verdict is not None:
                raise verdict from None
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if dog.hung and task is not None and not task.cancelling():  # our cancel, not the client's
                raise _Hung from None
            raise
        finally:
            dog.close()
        if missed:
            raise _Missed

    # residency and weights --------------------------------------------------------------------
    def _resident(self, replica: Replica, task_id: int, *, held: bool) -> None:
        if held:
            replica.resident.add(task_id)
        else:
            replica.resident.discard(task_id)
        self.metrics.resident.labels(replica.address).set(len(replica.resident))

    async def _batch(self, plan: Plan) -> int:
        """Rows of an adapter request (1 for a base-model request, which gets no LoRA inputs)."""
        if plan.entry is None:
            return 1
        info = await self.pool.model_info(plan.selection.model)
        return batch_size(plan.upstream.request, max_batch_size=info.max_batch_size, model=plan.selection.model)

    def _check_size(self, plan: Plan, tensors: LoraTensors, batch: int) -> None:
        """Refuse a batch whose copies of the adapter would not fit in one upstream message (before building it)."""
        needed = batch * tensors.nbytes + plan.upstream.nbytes
        if needed <= self.max_message_bytes:
            return
        rows = max(0, (self.max_message_bytes - plan.upstream.nbytes) // max(1, tensors.nbytes))
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"a batch of {batch} rows with adapter {shown(plan.label)} needs {needed / 2**20:.0f} MB upstream "
            f"(one copy of its weights per row), more than the {self.max_message_bytes / 2**20:.0f} MB message "
            f"limit: send at most {rows} rows per request",
        )

    async def _tensors(self, plan: Plan) -> LoraTensors:
        assert plan.entry is not None
        datatype = await self.pool.lora_datatype(plan.selection.model)
        loop = asyncio.get_running_loop()
        try:
            tensors = await loop.run_in_executor(None, self.store.get, plan.entry, datatype)
        except AdapterFilesError as exc:
            raise self._unusable(exc) from None
        self.metrics.weight_cache_bytes.set(self.store.bytes)
        return tensors

    def _unusable(self, exc: AdapterFilesError) -> RequestError:
        """The client's answer for unusable adapter files: never a server path (those go to the log).

        The registry is read again first: files are removed with the adapter's entry, and the
        periodic check may not have seen the removal yet.
        """
        log.warning("cannot read the tensors of %s", exc.detail)
        self.refresh_registry()
        name = shown(exc.entry.name)
        current = self.catalog.adapters.get(exc.entry.name)
        if current is None or current.task_id != exc.entry.task_id:
            return RequestError(grpc.StatusCode.NOT_FOUND, f"adapter {name} was removed")
        if exc.missing:
            return RequestError(grpc.StatusCode.UNAVAILABLE, f"adapter {name} cannot be read now: retry later")
        return RequestError(
            grpc.StatusCode.FAILED_PRECONDITION, f"adapter {name} has invalid stored tensors (see the router's log)"
        )
