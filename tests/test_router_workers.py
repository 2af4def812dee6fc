"""``serve --workers N``: several router processes on one port, merged metrics, one clean stop."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from phlora_nim.testing.standin import STANDIN_REPO, add_adapters
from phlora_nim.triton.launcher import LocalTriton, free_port

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    """Worker processes of ``pid`` (multiprocessing's resource tracker is a child too: left out)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    workers = []
    for child in (int(x) for x in out.split()):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    return workers


def _ask(address: str, model: str) -> list[int]:
    with grpcclient.InferenceServerClient(address) as client:  # a new connection each time
        x = grpcclient.InferInput("x", [1, 3], "INT32")
        x.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int32))
        return client.infer(model, [x]).as_numpy("y")[0].tolist()


def _start_workers(repository: Path, upstream: str, wait_until) -> tuple[subprocess.Popen[str], int, int]:
    """``serve --workers 2`` on picked ports, picked again when one was taken before the router bound it.

    Workers share one port, so it is chosen before they start (port 0 would give each its own).
    """
    for _attempt in range(3):
        port, metrics = free_port(), free_port()
        command = [
            str(Path(sys.executable).with_name("phlora-nim")),
            "serve",
            "-m", str(repository),
            "--upstream", upstream,
            "--port", str(port),
            "--metrics-port", str(metrics),
            "--workers", "2",
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def ready_or_exited(process: subprocess.Popen[str] = process, port: int = port) -> str | None:
            if process.poll() is not None:
                return "exited"
            with contextlib.suppress(Exception), grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                if client.is_server_ready(client_timeout=1) and len(_children(process.pid)) >= 2:
                    return "ready"
            return None

        if wait_until(ready_or_exited, 60, interval=0.3, what="the workers were not ready in time") == "ready":
            return process, port, metrics
        output, _ = process.communicate(timeout=30)
        assert "cannot listen" in output or "Address already in use" in output, output[-2000:]
    raise AssertionError("three picked ports in a row were taken")


@pytest.mark.timeout(180)
def test_two_workers_share_the_port_and_merge_metrics(tmp_path: Path, wait_until) -> None:
    add_adapters(tmp_path, {"ops": (500, "float16")})
    with LocalTriton(STANDIN_REPO) as triton:
        process, port, metrics = _start_workers(tmp_path, triton.grpc_url, wait_until)
        try:
            address = f"127.0.0.1:{port}"
            workers = _children(process.pid)
            assert len(workers) == 2
            for _ in range(30):
                assert _ask(address, "ops") == [501, 502, 503]
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
            line = next(ln for ln in text.splitlines() if ln.startswith('phlora_router_requests_total{adapter="ops"}'))
            assert float(line.rsplit(" ", 1)[1]) == 30  # counted by whichever worker served, summed here
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0, output[-2000:]
        assert f"merged metrics of 2 workers on http://127.0.0.1:{metrics}/metrics" in output, output[-2000:]
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
