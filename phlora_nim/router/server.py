"""The router's gRPC server: :class:`Router` (asyncio) and :class:`RouterThread` (for tests and tools).

One ``grpc.aio`` server carries the KServe v2 inference service, ``grpc.health.v1`` (SERVING
while at least one replica is ready) and server reflection.

Example:
    >>> config = RouterConfig(Path("model_repository"), upstreams=("127.0.0.1:8001",), port=0)  # doctest: +SKIP
    >>> with RouterThread(config) as router:  # doctest: +SKIP
    ...     client = tritonclient.grpc.InferenceServerClient(router.address)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2, service_pb2_grpc

from phlora_nim.core.errors import OptionError
from phlora_nim.router.catalog import AdapterCatalog
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.core import RouterCore, build_core
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.replicas import ReplicaPool
from phlora_nim.router.service import RouterService
from phlora_nim.router.tenants import TenantTable, load_tenants
from phlora_nim.router.weights import WeightStore

log = logging.getLogger("phlora_nim.router")
T = TypeVar("T")

INFERENCE_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class _HandlerTable:
    """Stands in for a server to collect the generated handler table of a servicer."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def add_inference_service(service: RouterService, server: grpc.aio.Server) -> None:
    """Register the servicer with the generated handlers, except that inference requests reach it as
    the bytes received (forwarded without re-serializing) and ``ModelInfer`` answers with the
    upstream's bytes as they came (its servicer method returns ``bytes``)."""
    table = _HandlerTable()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, table)
    table.handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        service.ModelInfer, request_deserializer=None, response_serializer=None
    )
    table.handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        service.ModelStreamInfer,
        request_deserializer=None,
        response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, table.handlers),))
    server.add_registered_method_handlers(INFERENCE_SERVICE, table.handlers)


class Router:
    """The router on the running event loop: ``await start()``, serve, ``await stop()``.

    Raises (from :meth:`start`):
        InputError: a bad tenants file or registry; OptionError: the port cannot be bound.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.catalog = AdapterCatalog(config.model_repository)
        self.store = WeightStore(config.model_repository, max_bytes=config.weight_cache_mb * 1024 * 1024)
        self.health = HealthServicer()
        self.pool: Any = self._pool()
        self.tenants: TenantTable | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.core: RouterCore | None = None
        self.http: Any = None  # the OpenAI-compatible front (phlora_nim.router.openai), when config.http_port
        self._tasks: list[asyncio.Task[None]] = []
        self._health_tasks: set[asyncio.Future[None]] = set()

    def _pool(self) -> Any:
        """The replicas, reached the way the engine is (KServe v2 gRPC, or the OpenAI API)."""
        if not self.config.speaks_openai:
            return ReplicaPool(self.config, self.metrics, on_change=self._health_changed)
        from phlora_nim.engines.registry import engine
        from phlora_nim.router.upstreams.openai_pool import OpenAIPool

        facts = engine(self.config.engine).openai_facts()
        policy: Any = self.config.routing_policy
        self.metrics.rank_of = lambda name: e.max_rank if (e := self.catalog.adapters.get(name)) else None
        return OpenAIPool(self.config, facts, self.metrics, on_change=self._health_changed, policy=policy)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """The OpenAI API's base URL (``http://host:port/v1``), when the HTTP front is on."""
        return None if self.http is None else f"http://{self.config.host}:{self.http.port}/v1"

    def _health_changed(self, healthy: int) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", INFERENCE_SERVICE):
            task = asyncio.ensure_future(self.health.set(service, status))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    def _refresh_registry(self) -> None:
        before = self.catalog.adapters
        gone = self.catalog.refresh()
        if gone:
            self.store.forget(gone)
        self.metrics.adapters.set(len(self.catalog.adapters))
        if self.catalog.adapters is not before and hasattr(self.pool, "forget"):  # removals reach the replicas
            task = asyncio.ensure_future(self.pool.forget(dict(self.catalog.adapters)))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(self.config.registry_interval)
            try:
                self._refresh_registry()
            except Exception:
                log.exception("registry check failed")

    async def start(self) -> None:
        config = self.config
        if config.tenants is not None:
            self.tenants = load_tenants(config.tenants)
            log.info("tenancy on: %d tenants", len(self.tenants.tenants))
        self._refresh_registry()
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(INFERENCE_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.pool.start()
        # gRPC turns SO_REUSEPORT on by default: a second router on a taken port would silently
        # share it. Off, a taken port is an error; on only for the workers of one `serve --workers N`.
        reuse = ("grpc.so_reuseport", 1 if config.reuse_port else 0)
        server = grpc.aio.server(options=[*config.channel_options(), reuse])
        self.core = build_core(
            config,
            catalog=self.catalog,
            store=self.store,
            tenants=self.tenants,
            metrics=self.metrics,
            pool=self.pool,
            refresh_registry=self._refresh_registry,
        )
        service = RouterService(self.core)
        add_inference_service(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        bind = f"{config.host}:{config.port}" if ":" not in config.host else f"[{config.host}]:{config.port}"
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
                )
                self.port = server.add_secure_port(bind, credentials)
            else:
                self.port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            await self.pool.stop()
            raise OptionError("cannot listen", where="--host / --port", found=f"{bind}: {exc}") from None
        await server.start()
        self.server = server
        if config.http_port:
            from phlora_nim.router.openai.server import OpenAIServer  # FastAPI only when the front is on

            http = OpenAIServer(self.core)
            try:
                await http.start()
            except BaseException:
                await server.stop(0)
                await self.pool.stop()
                raise
            self.http = http
        if config.metrics_port:
            self.metrics_port = self.metrics.serve(config.host, max(config.metrics_port, 0))  # ANY_FREE_PORT: 0
        self._tasks.append(asyncio.create_task(self._watch_registry()))
        log.info(
            "router on %s%s: %d adapters, %d/%d replicas ready, upstream model %s",
            self.address,
            " (TLS)" if config.tls_cert else "",
            len(self.catalog.adapters),
            len(self.pool.healthy()),
            len(self.pool.replicas),
            config.upstream_model,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish for ``grace`` seconds, then close."""
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.server is not None:
            await self.server.stop(self.config.grace if grace is None else grace)
            self.server = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.pool.stop()
        self.metrics.close()
        log.info("router stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


class RouterThread:
    """A :class:`Router` running in its own event-loop thread (a context manager).

    Attributes:
        router: the router (inspect its pool, metrics, catalog from the test's thread with care).
        address: ``host:port`` to point a Triton client at.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.router = Router(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="phlora-router", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the router's loop and wait for its result."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    @property
    def address(self) -> str:
        return self.router.address

    @property
    def http_url(self) -> str | None:
        return self.router.http_url

    def start(self) -> RouterThread:
        self._thread.start()
        try:
            self.call(self.router.start())
        except BaseException:
            self.close()
            raise
        return self

    def close(self, grace: float = 1.0) -> None:
        if self._thread.is_alive():
            try:
                self.call(self.router.stop(grace))
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> RouterThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
