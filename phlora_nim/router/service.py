"""The KServe v2 ``GRPCInferenceService`` of the router: adapter-aware, in front of Triton replicas.

Inference requests name an adapter (model name, ``lora_adapter`` parameter or ``phlora-adapter``
metadata, in that order); the router checks the tenant, picks a replica (rendezvous hashing with
bounded load), appends ``lora_task_id`` and, when the replica was not sent the adapter yet, its
weights. A replica answering ``not found in cache`` (it evicted the adapter) gets the request
again once with the weights; ``Cache is full`` sends the request to the next replica, and when
every replica is full the client gets ``RESOURCE_EXHAUSTED``. A replica that is unavailable is
taken out of rotation and a unary request is retried once on another; a stream is retried only
when nothing was delivered yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from phlora_nim.repository.registry import AdapterEntry
from phlora_nim.router.catalog import AdapterCatalog
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.metrics import UNKNOWN, RouterMetrics
from phlora_nim.router.replicas import Replica, ReplicaPool
from phlora_nim.router.rewrite import (
    ADAPTER_METADATA,
    LORA_INPUTS,
    LoraTensors,
    RequestError,
    Selection,
    add_lora,
    check_request,
    retarget,
    select,
)
from phlora_nim.router.tenants import Tenant, TenantTable
from phlora_nim.router.weights import WeightStore

log = logging.getLogger("phlora_nim.router")
T = TypeVar("T")

MISS = "not found in cache"
FULL = "Cache is full"


class _CacheFull(Exception):
    """The replica's LoRA cache has no room now: try another one."""


@dataclass
class _Attempt:
    delivered: bool = False


@dataclass(frozen=True)
class Plan:
    """A checked request: what to send upstream, for which adapter, counted under which label."""

    label: str
    selection: Selection
    entry: AdapterEntry | None
    request: service_pb2.ModelInferRequest  # aimed at the upstream model, without LoRA inputs

    @property
    def key(self) -> str | None:
        return self.entry.name if self.entry else None

    def with_lora(self, tensors: LoraTensors | None) -> service_pb2.ModelInferRequest:
        """The request with this adapter's id (and weights); rewritten in place, no copy of the payload."""
        assert self.entry is not None
        add_lora(self.request, self.entry.task_id, tensors)
        return self.request


