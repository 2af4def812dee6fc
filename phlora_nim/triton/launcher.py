"""Start the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel, on CPU.

The wheel carries the binary (``pytriton/tritonserver/bin/tritonserver``), its libraries
(``nvidia_pytriton.libs/``, which must be on ``LD_LIBRARY_PATH``), the Python backend and one
backend stub per Python version. The stub for the running interpreter is copied beside
``libtriton_python.so`` in a private backend folder, and this interpreter's ``bin/`` goes first on
``PATH`` so that Python-backend models import from the same environment (torch, transformers,
``phlora_nim``).

Example:
    >>> with LocalTriton(Path("model_repository")) as triton:  # doctest: +SKIP
    ...     print(triton.grpc_url)
    127.0.0.1:8001
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from phlora_nim.core.errors import InputError, OptionError, PhloraError

log = logging.getLogger("phlora_nim.triton")

# Lines Triton prints on every CPU-only start; they are not problems.
_CPU_NOISE = ("CUDA", "cuda", "NVML", "nvml", "DCGM", "dcgm", "CudaDriverHelper", "pinned memory")


class TritonStartError(PhloraError):
    """tritonserver exited or did not become ready."""

    exit_code = 3


@dataclass(frozen=True)
class TritonInstall:
    """Paths of one ``nvidia-pytriton`` installation."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path


def find_triton() -> TritonInstall:
    """Locate tritonserver, its libraries and the Python-backend stub for this interpreter.

    Raises:
        InputError: the ``nvidia-pytriton`` wheel is missing or lacks a stub for this Python.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the real Triton server is not installed",
            where="Python package nvidia-pytriton",
            expected="the nvidia-pytriton wheel (it ships tritonserver for CPU)",
            found="no module named pytriton",
            fix="pip install 'phlora-nim[triton]'  (or: pip install nvidia-pytriton)",
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=root.parent.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    missing = [p for p in (install.binary, install.libs, install.python_backend, install.stub) if not p.exists()]
    if missing:
        raise InputError(
            "incomplete nvidia-pytriton installation",
            where=str(missing[0]),
            expected=f"tritonserver, its libraries and a Python {version} backend stub",
            found="missing",
            fix="reinstall: pip install --force-reinstall nvidia-pytriton",
        )
    return install


def _backend_dir(install: TritonInstall) -> Path:
    """A backend folder with the Python backend and this interpreter's stub side by side (cached)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phlora-nim"
    key = f"triton-backends-py{version}-{install.binary.stat().st_mtime_ns}"
    target = cache / key
    if (target / "python" / "triton_python_backend_stub").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    shutil.copytree(install.python_backend, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, tmp / "python" / "triton_python_backend_stub")
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_prefetch_dirs(repository: Path) -> None:
    """Refuse a model whose ``lora_prefetch_dir`` does not exist.

    TensorRT-LLM's ``PeftCacheManager::prefetchLoraWeights`` skips a missing folder without a word,
    so every request for a prefetched adapter would fail with "not found in cache" instead.

    Raises:
        InputError: a ``config.pbtxt`` names a ``lora_prefetch_dir`` that is not a folder.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    for path in sorted(Path(repository).glob("*/config.pbtxt")):
        try:
            config = text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
        except text_format.ParseError:
            continue  # Triton reports an unreadable config itself, with its position
        value = config.parameters["lora_prefetch_dir"].string_value if "lora_prefetch_dir" in config.parameters else ""
        if value and not Path(value).is_dir():
            raise InputError(
                "lora_prefetch_dir does not exist: the runtime would skip it silently and no adapter "
                "would be preloaded",
                where=f"{path} (parameters.lora_prefetch_dir)",
                expected="an existing folder of <task_id>/model.lora_{weights,config}.npy",
                found=repr(value),
                fix="run `phlora-nim convert` again for this repository (it writes the folder and the "
                "path), or set --served-path to where this server sees the repository",
            )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# server/src/grpc/grpc_server.cc (Server::Start): the line once the gRPC endpoint is bound, and the
# words of a failed bind (the same for the HTTP and metrics endpoints).
_GRPC_STARTED = "Started GRPCInferenceService at "
_PORT_TAKEN = "already in use"
_PORT_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _package_parent() -> Path:
    """The folder holding the ``phlora_nim`` package: on the stub's PYTHONPATH, because an editable
    install's import hook lives in a ``.pth`` file that the embedded interpreter may not run."""
    return Path(__file__).resolve().parents[2]


