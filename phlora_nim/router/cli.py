"""``phlora-nim serve``: run the router in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from phlora_nim.core.errors import InputError
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.router.config import RouterConfig, load_router_file
from phlora_nim.router.server import Router

log = logging.getLogger("phlora_nim.router")


async def run_router(config: RouterConfig) -> None:
    """Start the router, serve until SIGTERM / SIGINT, then stop with ``config.grace`` seconds for in-flight work."""
    router = Router(config)
    await router.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        log.info("signal received: stopping (grace %.0f s)", config.grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await router.stop()


def _merged_metrics_server(config: RouterConfig, metrics_dir: str) -> Any:
    """Prometheus on ``config.metrics_port`` serving the sum of every worker's metrics."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    server, _ = start_http_server(max(config.metrics_port, 0), addr=config.host, registry=registry)
    bound = int(server.server_address[1])  # the port the OS chose for ANY_FREE_PORT (-1)
    log.info("merged metrics of %d workers on http://%s:%d/metrics", config.workers, config.host, bound)
    return server


def _worker_main(config: RouterConfig, index: int) -> None:
    """One worker process of ``serve --workers N`` (started with the spawn method)."""
    logging.basicConfig(level=logging.INFO, format=f"worker {index}: %(levelname)s %(message)s")
    asyncio.run(run_router(config))


def run_workers(config: RouterConfig) -> int:
    """Run ``config.workers`` router processes on one port; serve their merged metrics from this one.

    Workers share the port with SO_REUSEPORT (the kernel spreads connections over them) and each
    keeps its own view of replica residency (a worse guess costs a weight resend, never a wrong
    answer). Metrics use prometheus-client's multiprocess mode. SIGTERM / SIGINT stop every worker
    within the grace period; if one worker dies, the others are stopped too and the exit code is 1,
    so that the supervisor (Kubernetes) restarts the whole set.

    Returns:
        The exit code.
    """
    import multiprocessing
    import os
    import shutil
    import tempfile
    import time
    from dataclasses import replace

    metrics_dir = tempfile.mkdtemp(prefix="phlora-router-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by the workers' prometheus-client at import
    context = multiprocessing.get_context("spawn")
    worker_config = replace(config, metrics_port=0, reuse_port=True, workers=1)
    workers = [
        context.Process(target=_worker_main, args=(worker_config, i), name=f"phlora-router-{i}", daemon=False)
        for i in range(config.workers)
    ]
    stopping = {"signal": False}

    def _stop(signum: int, _frame: object) -> None:
        stopping["signal"] = True

    # Handlers first and everything after them inside the try: a signal while the workers start, or a
    # metrics port that cannot be bound, still stops the workers already started.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = None
    code = 0
    try:
        for worker in workers:
            worker.start()
        if config.metrics_port:
            server = _merged_metrics_server(config, metrics_dir)
        while not stopping["signal"]:
            if any(not w.is_alive() for w in workers):
                log.error("a router worker exited: stopping the others")
                code = 1
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + config.grace + 10
        for worker in (w for w in workers if w.pid is not None):  # a signal may come before all started
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        if server is not None:
            server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


@dataclass(frozen=True)
class ServeFlag:
    """One ``serve`` option: which :class:`RouterConfig` field it sets and what it says.

    The default shown in ``--help`` is the field's own default, so the two cannot drift.

    Args:
        flag: the long option (the parameter is its name in snake case).
        field: the RouterConfig field it sets.
        kind: the option's type (``list[str]`` for a repeatable option, kept as a tuple).
        help: what it does, without the default.
        short: an extra short option (``-m``).
        show_default: append ``(default X)`` from the field (off where the help says it in words).
    """

    flag: str
    field: str
    kind: Any
    help: str
    short: str | None = None
    show_default: bool = True

    @property
    def param(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def help_text(self) -> str:
        default = _DEFAULTS.get(self.field)
        if not self.show_default or default is None or default == ():
            return self.help
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        text = self.help.removesuffix(".")
        return f"{text} (default {shown})."


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(RouterConfig) if f.default is not MISSING}

# Every setting ``serve`` takes as a flag; ``--config`` takes these and the finer ones (below).
SERVE_FLAGS: tuple[ServeFlag, ...] = (
    ServeFlag(
        "--model-repository",
        "model_repository",
        Path,
        "Model repository holding phlora_registry.json and the adapters.",
        short="-m",
    ),
    ServeFlag(
        "--engine",
        "engine",
        str,
        "What the replicas run: trtllm-legacy, trtllm-legacy-cpu (Triton, KServe v2 gRPC), or vllm, nim, "
        "sglang, trtllm-serve (the OpenAI API over HTTP).",
    ),
    ServeFlag(
        "--upstream",
        "upstreams",
        list[str],
        "A replica: Triton's gRPC HOST:PORT, or an OpenAI server's http://HOST:PORT (repeat for each replica).",
    ),
    ServeFlag(
        "--upstream-dns",
        "upstream_dns",
        str,
        "NAME:PORT resolving to every replica (e.g. a Kubernetes headless Service).",
    ),
    ServeFlag("--dns-interval", "dns_interval", float, "Seconds between DNS resolutions."),
    ServeFlag(
        "--upstream-model",
        "upstream_model",
        str,
        "Triton model that serves the adapters (default: the repository engine's: tensorrt_llm for trtllm and "
        "trtllm-cpu, ensemble for trtllm-legacy).",
    ),
    ServeFlag(
        "--expose-model",
        "expose_models",
        list[str],
        "Another Triton model clients may call (name or glob; repeat). Default: only the upstream model; "
        "internal models (preprocessing, tensorrt_llm, ...) stay unknown to clients.",
    ),
    ServeFlag("--host", "host", str, "Address to listen on."),
    ServeFlag("--port", "port", int, "gRPC port of the router."),
    ServeFlag("--metrics-port", "metrics_port", int, "Prometheus HTTP port; 0: off."),
    ServeFlag("--tenants", "tenants", Path, "YAML file of API keys, tenants and their adapters."),
    ServeFlag("--tls-cert", "tls_cert", Path, "PEM certificate for TLS."),
    ServeFlag("--tls-key", "tls_key", Path, "PEM private key for TLS."),
    ServeFlag("--max-message-mb", "max_message_mb", int, "gRPC message limit, both ways."),
    ServeFlag("--health-interval", "health_interval", float, "Seconds between readiness checks of each replica."),
    ServeFlag(
        "--attempt-timeout",
        "attempt_timeout",
        float,
        "Seconds without an answer from a replica before it is probed; failing, it is taken out "
        "and the request retried elsewhere if nothing was streamed yet.",
    ),
    ServeFlag(
        "--spill-factor", "spill_factor", float, "ε: a replica above (1+ε)× the mean load spills to the next choice."
    ),
    ServeFlag("--workers", "workers", int, "Router processes sharing the port, to use more cores (metrics merged)."),
    ServeFlag(
        "--http-port",
        "http_port",
        int,
        "Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models); 0: off.",
    ),
    ServeFlag(
        "--served-model-name",
        "served_model_name",
        str,
        "OpenAI model id of the base model (default: its checkpoint folder's name).",
    ),
    ServeFlag("--llm-model", "llm_model", str, "Token-level Triton model the HTTP API sends token ids to."),
    ServeFlag(
        "--adapter-store",
        "adapter_store",
        Path,
        "The adapter store's folder as OpenAI-speaking replicas see it (default: the repository's store).",
    ),
    ServeFlag(
        "--routing-policy",
        "routing_policy",
        str,
        "OpenAI-speaking replicas: adapter-aware (a replica holding the adapter, else the least busy one "
        "loads it) or round-robin.",
    ),
)

# Set only in --config (or by the CLI itself: reuse_port).
_FILE_ONLY = tuple(
    name for name in _DEFAULTS if name not in {f.field for f in SERVE_FLAGS} | {"reuse_port", "model_repository"}
)


def _serve_signature() -> inspect.Signature:
    """``serve``'s parameters for typer: one per :data:`SERVE_FLAGS` entry, then ``--config``."""
    params = [
        inspect.Parameter(
            f.param,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                f.kind | None, typer.Option(f.flag, *((f.short,) if f.short else ()), help=f.help_text())
            ],
        )
        for f in SERVE_FLAGS
    ]
    config_help = (
        "router.yaml with any of these options (dashes or underscores) and finer settings "
        f"({', '.join(_FILE_ONLY)}); flags given here win."
    )
    params.append(
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option("--config", help=config_help)],
        )
    )
    return inspect.Signature(params, return_annotation=None)


