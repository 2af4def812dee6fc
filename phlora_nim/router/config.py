"""Settings of the router (one dataclass; the CLI and tests build it)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from phlora_nim.core.errors import InputError, OptionError, PhloraError, raise_all
from phlora_nim.engines.registry import engine

ROUTING_POLICIES = ("adapter-aware", "round-robin")


def split_host_port(text: str, *, flag: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[addr]:port``) → (host, port).

    Raises:
        OptionError: no port, or a port outside 1–65535.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(
            "not a host:port address", where=flag, expected="HOST:PORT, e.g. triton-0:8001", found=repr(text)
        )
    return host, int(port)


# http_port / metrics_port: on, at a port the OS picks as it is bound (0 means off there). Picking
# a "free" port first and passing it would race with any other process binding one meanwhile.
ANY_FREE_PORT = -1


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

    model_repository: Path
    upstreams: tuple[str, ...] = ()
    upstream_dns: str | None = None
    dns_interval: float = 10.0
    upstream_model: str = "ensemble"
    expose_models: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int = 9090
    tenants: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_mb: int = 256
    health_interval: float = 2.0
    attempt_timeout: float = 30.0
    spill_factor: float = 0.25
    residency_capacity: int = 8
    weight_cache_mb: int = 1024
    registry_interval: float = 1.0
    grace: float = 5.0
    workers: int = 1
    reuse_port: bool = False
    http_port: int = 0
    served_model_name: str | None = None
    llm_model: str = "tensorrt_llm"
    max_choices: int = 32
    max_body_mb: int = 4
    engine: str = "trtllm-legacy"
    adapter_store: Path | None = None
    routing_policy: str = "adapter-aware"
    max_loras: int = 0

    def __post_init__(self) -> None:
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
        for text, flag in [(u, "--upstream") for u in self.upstreams] + [(self.upstream_dns or "", "--upstream-dns")]:
            if text or flag == "--upstream":
                try:
                    split_host_port(text.split("://", 1)[-1].rstrip("/"), flag=flag)
                except OptionError as exc:
                    problems.append(exc)
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append(
                OptionError("TLS needs a certificate and its key", where="--tls-cert / --tls-key", found="only one")
            )
        for name, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tenants", self.tenants)):
            if path is not None and not Path(path).is_file():
                problems.append(OptionError("file not found", where=name, found=str(path)))
        positive = {
            "--dns-interval": self.dns_interval,
            "--health-interval": self.health_interval,
            "--attempt-timeout": self.attempt_timeout,
            "--max-message-mb": self.max_message_mb,
            "registry_interval": self.registry_interval,
        }
        for name, value in positive.items():
            if not value > 0:
                problems.append(OptionError("must be positive", where=name, found=str(value)))
        if not self.spill_factor >= 0:
            problems.append(OptionError("must be ≥ 0", where="--spill-factor", found=str(self.spill_factor)))
        for name, value in (("max_choices", self.max_choices), ("max_body_mb", self.max_body_mb)):
            if value < 1:
                problems.append(OptionError("must be ≥ 1", where=name, found=str(value)))
        if self.http_port > 0 and self.http_port in (self.port, self.metrics_port):
            problems.append(
                OptionError(
                    "must differ from --port and --metrics-port", where="--http-port", found=str(self.http_port)
                )
            )
        if not self.llm_model:
            problems.append(OptionError("must not be empty", where="--llm-model"))
        if self.served_model_name is not None and not self.served_model_name:
            problems.append(OptionError("must not be empty", where="--served-model-name"))
        ports = (("--port", self.port), ("--metrics-port", self.metrics_port), ("--http-port", self.http_port))
        for name, value in ports:
            if not 0 <= value < 65536 and not (name != "--port" and value == ANY_FREE_PORT):
                problems.append(OptionError("not a port number", where=name, expected="0–65535", found=str(value)))
        if not 1 <= self.workers <= 64:
            problems.append(OptionError("workers must be 1–64", where="--workers", found=str(self.workers)))
        if not self.upstream_model:
            problems.append(OptionError("must not be empty", where="--upstream-model"))
        if not all(isinstance(p, str) and p for p in self.expose_models):
            problems.append(
                OptionError(
                    "must be non-empty names or glob patterns", where="--expose-model", found=repr(self.expose_models)
                )
            )
        try:
            engine(self.engine, flag="--engine")
        except OptionError as exc:
            problems.append(exc)
        if self.routing_policy not in ROUTING_POLICIES:
            problems.append(
                OptionError(
                    "unknown routing policy",
                    where="--routing-policy",
                    expected=" or ".join(ROUTING_POLICIES),
                    found=repr(self.routing_policy),
                )
            )
        if self.max_loras < 0:
            problems.append(OptionError("must be ≥ 0", where="max_loras", found=str(self.max_loras)))
        raise_all(problems, summary="invalid router options")

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


_PATH_FIELDS = {"model_repository", "tenants", "tls_cert", "tls_key", "adapter_store"}


_LIST_FIELDS = {"upstreams", "expose_models"}


def _field_types() -> dict[str, type]:
    hints: dict[str, type] = dict.fromkeys(_LIST_FIELDS, tuple)
    for f in fields(RouterConfig):
        if f.name in hints:
            continue
        default = f.default
        hints[f.name] = Path if f.name in _PATH_FIELDS else (str if default is None else type(default))
    return hints


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
    name or a list. Relative paths are taken
    from the file's folder.

    Raises:
        InputError: unreadable YAML, unknown keys or values of the wrong type (all listed at once).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("router config not found", where=str(path), fix="check --config") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"unreadable router config ({exc})", where=str(path), expected="a YAML mapping") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("router config must be a mapping", where=str(path), found=type(data).__name__)
    types = _field_types()
    values: dict[str, Any] = {}
    problems: list[PhloraError] = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        key = "upstreams" if key == "upstream" else key
        if key not in types:
            problems.append(
                InputError(
                    "unknown router setting",
                    where=f"{path}: {raw_key}",
                    expected=", ".join(sorted(types)),
                    found=repr(raw_key),
                )
            )
            continue
        want = types[key]
        if key in _LIST_FIELDS:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                what = "an address" if key == "upstreams" else "a model name"
                problems.append(InputError(f"must be {what} or a list of them", where=f"{path}: {raw_key}"))
                continue
            values[key] = tuple(items)
        elif want is Path:
            if not isinstance(value, str):
                problems.append(InputError("must be a path", where=f"{path}: {raw_key}", found=repr(value)))
                continue
            values[key] = (path.parent / value) if not Path(value).is_absolute() else Path(value)
        elif want is float and isinstance(value, int | float) and not isinstance(value, bool):
            values[key] = float(value)
        elif isinstance(value, want) and not (want is int and isinstance(value, bool)):
            values[key] = value
        else:
            problems.append(
                InputError("wrong type", where=f"{path}: {raw_key}", expected=want.__name__, found=type(value).__name__)
            )
    raise_all(problems, summary=f"invalid router config {path}")
    return values
