"""Replicas that speak the OpenAI API: discovery, health, residency and adapter loading.

Replicas come from ``--upstream`` URLs or a DNS name (a headless Service), as for Triton. Each is
probed on its engine's readiness path every ``health_interval`` seconds, and its ``/v1/models``
read: what it lists is resident there, together with what the router loaded itself. A replica that
was out (or is new) starts with what it lists, nothing more (a restarted engine forgot its loads).

Loading (where the engine loads at run time): one load per (replica, adapter) at a time, shared by
every request waiting for it (single-flight); beyond ``residency_capacity`` adapters the least
recently used one the router loaded is unloaded. A refused load raises :class:`LoadRefused` with
the engine's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import httpx

from phlora_nim.engines.openai_api import OpenAIEngineFacts
from phlora_nim.repository.layout import adapter_store_dir
from phlora_nim.repository.registry import AdapterEntry
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.errors import RequestError, capped
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.replicas import BackgroundRounds, resolve_upstreams
from phlora_nim.router.routing import choose_replicas, load_bound, rank_replicas

log = logging.getLogger("phlora_nim.router")
# httpx logs every request at INFO: a health check per replica every few seconds would drown the router's log.
logging.getLogger("httpx").setLevel(logging.WARNING)
T = TypeVar("T")
Policy = Literal["adapter-aware", "round-robin"]
_rotation = itertools.count()


class LoadRefused(Exception):
    """The replica would not load the adapter; ``reason`` is the engine's message."""

    def __init__(self, replica: str, status: int, reason: str) -> None:
        super().__init__(f"replica {replica} refused to load it ({status}): {reason}")
        self.replica, self.status, self.reason = replica, status, reason


class Unreachable(Exception):
    """The replica could not be reached (connection refused or reset, timed out)."""


def base_url(address: str) -> str:
    """``http://host:port`` for an ``--upstream`` given as a URL or as ``host:port``."""
    text = address.strip().rstrip("/")
    return text if "://" in text else f"http://{text}"


def error_text(answer: httpx.Response) -> str:
    """The message of an engine's error answer (OpenAI's ``error.message``, vLLM's older flat
    ``message``, SGLang's ``error_message``), else its text."""
    try:
        data = answer.json()
    except ValueError:
        return capped(answer.text.strip() or f"HTTP {answer.status_code}")
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return capped(error["message"])
        for key in ("message", "error_message", "detail"):
            if isinstance(data.get(key), str):
                return capped(data[key])
    return capped(answer.text.strip())


class Residency:
    """Adapters held on one replica, least recently used first; ``ids``: the weights loaded under a name."""

    def __init__(self) -> None:
        self._names: OrderedDict[str, None] = OrderedDict()
        self.ids: dict[str, int] = {}
        self.own: set[str] = set()  # loaded by this router (the ones it may unload)
        self.since: dict[str, float] = {}  # when each name was added (monotonic)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def touch(self, name: str) -> None:
        if name in self._names:
            self._names.move_to_end(name)

    def add(self, name: str, task_id: int | None, *, own: bool) -> None:
        self._names[name] = None
        self._names.move_to_end(name)
        if task_id is not None:
            self.ids[name] = task_id
        if own:
            self.own.add(name)
        self.since[name] = time.monotonic()

    def discard(self, name: str) -> None:
        self._names.pop(name, None)
        self.ids.pop(name, None)
        self.own.discard(name)
        self.since.pop(name, None)

    def clear(self) -> None:
        self._names.clear()
        self.ids.clear()
        self.own.clear()
        self.since.clear()

    def surplus(self, capacity: int, keep: str) -> list[str]:
        """Own loads to unload, least recent first, so that at most ``capacity`` remain (never ``keep``)."""
        extra = len(self._names) - capacity
        return [n for n in self._names if n in self.own and n != keep][: max(0, extra)]


class OpenAIReplica:
    """One OpenAI-speaking server: its HTTP client, in-flight count and resident adapters."""

    def __init__(self, address: str, *, timeout: float) -> None:
        self.address = address
        self.url = base_url(address)
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0), limits=limits)
        self.healthy = False
        self.downs = 0
        self.in_flight = 0
        self.running: dict[str, int] = {}  # adapter → its requests in flight here
        self.base: str | None = None  # the model id it serves the base model under
        self.resident = Residency()
        self.loading: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"OpenAIReplica({self.address}, healthy={self.healthy}, in_flight={self.in_flight})"


