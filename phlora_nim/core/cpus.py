"""How many CPUs this process may really use, and torch's thread count set from it.

torch sizes its thread pool from the cores it sees on the machine, not from what the process is
granted: a Kubernetes pod limited to 4 CPUs on a 64-core node runs 64 threads on a 4-CPU quota,
and on a shared machine busy with other work the threads wait on each other. The extraction is
many mid-sized matrix products, which suffer most from that oversubscription. So the count comes
from the CPU affinity mask and the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``),
the smaller of the two, and can be set with ``--threads`` or ``PHLORA_THREADS``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from phlora_nim.core.errors import OptionError

log = logging.getLogger("phlora_nim.cpus")

ENV = "PHLORA_THREADS"
_CGROUP = Path("/sys/fs/cgroup")


def _quota_v2(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _own_groups(proc: Path = Path("/proc/self/cgroup")) -> list[str]:
    """This process's cgroup paths (v2 ``0::/path``, v1 ``N:cpu,cpuacct:/path``), "/" last."""
    paths: list[str] = []
    try:
        for line in proc.read_text(encoding="utf-8").splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" or "cpu" in controllers.split(","):
                paths.append(path.lstrip("/"))
    except (OSError, ValueError):
        pass
    return [p for p in paths if p] + [""]


def cgroup_quota(root: Path = _CGROUP) -> float | None:
    """CPUs granted by the cgroup quota (e.g. 2.5), or None when unlimited or unknown.

    The process's own group is read first (a container usually sees its own as the root).
    """
    quotas = []
    for group in _own_groups() if root == _CGROUP else [""]:
        for q in (_quota_v2(root / group), _quota_v1(root / "cpu" / group)):
            if q is not None:
                quotas.append(q)
    return min(quotas) if quotas else None


def usable_cpus(root: Path = _CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up), ≥ 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_quota(root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def thread_count(requested: int | None = None, *, root: Path = _CGROUP) -> int:
    """``requested`` (``--threads``), else ``$PHLORA_THREADS``, else :func:`usable_cpus`.

    Raises:
        OptionError: a count below 1 or not a whole number.
    """
    where = "--threads"
    value: object = requested
    if value is None and os.environ.get(ENV):
        where, value = ENV, os.environ[ENV]
    if value is None:
        return usable_cpus(root)
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise OptionError("thread count must be a whole number ≥ 1", where=where, expected="e.g. 4", found=str(value))
    return n


def set_torch_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count from :func:`thread_count`; returns it."""
    import torch

    n = thread_count(requested)
    if torch.get_num_threads() != n:
        log.debug("torch threads: %d (was %d)", n, torch.get_num_threads())
        torch.set_num_threads(n)
    return n
