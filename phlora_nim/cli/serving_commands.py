"""Commands that serve: ``triton`` (the real Triton server), ``serve`` (the router) and ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from phlora_nim.cli.app import RepoOpt, err_console, out_console


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``; ``serve``'s options live beside the router."""
    from phlora_nim.router.cli import serve

    app.command("triton")(triton_command)
    app.command("serve")(serve)
    app.command("demo")(demo_command)


def triton_command(
    model_repository: RepoOpt = Path("model_repository"),
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="KServe v2 gRPC port.")] = 8001,
    http_port: Annotated[int, typer.Option("--http-port", help="KServe v2 HTTP port.")] = 8000,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port.")] = 8002,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    exit_timeout: Annotated[
        int, typer.Option("--exit-timeout", help="Seconds in-flight requests get to finish on Ctrl-C / SIGTERM.")
    ] = 30,
) -> None:
    """Run the real Triton server (from the nvidia-pytriton wheel, CPU) on a model repository.

    Waits until every model is ready, streams Triton's log, and stops cleanly on Ctrl-C / SIGTERM.
    """
    import signal

    from phlora_nim.triton.launcher import LocalTriton

    server = LocalTriton(
        model_repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        host=host,
        exit_timeout=exit_timeout,
        on_log=lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True),
    )

    def _stop(signum: int, _frame: Any) -> None:
        # Once: a second SIGTERM / Ctrl-C must not interrupt the stop that the first one began.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # A signal may come at any point from here on, the moment the ready line is out included: the
    # start, the line and the wait are all inside the try, so each is a clean stop (exit 0).
    try:
        server.start()
        out_console.print(f"[bold green]Triton ready[/]: gRPC {server.grpc_url}, HTTP {server.http_url}")
        code = server.wait()
        err_console.print(f"tritonserver exited with code {code}", markup=False)
    except KeyboardInterrupt:
        code = 0
    finally:
        # Always: stops what is left of Triton's process group (stubs) and frees its shared memory.
        stopped = server.stop()
    raise typer.Exit(code or stopped or 0)


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder for the demo (replaced).")] = Path(
        "demo-output"
    ),
    steps: Annotated[int, typer.Option("--steps", help="Full fine-tuning steps per checkpoint.")] = 40,
    energy: Annotated[
        float, typer.Option("--energy", help="Share of each module's delta energy the adapters keep.")
    ] = 0.99,
) -> None:
    """Run the whole job on an embedded default, on CPU.

    Builds a small Llama with its tokenizer and three full fine-tunes of it (each taught its own
    rule), converts them into one Triton model repository, starts the real tritonserver and the
    router, sends mixed concurrent requests through the router (an adapter per request, by model
    name), and prints each answer beside the fine-tuned model's own output. Stops everything at the end.
    """
    from phlora_nim.demo.run import run_demo

    rows = run_demo(out, steps=steps, energy=energy, console=out_console)
    if not all(r.match for r in rows):
        raise typer.Exit(1)
