"""Benchmark: ``phlora-nim extract`` against ``mergekit-extract-lora`` on a Llama-3-8B-shaped pair.

What it measures, in one run on this machine (CPU only):

1. **Inputs.** With the project's own generator (:mod:`phlora_nim.testing.synthetic`) it writes two
   Llama-3-8B-shaped checkpoint pairs (hidden 4096, intermediate 14336, 32 heads / 8 KV heads,
   vocab 32000, bf16, sharded safetensors): one with ``--layers`` decoder layers (default 2) and one
   with twice as many, for the scaling comparison. Pairs already in the work folder are reused.
2. **mergekit.** ``mergekit`` is installed in its own virtual environment
   (``<workdir>/mergekit-venv``, pinned to this venv's torch version so that pip takes the CPU
   build) unless that environment already works. The CLI form of ``mergekit-extract-lora`` (option
   or positional arguments, ``--max-rank`` or ``--rank``) is read from its ``--help``; it runs on
   CPU with ``HF_HUB_OFFLINE=1``.
3. **Ours.** ``phlora-nim extract --base B --finetuned F --out OUT --rank 64 --force`` as a
   subprocess, on both pairs.
4. **Load floor.** A subprocess that imports torch, opens both checkpoints with
   :func:`phlora_nim.converters.checkpoint.open_checkpoint` and forms every tensor's delta with
   :class:`phlora_nim.converters.checkpoint.DeltaReader` (the reading path the extractor uses) and does
   nothing else: no extraction can be faster than reading its input.
5. **Wall time and peak RSS** of each child process: a tiny launcher spawns it and reaps it with
   ``os.wait4``, which returns the child's own rusage (``ru_maxrss``, KiB on Linux); see
   :func:`measure` for why not straight from this process. ``/proc/stat`` before and after tells
   how many CPUs the rest of the machine kept busy meanwhile; such runs are rerun once the machine
   is quiet (twice at most) and flagged as contended if they still were.
   Before the runs every checkpoint file is read once so that all runs see a warm page cache.
6. **Energy.** For every linear module (q, k, v, o, gate, up, down of every layer) the exact
   truncated-SVD optimum at the rank, ``Σ_{i≤r} σ_i²`` from ``torch.linalg.svdvals`` of the float32
   delta, against the energy each adapter captures, ``‖ΔW‖² − ‖ΔW − s·B·A‖²`` in float64, with the
   scale ``s`` read from the adapter's ``adapter_config.json`` (``lora_alpha / r``, patterns and
   rsLoRA honoured).

It prints a table of ratios with their targets (≥ 10× faster than mergekit, ≤ 1.5× the load floor,
min energy ratio ≥ 0.999, peak RSS ≤ mergekit's and flat when the layers double) and the raw
seconds and megabytes, and writes them to ``<workdir>/results.json``. It exits 0 — it is a report —
unless ``--check`` is given and a target is missed (exit 1). Errors exit 2.

Run it from the repository root (the first run generates ~7 GB of checkpoints and installs mergekit,
a few minutes; mergekit's extraction itself takes several minutes on 2 cores)::

    .venv/bin/python bench/extract_vs_mergekit.py
    .venv/bin/python bench/extract_vs_mergekit.py --skip-mergekit      # ours + load floor only
    .venv/bin/python bench/extract_vs_mergekit.py --layers 4 --check   # 4 vs 8 layers; exit 1 on a miss
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO / "bench" / ".work"
LINEAR_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Targets: (comparison, threshold). ">=" means the measured ratio must be at least the threshold.
TARGETS: dict[str, tuple[str, float]] = {
    "speedup_vs_mergekit": (">=", 10.0),
    "rss_vs_mergekit": ("<=", 1.0),
    "energy_min": (">=", 0.999),
    "time_vs_floor": ("<=", 1.5),
    "rss_scaling": ("<=", 1.10),
}

# The load floor: read both checkpoints and form every delta, nothing else.
FLOOR_PROGRAM = """\
\"\"\"Load floor (written by bench/extract_vs_mergekit.py): form every delta, nothing else.\"\"\"
import sys
import torch  # noqa: F401  (the extractor pays this import too)
from phlora_nim.converters.checkpoint import DeltaReader, open_checkpoint
with open_checkpoint(sys.argv[1]) as base, open_checkpoint(sys.argv[2]) as ft:
    reader = DeltaReader(base, ft)
    for name in ft.names():
        if name in base.tensors:
            reader.delta(name)
