"""The KServe v2 ``GRPCInferenceService`` of the router: adapter-aware, in front of Triton replicas.

Inference requests name an adapter (model name, ``lora_adapter`` parameter or ``phlora-adapter``
metadata, in that order); :mod:`access` checks the caller and plans the request, :mod:`delivery`
gets it answered by a replica (LoRA protocol, failover; or an OpenAI-speaking replica's
:mod:`~phlora_nim.router.upstreams.openai_delivery`). This module holds the RPCs; the objects they use
come in one :class:`~phlora_nim.router.core.RouterCore`, shared with the HTTP front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from phlora_nim.router.core import RouterCore
from phlora_nim.router.errors import RequestError, unknown
from phlora_nim.router.metrics import UNKNOWN
from phlora_nim.router.rewrite import ADAPTER_METADATA, LORA_INPUTS, parse
from phlora_nim.router.tenants import Tenant

log = logging.getLogger("phlora_nim.router")
T = TypeVar("T")


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

    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.config = core.config
        self.catalog = core.catalog
        self.pool = core.pool
        self.tenants = core.tenants
        self.metrics = core.metrics
        self.access = core.access
        self.delivery = core.delivery
        self.admission = core.admission

    # common ----------------------------------------------------------------------------------
    @staticmethod
    def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
        return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Tenant | None:
        return self.access.authenticate(self._metadata(context))

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> Callable[[], float | None]:
        def remaining() -> float | None:
            left = context.time_remaining()
            if left is not None and left <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded in the router")
            return left

        return remaining

    # unary inference -------------------------------------------------------------------------
    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Unary inference on the request's bytes as received; the answer is the upstream's serialized
        ``ModelInferResponse``, passed through."""
        started, label = time.perf_counter(), UNKNOWN
        try:
            tenant = self._authenticate(context)
            request = parse(data)
            plan = self.access.plan(request, self._metadata(context).get(ADAPTER_METADATA), tenant, wire=data)
            label = plan.label
            with self.admission.admit(tenant, label, adapter=plan.key):
                response = await self.delivery.unary(plan, self._deadline(context))
        except RequestError as exc:
            self.admission.done(label, started, exc.code)
            log.info("ModelInfer %s: %s %s", label, exc.code.name, exc.message)
            await context.abort(exc.code, exc.message)
        self.admission.done(label, started, None)
        return response

    # streaming inference ---------------------------------------------------------------------
    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Streaming inference: requests (bytes as received) are served concurrently, answers and
        per-request errors come back in band as they are ready."""
        try:
            tenant = self._authenticate(context)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        metadata_adapter = self._metadata(context).get(ADAPTER_METADATA)
        out: asyncio.Queue[service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(data: bytes) -> None:
            async with contextlib.aclosing(self._stream_one(data, metadata_adapter, tenant, context)) as responses:
                async for response in responses:
                    await out.put(response)

        async def reader() -> None:
            try:
                async for data in request_iterator:
                    task = asyncio.create_task(one(data))
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
        data: bytes,
        metadata_adapter: str | None,
        tenant: Tenant | None,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        started, label, code = time.perf_counter(), UNKNOWN, None
        asked = service_pb2.ModelInferRequest()
        try:
            request = parse(data)
            asked = service_pb2.ModelInferRequest(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            plan = self.access.plan(request, metadata_adapter, tenant, wire=data)
            label = plan.label
            with self.admission.admit(tenant, label, adapter=plan.key):
                async with contextlib.aclosing(self.delivery.stream(plan, self._deadline(context))) as responses:
                    async for response in responses:
                        if response.error_message:
                            code = grpc.StatusCode.INTERNAL
                        yield response
        except RequestError as exc:
            code = exc.code
            log.info("ModelStreamInfer %s: %s %s", label, exc.code.name, exc.message)
            yield _stream_error(asked, exc.code, exc.message)
        finally:
            self.admission.done(label, started, code)

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
        if self.access.adapter_visible(request.name, tenant):
            upstream = service_pb2.ModelReadyRequest(name=self.config.upstream_model)
            return await self._control(context, lambda stub, timeout: stub.ModelReady(upstream, timeout=timeout))
        if request.name in self.catalog.adapters or not self.access.model_visible(request.name, tenant):
            return service_pb2.ModelReadyResponse(ready=False)
        return await self._control(context, lambda stub, timeout: stub.ModelReady(request, timeout=timeout))

    async def _unknown(self, context: grpc.aio.ServicerContext, name: str) -> None:
        error = unknown(name)
        await context.abort(error.code, error.message)

    async def _describe(self, request: Any, context: grpc.aio.ServicerContext, method: str) -> Any:
        """ModelMetadata / ModelConfig: an adapter is described as the upstream model under the
        adapter's name, without the LoRA inputs (the router sets them); other names pass through."""
        tenant = await self._guard(context)
        adapter = self.access.adapter_visible(request.name, tenant)
        if not adapter and (
            request.name in self.catalog.adapters or not self.access.model_visible(request.name, tenant)
        ):
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
        models = [
            m
            for m in upstream.models
            if self.access.exposed(m.name) and (tenant is None or tenant.allows_base_model(m.name))
        ]
        models.extend(
            service_pb2.RepositoryIndexResponse.ModelIndex(name=name, version="1", state="READY")
            for name in sorted(self.catalog.adapters)
            if tenant is None or tenant.allows_adapter(name)
        )
        return service_pb2.RepositoryIndexResponse(models=models)
