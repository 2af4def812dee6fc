"""The router's objects, built once and handed to both fronts (KServe v2 gRPC and the OpenAI HTTP API).

Whatever the front and whatever the engine, a request goes through the same :class:`Access`
(keys, visibility, plans), the same :class:`Admission` (tenant limits, metrics) and the one delivery
of the engine's protocol: :class:`~phlora_nim.router.delivery.Delivery` for Triton replicas,
:class:`~phlora_nim.router.upstreams.openai_delivery.OpenAIDelivery` for OpenAI-speaking ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phlora_nim.router.access import Access
from phlora_nim.router.admission import Admission
from phlora_nim.router.catalog import AdapterCatalog
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.delivery import Delivery
from phlora_nim.router.metrics import RouterMetrics
from phlora_nim.router.tenants import TenantTable
from phlora_nim.router.weights import WeightStore

if TYPE_CHECKING:
    from phlora_nim.router.upstreams.openai_delivery import OpenAIDelivery


@dataclass
class RouterCore:
    """Catalogue, tenants and access, admission, replicas, metrics and delivery of one router.

    Attributes:
        relay: the OpenAI-speaking delivery when the replicas speak the OpenAI API (the HTTP front
            then passes requests through as the engine takes them); None for Triton replicas.
    """

    config: RouterConfig
    catalog: AdapterCatalog
    store: WeightStore
    tenants: TenantTable | None
    metrics: RouterMetrics
    pool: Any  # ReplicaPool (Triton) or OpenAIPool
    access: Access
    admission: Admission
    delivery: Any  # Delivery or OpenAIDelivery: unary(plan, remaining), stream(plan, remaining)
    relay: OpenAIDelivery | None = None


def build_core(
    config: RouterConfig,
    *,
    catalog: AdapterCatalog,
    store: WeightStore,
    tenants: TenantTable | None,
    metrics: RouterMetrics,
    pool: Any,
    refresh_registry: Callable[[], object] | None = None,
) -> RouterCore:
    """The core for ``pool``'s protocol (an OpenAI pool gets the OpenAI delivery)."""
    access = Access(config=config, catalog=catalog, pool=pool, tenants=tenants)
    admission = Admission(metrics, max_lora=config.residency_capacity)
    relay = None
    if config.speaks_openai:
        from phlora_nim.router.upstreams.openai_delivery import OpenAIDelivery

        relay = OpenAIDelivery(config=config, pool=pool, metrics=metrics)
        delivery: Any = relay
    else:
        delivery = Delivery(
            config=config,
            catalog=catalog,
            pool=pool,
            store=store,
            metrics=metrics,
            refresh_registry=refresh_registry or catalog.refresh,
        )
    return RouterCore(
        config=config,
        catalog=catalog,
        store=store,
        tenants=tenants,
        metrics=metrics,
        pool=pool,
        access=access,
        admission=admission,
        delivery=delivery,
        relay=relay,
    )
