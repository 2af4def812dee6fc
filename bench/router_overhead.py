"""What the router costs: latency and throughput of Triton directly vs through the router.

One tritonserver (CPU, the stand-in LoRA model of the router tests) and one router process
(``phlora-nim serve`` in a subprocess), both on this machine. The direct client sends
``lora_task_id`` itself (the adapter already in Triton's cache); the routed client names the
adapter as the model, and the router adds the id. Base-model requests pass through untouched.
Prints p50 / p99 latency of sequential requests and throughput at a given concurrency, and the
ratios router / direct.

    .venv/bin/python bench/router_overhead.py                       # ~1 min on 2 cores
    .venv/bin/python bench/router_overhead.py --requests 1000 --sizes 16,262144 --concurrency 16
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent

from phlora_nim.testing.standin import STANDIN_REPO, add_adapters  # noqa: E402
from phlora_nim.triton.launcher import LocalTriton, free_port  # noqa: E402

log = logging.getLogger("bench.router_overhead")
ADAPTER, OFFSET = "bench", 100


def inputs(size: int, task_id: int | None) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", [1, size], "INT32")
    x.set_data_from_numpy(np.arange(size, dtype=np.int32).reshape(1, size))
    out = [x]
    if task_id is not None:
        t = grpcclient.InferInput("lora_task_id", [1, 1], "UINT64")
        t.set_data_from_numpy(np.array([[task_id]], np.uint64))
        out.append(t)
    return out


def latencies(call: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(20, n)):  # warm up
        call()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def throughput(make_call: Callable[[], Callable[[], object]], concurrency: int, seconds: float) -> float:
    """Requests per second with ``concurrency`` threads, each with its own client."""
    stop = threading.Event()
    counts = [0] * concurrency

    def worker(i: int) -> None:
        call = make_call()
        call()
        while not stop.is_set():
            call()
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start_counts, started = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, elapsed = sum(counts) - start_counts, time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join()
    return done / elapsed


@contextlib.contextmanager
def router_process(
    repository: Path, upstream: str, workers: int = 1, extra_args: tuple[str, ...] = ()
) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "import typer; from phlora_nim.router.cli import serve; typer.run(serve)",
        "--model-repository", str(repository),
        "--upstream", upstream,
        "--port", str(port),
        "--metrics-port", "0",
        "--workers", str(workers),
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    try:
        client = grpcclient.InferenceServerClient(address)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                if client.is_server_ready(client_timeout=1):
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the router did not become ready")
            time.sleep(0.2)
        client.close()
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q) * 1000.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="sequential requests per case")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads for throughput")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput window per case")
    parser.add_argument("--sizes", default="16,65536", help="comma-separated lengths of x (INT32)")
    parser.add_argument("--router-workers", type=int, default=1, help="router processes (serve --workers)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp, LocalTriton(STANDIN_REPO) as triton:
        entry = add_adapters(Path(tmp), {ADAPTER: (OFFSET, "float16")})[ADAPTER]
        with router_process(Path(tmp), triton.grpc_url, args.router_workers) as routed:
            rows = []
            for size in sizes:
                for label, lora in (("adapter", True), ("base", False)):

                    def maker(address: str, direct: bool, size: int = size, lora: bool = lora) -> Callable[[], object]:
                        client = grpcclient.InferenceServerClient(address)
                        model = ADAPTER if (lora and not direct) else "ensemble"
                        data = inputs(size, entry.task_id if (lora and direct) else None)
                        return lambda: client.infer(model, data)

                    if lora:  # load the adapter into Triton's cache through the router first
                        out = maker(routed, False)()
                        assert int(out.as_numpy("y")[0, 0]) == OFFSET  # type: ignore[attr-defined]
                    case = {}
                    for side, address, direct in (("direct", triton.grpc_url, True), ("router", routed, False)):
                        lat = latencies(maker(address, direct), args.requests)
                        rps = throughput(lambda a=address, d=direct: maker(a, d), args.concurrency, args.seconds)
                        case[side] = (pct(lat, 50), pct(lat, 99), statistics.fmean(lat) * 1000, rps)
                    rows.append((label, size, case))
    print(f"\nrouter overhead: {args.requests} sequential requests, {args.concurrency} threads × {args.seconds:.0f} s")
    header = f"{'case':<8} {'x len':>7} | {'side':<6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}"
    print(header)
    print("-" * len(header))
    for label, size, case in rows:
        for side in ("direct", "router"):
            p50, p99, _, rps = case[side]
            print(f"{label:<8} {size:>7} | {side:<6} {p50:>8.3f} {p99:>8.3f} {rps:>8.0f}")
        (d50, d99, _, drps), (r50, r99, _, rrps) = case["direct"], case["router"]
        print(f"{'':<8} {'':>7} | {'ratio':<6} {r50 / d50:>8.2f} {r99 / d99:>8.2f} {rrps / drps:>8.2f}")


if __name__ == "__main__":
    main()