def _stream_error(
    request: service_pb2.ModelInferRequest, code: grpc.StatusCode, message: str
) -> service_pb2.ModelStreamInferResponse:
    return service_pb2.ModelStreamInferResponse(
        error_message=f"[{code}] {message}",
        infer_response=service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


class RouterService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The servicer; RPCs not defined here answer ``UNIMPLEMENTED`` (the base class)."""

    def __init__(
        self,
        *,
        config: RouterConfig,
        catalog: AdapterCatalog,
        pool: ReplicaPool,
        store: WeightStore,
        tenants: TenantTable | None,
        metrics: RouterMetrics,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.pool = pool
        self.store = store
        self.tenants = tenants
        self.metrics = metrics
        self._tenant_load: dict[str, int] = {}

    # common ----------------------------------------------------------------------------------
    @staticmethod
    def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
        return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Tenant | None:
        if self.tenants is None:
            return None
        tenant = self.tenants.authenticate(self._metadata(context).get("authorization"))
        if tenant is None:
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key: send 'authorization: Bearer <key>'"
            )
        return tenant

    def _visible_adapter(self, name: str, tenant: Tenant | None) -> bool:
        return name in self.catalog.adapters and (tenant is None or tenant.allows_adapter(name))

    def _visible_model(self, name: str, tenant: Tenant | None) -> bool:
        known = self.pool.models is None or name in self.pool.models
        return known and (tenant is None or tenant.allows_base_model(name))

    @staticmethod
    def _remaining(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded in the router")
        return remaining

    def _plan(
        self, request: service_pb2.ModelInferRequest, metadata_adapter: str | None, tenant: Tenant | None
    ) -> Plan:
        check_request(request)
        selection = select(
            request,
            adapters=self.catalog.adapters,
            metadata_adapter=metadata_adapter,
            upstream_model=self.config.upstream_model,
        )
        name = selection.adapter
        if name is None:
            if not self._visible_model(request.model_name, tenant):
                if tenant is not None and self.pool.models is not None and request.model_name in self.pool.models:
                    raise RequestError(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"model '{request.model_name}' is not allowed for this API key",
                    )
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model or adapter '{request.model_name}'")
            return Plan(label=f"base:{request.model_name}", selection=selection, entry=None, request=request)
        if tenant is not None and not tenant.allows_adapter(name):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, f"adapter '{name}' is not allowed for this API key")
        entry = self.catalog.adapters.get(name)
        if entry is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown adapter '{name}' (not in the registry)")
        if self.pool.models is not None and selection.model not in self.pool.models:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model '{selection.model}' for adapter '{name}'")
        return Plan(label=name, selection=selection, entry=entry, request=retarget(request, selection.model))

    @contextlib.contextmanager
    def _admit(self, tenant: Tenant | None, label: str) -> Iterator[None]:
        limit = tenant.max_in_flight if tenant is not None else None
        if tenant is not None and limit is not None and self._tenant_load.get(tenant.name, 0) >= limit:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tenant '{tenant.name}' has {tenant.max_in_flight} requests in flight, its limit: retry later",
            )
        if tenant is not None:
            self._tenant_load[tenant.name] = self._tenant_load.get(tenant.name, 0) + 1
        gauge = self.metrics.in_flight.labels(label)
        gauge.inc()
        self.metrics.total_in_flight.inc()
        try:
            yield
        finally:
            gauge.dec()
            self.metrics.total_in_flight.dec()
            if tenant is not None:
                self._tenant_load[tenant.name] -= 1

    def _done(self, label: str, started: float, code: grpc.StatusCode | None) -> None:
        m = self.metrics
        m.requests.labels(label).inc()
        m.total_requests.inc()
        m.latency.labels(label).observe(time.perf_counter() - started)
        if code is not None:
            m.errors.labels(label, code.name).inc()

    async def _tensors(self, plan: Plan) -> LoraTensors:
        assert plan.entry is not None
        datatype = await self.pool.lora_datatype(plan.selection.model)
        loop = asyncio.get_running_loop()
        tensors = await loop.run_in_executor(None, self.store.get, plan.entry, datatype)
        self.metrics.weight_cache_bytes.set(self.store.bytes)
        return tensors

    def _candidates(self, plan: Plan) -> list[Replica]:
        replicas = self.pool.ordered(plan.key)
        if not replicas:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"no Triton replica is ready ({len(self.pool.replicas)} known): retry later",
            )
        return replicas

    # unary inference -------------------------------------------------------------------------
    async def ModelInfer(self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        """Unary inference; the answer is the upstream's serialized ``ModelInferResponse``, passed through."""
        started, label = time.perf_counter(), UNKNOWN
        try:
            tenant = self._authenticate(context)
            plan = self._plan(request, self._metadata(context).get(ADAPTER_METADATA), tenant)
            label = plan.label
            with self._admit(tenant, label):
                response = await self._unary(plan, context)
        except RequestError as exc:
            self._done(label, started, exc.code)
            log.info("ModelInfer %s: %s %s", label, exc.code.name, exc.message)
            await context.abort(exc.code, exc.message)
        self._done(label, started, None)
        return response

    async def _unary(self, plan: Plan, context: grpc.aio.ServicerContext) -> bytes:
        candidates = self._candidates(plan)
        retried, full = False, []
        while candidates:
            replica = candidates.pop(0)
            try:
                return await self._unary_on(replica, plan, context)
            except _CacheFull:
                full.append(replica.address)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or exc.code().name
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise RequestError(code, details) from None
                self.pool.mark_down(replica, details)
                if retried or not candidates:
                    raise RequestError(code, f"replica {replica.address} unavailable: {details}") from None
                retried = True
                log.info("retrying %s elsewhere: replica %s unavailable", plan.label, replica.address)
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the LoRA cache is full on every replica tried ({', '.join(full)}): retry later",
        )

    async def _unary_on(self, replica: Replica, plan: Plan, context: grpc.aio.ServicerContext) -> bytes:
        with self.pool.busy(replica):
            if plan.entry is None:
                return await replica.model_infer_raw(plan.request, timeout=self._remaining(context))
            task_id = plan.entry.task_id
            if replica.resident.touch(task_id):
                try:
                    return await replica.model_infer_raw(plan.with_lora(None), timeout=self._remaining(context))
                except grpc.aio.AioRpcError as exc:
                    if MISS not in (exc.details() or ""):
                        raise
                replica.resident.discard(task_id)
                self.metrics.resident.labels(replica.address).set(len(replica.resident))
                self.metrics.cache_misses.labels(replica.address).inc()
                self.metrics.adapter_resends.labels(plan.label).inc()
                log.debug("adapter %s evicted on %s: sending weights", plan.label, replica.address)
            tensors = await self._tensors(plan)
            request = plan.with_lora(tensors)
            self.metrics.weight_sends.labels(replica.address).inc()
            self.metrics.weight_bytes.labels(plan.label).inc(tensors.nbytes)
            try:
                response = await replica.model_infer_raw(request, timeout=self._remaining(context))
            except grpc.aio.AioRpcError as exc:
                if FULL in (exc.details() or ""):
                    raise _CacheFull from None
                raise
            replica.resident.add(task_id)
            self.metrics.resident.labels(replica.address).set(len(replica.resident))
            return response

    # streaming inference ---------------------------------------------------------------------
    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        try:
            tenant = self._authenticate(context)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        metadata_adapter = self._metadata(context).get(ADAPTER_METADATA)
        out: asyncio.Queue[service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: service_pb2.ModelInferRequest) -> None:
            async with contextlib.aclosing(self._stream_one(request, metadata_adapter, tenant, context)) as responses:
                async for response in responses:
                    await out.put(response)

        async def reader() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await out.put(None)

        read_task = asyncio.create_task(reader())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(
        self,
        request: service_pb2.ModelInferRequest,
        metadata_adapter: str | None,
        tenant: Tenant | None,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        started, label, code = time.perf_counter(), UNKNOWN, None
        asked = service_pb2.ModelInferRequest(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        try:
            plan = self._plan(request, metadata_adapter, tenant)
            label = plan.label
            with self._admit(tenant, label):
                async with contextlib.aclosing(self._stream_route(plan, context)) as responses:
                    async for response in responses:
                        if response.error_message:
                            code = grpc.StatusCode.INTERNAL
                        yield response
        except RequestError as exc:
            code = exc.code
            log.info("ModelStreamInfer %s: %s %s", label, exc.code.name, exc.message)
            yield _stream_error(asked, exc.code, exc.message)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            yield _stream_error(asked, exc.code(), exc.details() or "")
        finally:
            self._done(label, started, code)

    async def _stream_route(
        self, plan: Plan, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        candidates = self._candidates(plan)
        retried, full = False, []
        while candidates:
            replica = candidates.pop(0)
            attempt = _Attempt()
            try:
                async with contextlib.aclosing(self._stream_on(replica, plan, context, attempt)) as responses:
                    async for response in responses:
                        yield response
                return
            except _CacheFull:
                full.append(replica.address)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or exc.code().name
                if code != grpc.StatusCode.UNAVAILABLE or attempt.delivered:
                    raise RequestError(code, details) from None
                self.pool.mark_down(replica, details)
                if retried or not candidates:
                    raise RequestError(code, f"replica {replica.address} unavailable: {details}") from None
                retried = True
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the LoRA cache is full on every replica tried ({', '.join(full)}): retry later",
        )

    async def _upstream_stream(
        self, replica: Replica, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        call = replica.stub.ModelStreamInfer(timeout=self._remaining(context))
        try:
            await call.write(request)
            await call.done_writing()
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def _stream_on(
        self, replica: Replica, plan: Plan, context: grpc.aio.ServicerContext, attempt: _Attempt
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        with self.pool.busy(replica):
            if plan.entry is None:
                async with contextlib.aclosing(self._upstream_stream(replica, plan.request, context)) as responses:
                    async for response in responses:
                        attempt.delivered = True
                        yield response
                return
            task_id = plan.entry.task_id
            if replica.resident.touch(task_id):
                missed = False
                async with contextlib.aclosing(
                    self._upstream_stream(replica, plan.with_lora(None), context)
                ) as responses:
                    async for response in responses:
                        if not attempt.delivered and MISS in response.error_message:
                            missed = True  # read on: the upstream call ends by itself after its final answer
                        if missed:
                            continue
                        attempt.delivered = True
                        yield response
                if not missed:
                    return
                replica.resident.discard(task_id)
                self.metrics.resident.labels(replica.address).set(len(replica.resident))
                self.metrics.cache_misses.labels(replica.address).inc()
                self.metrics.adapter_resends.labels(plan.label).inc()
            tensors = await self._tensors(plan)
            request = plan.with_lora(tensors)
            self.metrics.weight_sends.labels(replica.address).inc()
            self.metrics.weight_bytes.labels(plan.label).inc(tensors.nbytes)
            failed = False
            async with contextlib.aclosing(self._upstream_stream(replica, request, context)) as responses:
                async for response in responses:
                    if not attempt.delivered and FULL in response.error_message:
                        raise _CacheFull
                    failed = failed or bool(response.error_message)
                    attempt.delivered = True
                    yield response
            if not failed:
                replica.resident.add(task_id)
                self.metrics.resident.labels(replica.address).set(len(replica.resident))

    # model and server RPCs -------------------------------------------------------------------
    async def _guard(self, context: grpc.aio.ServicerContext) -> Tenant | None:
        try:
            return self._authenticate(context)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises

    async def _control(
        self,
        context: grpc.aio.ServicerContext,
        call: Callable[[service_pb2_grpc.GRPCInferenceServiceStub, float], Awaitable[T]],
    ) -> T:
        try:
            return await self.pool.control(call)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=bool(self.pool.healthy()))

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        tenant = await self._guard(context)
        if self._visible_adapter(request.name, tenant):
            upstream = service_pb2.ModelReadyRequest(name=self.config.upstream_model)
            return await self._control(context, lambda stub, timeout: stub.ModelReady(upstream, timeout=timeout))
        if request.name in self.catalog.adapters or not self._visible_model(request.name, tenant):
            return service_pb2.ModelReadyResponse(ready=False)
        return await self._control(context, lambda stub, timeout: stub.ModelReady(request, timeout=timeout))

    async def _unknown(self, context: grpc.aio.ServicerContext, name: str) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model or adapter '{name}'")

    async def _describe(self, request: Any, context: grpc.aio.ServicerContext, method: str) -> Any:
        """ModelMetadata / ModelConfig: an adapter is described as the upstream model under the
        adapter's name, without the LoRA inputs (the router sets them); other names pass through."""
        tenant = await self._guard(context)
        adapter = self._visible_adapter(request.name, tenant)
        if not adapter and (request.name in self.catalog.adapters or not self._visible_model(request.name, tenant)):
            await self._unknown(context, request.name)
        upstream = type(request)(name=self.config.upstream_model) if adapter else request
        response = await self._control(context, lambda stub, timeout: getattr(stub, method)(upstream, timeout=timeout))
        if adapter:
            described = response.config if method == "ModelConfig" else response
            inputs = described.input if method == "ModelConfig" else described.inputs
            described.name = request.name
            kept = [t for t in inputs if t.name not in LORA_INPUTS]
            del inputs[:]
            inputs.extend(kept)
        return response

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        response: service_pb2.ModelMetadataResponse = await self._describe(request, context, "ModelMetadata")
        return response

    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelConfigResponse:
        response: service_pb2.ModelConfigResponse = await self._describe(request, context, "ModelConfig")
        return response

    async def RepositoryIndex(
        self, request: service_pb2.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.RepositoryIndexResponse:
        tenant = await self._guard(context)
        upstream = await self._control(context, lambda stub, timeout: stub.RepositoryIndex(request, timeout=timeout))
        models = [m for m in upstream.models if tenant is None or tenant.allows_base_model(m.name)]
        models.extend(
            service_pb2.RepositoryIndexResponse.ModelIndex(name=name, version="1", state="READY")
            for name in sorted(self.catalog.adapters)
            if tenant is None or tenant.allows_adapter(name)
        )
        return service_pb2.RepositoryIndexResponse(models=models)