def serve(*, config_file: Path | None = None, **options: Any) -> None:
    """Serve every registered adapter through one KServe v2 gRPC endpoint in front of Triton replicas.

    Clients name an adapter as the model (or with the `lora_adapter` parameter, or `phlora-adapter`
    metadata); the router adds its `lora_task_id`, sends its weights only to replicas lacking them,
    keeps each adapter on few replicas and applies tenants' API keys and limits.
    """
    unknown = set(options) - {f.param for f in SERVE_FLAGS}
    if unknown:
        raise TypeError(f"serve() got unexpected options {sorted(unknown)}")
    settings = load_router_file(config_file) if config_file is not None else {}
    flags: dict[str, Any] = {}
    for f in SERVE_FLAGS:
        value = options.get(f.param)
        flags[f.field] = (tuple(value) or None) if isinstance(value, list | tuple) else value
    if flags["upstreams"] or flags["upstream_dns"]:  # a flag's way of finding replicas replaces the file's
        settings.pop("upstreams", None)
        settings.pop("upstream_dns", None)
    settings.update({k: v for k, v in flags.items() if v is not None})
    repo = settings.get("model_repository")
    if repo is None or not Path(repo).is_dir():
        raise InputError(
            "model repository not found",
            where=str(repo) if repo is not None else "--model-repository",
            expected="a folder holding phlora_registry.json",
            fix="pass the folder `phlora-nim convert` wrote as --model-repository (or model_repository: in --config)",
        )
    config = RouterConfig(**_with_engine_model(settings, Path(repo)))
    if config.workers > 1:
        raise typer.Exit(run_workers(config))
    asyncio.run(run_router(config))


def _with_engine_model(settings: dict[str, Any], repository: Path) -> dict[str, Any]:
    """``settings`` with the Triton model the repository's engine serves adapters from, unless one is given
    (``ensemble`` for the legacy engine, ``tensorrt_llm`` for the llmapi model)."""
    stored = RepositorySettings.load(repository)
    if "upstream_model" in settings or stored is None or stored.engine_row.protocol != "triton":
        return settings
    return {**settings, "upstream_model": stored.engine_row.triton_model}


serve.__signature__ = _serve_signature()  # type: ignore[attr-defined]  # typer reads the options from here