"""

# Runs argv[2:] and writes its wall time, exit code and own peak RSS (KiB) as JSON to argv[1].
# A fresh, small process (python -S) so that the child's ru_maxrss starts from the launcher's few MB.
LAUNCHER_PROGRAM = """\
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except OSError as exc:
    out = {"error": str(exc), "rc": 127}
else:
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    cpu = usage.ru_utime + usage.ru_stime
    out = {"wall_s": wall, "cpu_s": cpu, "maxrss_kib": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}
with open(report, "w") as fh:
    json.dump(out, fh)
"""

# Ours' fixed start-up cost: the modules `phlora-nim extract` imports before it reads a tensor.
IMPORTS_PROGRAM = "import phlora_nim.cli, phlora_nim.jobs.adapter_jobs, phlora_nim.converters.extract, rich.progress"

# A run counts as contended when the rest of the machine kept this many CPUs busy on average meanwhile.
CONTENTION_CPUS = 0.25

log = logging.getLogger("bench")


class BenchError(Exception):
    """A failure the user can act on; printed without a traceback (exit 2)."""


@dataclass
class Run:
    """One measured child process."""

    label: str
    command: list[str]
    wall_s: float
    peak_rss_mb: float
    log: str
    cpu_s: float = 0.0  # user + system CPU seconds of the child
    other_cpus: float | None = None  # CPUs kept busy by everything else on the machine, on average

    @property
    def parallelism(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def contended(self) -> bool:
        """Other work (or the hypervisor's steal) took a noticeable share of the CPUs meanwhile."""
        return self.other_cpus is not None and self.other_cpus > CONTENTION_CPUS


@dataclass
class ModuleEnergy:
    module: str
    delta_energy: float
    exact: float
    captured: dict[str, float] = field(default_factory=dict)

    def ratio(self, tool: str) -> float:
        return self.captured[tool] / self.exact if self.exact else 1.0


@dataclass
class MergekitInfo:
    version: str
    torch_version: str
    exe: Path
    install_s: float | None  # None: an existing environment was reused


# --------------------------------------------------------------------------------------------
# processes


def measure(label: str, command: Sequence[str | Path], log_path: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``command`` to completion; its wall time and its own peak RSS.

    The command is started by a small launcher process (:data:`LAUNCHER_PROGRAM`) that spawns it,
    reaps it with ``os.wait4`` and reports the child's rusage. Spawning it from this process
    directly would be wrong: Linux carries the spawning process's memory high-water mark across
    ``exec`` into the child's ``ru_maxrss``, and this process holds torch and, after generating
    checkpoints, gigabytes of heap.

    Raises:
        BenchError: the command is missing or exits non-zero (with the tail of its log).
    """
    cmd = [str(c) for c in command]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result = log_path.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    log.info("running %s: %s", label, shlex.join(cmd))
    busy_before = _machine_busy_s()
    with log_path.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCHER_PROGRAM, str(result), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    try:
        usage = json.loads(result.read_text())
    except (OSError, ValueError):
        raise BenchError(f"{label}: the launcher reported nothing (exit {proc.returncode}); see {log_path}") from None
    if usage.get("error"):
        raise BenchError(f"{label}: cannot start {cmd[0]} ({usage['error']})")
    if usage["rc"] != 0:
        raise BenchError(f"{label} failed with exit code {usage['rc']}. Last lines of {log_path}:\n{_tail(log_path)}")
    busy_after = _machine_busy_s()
    other = None
    if busy_before is not None and busy_after is not None and usage["wall_s"] > 0:
        other = max(0.0, (busy_after - busy_before - usage["cpu_s"]) / usage["wall_s"])
    run = Run(
        label=label,
        command=cmd,
        wall_s=usage["wall_s"],
        peak_rss_mb=usage["maxrss_kib"] / 1024,
        log=str(log_path),
        cpu_s=usage["cpu_s"],
        other_cpus=other,
    )
    log.info("  %s: %.2f s, peak RSS %.0f MB, %.2f CPUs busy", label, run.wall_s, run.peak_rss_mb, run.parallelism)
    if run.contended:
        log.warning("  other work kept %.2f CPUs busy meanwhile: the time of %s is inflated", other, label)
    return run


QUIET_WAIT_S = 600.0  # longest wait for a quiet machine before a retry


def wait_until_quiet(timeout: float = QUIET_WAIT_S, window: float = 5.0) -> bool:
    """Wait until other processes keep fewer than ``CONTENTION_CPUS`` busy over ``window`` seconds."""
    deadline = time.monotonic() + timeout
    last_note = 0.0
    while True:
        before = _machine_busy_s()
        time.sleep(window)
        after = _machine_busy_s()
        if before is None or after is None:
            return True
        other = (after - before) / window
        if other < CONTENTION_CPUS:
            return True
        if time.monotonic() > deadline:
            return False
        if time.monotonic() - last_note > 60:
            log.info("  waiting for a quiet machine (others keep %.2f CPUs busy)", other)
            last_note = time.monotonic()


def measure_quiet(
    label: str,
    command: Sequence[str | Path],
    log_path: Path,
    env: dict[str, str] | None = None,
    retries: int = 2,
) -> Run:
    """:func:`measure`, rerun up to ``retries`` times after a wait when other work shared the CPUs."""
    run = measure(label, command, log_path, env)
    for attempt in range(retries):
        if not run.contended:
            break
        log.info("  retrying %s once the machine is quiet (retry %d of %d)", label, attempt + 1, retries)
        wait_until_quiet()
        run = measure(label, command, log_path, env)
    return run


def best_of(runs: list[Run]) -> Run:
    """Fastest wall time, largest peak RSS over repeats of the same command."""
    best = min(runs, key=lambda r: r.wall_s)
    return Run(
        label=best.label,
        command=best.command,
        wall_s=best.wall_s,
        peak_rss_mb=max(r.peak_rss_mb for r in runs),
        log=best.log,
        cpu_s=best.cpu_s,
        other_cpus=best.other_cpus,
    )


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all CPUs, steal included)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _capture(cmd: Sequence[str | Path], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    proc = subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# inputs


def ensure_pair(workdir: Path, layers: int) -> tuple[Path, Path]:
    """The synthetic pair with ``layers`` decoder layers, generated unless already complete."""
    from phlora_nim.testing.synthetic import SyntheticLlama, write_synthetic_pair

    spec = SyntheticLlama(num_hidden_layers=layers)
    root = workdir / f"pair-L{layers}"
    folders = (root / "base", root / "finetuned")
    if all(_pair_complete(f, asdict(spec)) for f in folders):
        log.info("reusing the %d-layer pair in %s", layers, root)
        return folders
    shutil.rmtree(root, ignore_errors=True)
    log.info("generating the %d-layer Llama-3-8B-shaped pair in %s", layers, root)
    start = time.perf_counter()
    base, ft = write_synthetic_pair(root, spec)
    log.info("  generated in %.1f s (%.2f GB)", time.perf_counter() - start, _folder_bytes(root) / 1e9)
    return base.resolve(), ft.resolve()


def _pair_complete(folder: Path, spec: dict[str, Any]) -> bool:
    # The generator writes the index last: its presence with the same spec means a finished folder.
    index = folder / "model.safetensors.index.json"
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return False
    if data.get("metadata", {}).get("spec") != spec:
        return False
    return all((folder / shard).exists() for shard in set(data.get("weight_map", {}).values()))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def warm_page_cache(folders: Sequence[Path]) -> None:
    """Read every file once so that no measured run pays for the first disk read."""
    start = time.perf_counter()
    total = 0
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                with path.open("rb", buffering=0) as fh:
                    while chunk := fh.read(64 << 20):
                        total += len(chunk)
    log.info("page cache warmed: %.2f GB read in %.1f s", total / 1e9, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# mergekit


def ensure_mergekit(venv: Path, spec: str, logs: Path) -> MergekitInfo:
    """A working ``mergekit`` in its own venv, with this venv's torch version (the CPU wheel)."""
    torch_version = metadata.version("torch").split("+")[0]
    info = _probe_mergekit(venv)
    if info is not None:
        log.info("reusing mergekit %s (torch %s) in %s", info.version, info.torch_version, venv)
        return info
    if venv.exists():
        log.info("the environment in %s does not work; recreating it", venv)
        shutil.rmtree(venv)
    log.info("installing %s with torch==%s into %s (pip log: %s)", spec, torch_version, venv, logs / "mergekit-pip.log")
    rc, out = _capture([sys.executable, "-m", "venv", venv])
    if rc != 0:
        raise BenchError(f"cannot create a virtual environment in {venv}:\n{out[-2000:]}")
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check"]
    run = measure("pip install mergekit", [*pip, f"torch=={torch_version}", spec], logs / "mergekit-pip.log")
    rc, out = _capture([venv / "bin" / "python", "-m", "pip", "check"])
    if rc != 0:
        log.warning("pip check reports conflicts in the mergekit environment:\n%s", out.strip())
    info = _probe_mergekit(venv)
    if info is None:
        raise BenchError(
            f"mergekit was installed into {venv} but does not run; see {logs / 'mergekit-pip.log'}. "
            "Pin an older release with --mergekit-spec 'mergekit==X.Y.Z'."
        )
    if info.torch_version.split("+")[0] != torch_version:
        log.warning("mergekit's pins replaced torch %s by %s", torch_version, info.torch_version)
    info.install_s = run.wall_s
    log.info("  installed mergekit %s in %.0f s", info.version, run.wall_s)
    return info


def _probe_mergekit(venv: Path) -> MergekitInfo | None:
    exe = venv / "bin" / "mergekit-extract-lora"
    python = venv / "bin" / "python"
    if not (exe.exists() and python.exists()):
        return None
    probe = "import importlib.metadata as m, mergekit, torch; print(m.version('mergekit'), torch.__version__)"
    try:
        rc, out = _capture([python, "-c", probe])
        help_rc, _ = _capture([exe, "--help"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rc != 0 or help_rc != 0:
        return None
    version, torch_version = out.split()[-2:]
    return MergekitInfo(version=version, torch_version=torch_version, exe=exe, install_s=None)


def mergekit_command(exe: Path, base: Path, ft: Path, out: Path, rank: int) -> list[str]:
    """The ``mergekit-extract-lora`` command line for the installed version, read from ``--help``.

    0.1.5 takes ``--model FT --base-model BASE --out-path OUT --max-rank R``. A usage line with
    positional arguments (older releases) is mapped by name (``*BASE*``, ``*OUT*``, else the
    fine-tune) and ``--rank`` is used where ``--max-rank`` is absent; that path is untested.
    """
    rc, text = _capture([exe, "--help"], env={**os.environ, **OFFLINE_ENV})
    if rc != 0:
        raise BenchError(f"{exe} --help failed:\n{text[-2000:]}")
    if re.search(r"--max-rank\b", text):
        rank_flag = "--max-rank"
    elif re.search(r"--rank\b", text):
        rank_flag = "--rank"
    else:
        raise BenchError(f"cannot find a rank option in `{exe.name} --help`:\n{text[:1500]}")
    if all(re.search(rf"{opt}\b", text) for opt in ("--model", "--base-model", "--out-path")):
        cmd = [str(exe), "--model", str(ft), "--base-model", str(base), "--out-path", str(out)]
    else:
        usage = re.search(r"Usage:\s*\S+\s+\[OPTIONS\]\s+([A-Z_ ]+)", text)
        if not usage:
            raise BenchError(f"cannot tell the argument order of `{exe.name}` from its --help:\n{text[:1500]}")
        args: list[str] = []
        for token in usage.group(1).split():
            if "BASE" in token:
                args.append(str(base))
            elif "OUT" in token:
                args.append(str(out))
            else:
                args.append(str(ft))
        cmd = [str(exe), *args]
    cmd += [rank_flag, str(rank)]
    # Local folders only: no tokenizer to copy, no GPU.
    if "--copy-tokenizer" in text:
        cmd.append("--no-copy-tokenizer")
    if "--no-cuda" in text:
        cmd.append("--no-cuda")
    return cmd


# --------------------------------------------------------------------------------------------
# energy


@dataclass
class LoraFactors:
    """Lazy access to a PEFT LoRA adapter's factors and per-module scale."""

    folder: Path
    config: dict[str, Any]
    keys: dict[str, Path]  # tensor key -> file

    @classmethod
    def open(cls, folder: Path) -> LoraFactors:
        from safetensors import safe_open

        cfg_path = folder / "adapter_config.json"
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot read {cfg_path} ({exc})") from None
        files = sorted(folder.glob("adapter_model*.safetensors"))
        if not files:
            raise BenchError(f"no adapter_model*.safetensors in {folder}")
        keys: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                keys.update(dict.fromkeys(fh.keys(), file))
        return cls(folder=folder, config=config, keys=keys)

    def factors(self, module: str) -> tuple[Any, Any, float] | None:
        """``(A [r, in], B [out, r], scale)`` of ``module``, or None if the adapter lacks it."""
        from safetensors import safe_open

        key_a = f"base_model.model.{module}.lora_A.weight"
        key_b = f"base_model.model.{module}.lora_B.weight"
        if key_a not in self.keys or key_b not in self.keys:
            return None
        with safe_open(str(self.keys[key_a]), framework="pt") as fh:
            a = fh.get_tensor(key_a)
        with safe_open(str(self.keys[key_b]), framework="pt") as fh:
            b = fh.get_tensor(key_b)
        r = int(_pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", a.shape[0])))
        if r != a.shape[0]:
            log.warning("%s: %s has rank %d but its config says %d", self.folder, module, a.shape[0], r)
        alpha = float(_pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return a, b, scale


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    # PEFT matches a pattern key against the module path's full name or as a dotted suffix.
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def module_energies(base: Path, ft: Path, layers: int, rank: int, adapters: dict[str, Path]) -> list[ModuleEnergy]:
    """Exact rank-``rank`` optimum and each adapter's captured energy, per linear module."""
    import torch

    from phlora_nim.converters.checkpoint import DeltaReader, open_checkpoint

    opened = {tool: LoraFactors.open(folder) for tool, folder in adapters.items()}
    for tool, lora in opened.items():
        log.info(
            "%s adapter: r=%s lora_alpha=%s, %d tensors",
            tool,
            lora.config.get("r"),
            lora.config.get("lora_alpha"),
            len(lora.keys),
        )
    results: list[ModuleEnergy] = []
    start = time.perf_counter()
    with open_checkpoint(base) as b, open_checkpoint(ft) as f:
        reader = DeltaReader(b, f)
        modules = [f"model.layers.{i}.{m}" for i in range(layers) for m in LINEAR_MODULES]
        for n, module in enumerate(modules, 1):
            delta = reader.delta(f"{module}.weight")
            d64 = delta.double()
            total = float(d64.square().sum())
            # Same singular values either way; LAPACK is several times faster on a tall matrix.
            sigma = torch.linalg.svdvals(delta if delta.shape[0] >= delta.shape[1] else delta.T)
            exact = float(sigma[:rank].double().square().sum())
            row = ModuleEnergy(module=module, delta_energy=total, exact=exact)
            for tool, lora in opened.items():
                got = lora.factors(module)
                if got is None:
                    log.warning("%s adapter has no %s: counted as 0 energy", tool, module)
                    row.captured[tool] = 0.0
                    continue
                a, bm, scale = got
                residual = d64 - (bm.double() @ a.double()).mul_(scale)
                row.captured[tool] = total - float(residual.square().sum())
                del residual
            results.append(row)
            ratios = ", ".join(f"{t} {row.ratio(t):.6f}" for t in opened)
            log.info("  [%d/%d] %s: optimum keeps %.4f of ‖ΔW‖²; %s", n, len(modules), module, exact / total, ratios)
    log.info("energy evaluation: %.0f s", time.perf_counter() - start)
    return results


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Row:
    metric: str
    value: float | None  # None: not measured (skipped)
    unit: str
    target_key: str | None = None
    note: str = ""

    def status(self) -> str:
        if self.value is None:
            return "skipped"
        if self.target_key is None:
            return "info"
        return "ok" if meets(self.target_key, self.value) else "MISSED"

    def target_text(self) -> str:
        if self.target_key is None:
            return self.note
        op, threshold = TARGETS[self.target_key]
        text = f"{'≥' if op == '>=' else '≤'} {threshold:g}{self.unit}"
        return f"{text} ({self.note})" if self.note else text


def meets(key: str, value: float) -> bool:
    op, threshold = TARGETS[key]
    return value >= threshold if op == ">=" else value <= threshold


def run_ours(tag: str, base: Path, ft: Path, out: Path, rank: int, logs: Path, repeat: int) -> Run:
    exe = Path(sys.executable).parent / "phlora-nim"
    if not exe.exists():
        raise BenchError(f"{exe} not found: install the project first (pip install -e '.[test]')")
    cmd = [exe, "extract", "--base", base, "--finetuned", ft, "--out", out, "--rank", str(rank), "--force"]
    return best_of([measure_quiet(f"ours {tag}", cmd, logs / f"ours-{tag}.log") for _ in range(repeat)])


def run_floor(tag: str, base: Path, ft: Path, logs: Path, repeat: int) -> Run:
    program = logs.parent / "load_floor.py"
    program.write_text(FLOOR_PROGRAM)
    cmd = [sys.executable, program, base, ft]
    return best_of([measure_quiet(f"load floor {tag}", cmd, logs / f"floor-{tag}.log") for _ in range(repeat)])


def ours_timings(out: Path) -> dict[str, float]:
    try:
        return dict(json.loads((out / "phlora_report.json").read_text()).get("timings", {}))
    except (OSError, ValueError):
        return {}


def _decompose_seconds_by_type(out: Path) -> dict[str, float]:
    try:
        modules = json.loads((out / "phlora_report.json").read_text()).get("modules", [])
    except (OSError, ValueError):
        return {}
    totals: dict[str, float] = {}
    for m in modules:
        if isinstance(m.get("seconds"), int | float):
            key = str(m.get("type") or m.get("name", "?").rsplit(".", 1)[-1])
            totals[key] = totals.get(key, 0.0) + float(m["seconds"])
    return totals


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "":
        return f"{value:.4f}"
    return f"{value:.1f}{unit}" if value >= 10 else f"{value:.3f}{unit}"


def print_report(rows: list[Row], runs: list[Run], extra_lines: list[str]) -> None:
    width = max(len(r.metric) for r in rows)
    targets = [r.target_text() for r in rows]
    twidth = max(len(t) for t in targets)
    print()
    print(f"{'ratio':<{width}}  {'value':>10}  {'target':<{twidth}}  status")
    print(f"{'-' * width}  {'-' * 10}  {'-' * twidth}  ------")
    for row, target in zip(rows, targets, strict=True):
        print(f"{row.metric:<{width}}  {_fmt(row.value, row.unit):>10}  {target:<{twidth}}  {row.status()}")
    print()
    lwidth = max(len(r.label) for r in runs)
    print(f"{'run':<{lwidth}}  {'wall s':>9}  {'peak RSS MB':>11}  {'CPUs used':>9}  {'CPUs others':>11}")
    print(f"{'-' * lwidth}  {'-' * 9}  {'-' * 11}  {'-' * 9}  {'-' * 11}")
    for run in runs:
        other = "—" if run.other_cpus is None else f"{run.other_cpus:.2f}"
        flag = "  ← contended" if run.contended else ""
        print(
            f"{run.label:<{lwidth}}  {run.wall_s:>9.2f}  {run.peak_rss_mb:>11.0f}  {run.parallelism:>9.2f}"
            f"  {other:>11}{flag}"
        )
    for line in extra_lines:
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare phlora-nim extract with mergekit-extract-lora on a Llama-3-8B-shaped synthetic pair.",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="work files (default: bench/.work)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the main pair (default 2)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank for both tools (default 64)")
    parser.add_argument("--skip-mergekit", action="store_true", help="run only ours and the load floor")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of ours and of the floor; best time, largest RSS kept (default 3)"
    )
    parser.add_argument(
        "--mergekit-spec", default="mergekit", help="pip requirement for mergekit (default: the newest release)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return _run(args)
    except BenchError as exc:
        log.error("%s", exc)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.layers < 1 or args.rank < 1 or args.repeat < 1:
        raise BenchError("--layers, --rank and --repeat must be positive")
    workdir: Path = args.workdir.resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    small, large = args.layers, 2 * args.layers
    t0 = time.perf_counter()

    pairs = {n: ensure_pair(workdir, n) for n in (small, large)}
    mergekit: MergekitInfo | None = None
    if not args.skip_mergekit:
        mergekit = ensure_mergekit(workdir / "mergekit-venv", args.mergekit_spec, logs)
    setup_s = time.perf_counter() - t0

    base, ft = pairs[small]
    outs = {
        "ours": workdir / "out" / f"ours-L{small}",
        "ours_large": workdir / "out" / f"ours-L{large}",
        "mergekit": workdir / "out" / f"mergekit-L{small}",
    }
    warm_page_cache([base, ft])
    # What ours pays before reading any tensor: the imports of the CLI's extract command.
    startup = measure_quiet("ours imports only", [sys.executable, "-c", IMPORTS_PROGRAM], logs / "ours-imports.log")
    floor = run_floor(f"L{small}", base, ft, logs, args.repeat)
    ours = run_ours(f"L{small}", base, ft, outs["ours"], args.rank, logs, args.repeat)
    mk_run: Run | None = None
    mk_cmd: list[str] | None = None
    if mergekit is not None:
        shutil.rmtree(outs["mergekit"], ignore_errors=True)
        mk_cmd = mergekit_command(mergekit.exe, base, ft, outs["mergekit"], args.rank)
        warm_page_cache([base, ft])
        mk_run = measure_quiet(
            f"mergekit L{small}", mk_cmd, logs / f"mergekit-L{small}.log", env={**os.environ, **OFFLINE_ENV}
        )
    base_l, ft_l = pairs[large]
    warm_page_cache([base_l, ft_l])
    floor_large = run_floor(f"L{large}", base_l, ft_l, logs, args.repeat)
    ours_large = run_ours(f"L{large}", base_l, ft_l, outs["ours_large"], args.rank, logs, args.repeat)

    adapters = {"ours": outs["ours"]}
    if mk_run is not None:
        adapters["mergekit"] = outs["mergekit"]
    energies = module_energies(base, ft, small, args.rank, adapters)
    ours_ratios = [e.ratio("ours") for e in energies]
    mk_ratios = [e.ratio("mergekit") for e in energies] if mk_run is not None else []
    worst = min(energies, key=lambda e: e.ratio("ours"))

    data_ratio = _folder_bytes(base_l.parent) / _folder_bytes(base.parent)
    mk_wall = mk_run.wall_s if mk_run else None
    mk_rss = mk_run.peak_rss_mb if mk_run else None
    rows = [
        Row("time mergekit / ours", _ratio(mk_wall, ours.wall_s), "×", "speedup_vs_mergekit"),
        Row("peak RSS ours / mergekit", _ratio(ours.peak_rss_mb, mk_rss), "×", "rss_vs_mergekit"),
        Row("energy ours / exact, min over modules", min(ours_ratios), "", "energy_min", worst.module),
        Row("energy ours / exact, mean over modules", sum(ours_ratios) / len(ours_ratios), "", None),
        Row("time ours / load floor", ours.wall_s / floor.wall_s, "×", "time_vs_floor"),
        Row(f"time ours L{large} / L{small}", ours_large.wall_s / ours.wall_s, "×", None, f"data ×{data_ratio:.2f}"),
        Row(
            f"peak RSS ours L{large} / L{small}", ours_large.peak_rss_mb / ours.peak_rss_mb, "×", "rss_scaling", "flat"
        ),
        Row(f"time ours / load floor at L{large}", ours_large.wall_s / floor_large.wall_s, "×", None),
        Row(
            "energy mergekit / exact, min over modules",
            min(mk_ratios) if mk_ratios else None,
            "",
            None,
            "for information",
        ),
        Row(
            "energy mergekit / exact, mean over modules",
            sum(mk_ratios) / len(mk_ratios) if mk_ratios else None,
            "",
            None,
            "for information",
        ),
    ]
    runs = [r for r in (startup, floor, ours, mk_run, floor_large, ours_large) if r is not None]
    timings = ours_timings(outs["ours"])
    extra = [
        "",
        f"pairs: Llama-3-8B shapes, bf16, {small} and {large} decoder layers "
        f"({_folder_bytes(base.parent) / 1e9:.2f} GB and {_folder_bytes(base_l.parent) / 1e9:.2f} GB per pair); "
        f"rank {args.rank}; {len(energies)} linear modules evaluated at L{small}; best of {args.repeat}",
        f"optimum keeps {min(e.exact / e.delta_energy for e in energies):.4f}–"
        f"{max(e.exact / e.delta_energy for e in energies):.4f} of each module's ‖ΔW‖² at rank {args.rank}",
    ]
    if timings:
        inside = timings.get("total_s", 0.0)
        extra.append(
            f"ours L{small} breakdown (phlora_report.json timings): "
            + ", ".join(f"{k} {v:.2f}" for k, v in timings.items())
            + f"; outside total_s: {ours.wall_s - inside:.2f} s, of which imports {startup.wall_s:.2f} s"
            + f" and the rest (energy.png, report, exit) {ours.wall_s - inside - startup.wall_s:.2f} s"
        )
    by_type = _decompose_seconds_by_type(outs["ours"])
    if by_type:
        extra.append(
            f"ours L{small} decomposition by module type (s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]))
        )
    adapter_growth = _folder_bytes(outs["ours_large"]) - _folder_bytes(outs["ours"])
    extra.append(
        f"ours peak RSS L{small}→L{large}: {ours_large.peak_rss_mb - ours.peak_rss_mb:+.0f} MB; the adapter folder "
        f"grows {adapter_growth / 1e6:+.0f} MB on disk (bf16 factors; float32 while in memory)"
    )
    if mergekit is not None and mk_cmd is not None:
        installed = "reused" if mergekit.install_s is None else f"installed in {mergekit.install_s:.0f} s"
        extra.append(f"mergekit {mergekit.version} (torch {mergekit.torch_version}, {installed}): {shlex.join(mk_cmd)}")
    extra.append(f"ours: {shlex.join(ours.command)}")
    contended = [r.label for r in runs if r.contended]
    if contended:
        extra.append(
            f"WARNING: other work shared the {os.cpu_count()} CPUs during: {', '.join(contended)}; "
            "their times are inflated — rerun on a quiet machine"
        )
    extra.append(f"setup (generation/reuse, install): {setup_s:.0f} s; whole run {time.perf_counter() - t0:.0f} s")
    print_report(rows, runs, extra)

    results = {
        "rows": [{**asdict(r), "status": r.status(), "target": r.target_text()} for r in rows],
        "runs": [asdict(r) for r in runs],
        "modules": [{**asdict(e), "ratios": {t: e.ratio(t) for t in e.captured}} for e in energies],
        "ours_timings": timings,
        "mergekit": None if mergekit is None else {"version": mergekit.version, "command": mk_cmd},
        "layers": [small, large],
        "rank": args.rank,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    log.info("results written to %s", workdir / "results.json")
    missed = [r.metric for r in rows if r.status() == "MISSED"]
    if missed and args.check:
        log.error("targets missed: %s", "; ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
