"""``phlora-nim serve``: run the router in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from phlora_nim.converters.errors import InputError
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
    for worker in workers:
        worker.start()
    server = None
    if config.metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)
        server, _ = start_http_server(config.metrics_port, addr=config.host, registry=registry)
        log.info(
            "merged metrics of %d workers on http://%s:%d/metrics", config.workers, config.host, config.metrics_port
        )
    stopping = {"signal": False}

    def _stop(signum: int, _frame: object) -> None:
        stopping["signal"] = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
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
        for worker in workers:
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


def serve(
    model_repository: Annotated[
        Path | None,
        typer.Option(
            "--model-repository", "-m", help="Model repository holding phlora_registry.json and the adapters."
        ),
    ] = None,
    upstream: Annotated[
        list[str] | None, typer.Option("--upstream", help="Triton gRPC address HOST:PORT (repeat for each replica).")
    ] = None,
    upstream_dns: Annotated[
        str | None,
        typer.Option(
            "--upstream-dns", help="NAME:PORT resolving to every replica (e.g. a Kubernetes headless Service)."
        ),
    ] = None,
    dns_interval: Annotated[
        float | None, typer.Option("--dns-interval", help="Seconds between DNS resolutions (default 10).")
    ] = None,
    upstream_model: Annotated[
        str | None, typer.Option("--upstream-model", help="Triton model that serves the adapters (default ensemble).")
    ] = None,
    expose_model: Annotated[
        list[str] | None,
        typer.Option(
            "--expose-model",
            help="Another Triton model clients may call (name or glob; repeat). Default: only the upstream model; "
            "internal models (preprocessing, tensorrt_llm, ...) stay unknown to clients.",
        ),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="gRPC port of the router (default 8001).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Prometheus HTTP port (default 9090; 0: off).")
    ] = None,
    tenants: Annotated[
        Path | None, typer.Option("--tenants", help="YAML file of API keys, tenants and their adapters.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate for TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key for TLS.")] = None,
    max_message_mb: Annotated[
        int | None, typer.Option("--max-message-mb", help="gRPC message limit, both ways (default 256).")
    ] = None,
    health_interval: Annotated[
        float | None,
        typer.Option("--health-interval", help="Seconds between readiness checks of each replica (default 2)."),
    ] = None,
    attempt_timeout: Annotated[
        float | None,
        typer.Option(
            "--attempt-timeout",
            help="Seconds without an answer from a replica before it is probed; failing, it is taken out "
            "and the request retried elsewhere if nothing was streamed yet (default 30).",
        ),
    ] = None,
    spill_factor: Annotated[
        float | None,
        typer.Option(
            "--spill-factor", help="ε: a replica above (1+ε)× the mean load spills to the next choice (default 0.25)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="Router processes sharing the port, to use more cores (default 1; metrics merged)."
        ),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port",
            help="Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models; "
            "default 0: off).",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name", help="OpenAI model id of the base model (default: its checkpoint folder's name)."
        ),
    ] = None,
    llm_model: Annotated[
        str | None,
        typer.Option(
            "--llm-model", help="Token-level Triton model the HTTP API sends token ids to (default tensorrt_llm)."
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="router.yaml with any of these options (dashes or underscores) and finer settings "
            "(residency_capacity, weight_cache_mb, registry_interval, grace, max_choices, max_body_mb); "
            "flags given here win.",
        ),
    ] = None,
) -> None:
    """Serve every registered adapter through one KServe v2 gRPC endpoint in front of Triton replicas.

    Clients name an adapter as the model (or with the `lora_adapter` parameter, or `phlora-adapter`
    metadata); the router adds its `lora_task_id`, sends its weights only to replicas lacking them,
    keeps each adapter on few replicas and applies tenants' API keys and limits.
    """
    settings = load_router_file(config_file) if config_file is not None else {}
    flags = {
        "model_repository": model_repository,
        "upstreams": tuple(upstream) if upstream else None,
        "upstream_dns": upstream_dns,
        "dns_interval": dns_interval,
        "upstream_model": upstream_model,
        "expose_models": tuple(expose_model) if expose_model else None,
        "host": host,
        "port": port,
        "metrics_port": metrics_port,
        "tenants": tenants,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "max_message_mb": max_message_mb,
        "health_interval": health_interval,
        "attempt_timeout": attempt_timeout,
        "spill_factor": spill_factor,
        "workers": workers,
        "http_port": http_port,
        "served_model_name": served_model_name,
        "llm_model": llm_model,
    }
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
    config = RouterConfig(**settings)
    if config.workers > 1:
        raise typer.Exit(run_workers(config))
    asyncio.run(run_router(config))
