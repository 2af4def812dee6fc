"""What the router needs to know of an engine that serves the OpenAI API, as data.

Each OpenAI-speaking engine's package (``phlora_nim.engines.<package>.openai``) holds one
:class:`OpenAIEngineFacts` written from that engine's source; the router reads only these fields,
never an engine's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# How a request names the adapter: ``model=<adapter>``; ``model=<base>:<adapter>``; or
# ``lora_request {lora_name, lora_int_id, lora_path}`` beside ``model=<base>``.
AdapterSelector = Literal["model", "base-colon-adapter", "lora-request"]


@dataclass(frozen=True)
class RuntimeLoading:
    """The engine's endpoints that load and unload an adapter while it runs.

    Attributes:
        load_path, unload_path: POST paths, relative to the server's root.
        name_field, path_field: body fields of the adapter's name and its folder on the replica.
        already_loaded: texts of a load refused because the name is loaded already (success for the router).
        not_loaded: texts of an unload refused because the name is not loaded (success too).
        enable: what the replica must run with to accept these calls (for docs and the chart).
    """

    load_path: str
    unload_path: str
    name_field: str = "lora_name"
    path_field: str = "lora_path"
    already_loaded: tuple[str, ...] = ()
    not_loaded: tuple[str, ...] = ()
    enable: tuple[str, ...] = ()

    def load_body(self, name: str, path: str) -> dict[str, Any]:
        return {self.name_field: name, self.path_field: path}

    def unload_body(self, name: str) -> dict[str, Any]:
        return {self.name_field: name}


@dataclass(frozen=True)
class OpenAIEngineFacts:
    """One OpenAI-compatible engine, as the router sees it.

    Attributes:
        selector: how a request names its adapter.
        separator: between base and adapter for ``base-colon-adapter``.
        loading: runtime loading endpoints (None: the engine loads from the request itself, or from
            a store it watches).
        ready_path: readiness probe (200 when the replica can serve).
        models_path: the model list (``data[].id``; adapters listed there are resident).
        lists_adapters: the model list names loaded adapters (else the router's own loads are all it knows).
        not_resident: texts of an answer meaning the named adapter is not loaded on that replica (the
            router loads it and sends the request once more).
        not_resident_status: the HTTP status of that answer.
        token_ids_field: a request flag that makes the engine return each choice's token ids
            (``choices[].token_ids``), for gRPC clients that send and want token ids.
    """

    selector: AdapterSelector
    ready_path: str
    loading: RuntimeLoading | None = None
    separator: str = ":"
    models_path: str = "/v1/models"
    lists_adapters: bool = True
    not_resident: tuple[str, ...] = ()
    not_resident_status: int = 404
    token_ids_field: str | None = None
    sources: tuple[str, ...] = field(default=())

    def aim(self, body: dict[str, Any], *, base: str, adapter: str | None, lora_id: int, path: str) -> dict[str, Any]:
        """``body`` (an OpenAI request) aimed at ``adapter`` (None: the base model) on this engine."""
        out = dict(body)
        if adapter is None:
            out["model"] = base
        elif self.selector == "model":
            out["model"] = adapter
        elif self.selector == "base-colon-adapter":
            out["model"] = f"{base}{self.separator}{adapter}"
        else:
            out["model"] = base
            out["lora_request"] = {"lora_name": adapter, "lora_int_id": lora_id, "lora_path": path}
        return out

    def is_not_resident(self, status: int, message: str) -> bool:
        return status == self.not_resident_status and any(t in message for t in self.not_resident)

    def resident_in(self, listing: dict[str, Any], base: str) -> set[str]:
        """Adapter names a ``/v1/models`` answer says are loaded (nothing when the engine lists none)."""
        if not self.lists_adapters:
            return set()
        names = set()
        for card in listing.get("data") or ():
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                continue
            name = card["id"]
            if self.selector == "base-colon-adapter" and name.startswith(base + self.separator):
                name = name[len(base) + len(self.separator) :]
            if name != base:
                names.add(name)
        return names
