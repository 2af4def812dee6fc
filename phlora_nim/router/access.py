"""Who may call what: API keys, the adapters and models a caller may see, and the checked plan of a request."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2

from phlora_nim.repository.registry import AdapterEntry
from phlora_nim.router.catalog import AdapterCatalog
from phlora_nim.router.config import RouterConfig
from phlora_nim.router.errors import RequestError, unknown
from phlora_nim.router.replicas import ReplicaPool
from phlora_nim.router.rewrite import (
    ADAPTER_PARAMETER,
    Selection,
    UpstreamRequest,
    check_request,
    retarget,
    retryable,
    select,
)
from phlora_nim.router.tenants import Tenant, TenantTable


def request_label(adapter: str | None, base_model: str) -> str:
    """A request's label in metrics, logs and limits: the adapter's name, or ``base:<model>``."""
    return adapter if adapter is not None else f"base:{base_model}"


@dataclass(frozen=True)
class Plan:
    """A checked request: what to send upstream, for which adapter, counted under which label."""

    label: str
    selection: Selection
    entry: AdapterEntry | None
    upstream: UpstreamRequest  # aimed at the upstream model, without LoRA inputs
    retryable: bool  # safe to send again to another replica (not part of a sequence)

    @property
    def key(self) -> str | None:
        return self.entry.name if self.entry else None


class Access:
    """The router's view of callers: authentication, visibility and request plans."""

    def __init__(
        self, *, config: RouterConfig, catalog: AdapterCatalog, pool: ReplicaPool, tenants: TenantTable | None
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.pool = pool
        self.tenants = tenants

    def authenticate(self, metadata: Mapping[str, str]) -> Tenant | None:
        """The caller's tenant (None without tenancy).

        Raises:
            RequestError: UNAUTHENTICATED without a known key.
        """
        if self.tenants is None:
            return None
        tenant = self.tenants.authenticate(metadata.get("authorization"))
        if tenant is None:
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key: send 'authorization: Bearer <key>'"
            )
        return tenant

    def adapter_visible(self, name: str, tenant: Tenant | None) -> bool:
        return name in self.catalog.adapters and (tenant is None or tenant.allows_adapter(name))

    def exposed(self, model: str) -> bool:
        """Whether clients may reach ``model`` at all (the upstream model and ``expose_models``)."""
        return model == self.config.upstream_model or any(
            fnmatch.fnmatchcase(model, p) for p in self.config.expose_models
        )

    def model_visible(self, name: str, tenant: Tenant | None) -> bool:
        known = self.pool.models is None or name in self.pool.models
        return known and self.exposed(name) and (tenant is None or tenant.allows_base_model(name))

    @staticmethod
    def _upstream(request: service_pb2.ModelInferRequest, selection: Selection, wire: bytes | None) -> UpstreamRequest:
        if ADAPTER_PARAMETER in request.parameters:  # the parameter is the router's: serialize without it
            return UpstreamRequest(retarget(request, selection.model))
        return UpstreamRequest(request, wire=wire, model=selection.model)

    def plan(
        self,
        request: service_pb2.ModelInferRequest,
        metadata_adapter: str | None,
        tenant: Tenant | None,
        *,
        wire: bytes | None = None,
    ) -> Plan:
        """Check ``request`` (parsed from ``wire``, when given) for ``tenant`` and aim it at the upstream model.

        Raises:
            RequestError: INVALID_ARGUMENT for a malformed request; NOT_FOUND, with the same words,
                for a name that does not exist or that the caller may not use.
        """
        check_request(request)
        selection = select(
            request,
            adapters=self.catalog.adapters,
            metadata_adapter=metadata_adapter,
            upstream_model=self.config.upstream_model,
        )
        name = selection.adapter
        if name is None:
            if not self.model_visible(request.model_name, tenant):
                raise unknown(request.model_name)
            return Plan(
                label=request_label(None, request.model_name),
                selection=selection,
                entry=None,
                upstream=UpstreamRequest(request, wire=wire),
                retryable=retryable(request),
            )
        entry = self.catalog.adapters.get(name)
        if entry is None or not self.adapter_visible(name, tenant):
            raise unknown(name)  # another tenant's adapter looks exactly like a missing one
        if not self.exposed(selection.model) or (
            self.pool.models is not None and selection.model not in self.pool.models
        ):
            raise unknown(selection.model)
        return Plan(
            label=name,
            selection=selection,
            entry=entry,
            upstream=self._upstream(request, selection, wire),
            retryable=retryable(request),
        )

    # requests the router builds itself (the HTTP front's token-level calls) --------------------
    def resolve(self, name: str, tenant: Tenant | None, *, base_model: str) -> AdapterEntry | None:
        """The adapter ``name`` names for ``tenant`` (None: the base model ``base_model``).

        Raises:
            RequestError: NOT_FOUND, with the words of every other unknown name, for a name that is
                neither a visible adapter nor the base model (or a base model the tenant may not use).
        """
        entry = self.catalog.adapters.get(name)
        if entry is not None:
            if self.adapter_visible(name, tenant):
                return entry
            raise unknown(name)  # another tenant's adapter looks exactly like a missing one
        if name == base_model and (tenant is None or tenant.allows_base_model(name)):
            return None
        raise unknown(name)

    @staticmethod
    def built_plan(request: service_pb2.ModelInferRequest, entry: AdapterEntry | None, *, base_model: str) -> Plan:
        """The plan of a request the router built for ``entry`` (None: the base model)."""
        adapter = entry.name if entry is not None else None
        return Plan(
            label=request_label(adapter, base_model),
            selection=Selection(adapter, "model_name" if adapter else "none", request.model_name),
            entry=entry,
            upstream=UpstreamRequest(request),
            retryable=True,
        )