class OpenAIPool(BackgroundRounds):
    """Every known OpenAI-speaking replica, kept current by the DNS and health loops.

    Args:
        config: the router's settings (``residency_capacity``: adapters loaded per replica at most).
        facts: the engine's facts.
        metrics: where replica gauges and load counters go.
        on_change: called with the number of healthy replicas whenever it changes.
        policy: ``adapter-aware`` (a replica holding the adapter, else the least busy) or ``round-robin``.
    """

    def __init__(
        self,
        config: RouterConfig,
        facts: OpenAIEngineFacts,
        metrics: RouterMetrics,
        on_change: Callable[[int], None] | None = None,
        *,
        policy: Policy = "adapter-aware",
    ) -> None:
        self.config = config
        self.facts = facts
        self.metrics = metrics
        self.on_change = on_change
        self.policy = policy
        self.replicas: dict[str, OpenAIReplica] = {}
        self.models: set[str] | None = {config.upstream_model}  # what gRPC clients call the base model
        self.loads = 0  # adapter loads this router asked for (successful), all replicas
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._healthy_count = -1
        self.store = Path(config.adapter_store) if config.adapter_store else None

    # discovery -------------------------------------------------------------------------------
    async def _resolve(self) -> set[str]:
        return await resolve_upstreams(self.config)

    async def refresh_members(self) -> None:
        try:
            found = await self._resolve()
        except OSError as exc:
            log.warning("cannot resolve %s, keeping %d replicas: %s", self.config.upstream_dns, len(self.replicas), exc)
            return
        for address in sorted(found - set(self.replicas)):
            log.info("replica %s added", address)
            self.replicas[address] = OpenAIReplica(address, timeout=self.config.attempt_timeout)
        for address in sorted(set(self.replicas) - found):
            log.info("replica %s removed (no longer resolved)", address)
            gone = self.replicas.pop(address)
            self.metrics.forget_replica(address)
            asyncio.get_running_loop().call_later(
                self.config.grace, lambda c=gone.client: asyncio.ensure_future(c.aclose())
            )
        await self.check_all()

    # health and residency ----------------------------------------------------------------------
    async def check(self, replica: OpenAIReplica) -> None:
        timeout = min(2.0, self.config.health_interval)
        downs = replica.downs
        listing: dict[str, Any] | None = None
        asked = time.monotonic()
        try:
            answer = await replica.client.get(self.facts.ready_path, timeout=timeout)
            ready, reason = answer.status_code == 200, f"{self.facts.ready_path} answered {answer.status_code}"
            if ready:
                models = await replica.client.get(self.facts.models_path, timeout=timeout)
                listing = models.json() if models.status_code == 200 else None
                listing = listing if isinstance(listing, dict) else None
        except (httpx.HTTPError, ValueError) as exc:
            ready, reason = False, f"{type(exc).__name__}: {exc}"
        if ready and replica.downs != downs:
            return  # taken out while this check was under way: its "ready" is older news
        if ready and not replica.healthy:
            replica.resident.clear()  # new or restarted: it holds what it lists, no more
            log.info("replica %s ready", replica.address)
        elif not ready and replica.healthy:
            log.warning("replica %s out of rotation: %s", replica.address, reason)
        if not ready:
            replica.downs += 1
        replica.healthy = ready
        if listing is not None:
            self._sync(replica, listing, asked)
        self.metrics.replica_healthy.labels(replica.address).set(1 if ready else 0)

    def _sync(self, replica: OpenAIReplica, listing: dict[str, Any], asked: float) -> None:
        """Residency from the replica's model list, read at ``asked`` (loads since then keep their place)."""
        cards = [c for c in listing.get("data") or () if isinstance(c, dict) and isinstance(c.get("id"), str)]
        bases = [c["id"] for c in cards if not c.get("parent")]
        if replica.base is None:
            named = self.config.served_model_name
            replica.base = named if named in bases or not bases else bases[0]
        if not self.facts.lists_adapters:
            return
        listed = self.facts.resident_in(listing, replica.base or "") - set(bases)
        for name in listed:
            if name not in replica.resident:
                replica.resident.add(name, None, own=False)
        for name in replica.resident.names():
            fresh = replica.resident.since.get(name, 0.0) >= asked
            if name not in listed and name not in replica.loading and not fresh:
                replica.resident.discard(name)
        self.metrics.resident.labels(replica.address).set(len(replica.resident))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))
        self._publish()

    def _publish(self) -> None:
        count = len(self.healthy())
        self.metrics.healthy_replicas.set(count)
        slots = (self.config.max_loras or self.config.residency_capacity) * count
        self.metrics.set_residency(self._residency(), slots=slots)
        if count != self._healthy_count:
            self._healthy_count = count
            if self.on_change:
                self.on_change(count)

    def _residency(self) -> dict[str, int]:
        """Adapter → replicas holding it (healthy ones)."""
        held: dict[str, int] = {}
        for replica in self.healthy():
            for name in replica.resident.names():
                held[name] = held.get(name, 0) + 1
        return held

    async def _close_replicas(self) -> None:
        await asyncio.gather(*(r.client.aclose() for r in self.replicas.values()), return_exceptions=True)

    # selection -------------------------------------------------------------------------------
    def healthy(self) -> list[OpenAIReplica]:
        return [r for r in self.replicas.values() if r.healthy]

    def ordered(self, adapter: str | None) -> list[OpenAIReplica]:
        """Healthy replicas in the order to try them for ``adapter`` (None: base model).

        Adapter-aware: replicas under the load bound first, and among them those with a free LoRA
        slot for the adapter (it runs there already, or fewer than ``max_loras`` adapters do: an engine
        batches at most that many adapters at once, so a request for another one waits), then those
        holding the adapter (or loading it), then the least busy (the one that will answer soonest gets
        the load); everything over the bound last. Round-robin: the next replica in turn.
        """
        healthy = self.healthy()
        if not healthy:
            return []
        if self.policy == "round-robin" and adapter is not None:
            start = next(_rotation) % len(healthy)
            return healthy[start:] + healthy[:start]
        by_address = {r.address: r for r in healthy}
        loads = {a: r.in_flight + len(r.loading) for a, r in by_address.items()}
        if adapter is None:
            return [by_address[a] for a in choose_replicas(None, loads, spill_factor=self.config.spill_factor)]
        bound = load_bound(loads, self.config.spill_factor)
        rank = {a: i for i, a in enumerate(rank_replicas(adapter, list(by_address)))}
        slots = self.config.max_loras or self.config.residency_capacity

        def key(address: str) -> tuple[int, int, int, int, int]:
            replica = by_address[address]
            holds = adapter in replica.resident or adapter in replica.loading
            over = loads[address] + 1 > bound
            waits = adapter not in replica.running and len(replica.running) >= slots
            return (int(over), int(waits), int(not holds), loads[address], rank[address])

        return [by_address[a] for a in sorted(by_address, key=key)]

    @contextlib.contextmanager
    def busy(self, replica: OpenAIReplica, adapter: str | None = None) -> Iterator[OpenAIReplica]:
        """Count a request (for ``adapter``, None: the base model) in flight on ``replica`` for the block."""
        replica.in_flight += 1
        if adapter is not None:
            replica.running[adapter] = replica.running.get(adapter, 0) + 1
        gauge = self.metrics.replica_in_flight.labels(replica.address)
        gauge.inc()
        try:
            yield replica
        finally:
            replica.in_flight -= 1
            if adapter is not None:
                left = replica.running.pop(adapter) - 1
                if left:
                    replica.running[adapter] = left
            gauge.dec()

    # loading ---------------------------------------------------------------------------------
    def served_path(self, entry: AdapterEntry) -> str:
        """The adapter's folder as the replicas see it (``adapter_store``, else the repository's store)."""
        if self.store is not None:
            return str(self.store / entry.name)
        return str(adapter_store_dir(Path(self.config.model_repository).resolve(), entry.name))

    def holds(self, replica: OpenAIReplica, entry: AdapterEntry) -> bool:
        """Whether ``replica`` serves ``entry`` now without a load (same weights as registered)."""
        if self.facts.loading is None:
            return True  # the engine reads the folder itself (trtllm-serve) or from its watched store (NIM)
        loaded = replica.resident.ids.get(entry.name)
        return entry.name in replica.resident and (loaded is None or loaded == entry.task_id)

    async def ensure_loaded(self, replica: OpenAIReplica, entry: AdapterEntry) -> None:
        """Have ``replica`` hold ``entry``: at once when it does, else one load shared by all callers.

        Raises:
            LoadRefused: the engine would not load it (its reason); Unreachable: no answer.
        """
        if self.holds(replica, entry):
            replica.resident.touch(entry.name)
            return
        task = replica.loading.get(entry.name)
        if task is None:
            task = asyncio.ensure_future(self._load(replica, entry))
            replica.loading[entry.name] = task
            task.add_done_callback(lambda _t, r=replica, n=entry.name: r.loading.pop(n, None))
        await asyncio.shield(task)  # a caller giving up does not cancel the others' load

    async def _post(self, replica: OpenAIReplica, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await replica.client.post(path, json=body, timeout=max(60.0, self.config.attempt_timeout))
        except httpx.HTTPError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None

    async def _load(self, replica: OpenAIReplica, entry: AdapterEntry) -> None:
        loading = self.facts.loading
        assert loading is not None
        name = entry.name
        if name in replica.resident:  # other weights under this name (replaced adapter): out first
            await self.unload(replica, name, reason="replaced")
        answer = await self._post(replica, loading.load_path, loading.load_body(name, self.served_path(entry)))
        text = "" if answer.status_code == 200 else error_text(answer)
        if answer.status_code != 200 and not any(t in text for t in loading.already_loaded):
            self.metrics.adapter_loads.labels(replica.address, "refused").inc()
            log.warning("replica %s refused to load adapter %s: %s", replica.address, name, text)
            raise LoadRefused(replica.address, answer.status_code, text)
        replica.resident.add(name, entry.task_id, own=True)
        self.loads += 1
        self.metrics.adapter_loads.labels(replica.address, "loaded").inc()
        log.info("adapter %s loaded on %s", name, replica.address)
        for old in replica.resident.surplus(self.config.residency_capacity, keep=name):
            await self.unload(replica, old, reason="evicted")
        self._publish()
        self.metrics.resident.labels(replica.address).set(len(replica.resident))

    async def unload(self, replica: OpenAIReplica, name: str, *, reason: str) -> None:
        """Unload ``name`` from ``replica`` (a name it does not hold is not an error)."""
        loading = self.facts.loading
        replica.resident.discard(name)
        if loading is None or not replica.healthy:
            return
        try:
            answer = await self._post(replica, loading.unload_path, loading.unload_body(name))
        except Unreachable as exc:
            log.warning("unloading %s from %s: %s", name, replica.address, exc)
            return
        text = "" if answer.status_code == 200 else error_text(answer)
        if answer.status_code != 200 and not any(t in text for t in loading.not_loaded):
            log.warning("replica %s did not unload %s: %s", replica.address, name, text)
            return
        self.metrics.adapter_unloads.labels(replica.address, reason).inc()
        log.info("adapter %s unloaded from %s (%s)", name, replica.address, reason)

    async def forget(self, served: dict[str, AdapterEntry]) -> None:
        """Unload from every replica the adapters no longer registered, or registered with other weights."""
        for replica in list(self.replicas.values()):
            for name in replica.resident.names():
                entry = served.get(name)
                loaded = replica.resident.ids.get(name)
                if entry is None and name in replica.resident.own:
                    await self.unload(replica, name, reason="removed")
                elif entry is not None and loaded is not None and loaded != entry.task_id:
                    await self.unload(replica, name, reason="replaced")
        self._publish()

    async def model_info(self, model: str) -> Any:
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED, "OpenAI-speaking replicas have no Triton model config")

    # the KServe model RPCs, answered from what the pool knows -----------------------------------
    async def control(self, call: Callable[[Any, float], Awaitable[T]]) -> T:
        from phlora_nim.router.upstreams.kserve_models import KServeModels

        if not self.healthy():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no replica is ready")
        return await call(KServeModels(self.config.upstream_model), min(10.0, self.config.attempt_timeout))
