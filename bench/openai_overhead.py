"""What the router's OpenAI HTTP front costs: the same 16-token request direct to Triton, through the
router's gRPC front, and through its HTTP front (``/v1/completions``).

One tritonserver (CPU reference ``tensorrt_llm`` model, a toy Llama with one rank-8 adapter, resident
from ``lora_prefetch_dir``) and one router process (``phlora-nim serve --upstream-model tensorrt_llm
--http-port``), all on this machine. Every path reaches the same ``tensorrt_llm`` model with the same
prompt token ids and generates exactly 16 tokens (no end token: ``end_id`` -1 / ``ignore_eos``):

- direct: tritonclient gRPC to Triton, with ``lora_task_id``;
- gRPC: tritonclient gRPC to the router, the adapter named as the model;
- HTTP: ``POST /v1/completions`` with the prompt as token ids (a keep-alive ``httpx`` client; the
  router tokenizes nothing but counts, detokenizes the answer and builds the OpenAI body).

Prints p50 / p99 of sequential requests, the router's CPU time per request (from /proc), throughput
at the given concurrency, and ratios.

    .venv/bin/python bench/openai_overhead.py                       # ~2 min on 2 cores
    .venv/bin/python bench/openai_overhead.py --requests 500 --concurrency 16 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent

from router_overhead import latencies, pct, throughput  # noqa: E402  (bench/ is on the path of a bench script)

from phlora_nim.triton.launcher import LocalTriton, free_port  # noqa: E402

log = logging.getLogger("bench.openai_overhead")
ADAPTER, TOKENS = "bench", 16
PROMPT = [3, 9, 16, 4, 5, 6, 7, 8]


def build_repository(root: Path) -> tuple[Path, int]:
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.demo.toy_models import make_finetunes
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings

    base, fts = make_finetunes("llama", root / "ckpt", 1, steps=4, linear_only=True)
    repo = root / "repo"
    job = ConvertJob(
        base=base,
        finetuned=(fts[0],),
        names=(ADAPTER,),
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=8)),
        settings=RepositorySettings(backend="trtllm-legacy-cpu", base=str(base), dtype="float32"),
    )
    return repo, convert(job)[0].entry.task_id


def grpc_inputs(task_id: int | None) -> list[grpcclient.InferInput]:
    arrays = [
        ("input_ids", np.array([PROMPT], np.int32), "INT32"),
        ("input_lengths", np.array([[len(PROMPT)]], np.int32), "INT32"),
        ("request_output_len", np.array([[TOKENS]], np.int32), "INT32"),
        ("end_id", np.array([[-1]], np.int32), "INT32"),
        ("pad_id", np.array([[0]], np.int32), "INT32"),
        ("runtime_top_k", np.array([[1]], np.int32), "INT32"),
    ]
    if task_id is not None:
        arrays.append(("lora_task_id", np.array([[task_id]], np.uint64), "UINT64"))
    out = []
    for name, array, dtype in arrays:
        x = grpcclient.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        out.append(x)
    return out


def grpc_call(address: str, model: str, task_id: int | None) -> Callable[[], object]:
    client = grpcclient.InferenceServerClient(address)
    data = grpc_inputs(task_id)

    def call() -> object:
        ids = client.infer(model, data).as_numpy("output_ids")
        assert ids is not None and ids.shape[-1] == TOKENS, ids
        return ids

    return call


def http_call(base_url: str) -> Callable[[], object]:
    client = httpx.Client(base_url=base_url, timeout=60)
    body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}

    def call() -> object:
        answer = client.post("/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == TOKENS
        return answer

    return call


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def router_process(repository: Path, upstream: str) -> Iterator[tuple[str, str, int]]:
    port, http_port = free_port(), free_port()
    command = [
        sys.executable, "-c", "import typer; from phlora_nim.router.cli import serve; typer.run(serve)",
        "--model-repository", str(repository), "--upstream", upstream, "--upstream-model", "tensorrt_llm",
        "--port", str(port), "--metrics-port", "0", "--http-port", str(http_port),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(Exception):
                if httpx.get(f"http://127.0.0.1:{http_port}/v1/health/ready", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the router did not become ready")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/v1", process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per path")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads for throughput")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput window per path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        repo, task_id = build_repository(Path(tmp))
        with LocalTriton(repo) as triton, router_process(repo, triton.grpc_url) as (grpc_address, url, pid):
            paths: dict[str, Callable[[], Callable[[], object]]] = {
                "direct": lambda: grpc_call(triton.grpc_url, "tensorrt_llm", task_id),
                "gRPC": lambda: grpc_call(grpc_address, ADAPTER, None),
                "HTTP": lambda: http_call(url),
            }
            results = {}
            for name, make in paths.items():
                cpu = cpu_seconds(pid)
                lat = latencies(make(), args.requests)
                used = (cpu_seconds(pid) - cpu) / (args.requests + min(20, args.requests)) * 1e6
                rps = throughput(make, args.concurrency, args.seconds)
                results[name] = (pct(lat, 50), pct(lat, 99), used if name != "direct" else 0.0, rps)
    print(f"\nOpenAI front overhead: {TOKENS} generated tokens, {args.requests} sequential requests, "
          f"{args.concurrency} threads × {args.seconds:.0f} s")  # fmt: skip
    header = f"{'path':<7} {'p50 ms':>8} {'p99 ms':>8} {'router CPU µs/req':>18} {'req/s @C':>9}"
    print(header)
    print("-" * len(header))
    for name, (p50, p99, cpu, rps) in results.items():
        print(f"{name:<7} {p50:>8.2f} {p99:>8.2f} {cpu:>18.0f} {rps:>9.1f}")
    d, g, h = results["direct"], results["gRPC"], results["HTTP"]
    print(f"\nadded p50: HTTP − gRPC {h[0] - g[0]:+.2f} ms, HTTP − direct {h[0] - d[0]:+.2f} ms, "
          f"gRPC − direct {g[0] - d[0]:+.2f} ms")  # fmt: skip
    print(f"added p99: HTTP − gRPC {h[1] - g[1]:+.2f} ms, HTTP − direct {h[1] - d[1]:+.2f} ms")
    print(f"latency ratio p50: HTTP / gRPC {h[0] / g[0]:.2f}, HTTP / direct {h[0] / d[0]:.2f}")
    print(f"router CPU per request: HTTP / gRPC {h[2] / max(g[2], 1e-9):.2f} ({h[2]:.0f} vs {g[2]:.0f} µs)")
    print(f"throughput at C={args.concurrency}: HTTP / direct {h[3] / d[3]:.2f}, gRPC / direct {g[3] / d[3]:.2f}, "
          f"HTTP / gRPC {h[3] / g[3]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
