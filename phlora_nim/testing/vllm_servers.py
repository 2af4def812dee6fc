"""vLLM's OpenAI server as replicas behind the router: started in its own environment, runtime LoRA loading on.

Shared by ``tests/test_vllm_router.py`` and ``bench/openai_router.py``. Each server is ``vllm serve``'s
entry point (``vllm.entrypoints.openai.api_server``) with ``--enable-lora``, no adapters at start
(the router loads them: ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` opens ``/v1/load_lora_adapter``),
float32 and eager like the engine check of :mod:`vllm_check`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phlora_nim.testing.vllm_check import vllm_python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VllmServer:
    """One running server: its process, URL and log."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        """SIGKILL the server's process group (its engine core process too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


def start(
    model: Path,
    log: Path,
    *,
    served_name: str,
    max_loras: int = 2,
    max_cpu_loras: int = 4,
    max_lora_rank: int = 16,
    max_model_len: int = 256,
    threads: int = 1,
) -> VllmServer:
    """Start one server on a free 127.0.0.1 port (not waiting for it: see :func:`wait_ready`)."""
    python = vllm_python()
    if python is None:
        raise RuntimeError("the vLLM environment is not set up: run `bash tests/setup_vllm_env.sh`")
    port = free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras)]
    cmd += ["--max-lora-rank", str(max_lora_rank), "--dtype", "float32", "--max-model-len", str(max_model_len)]
    cmd += ["--enforce-eager", "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may shadow vLLM's packages
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        OMP_NUM_THREADS=str(threads),
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return VllmServer(proc=proc, url=f"http://127.0.0.1:{port}", log=log)


def wait_ready(servers: list[VllmServer], timeout: float) -> None:
    """Wait until every server answers ``/health`` 200.

    Raises:
        RuntimeError: one exited or was not ready in time (the end of its log in the message).
    """
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.proc.poll() is not None:
                tail = server.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM server exited with {server.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        pending.remove(server)
            except OSError:
                pass
        if pending and time.monotonic() > deadline:
            tail = pending[0].log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s:\n{tail}")
        if pending:
            time.sleep(1)


@contextlib.contextmanager
def servers(
    model: Path, root: Path, count: int, *, served_name: str, timeout: float = 900, **options: int
) -> Iterator[list[VllmServer]]:
    """``count`` servers started together, stopped on exit."""
    started: list[VllmServer] = []
    try:
        for i in range(count):
            started.append(start(model, root / f"vllm-{i}.log", served_name=served_name, **options))
        wait_ready(started, timeout)
        yield started
    finally:
        for server in started:
            server.stop()
