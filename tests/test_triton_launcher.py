"""``phlora-nim triton`` / ``LocalTriton``: clear errors, readiness, and a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from phlora_nim.converters.errors import InputError, OptionError
from phlora_nim.triton.launcher import LocalTriton, TritonStartError, find_triton, free_port

pytestmark = pytest.mark.slow


def test_the_wheel_provides_binary_libraries_and_stub() -> None:
    install = find_triton()
    assert install.binary.is_file() and install.libs.is_dir() and install.stub.is_file()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in str(install.stub)


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="model repository not found"):
        LocalTriton(tmp_path / "nope").start()


def test_port_taken_is_a_clear_error(tmp_path: Path, run_cli) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OptionError, match=f"--grpc-port.*127.0.0.1:{port} is taken"):
            LocalTriton(tmp_path, grpc_port=port).start()
        code, _, err = run_cli("triton", "-m", tmp_path, "--grpc-port", port, "--http-port", free_port())
        assert code == 2 and "port already in use" in err and "Traceback" not in err


def test_a_missing_lora_prefetch_dir_is_refused_before_the_server_starts(tmp_path: Path, run_cli) -> None:
    from phlora_nim.repository.configs import RepositorySettings, write_repository
    from phlora_nim.repository.registry import RegistryState
    from phlora_nim.triton.launcher import check_prefetch_dirs

    here = tmp_path / "here"
    write_repository(here, RepositorySettings(base=str(tmp_path)), RegistryState())
    check_prefetch_dirs(here)  # the folder convert writes exists
    moved = tmp_path / "moved"
    write_repository(moved, RepositorySettings(base=str(tmp_path), served_path="/nowhere/repo"), RegistryState())
    with pytest.raises(InputError, match=r"lora_prefetch_dir does not exist.*'/nowhere/repo/"):
        LocalTriton(moved).start()
    code, _, err = run_cli("triton", "-m", moved, "--grpc-port", free_port(), "--http-port", free_port())
    assert code == 2 and "lora_prefetch_dir does not exist" in err and "--served-path" in err
    assert "Traceback" not in err


def test_a_model_that_fails_to_load_is_reported_with_its_error(tmp_path: Path) -> None:
    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 1\n')
    (broken / "1" / "model.py").write_text("raise RuntimeError('this model cannot load')\n")
    with pytest.raises(TritonStartError, match="this model cannot load"):
        LocalTriton(tmp_path / "repo", ready_timeout=60).start()


@pytest.mark.timeout(300)
def test_cli_serves_until_sigterm_then_stops_cleanly(converted_repository: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        _triton_command(converted_repository, port, "--exit-timeout", "20"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        while not _ready(client):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert client.is_model_ready("tensorrt_llm")
        client.close()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert "Triton ready" in stdout
    assert "successfully loaded 'tensorrt_llm'" in stderr  # the log is streamed
    with contextlib.closing(socket.socket()) as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def _triton_command(repository: Path, grpc_port: int, *extra: str) -> list[str]:
    """``phlora-nim triton`` on free ports (gRPC on ``grpc_port``)."""
    exe = str(Path(sys.executable).with_name("phlora-nim"))
    ports = ["--grpc-port", str(grpc_port), "--http-port", str(free_port()), "--metrics-port", str(free_port())]
    return [exe, "triton", "-m", str(repository), *ports, *extra]


def _ready(client: grpcclient.InferenceServerClient) -> bool:
    try:
        return bool(client.is_server_ready(client_timeout=1))
    except Exception:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pgid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.timeout(300)
def test_a_killed_server_leaves_no_stub_processes_or_shared_memory(converted_repository: Path) -> None:
    server = LocalTriton(converted_repository, exit_timeout=5).start()
    pgid = server._process.pid  # type: ignore[union-attr]
    try:
        assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))  # the Python backend's regions
        os.kill(pgid, signal.SIGKILL)  # the server dies; its Python-backend stubs would stay behind
        server._process.wait(timeout=30)  # type: ignore[union-attr]
    finally:
        server.stop()
    assert _wait_gone(pgid), "processes of Triton's group are still running"
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*")) == []


@pytest.mark.timeout(300)
def test_cli_exits_when_the_server_dies_and_cleans_up(converted_repository: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        _triton_command(converted_repository, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        while not _ready(client):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        client.close()
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        server_pid = next(int(c) for c in children if "tritonserver" in Path(f"/proc/{c}/cmdline").read_text())
        os.kill(server_pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "tritonserver exited" in stderr
    assert _wait_gone(server_pid), "Triton's Python-backend stubs outlived it"
