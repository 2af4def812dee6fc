"""Extraction speed with torch's thread count set from the CPUs the process may use, against torch's
count from the cores the machine shows, under a CPU limit.

torch sizes its pool from the machine's cores; a process granted fewer (a Kubernetes CPU limit, a
cgroup quota, a shared machine) then runs more threads than CPUs, and extraction, many mid-sized
matrix products, waits on its own threads. phlora-nim sets the count from the affinity mask and
the cgroup quota (``phlora_nim/core/cpus.py``).

The limit is emulated with the affinity mask (``--cpus K``: the child runs on K CPUs) while the
"machine's count" run is given ``os.cpu_count()`` threads, as torch picks under a cgroup quota it
cannot see. Each configuration runs ``--repeat`` times in a fresh process on the same synthetic
Llama-shaped pair (``phlora_nim/testing/synthetic.py``); the median extraction time is reported and
the ratio printed. On a machine shared with other work the figures move with its load: run both
configurations back to back, as here, and quote the load average printed with them.

Run: ``.venv/bin/python bench/extract_threads.py [--cpus 1] [--hidden 1024] [--layers 2] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from phlora_nim.testing.synthetic import SyntheticLlama, write_synthetic_pair

_CHILD = """
import json, os, sys, time
cpus = json.loads(sys.argv[3])
os.sched_setaffinity(0, cpus)
import torch
from phlora_nim.converters.checkpoint import open_checkpoint
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.jobs.pipeline import planned, extract_adapter
options = ExtractOptions(policy=RankPolicy(rank=int(sys.argv[4])))
start = time.perf_counter()
with planned(sys.argv[1], [sys.argv[2]], options) as job:
    extract_adapter(job, job.pairs[0])
print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}))
"""


def run_once(base: Path, ft: Path, cpus: list[int], rank: int, threads: int | None) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("PHLORA_THREADS", None)
    if threads is not None:
        env["PHLORA_THREADS"] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(base), str(ft), json.dumps(cpus), str(rank)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs the extraction may use (the emulated limit)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    visible = os.cpu_count() or 1
    cpus = sorted(os.sched_getaffinity(0))[: args.cpus]
    spec = SyntheticLlama(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512),
        num_hidden_layers=args.layers,
        vocab_size=8000,
        head_rank=64,
    )
    work = Path(tempfile.mkdtemp(prefix="phlora-threads-bench-"))
    try:
        base, ft = write_synthetic_pair(work, spec)
        rows = {}
        for label, threads in ((f"machine's count ({visible} threads)", visible), ("phlora-nim's count", None)):
            runs = [run_once(base, ft, cpus, args.rank, threads) for _ in range(args.repeat)]
            rows[label] = (statistics.median(r["seconds"] for r in runs), int(runs[0]["threads"]))
        load = os.getloadavg()
        print(f"limit: {len(cpus)} of {visible} CPUs; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
        for label, (seconds, threads) in rows.items():
            print(f"  {label:34s} {threads:3d} threads  {seconds:7.2f} s (median of {args.repeat})")
        (slow, _), (fast, _) = rows.values()
        print(f"speed-up: {slow / fast:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
