"""``phlora-nim serve``: run the router in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from converters.errors import InputError
from phlora_nim.router.config import RouterConfig
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


def serve(
    model_repository: Annotated[
        Path, typer.Option("--model-repository", help="Model repository holding phlora_registry.json and the adapters.")
    ],
    upstream: Annotated[
        list[str] | None, typer.Option("--upstream", help="Triton gRPC address HOST:PORT (repeat for each replica).")
    ] = None,
    upstream_dns: Annotated[
        str | None,
        typer.Option(
            "--upstream-dns", help="NAME:PORT resolving to every replica (e.g. a Kubernetes headless Service)."
        ),
    ] = None,
    dns_interval: Annotated[float, typer.Option("--dns-interval", help="Seconds between DNS resolutions.")] = 10.0,
    upstream_model: Annotated[
        str, typer.Option("--upstream-model", help="Triton model that serves the adapters.")
    ] = "ensemble",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="gRPC port of the router.")] = 8001,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus HTTP port (0: off).")] = 9090,
    tenants: Annotated[
        Path | None, typer.Option("--tenants", help="YAML file of API keys, tenants and their adapters.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate for TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key for TLS.")] = None,
    max_message_mb: Annotated[int, typer.Option("--max-message-mb", help="gRPC message limit, both ways.")] = 256,
    health_interval: Annotated[
        float, typer.Option("--health-interval", help="Seconds between readiness checks of each replica.")
    ] = 2.0,
    spill_factor: Annotated[
        float,
        typer.Option("--spill-factor", help="ε: a replica above (1+ε)× the mean load spills to the next choice."),
    ] = 0.25,
) -> None:
    """Serve every registered adapter through one KServe v2 gRPC endpoint in front of Triton replicas.

    Clients name an adapter as the model (or with the `lora_adapter` parameter, or `phlora-adapter`
    metadata); the router adds its `lora_task_id`, sends its weights only to replicas lacking them,
    keeps each adapter on few replicas and applies tenants' API keys and limits.
    """
    if not model_repository.is_dir():
        raise InputError(
            "model repository not found",
            where=str(model_repository),
            expected="a folder holding phlora_registry.json",
            fix="pass the folder written by `phlora-nim convert` to --model-repository",
        )
    config = RouterConfig(
        model_repository=model_repository,
        upstreams=tuple(upstream or ()),
        upstream_dns=upstream_dns,
        dns_interval=dns_interval,
        upstream_model=upstream_model,
        host=host,
        port=port,
        metrics_port=metrics_port,
        tenants=tenants,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_message_mb=max_message_mb,
        health_interval=health_interval,
        spill_factor=spill_factor,
    )
    asyncio.run(run_router(config))
