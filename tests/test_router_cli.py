"""``serve``: its options, its errors, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import typer
from typer.testing import CliRunner

from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.router.cli import serve
from phlora_nim.testing.processes import OutputLines

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
    with socket.socket() as nothing_there:  # bound, never listening: the router is live, not ready
        nothing_there.bind(("127.0.0.1", 0))
        command = [
            str(Path(sys.executable).with_name("phlora-nim")),
            "serve",
            "--model-repository", str(tmp_path),
            "--upstream", f"127.0.0.1:{nothing_there.getsockname()[1]}",
            "--port", "0",  # the router binds a free port and logs it
            "--metrics-port", "0",
        ]  # fmt: skip
        env = {**os.environ, "COLUMNS": "300"}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert process.stdout is not None
        output = OutputLines(process.stdout)
        try:
            port = int(output.wait_for(r"router on 127\.0\.0\.1:(\d+)", timeout=40).group(1))
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            assert client.is_server_live(client_timeout=5) and not client.is_server_ready()
            client.close()
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0, output.close()
            assert time.monotonic() - started < 10
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_serve_help_shows_the_configs_own_defaults() -> None:
    """Each flag's help shows its RouterConfig field's default; every other field is named under --config."""
    from dataclasses import MISSING, fields

    from phlora_nim.router.cli import SERVE_FLAGS
    from phlora_nim.router.config import RouterConfig

    app = typer.Typer()
    app.command()(serve)
    output = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"}).output
    text = " ".join(output.replace("│", " ").split())
    defaults = {f.name: f.default for f in fields(RouterConfig)}  # model_repository: MISSING (no default)
    assert defaults["port"] == 8001 and "gRPC port of the router (default 8001)." in text
    assert "Seconds between DNS resolutions (default 10)." in text  # a float default, shown as given
    flagged = {f.field for f in SERVE_FLAGS}
    for name in set(defaults) - flagged - {"model_repository", "reuse_port"}:
        assert name in text, f"{name} is neither a flag nor listed under --config"
    for f in SERVE_FLAGS:
        assert f.field in defaults and f.flag in text
        default = defaults[f.field]
        if f.show_default and default not in (None, (), MISSING):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"(default {shown})." in text, f.flag


def test_option_errors_name_the_flag_that_sets_each_field() -> None:
    """An option error names the ``serve`` flag of its field, or the field itself where only --config sets it."""
    from dataclasses import fields

    from phlora_nim.router.cli import SERVE_FLAGS
    from phlora_nim.router.config import FILE_ONLY, RouterConfig, option_name

    flags = {f.field: f.flag for f in SERVE_FLAGS}
    for field in fields(RouterConfig):
        assert option_name(field.name) == flags.get(field.name, field.name), field.name
        assert (field.name in FILE_ONLY) == (field.name not in flags and field.name != "model_repository")


def test_a_bad_config_file_exits_2_naming_the_file_and_field(tmp_path: Path, run_cli) -> None:
    (tmp_path / "repo").mkdir()
    config = tmp_path / "router.yaml"
    config.write_text("model_repository: repo\nupstream: [a:1, triton]\nworkers: 0\n")
    code, _, err = run_cli("serve", "--config", config)
    assert code == 2 and "Traceback" not in err
    assert f"{config}: upstream[1]: not a host:port address" in err
    assert f"{config}: workers: must be ≥ 1; expected 1–64 processes; found 0" in err
