"""The Triton replicas behind the router: discovery, health, load and LoRA residency.

Replicas come from a static list or from a DNS name resolved every ``dns_interval`` seconds (a
Kubernetes headless Service resolves to one address per ready pod). Each is asked ``ServerReady``
every ``health_interval`` seconds: a failure takes it out of rotation, a success brings it back.
A replica that was out (or is new) starts with an empty residency mirror, since a restarted Triton
has an empty LoRA cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from phlora_nim.router.config import RouterConfig, split_host_port
from phlora_nim.router.errors import RequestError, shown
from phlora_nim.router.lru import LruSet
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.routing import choose_replicas

log = logging.getLogger("phlora_nim.router")
T = TypeVar("T")

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# Reconnect quickly after a replica restarts (gRPC's default backoff grows to two minutes).
_BACKOFF = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class ModelInfo:
    """What the router needs to know of an upstream model to shape LoRA inputs."""

    max_batch_size: int  # 0: the model does not batch
    lora_datatype: str | None  # of its lora_weights input (FP16, BF16, FP32); None: it takes no LoRA
    decoupled: bool = False  # answers through ModelStreamInfer only, any number of responses
    inputs: frozenset[str] = frozenset()  # the input names it declares
    parameters: tuple[tuple[str, str], ...] = ()  # its config's string parameters


class Replica:
    """One Triton server: its channel, in-flight count and which adapters it was sent."""

    def __init__(self, address: str, *, options: list[tuple[str, int]], residency_capacity: int) -> None:
        self.address = address
        # Triton echoes client values (input names, datatypes) in its error messages, which travel in
        # trailers: take them whatever their size (up to the message limit) and cut them before they
        # go back to the client, rather than fail the call with RESOURCE_EXHAUSTED.
        limit = dict(options).get("grpc.max_receive_message_length", 4 << 20)
        trailers = [("grpc.max_metadata_size", limit), ("grpc.absolute_max_metadata_size", limit)]
        self.channel = grpc.aio.insecure_channel(address, options=[*options, *trailers, *_BACKOFF])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        # ModelInfer answers go back to the client untouched: keep them as bytes (no parse, no re-encode).
        # Requests go out as bytes built by UpstreamRequest (serialized once, LoRA inputs appended).
        self.model_infer_raw = self.channel.unary_unary(
            MODEL_INFER_METHOD, request_serializer=None, response_deserializer=None
        )
        self.model_stream_raw = self.channel.stream_stream(
            MODEL_STREAM_INFER_METHOD,
            request_serializer=None,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self.healthy = False
        self.downs = 0  # times taken out of rotation: a check that started before the last one is stale
        self.in_flight = 0
        self.resident: LruSet[int] = LruSet(residency_capacity)

    def __repr__(self) -> str:
        return f"Replica({self.address}, healthy={self.healthy}, in_flight={self.in_flight})"


async def resolve_upstreams(config: RouterConfig) -> set[str]:
    """The replicas' ``host:port`` addresses: ``--upstream`` as given, else every address ``--upstream-dns``
    resolves to (a headless Service's pods)."""
    if config.upstreams:
        return set(config.upstreams)
    host, port = split_host_port(config.upstream_dns or "", flag="--upstream-dns")
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(None, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    found = set()
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return found


class BackgroundRounds:
    """The health and DNS rounds a pool of replicas runs in the background, for both kinds of pool."""

    config: RouterConfig
    metrics: RouterMetrics
    _tasks: list[asyncio.Task[None]]
    _probes: dict[str, asyncio.Future[None]]

    async def refresh_members(self) -> None:
        raise NotImplementedError

    async def check_all(self) -> None:
        raise NotImplementedError

    async def _close_replicas(self) -> None:
        raise NotImplementedError

    async def check(self, replica: Any) -> None:
        raise NotImplementedError

    def _publish(self) -> None:
        raise NotImplementedError

    async def probe(self, replica: Any) -> bool:
        """Check ``replica`` now (one check shared by concurrent callers); a failure takes it out of rotation."""
        task = self._probes.get(replica.address)
        if task is None or task.done():
            task = asyncio.ensure_future(self.check(replica))
            self._probes[replica.address] = task
        await asyncio.shield(task)  # a caller giving up does not cancel the others' check
        self._publish()
        return replica.healthy

    def mark_down(self, replica: Any, reason: str) -> None:
        """Take a replica out of rotation now (a call to it failed as unavailable)."""
        if replica.healthy:
            log.warning("replica %s out of rotation: %s", replica.address, reason)
        replica.healthy = False
        replica.downs += 1
        self.metrics.replica_healthy.labels(replica.address).set(0)
        self._publish()

    async def _loop(self, interval: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await action()
            except Exception:  # a loop must survive anything one round throws
                log.exception("background round failed")

    async def start(self) -> None:
        await self.refresh_members()
        self._tasks.append(asyncio.create_task(self._loop(self.config.health_interval, self.check_all)))
        if self.config.upstream_dns:
            self._tasks.append(asyncio.create_task(self._loop(self.config.dns_interval, self.refresh_members)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._close_replicas()


class ReplicaPool(BackgroundRounds):
    """Every known replica, kept current by the DNS and health loops.

    Args:
        config: the router's settings.
        metrics: where replica gauges go.
        on_change: called with the number of healthy replicas whenever it changes.
    """

    def __init__(
        self, config: RouterConfig, metrics: RouterMetrics, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.on_change = on_change
        self.replicas: dict[str, Replica] = {}
        self.models: set[str] | None = None  # upstream model names, once a replica answered
        self.index: list[service_pb2.RepositoryIndexResponse.ModelIndex] = []
        self._infos: dict[str, ModelInfo] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._healthy_count = -1

    # discovery -----------------------------------------------------------------------------
    async def _resolve(self) -> set[str]:
        return await resolve_upstreams(self.config)

    async def refresh_members(self) -> None:
        """Resolve the upstreams; add new replicas (checked at once), drop vanished ones."""
        try:
            found = await self._resolve()
        except OSError as exc:
            log.warning("cannot resolve %s, keeping %d replicas: %s", self.config.upstream_dns, len(self.replicas), exc)
            return
        for address in sorted(found - set(self.replicas)):
            log.info("replica %s added", address)
            self.replicas[address] = Replica(
                address, options=self.config.channel_options(), residency_capacity=self.config.residency_capacity
            )
        for address in sorted(set(self.replicas) - found):
            log.info("replica %s removed (no longer resolved)", address)
            gone = self.replicas.pop(address)
            self.metrics.forget_replica(address)
            asyncio.get_running_loop().call_later(
                self.config.grace, lambda ch=gone.channel: asyncio.ensure_future(ch.close())
            )
        await self.check_all()

    # health ----------------------------------------------------------------------------------
    async def check(self, replica: Replica) -> None:
        timeout = min(2.0, self.config.health_interval)
        downs = replica.downs
        try:
            ready = (await replica.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)).ready
            reason = "ServerReady false"
        except grpc.aio.AioRpcError as exc:
            ready, reason = False, f"{exc.code().name}: {exc.details()}"
        if ready and replica.downs != downs:
            return  # taken out of rotation while this check was under way: its "ready" is older news
        if ready and not replica.healthy:
            replica.resident.clear()  # new or restarted: its LoRA cache is empty
            self._infos.clear()
            log.info("replica %s ready", replica.address)
        elif not ready and replica.healthy:
            log.warning("replica %s out of rotation: %s", replica.address, reason)
        if not ready:
            replica.downs += 1
        replica.healthy = ready
        self.metrics.replica_healthy.labels(replica.address).set(1 if ready else 0)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))
        await self._refresh_index()
        self._publish()

    def _publish(self) -> None:
        count = len(self.healthy())
        self.metrics.healthy_replicas.set(count)
        if count != self._healthy_count:
            self._healthy_count = count
            if self.on_change:
                self.on_change(count)

    async def _refresh_index(self) -> None:
        with contextlib.suppress(RequestError):
            response = await self.control(
                lambda stub, timeout: stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=timeout)
            )
            self.index = list(response.models)
            self.models = {m.name for m in response.models}

    async def _close_replicas(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas.values()), return_exceptions=True)

    # selection -------------------------------------------------------------------------------
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    def ordered(self, adapter: str | None) -> list[Replica]:
        """Healthy replicas in the order to try them for ``adapter`` (None: base model)."""
        healthy = {r.address: r for r in self.healthy()}
        loads = {a: r.in_flight for a, r in healthy.items()}
        return [healthy[a] for a in choose_replicas(adapter, loads, spill_factor=self.config.spill_factor)]

    @contextlib.contextmanager
    def busy(self, replica: Replica) -> Iterator[Replica]:
        """Count a request in flight on ``replica`` for the duration of the block."""
        replica.in_flight += 1
        gauge = self.metrics.replica_in_flight.labels(replica.address)
        gauge.inc()
        try:
            yield replica
        finally:
            replica.in_flight -= 1
            gauge.dec()

    # control RPCs ----------------------------------------------------------------------------
    async def control(self, call: Callable[[service_pb2_grpc.GRPCInferenceServiceStub, float], Awaitable[T]]) -> T:
        """Run a metadata RPC on the first healthy replica that answers.

        A replica that does not answer within ``attempt_timeout`` (at most 10 s) and then fails a
        readiness probe is hung: taken out of rotation, and the next one is asked.

        Raises:
            RequestError: UNAVAILABLE when none answers; the upstream status otherwise.
        """
        replicas = self.ordered(None)
        last = "no Triton replica is ready"
        for replica in replicas:
            try:
                return await call(replica.stub, min(10.0, self.config.attempt_timeout))
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and await self.probe(replica):
                    raise RequestError(code, exc.details() or code.name) from None  # alive, merely slow
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise RequestError(code, exc.details() or code.name) from None
                self.mark_down(replica, exc.details() or "unavailable")
                last = f"replica {replica.address}: {exc.details()}"
        raise RequestError(grpc.StatusCode.UNAVAILABLE, last)

    async def model_info(self, model: str) -> ModelInfo:
        """Batch limit and ``lora_weights`` datatype of ``model`` (from its config, cached)."""
        if model in self._infos:
            return self._infos[model]
        response = await self.control(
            lambda stub, timeout: stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=timeout)
        )
        datatype = next(
            (
                model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
                for t in response.config.input
                if t.name == "lora_weights"
            ),
            None,
        )
        config = response.config
        info = ModelInfo(
            max_batch_size=int(config.max_batch_size),
            lora_datatype=datatype,
            decoupled=bool(config.model_transaction_policy.decoupled),
            inputs=frozenset(t.name for t in config.input),
            parameters=tuple(sorted((k, v.string_value) for k, v in config.parameters.items())),
        )
        self._infos[model] = info
        return info

    async def lora_datatype(self, model: str) -> str:
        """Datatype of ``model``'s ``lora_weights`` input (FP16, BF16 or FP32), cached.

        Raises:
            RequestError: FAILED_PRECONDITION when the model takes no LoRA weights.
        """
        datatype = (await self.model_info(model)).lora_datatype
        if datatype is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"upstream model {shown(model)} has no lora_weights input: it cannot serve adapters",
            )
        return datatype