def _signal_group(pgid: int, signum: int) -> bool:
    """Signal every process of a group; False when none is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _stop_group(pgid: int, grace: float = 5.0) -> None:
    """Stop what is left of a process group (orphaned stubs): SIGTERM, then SIGKILL after ``grace`` s."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


class LocalTriton:
    """The real tritonserver on a model repository, as a context manager.

    Args:
        model_repository: Triton model repository folder.
        grpc_port, http_port, metrics_port: ports on ``host`` (0 = pick a free one).
        host: address to listen on (127.0.0.1 by default: nothing outside this machine).
        log_path: file that receives Triton's log (a temporary file by default).
        on_log: called with every log line (e.g. to stream it to the terminal).
        ready_timeout: seconds to wait for readiness.
        exit_timeout: seconds Triton lets in-flight requests finish when asked to stop.
        extra_args: more tritonserver flags.

    Raises:
        InputError: missing wheel or repository; OptionError: a port is taken;
        TritonStartError: Triton exited or was not ready in time (with its log's tail).
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        on_log: Callable[[str], None] | None = None,
        ready_timeout: float = 180.0,
        exit_timeout: int = 10,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        # Ports given as 0 are picked here; another process may bind one before Triton does, so
        # start() tries again on fresh ports when Triton reports one of them taken.
        self._picked = (grpc_port == 0, http_port == 0, metrics_port == 0)
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.on_log = on_log
        self.ready_timeout = ready_timeout
        self.exit_timeout = exit_timeout
        self.extra_args = extra_args
        self._log_path = Path(log_path) if log_path else None
        self._tmp_log: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # The Python backend's shared-memory regions get a name of their own, so that stop() can
        # remove exactly this server's regions from /dev/shm even when the server was killed.
        self.shm_prefix = f"phlora_triton_{uuid.uuid4().hex[:12]}_"
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def problems(self) -> list[str]:
        """Error and warning lines of the log, without the harmless CPU-only ones."""
        return [
            line.rstrip()
            for line in self._lines
            if line[:1] in ("E", "W") and line[1:2].isdigit() and not any(n in line for n in _CPU_NOISE)
        ]

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        return [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--grpc-address={self.host}",
            f"--http-address={self.host}",
            f"--metrics-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython3.X.so: take this interpreter's own, not another build of the same
        # minor version whose ABI differs from this interpreter's extension modules.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        own = libdir if libdir and Path(libdir, sysconfig.get_config_var("INSTSONAME") or "-").exists() else None
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [own, str(install.libs), env.get("LD_LIBRARY_PATH")]))
        # The stub's embedded Python finds its prefix (and so site-packages) from python3 on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_package_parent()), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUTF8", "1")  # the stub may start under a C locale
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
        return env

    def start(self) -> LocalTriton:
        if not self.model_repository.is_dir():
            raise InputError(
                "model repository not found",
                where=str(self.model_repository),
                expected="a folder written by `phlora-nim convert`",
                fix="run `phlora-nim convert … --model-repository DIR` first",
            )
        check_prefetch_dirs(self.model_repository)
        if not all(port_is_free(port, self.host) for port in (self.grpc_port, self.http_port, self.metrics_port)):
            self._repick_ports()  # ports given stay as they are (and are refused just below)
        for flag, port in (("--grpc-port", self.grpc_port), ("--http-port", self.http_port)):
            if not port_is_free(port, self.host):
                raise OptionError(
                    "port already in use",
                    where=flag,
                    expected="a free port",
                    found=f"{self.host}:{port} is taken",
                    fix=f"stop what listens there, or pass another {flag}",
                )
        if not port_is_free(self.metrics_port, self.host):
            raise OptionError("port already in use", where="--metrics-port", found=str(self.metrics_port))
        install = find_triton()
        backends = _backend_dir(install)
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._tmp_log = self._log_path = Path(name)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._launch(install, backends)
                return self
            except TritonStartError:
                if attempt == _PORT_ATTEMPTS or not self._lost_a_picked_port():
                    raise
                log.info("a port picked for tritonserver was taken meanwhile: trying fresh ports")
                self.stop()
                self._repick_ports()
        return self

    def _lost_a_picked_port(self) -> bool:
        """Whether Triton failed because a port this launcher picked was bound by someone else first."""
        return any(self._picked) and any(_PORT_TAKEN in line for line in self._lines)

    def _repick_ports(self) -> None:
        grpc, http, metrics = self._picked
        self.grpc_port = free_port(self.host) if grpc else self.grpc_port
        self.http_port = free_port(self.host) if http else self.http_port
        self.metrics_port = free_port(self.host) if metrics else self.metrics_port
        self._lines = []

    def _launch(self, install: TritonInstall, backends: Path) -> None:
        log.info("starting tritonserver on %s (log: %s)", self.grpc_url, self._log_path)
        self._process = subprocess.Popen(
            self.command(install, backends),
            env=self.environment(install),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, name="tritonserver-log", daemon=True)
        self._reader.start()
        self._wait_ready()

    def _pump(self) -> None:
        assert self._process is not None and self._process.stdout is not None and self._log_path is not None
        with open(self._log_path, "a", encoding="utf-8") as sink:
            for raw in self._process.stdout:
                line = raw.decode("utf-8", errors="replace")
                self._lines.append(line)
                sink.write(line)
                sink.flush()
                if self.on_log:
                    self.on_log(line.rstrip("\n"))

    def _listening(self) -> bool:
        """Whether this server's own log says it listens on its gRPC port (not another server there)."""
        started = f"{_GRPC_STARTED}{self.grpc_url}"
        return any(started in line for line in self._lines)

    def _ready(self) -> bool:
        import tritonclient.grpc as grpcclient  # deferred: heavy import

        try:
            with contextlib.closing(grpcclient.InferenceServerClient(self.grpc_url)) as client:
                return bool(client.is_server_ready(client_timeout=2.0))
        except Exception:
            return False

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if self._reader:
                    self._reader.join(timeout=5)
                raise TritonStartError(
                    f"tritonserver exited with code {self._process.returncode} before it was ready",
                    where=str(self.model_repository),
                    found=self._tail(),
                    fix=f"read the full log in {self._log_path}",
                )
            if self._listening() and self._ready():
                log.info("tritonserver ready on %s", self.grpc_url)
                return
            time.sleep(0.25)
        tail = self._tail()
        self.stop()
        raise TritonStartError(
            f"tritonserver not ready after {self.ready_timeout:.0f} s",
            where=str(self.model_repository),
            found=tail,
            fix=f"read the full log in {self._log_path}",
        )

    def _tail(self, n: int = 15) -> str:
        """The log's errors (else its last lines), without the CPU-only noise."""
        errors = [ln.rstrip()[:600] for ln in self.problems() if ln.startswith("E")]
        lines = errors or [ln.rstrip() for ln in self._lines if not any(x in ln for x in _CPU_NOISE)]
        return "\n" + "\n".join(lines[-n:])

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait for in-flight requests (Triton's own exit timeout), then SIGKILL; then clean up.

        The server runs in a process group of its own with its Python-backend stubs. Whatever
        happened to the server (stopped here, exited, killed), every process left in that group is
        stopped and the server's shared-memory regions are removed, so nothing outlives it.
        """
        proc = self._process
        if proc is None:
            return None
        timeout = self.exit_timeout + 10 if timeout is None else timeout
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        _stop_group(proc.pid)
        self._remove_shared_memory()
        if self._reader:
            self._reader.join(timeout=5)
        self._process = None
        return proc.returncode

    def _remove_shared_memory(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for region in shm.glob(f"{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()

    def wait(self) -> int:
        """Block until tritonserver exits; returns its exit code."""
        assert self._process is not None
        return self._process.wait()

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._tmp_log is not None and exc_type is None:
            with contextlib.suppress(OSError):
                self._tmp_log.unlink()
