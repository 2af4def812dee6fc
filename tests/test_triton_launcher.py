"""``phlora-nim triton`` / ``LocalTriton``: clear errors, readiness, and a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.testing.processes import OutputLines
from phlora_nim.triton.launcher import LocalTriton, TritonStartError, find_triton

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
        code, _, err = run_cli("triton", "-m", tmp_path, "--grpc-port", port, "--http-port", 0)
        assert code == 2 and "port already in use" in err and "Traceback" not in err


def test_a_missing_lora_prefetch_dir_is_refused_before_the_server_starts(tmp_path: Path, run_cli) -> None:
    from phlora_nim.engines.trtllm_legacy.deploy import write_repository
    from phlora_nim.repository.registry import RegistryState
    from phlora_nim.repository.settings import RepositorySettings
    from phlora_nim.triton.launcher import check_prefetch_dirs

    here = tmp_path / "here"
    write_repository(here, RepositorySettings(base=str(tmp_path)), RegistryState())
    check_prefetch_dirs(here)  # the folder convert writes exists
    moved = tmp_path / "moved"
    write_repository(moved, RepositorySettings(base=str(tmp_path), served_path="/nowhere/repo"), RegistryState())
    with pytest.raises(InputError, match=r"lora_prefetch_dir does not exist.*'/nowhere/repo/"):
        LocalTriton(moved).start()
    code, _, err = run_cli("triton", "-m", moved, "--grpc-port", 0, "--http-port", 0)
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
    with _triton_cli(converted_repository, "--exit-timeout", "20") as (process, stdout, stderr):
        port = int(stdout.wait_for(_READY, timeout=180).group(1))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready() and client.is_model_ready("tensorrt_llm")
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    stderr_text = stderr.close()
    assert process.returncode == 0, stderr_text[-2000:]
    assert "successfully loaded 'tensorrt_llm'" in stderr_text  # the log is streamed
    with contextlib.closing(socket.socket()) as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


_READY = r"Triton ready: gRPC 127\.0\.0\.1:(\d+)"


@pytest.mark.timeout(300)
def test_cli_sigterm_while_triton_starts_is_a_clean_stop(converted_repository: Path, wait_until) -> None:
    """A signal before the ready line (or between it and the wait) stops Triton, not the CLI alone."""
    with _triton_cli(converted_repository, "--exit-timeout", "5") as (process, stdout, stderr):
        stderr.wait_for(r"starting tritonserver", timeout=120)
        server_pid = wait_until(lambda: _triton_child(process.pid), 60, what="no tritonserver child")
        assert not stdout.lines  # Triton launched, its models still loading: no ready line yet
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    text = stderr.close()
    assert process.returncode != 130 and "Aborted" not in text, text[-2000:]  # not typer's KeyboardInterrupt exit
    wait_until(lambda: not _group_alive(server_pid), 20, what="Triton's process group outlived the CLI")


@contextlib.contextmanager
def _triton_cli(repository: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], OutputLines, OutputLines]]:
    """``phlora-nim triton`` on ports it picks (it prints them once ready); its stdout and stderr, read.

    Whatever the test does, the process is killed on the way out if it is still running.
    """
    exe = str(Path(sys.executable).with_name("phlora-nim"))
    ports = ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
    command = [exe, "triton", "-m", str(repository), *ports, *extra]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300"}
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        yield process, OutputLines(process.stdout), OutputLines(process.stderr)
    finally:
        if process.poll() is None:
            process.kill()


def _triton_child(pid: int) -> int | None:
    """The tritonserver process ``pid`` started, if it has started one."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if "tritonserver" in Path(f"/proc/{child}/cmdline").read_text():
                return int(child)
    return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(300)
def test_a_killed_server_leaves_no_stub_processes_or_shared_memory(converted_repository: Path, wait_until) -> None:
    server = LocalTriton(converted_repository, exit_timeout=5).start()
    pgid = server._process.pid  # type: ignore[union-attr]
    try:
        assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))  # the Python backend's regions
        os.kill(pgid, signal.SIGKILL)  # the server dies; its Python-backend stubs would stay behind
        server._process.wait(timeout=30)  # type: ignore[union-attr]
    finally:
        server.stop()
    wait_until(lambda: not _group_alive(pgid), 20, what="processes of Triton's group are still running")
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*")) == []


@pytest.mark.timeout(300)
def test_cli_exits_when_the_server_dies_and_cleans_up(converted_repository: Path, wait_until) -> None:
    with _triton_cli(converted_repository) as (process, stdout, stderr):
        stdout.wait_for(_READY, timeout=180)
        server_pid = _triton_child(process.pid)
        assert server_pid is not None
        os.kill(server_pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode != 0
    assert "tritonserver exited" in stderr.close()
    wait_until(lambda: not _group_alive(server_pid), 20, what="Triton's Python-backend stubs outlived it")


def test_a_picked_port_taken_before_triton_binds_it_is_picked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between picking a free port and Triton binding it, another process may take it: start() tries again."""
    from phlora_nim.testing.standin import STANDIN_REPO
    from phlora_nim.triton import launcher

    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()
        stolen = thief.getsockname()[1]
        picks = iter([stolen])
        real_free_port = launcher.free_port
        monkeypatch.setattr(launcher, "free_port", lambda host="127.0.0.1": next(picks, None) or real_free_port(host))
        monkeypatch.setattr(launcher, "port_is_free", lambda port, host="127.0.0.1": True)  # taken after the check
        with LocalTriton(STANDIN_REPO, ready_timeout=120) as server:
            assert server.grpc_port != stolen
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                assert client.is_server_ready()
