"""Admission and accounting of inference requests, shared by the gRPC service and the HTTP front.

One place counts what is in flight (per tenant, for ``max_in_flight``; per adapter and in total, for
the metrics) and records each finished request (count, latency, error code), so both fronts apply
the same back-pressure and report in the same series.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import grpc

from phlora_nim.router.errors import RequestError
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.tenants import Tenant


class Admission:
    """Tenants' in-flight limits and per-request metrics.

    Args:
        metrics: the router's collectors.
        max_lora: adapters a replica's LoRA cache is taken to hold (``max_lora`` of the
            ``vllm:lora_requests_info`` gauge).
    """

    def __init__(self, metrics: RouterMetrics, *, max_lora: int) -> None:
        self.metrics = metrics
        self.max_lora = max_lora
        self._tenant_load: dict[str, int] = {}
        self._adapter_load: dict[str, int] = {}
        self._publish_adapters()

    def _publish_adapters(self) -> None:
        running = ",".join(sorted(a for a, n in self._adapter_load.items() if n > 0))
        self.metrics.set_lora_info(max_lora=self.max_lora, running=running, waiting="")

    def _count_adapter(self, adapter: str | None, delta: int) -> None:
        if adapter is None:
            return
        before = self._adapter_load.get(adapter, 0)
        after = before + delta
        if after:
            self._adapter_load[adapter] = after
        else:
            self._adapter_load.pop(adapter, None)
        if (before == 0) != (after == 0):
            self._publish_adapters()

    @contextlib.contextmanager
    def admit(self, tenant: Tenant | None, label: str, *, adapter: str | None = None, slots: int = 1) -> Iterator[None]:
        """Count ``slots`` requests in flight for the block.

        Raises:
            RequestError: RESOURCE_EXHAUSTED when the tenant's ``max_in_flight`` has no room for them.
        """
        limit = tenant.max_in_flight if tenant is not None else None
        if tenant is not None and limit is not None and self._tenant_load.get(tenant.name, 0) + slots > limit:
            asked = f" (this request needs {slots})" if slots > 1 else ""
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tenant '{tenant.name}' has {tenant.max_in_flight} requests in flight, its limit{asked}: retry later",
            )
        if tenant is not None:
            self._tenant_load[tenant.name] = self._tenant_load.get(tenant.name, 0) + slots
        gauge = self.metrics.in_flight.labels(label)
        gauge.inc(slots)
        self.metrics.total_in_flight.inc(slots)
        self.metrics.requests_running.inc(slots)
        self._count_adapter(adapter, slots)
        try:
            yield
        finally:
            gauge.dec(slots)
            self.metrics.total_in_flight.dec(slots)
            self.metrics.requests_running.dec(slots)
            self._count_adapter(adapter, -slots)
            if tenant is not None:
                self._tenant_load[tenant.name] -= slots

    def done(self, label: str, started: float, code: grpc.StatusCode | None) -> None:
        """Record a finished request (``code`` None: it succeeded)."""
        m = self.metrics
        m.requests.labels(label).inc()
        m.total_requests.inc()
        m.latency.labels(label).observe(time.perf_counter() - started)
        if code is not None:
            m.errors.labels(label, code.name).inc()
            m.total_errors.labels(code.name).inc()
