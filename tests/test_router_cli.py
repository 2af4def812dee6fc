"""``serve``: its options, its errors, and a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import typer
from typer.testing import CliRunner

from phlora_nim.converters.errors import InputError, OptionError
from phlora_nim.router.cli import serve
from phlora_nim.triton.launcher import free_port

FLAGS = [
    "--model-repository",
    "--upstream",
    "--upstream-dns",
    "--dns-interval",
    "--upstream-model",
    "--expose-model",
    "--host",
    "--port",
    "--metrics-port",
    "--tenants",
    "--tls-cert",
    "--tls-key",
    "--max-message-mb",
    "--health-interval",
    "--attempt-timeout",
    "--spill-factor",
]


def test_serve_flags() -> None:
    app = typer.Typer()
    app.command()(serve)
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in FLAGS:
        assert flag in result.output


def test_serve_needs_exactly_one_upstream_source(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"--upstream / --upstream-dns.*found neither"):
        serve(model_repository=tmp_path)
    with pytest.raises(OptionError, match="found both"):
        serve(model_repository=tmp_path, upstream=["a:1"], upstream_dns="b:2")
    with pytest.raises(InputError, match="model repository not found"):
        serve(model_repository=tmp_path / "missing", upstream=["a:1"])


@pytest.mark.timeout(60)
def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "import typer; from phlora_nim.router.cli import serve; typer.run(serve)",
        "--model-repository", str(tmp_path),
        "--upstream", f"127.0.0.1:{free_port()}",  # nothing there: the router is live, not ready
        "--port", str(port),
        "--metrics-port", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 40
        while True:
            with contextlib.suppress(Exception):
                if client.is_server_live(client_timeout=1):
                    break
            assert process.poll() is None and time.monotonic() < deadline, process.stdout and process.stdout.read()
            time.sleep(0.2)
        assert not client.is_server_ready()
        client.close()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
