"""Settings of the router (one dataclass; the CLI and tests build it) and the ``--config`` file.

Each field's type says what it accepts (the types of :mod:`phlora_nim.router.config_schema`);
pydantic checks them, for options and for files alike.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from phlora_nim.core.errors import InputError, OptionError, PhloraError, raise_all
from phlora_nim.engines.registry import engine
from phlora_nim.router.config_schema import ANY_FREE_PORT as ANY_FREE_PORT
from phlora_nim.router.config_schema import (
    Addresses,
    Count,
    DnsName,
    EngineName,
    FilePath,
    FrontPort,
    Megabytes,
    ModelNames,
    Name,
    Port,
    RoutingPolicy,
    Seconds,
    schema_problems,
)
from phlora_nim.router.config_schema import split_host_port as split_host_port


@dataclass(frozen=True)
class RouterConfig:
    """What the router serves and where it sends requests.

    Args:
        model_repository: the repository holding ``phlora_registry.json`` and the adapter tensors.
        upstreams: static Triton gRPC addresses (``host:port``).
        upstream_dns: a DNS name resolving to every replica (``name:port``, e.g. a headless Service).
        dns_interval: seconds between DNS resolutions.
        upstream_model: the Triton model adapters are served by; reachable by its name too.
        expose_models: glob patterns of further Triton models clients may call (by name, or as the
            model an adapter runs on); every other model (``preprocessing``, ``tensorrt_llm``,
            ``postprocessing``...) is unknown to clients, whatever their tenant's patterns.
        host, port: where the router listens (port 0: any free port).
        metrics_port: Prometheus HTTP port on ``host`` (0: no metrics server; :data:`ANY_FREE_PORT`:
            a port the OS picks, named by ``Router.metrics_port``).
        tenants: YAML file of API keys and tenants (None: no authentication).
        tls_cert, tls_key: PEM files for TLS on the front (both or neither).
        max_message_mb: gRPC message limit, both ways, front and upstream.
        health_interval: seconds between readiness checks of each replica.
        attempt_timeout: seconds a replica may go without answering a call before it is probed;
            failing the probe it counts as hung: taken out of rotation, the request retried
            elsewhere when nothing was delivered yet and it is not part of a sequence. A replica
            passing the probe keeps the request (it is slow, not hung).
        spill_factor: ε of the bounded-load rule.
        residency_capacity: adapters remembered per replica as resident in its LoRA cache.
        weight_cache_mb: memory for adapter tensors converted to the upstream dtype.
        registry_interval: seconds between checks of the registry file.
        grace: seconds in-flight requests get at shutdown.
        workers: router processes sharing the port (SO_REUSEPORT), to use more than one core.
        http_port: port of the OpenAI-compatible HTTP front on ``host`` (0: none; :data:`ANY_FREE_PORT`:
            a port the OS picks when the front binds it, named by ``Router.http_url``).
        served_model_name: the OpenAI ``model`` id of the base model (default: the name of the base
            checkpoint's folder, from ``phlora_repository.json``).
        llm_model: the token-level Triton model the HTTP front sends token ids to (TensorRT-LLM's
            ``tensorrt_llm``); it tokenizes itself, with each adapter's own tokenizer.
        max_choices: the most choices (prompts × ``n``) one HTTP request may ask for.
        max_body_mb: the largest HTTP request body, in MiB (larger: 413).
        reuse_port: set on each worker's server (the CLI does it); off, a taken port is an error.
        engine: what the replicas run (a row of ``phlora_nim.engines.registry``): Triton engines are
            reached over KServe v2 gRPC at ``host:port``; OpenAI-speaking ones (vLLM, NIM, SGLang,
            trtllm-serve) over HTTP at ``http://host:port``.
        adapter_store: the adapter store's folder as the OpenAI-speaking replicas see it (what load
            requests and ``lora_path`` name); default: the repository's store, as the router sees it.
        routing_policy: for OpenAI-speaking replicas: ``adapter-aware`` (a replica holding the
            adapter, else the least busy one, which loads it) or ``round-robin``.
        max_loras: GPU LoRA slots per replica (vLLM's ``--max-loras``), for the gateway metrics; 0:
            ``residency_capacity``.
    """

    model_repository: FilePath
    upstreams: Addresses = ()
    upstream_dns: DnsName | None = None
    dns_interval: Seconds = 10.0
    upstream_model: Name = "ensemble"
    expose_models: ModelNames = ()
    host: Annotated[str, Field(description="a host name or address to listen on")] = "127.0.0.1"
    port: Port = 8001
    metrics_port: FrontPort = 9090
    tenants: FilePath | None = None
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    max_message_mb: Megabytes = 256
    health_interval: Seconds = 2.0
    attempt_timeout: Seconds = 30.0
    spill_factor: Annotated[float, Field(ge=0, description="a number ≥ 0")] = 0.25
    residency_capacity: Count = 8
    weight_cache_mb: Annotated[int, Field(ge=0, description="a whole number of MiB ≥ 0")] = 1024
    registry_interval: Seconds = 1.0
    grace: Annotated[float, Field(ge=0, description="a number of seconds ≥ 0")] = 5.0
    workers: Annotated[int, Field(ge=1, le=64, description="1–64 processes")] = 1
    reuse_port: Annotated[bool, Field(description="true or false")] = False
    http_port: FrontPort = 0
    served_model_name: Name | None = None
    llm_model: Name = "tensorrt_llm"
    max_choices: Count = 32
    max_body_mb: Megabytes = 4
    engine: EngineName = "trtllm-legacy"
    adapter_store: FilePath | None = None
    routing_policy: RoutingPolicy = "adapter-aware"
    max_loras: Annotated[int, Field(ge=0, description="a whole number ≥ 0 (0: residency_capacity)")] = 0

    def __post_init__(self) -> None:
        """Check every field against its type (all problems at once), keep the values as checked
        (``"a:1"`` as ``("a:1",)``, a ``str`` path as a ``Path``), then the rules between fields."""
        schema = _schema(file=False)
        try:
            checked = schema.model_validate({f.name: getattr(self, f.name) for f in fields(self)})
        except ValidationError as exc:
            problems = schema_problems(
                exc, fields=schema.model_fields, where=lambda loc: option_name(str(loc[0])), error=OptionError, fix=_FIX
            )
        else:
            for f in fields(self):
                object.__setattr__(self, f.name, getattr(checked, f.name))
            problems = self._relations()
        raise_all(problems, summary="invalid router options")

    def _relations(self) -> list[PhloraError]:
        """Rules between fields, and the files that must exist (checked once each field is valid)."""
        problems: list[PhloraError] = []
        if bool(self.upstreams) == bool(self.upstream_dns):
            problems.append(
                OptionError(
                    "give exactly one way to find the Triton replicas",
                    where="--upstream / --upstream-dns",
                    expected="one or more --upstream HOST:PORT, or one --upstream-dns NAME:PORT",
                    found="both" if self.upstreams else "neither",
                )
            )
        urls = [u for u in self.upstreams if "://" in u]
        if urls and not self.speaks_openai:
            problems.append(
                OptionError(
                    "a Triton replica is reached over gRPC, not at a URL",
                    where="--upstream",
                    expected=f"HOST:PORT for --engine {self.engine}",
                    found=repr(urls[0]),
                    fix="drop the scheme, or name the OpenAI-speaking engine the replicas run with --engine",
                )
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append(
                OptionError("TLS needs a certificate and its key", where="--tls-cert / --tls-key", found="only one")
            )
        for name, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tenants", self.tenants)):
            if path is not None and not Path(path).is_file():
                problems.append(OptionError("file not found", where=name, found=str(path)))
        if self.http_port > 0 and self.http_port in (self.port, self.metrics_port):
            problems.append(
                OptionError(
                    "must differ from --port and --metrics-port", where="--http-port", found=str(self.http_port)
                )
            )
        return problems

    @property
    def speaks_openai(self) -> bool:
        """Whether the replicas are reached over the OpenAI API (else Triton's KServe v2)."""
        return engine(self.engine).protocol == "openai"

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb) * 1024 * 1024

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC options shared by the front server and the upstream channels."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]


_FIX = "see `phlora-nim serve --help`"

# Settings only a --config file sets (or the CLI itself: reuse_port): their errors name the field,
# the others name their ``serve`` flag (tests/test_router_cli.py checks this against SERVE_FLAGS).
FILE_ONLY = frozenset(
    {
        "registry_interval",
        "residency_capacity",
        "weight_cache_mb",
        "grace",
        "max_choices",
        "max_body_mb",
        "max_loras",
        "reuse_port",
    }
)
_REPEATED = {"upstreams": "upstream", "expose_models": "expose_model"}  # a flag given once per value


def option_name(field: str) -> str:
    """What an option error calls a setting: its ``serve`` flag, or its name if it has none."""
    if field in FILE_ONLY or field not in _DEFAULTS:
        return field
    return "--" + _REPEATED.get(field, field).replace("_", "-")


_DEFAULTS = {f.name: f.default for f in fields(RouterConfig)}


@functools.cache
def _schema(*, file: bool) -> type[BaseModel]:
    """RouterConfig's fields as a pydantic model: for options (lax: ``1`` for a float) or a file
    (strict: YAML's own types; every field optional, since flags may give the rest)."""
    hints = typing.get_type_hints(RouterConfig, include_extras=True)
    spec: dict[str, Any] = {
        name: (hints[name], None if file and default is MISSING else ... if default is MISSING else default)
        for name, default in _DEFAULTS.items()
    }
    config = ConfigDict(extra="forbid", strict=file, frozen=True)
    return create_model("RouterFile" if file else "RouterOptions", __config__=config, **spec)


def _field_name(key: str) -> str:
    """A file's key as the field it sets: dashes or underscores, and each repeatable flag's name."""
    name = key.replace("-", "_")
    return {flag: field for field, flag in _REPEATED.items()}.get(name, name)


def _read_pairs(path: Path) -> list[tuple[str, Any, int]]:
    """The file's top-level ``(key, value, line)`` in order, a repeated key included (YAML keeps the last).

    Raises:
        InputError: missing, unreadable, not YAML, or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("router config not found", where=str(path), fix="check --config") from None
    except OSError as exc:
        raise InputError(f"unreadable router config ({exc})", where=str(path), expected="a YAML mapping") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        if not isinstance(node, yaml.MappingNode):
            found = type(loader.construct_document(node)).__name__
            raise InputError("router config must be a mapping", where=str(path), found=found)
        loader.flatten_mapping(node)
        return [
            (str(loader.construct_object(k, deep=True)), loader.construct_object(v, deep=True), k.start_mark.line + 1)
            for k, v in node.value
        ]
    except yaml.YAMLError as exc:
        raise InputError(f"unreadable router config ({exc})", where=str(path), expected="a YAML mapping") from None
    finally:
        loader.dispose()


def load_router_file(path: Path) -> dict[str, Any]:
    """Read ``--config router.yaml``: every ``serve`` option (dashes or underscores) and the finer settings.

    Example file::

        model_repository: /models
        upstream_dns: triton-headless.llm.svc.cluster.local:8001
        expose_models: [ensemble_text]  # besides upstream_model (default ensemble)
        port: 8001
        metrics_port: 9090
        spill_factor: 0.25
        residency_capacity: 16      # adapters remembered per replica
        weight_cache_mb: 2048
        grace: 10

    ``upstream`` (one address or a list) maps to the ``upstreams`` field; ``expose_models`` takes one
    name or a list. Relative paths are taken from the file's folder. Each value is checked against
    its field's type and bounds here; the rules between fields once flags are merged in
    (:class:`RouterConfig`).

    Returns:
        The settings the file gives, by field name.

    Raises:
        InputError: unreadable YAML, or, all listed at once, unknown or repeated keys and values of
            the wrong type or out of bounds, each naming the file and the field's path.
    """
    path = Path(path)
    problems: list[PhloraError] = []
    document: dict[str, Any] = {}
    spelled: dict[str, tuple[str, int]] = {}  # field → (its key as written, line)
    for key, value, line in _read_pairs(path):
        name = _field_name(key)
        if name in spelled:
            first, at = spelled[name]
            problems.append(
                InputError(
                    "setting given twice",
                    where=f"{path}: {key}",
                    expected="each setting once",
                    found=f"{first!r} on line {at} and {key!r} on line {line}",
                    fix="keep one of them",
                )
            )
            continue
        spelled[name], document[name] = (key, line), value

    def where(loc: tuple[str | int, ...]) -> str:
        key = spelled.get(str(loc[0]), (str(loc[0]), 0))[0]
        return f"{path}: {key}" + "".join(f"[{i}]" for i in loc[1:])

    schema = _schema(file=True)
    try:
        checked = schema.model_validate(document, context={"folder": path.parent})
    except ValidationError as exc:
        problems += schema_problems(exc, fields=schema.model_fields, where=where, error=InputError, fix=_FIX)
    raise_all(problems, summary=f"invalid router config {path}")
    return {name: getattr(checked, name) for name in checked.model_fields_set}
