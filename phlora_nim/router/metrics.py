"""Prometheus metrics of the router (each router has its own registry; served over HTTP).

Per adapter (``adapter`` label: the adapter name, ``base:<model>`` for base-model requests,
``(unknown)`` before a name is known to be registered): requests, errors by gRPC code, latency,
in-flight. Per replica (``replica`` label: host:port): in-flight, weight sends, cache misses,
health, upstream failures the client never saw. Totals: requests, errors by code, in-flight,
adapters served, healthy replicas, weight-cache bytes.

The router's errors are what clients see, hence the source of truth for alerts. Triton's own
``nv_inference_request_failure`` also counts failures the router recovers from: each adapter
evicted from a replica's LoRA cache answers ``not found in cache`` (a failure of the ensemble and of
its ``tensorrt_llm`` step) before the router resends the weights, and ``Cache is full`` answers are
spilled to another replica; ``phlora_router_upstream_failures`` counts upstream failures by reason.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

log = logging.getLogger("phlora_nim.router")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
UNKNOWN = "(unknown)"
UPSTREAM_FAILURE_REASONS = ("cache_miss", "cache_full", "unavailable", "hung")


class RouterMetrics:
    """The router's collectors, registered in a private :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("phlora_router_requests", "Inference requests by adapter.", ["adapter"], registry=r)
        self.errors = Counter(
            "phlora_router_errors",
            "Failed inference requests by adapter and gRPC code.",
            ["adapter", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "phlora_router_request_seconds",
            "Inference latency seen by the router, by adapter.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "phlora_router_in_flight",
            "Inference requests in flight, by adapter.",
            ["adapter"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.replica_in_flight = Gauge(
            "phlora_router_replica_in_flight",
            "Requests in flight on each replica.",
            ["replica"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.weight_sends = Counter(
            "phlora_router_replica_weight_sends",
            "Requests sent with LoRA weights, per replica.",
            ["replica"],
            registry=r,
        )
        self.cache_misses = Counter(
            "phlora_router_replica_cache_misses",
            "Id-only requests a replica answered with 'not found in cache'.",
            ["replica"],
            registry=r,
        )
        self.adapter_resends = Counter(
            "phlora_router_adapter_resends",
            "Requests resent with LoRA weights after a replica's cache miss, by adapter.",
            ["adapter"],
            registry=r,
        )
        self.weight_bytes = Counter(
            "phlora_router_weight_bytes_sent",
            "Bytes of LoRA tensors sent to replicas, by adapter.",
            ["adapter"],
            registry=r,
        )
        self.resident = Gauge(
            "phlora_router_replica_resident_adapters",
            "Adapters the router believes each replica's LoRA cache holds.",
            ["replica"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.replica_healthy = Gauge(
            "phlora_router_replica_healthy",
            "1 when the replica answered ServerReady.",
            ["replica"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.total_requests = Counter("phlora_router_all_requests", "Inference requests, all adapters.", registry=r)
        self.total_errors = Counter(
            "phlora_router_all_errors",
            "Failed inference requests as clients saw them, all adapters, by gRPC code.",
            ["code"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "phlora_router_upstream_failures",
            "Upstream calls that failed, per replica and reason: cache_miss (weights resent) and cache_full "
            "(spilled) never reach the client; unavailable and hung are retried elsewhere when safe.",
            ["replica", "reason"],
            registry=r,
        )
        self.total_in_flight = Gauge(
            "phlora_router_all_in_flight", "Inference requests in flight, all.", multiprocess_mode="livesum", registry=r
        )
        self.adapters = Gauge(
            "phlora_router_adapters", "Adapters in the registry.", multiprocess_mode="livesum", registry=r
        )
        self.healthy_replicas = Gauge(
            "phlora_router_healthy_replicas", "Replicas ready to serve.", multiprocess_mode="livesum", registry=r
        )
        self.weight_cache_bytes = Gauge(
            "phlora_router_weight_cache_bytes",
            "Adapter tensors held in memory, in bytes.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "phlora_router_prompt_tokens", "Prompt tokens of HTTP-front requests, by adapter.", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            "phlora_router_generation_tokens",
            "Tokens generated for HTTP-front requests, by adapter.",
            ["adapter"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "phlora_router_time_to_first_token_seconds",
            "HTTP front: seconds from a request's arrival to its first generated token, by adapter.",
            ["adapter"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        # vLLM's names and labels (vllm/v1/metrics/loggers.py, PrometheusStatLogger): one series whose
        # labels carry comma-separated adapter names and whose value is the time it was set.
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests: adapters with requests in flight through this router (running); "
            "the router queues none (waiting); max_lora = adapters each replica's LoRA cache is taken to hold.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.requests_running = Gauge(
            "vllm:num_requests_running",
            "Inference requests in flight through this router (= phlora_router_all_in_flight).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.requests_waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests queued in the router: always 0 (it answers RESOURCE_EXHAUSTED / 429 instead of queueing).",
            multiprocess_mode="livesum",
            registry=r,
        )
        # Residency, as vLLM's proposed residency family names it (vLLM PRs #51433, #54830, #54833):
        # level "cpu" = loaded on a replica (registered with the engine, in its host cache), value = the
        # replicas holding it; level "gpu" = requests running with it now (so in an engine's GPU slots).
        self.adapter_loaded = Gauge(
            "vllm:lora_adapter_loaded",
            "LoRA adapters resident behind this router: level cpu = loaded on replicas (value: how many), "
            "level gpu = running requests now.",
            ["adapter_name", "level", "pinned", "rank"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.gpu_loaded = Gauge(
            "vllm:num_gpu_loaded_lora_adapters",
            "Adapters running requests now through this router.",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.max_gpu = Gauge(
            "vllm:max_gpu_lora_adapters",
            "Adapters the replicas can run at once (GPU LoRA slots per replica × ready replicas).",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.adapter_loads = Counter(
            "phlora_router_adapter_loads",
            "Adapter loads the router asked of OpenAI-speaking replicas, per replica and result (loaded, refused).",
            ["replica", "result"],
            registry=r,
        )
        self.adapter_unloads = Counter(
            "phlora_router_adapter_unloads",
            "Adapters the router unloaded from replicas, per replica and reason (evicted, removed, replaced).",
            ["replica", "reason"],
            registry=r,
        )
        self._lora_labels: tuple[str, str, str] | None = None
        self._levels: dict[tuple[str, str], tuple[str, str, str, str]] = {}
        self.rank_of: Callable[[str], int | None] = lambda name: None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set_lora_info(self, *, max_lora: int, running: str, waiting: str) -> None:
        """Replace the one ``vllm:lora_requests_info`` series (its value: the time of the change)."""
        labels = (str(max_lora), waiting, running)
        if self._lora_labels is not None and self._lora_labels != labels:
            with contextlib.suppress(KeyError):
                self.lora_info.remove(*self._lora_labels)
        self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())
        names = [n for n in running.split(",") if n]
        self._set_level("gpu", dict.fromkeys(names, 1))
        self.gpu_loaded.set(len(names))

    def _set_level(self, level: str, held: dict[str, int]) -> None:
        for key in [k for k in self._levels if k[1] == level and k[0] not in held]:
            with contextlib.suppress(KeyError):
                self.adapter_loaded.remove(*self._levels.pop(key))
        for name, count in held.items():
            rank = self.rank_of(name)
            labels = (name, level, "false", "" if rank is None else str(rank))
            old = self._levels.get((name, level))
            if old is not None and old != labels:
                with contextlib.suppress(KeyError):
                    self.adapter_loaded.remove(*old)
            self._levels[(name, level)] = labels
            self.adapter_loaded.labels(*labels).set(count)

    def set_residency(self, held: dict[str, int], *, slots: int) -> None:
        """Adapters loaded on replicas (name → replicas holding it) and the GPU slots of all ready replicas."""
        self._set_level("cpu", held)
        self.max_gpu.set(slots)

    def text(self) -> str:
        """The exposition text (what the HTTP endpoint serves)."""
        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint on ``host:port`` (0: any free port); returns the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def forget_replica(self, replica: str) -> None:
        families = (self.replica_in_flight, self.weight_sends, self.cache_misses, self.replica_healthy, self.resident)
        for result in ("loaded", "refused"):
            with contextlib.suppress(KeyError):
                self.adapter_loads.remove(replica, result)
        for reason in ("evicted", "removed", "replaced"):
            with contextlib.suppress(KeyError):
                self.adapter_unloads.remove(replica, reason)
        for family in families:
            with contextlib.suppress(KeyError):
                family.remove(replica)
        for reason in UPSTREAM_FAILURE_REASONS:
            with contextlib.suppress(KeyError):
                self.upstream_failures.remove(replica, reason)
