"""The router in front of two vLLM replicas vs straight to one replica, and adapter loads per routing policy.

16-token requests (greedy, ``ignore_eos``) over 8 adapters, each request's adapter drawn at random
(seeded), sent by the openai SDK at a fixed concurrency:

- direct: to one vLLM replica, every adapter loaded there beforehand (``/v1/load_lora_adapter``), so
  that vLLM itself swaps them through its ``--max-loras`` GPU slots and ``--max-cpu-loras`` cache;
- router, adapter-aware: ``phlora-nim serve --engine vllm`` over two replicas (nothing loaded at start),
  a replica holding the adapter first, else the least busy one loads it;
- router, round-robin: the same router, replicas taken in turn whatever they hold.

Each router run starts with no adapter loaded anywhere; ``residency_capacity`` (adapters the router
keeps loaded per replica) is ``--max-cpu-loras``. Prints tokens/s of each, the router/direct ratio,
p50/p99 latency added over direct, and how many loads each policy caused; states the machine load.

    .venv/bin/python bench/openai_router.py --repo REPO --base BASE_HF_FOLDER                # starts two servers
    .venv/bin/python bench/openai_router.py --repo REPO --upstream http://127.0.0.1:8001 --upstream http://...:8002

The repository needs 8 adapters (``phlora-nim convert``); ``--base`` is the checkpoint vLLM serves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVED = "smollm2"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(base_url: str, plan: list[str], prompt: list[int], *, tokens: int, concurrency: int) -> dict[str, Any]:
    """Send ``plan`` (one adapter name per request); tokens/s and per-request latencies."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=600, max_retries=0)

    def one(model: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=tokens, temperature=0.0, extra_body={"ignore_eos": True}
        )
        return time.perf_counter() - t0, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, plan))
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    return {
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": pct(latencies, 0.99),
        "wall_s": wall,
    }


def unload_all(urls: list[str]) -> None:
    for url in urls:
        listed = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        for card in listed:
            if card.get("parent"):
                httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": card["id"]}, timeout=60)


def through_router(
    repo: Path, urls: list[str], policy: str, capacity: int, max_loras: int, **kw: Any
) -> dict[str, Any]:
    from phlora_nim.router.config import ANY_FREE_PORT, RouterConfig
    from phlora_nim.router.server import RouterThread

    unload_all(urls)
    config = RouterConfig(
        repo,
        upstreams=tuple(urls),
        engine="vllm",
        upstream_model=SERVED,
        port=0,
        metrics_port=0,
        http_port=ANY_FREE_PORT,
        residency_capacity=capacity,
        max_loras=max_loras,
        routing_policy=policy,
        attempt_timeout=600,
    )
    with RouterThread(config) as router:
        result = run(router.http_url, **kw)

        async def loads() -> int:
            return int(router.router.pool.loads)

        result["loads"] = router.call(loads())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--base", type=Path, help="the base checkpoint (HF folder) to start two servers on")
    parser.add_argument("--upstream", action="append", default=[], help="two running vLLM servers instead")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--max-cpu-loras", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = parser.parse_args()

    from phlora_nim.repository.layout import adapter_store_dir
    from phlora_nim.repository.registry import Registry

    names = sorted(Registry(args.repo).read().adapters)[: args.adapters]
    if len(names) < args.adapters:
        sys.exit(f"{args.repo} holds {len(names)} adapters; convert {args.adapters}")
    rng = random.Random(0)
    plan = [rng.choice(names) for _ in range(args.requests)]
    prompt = list(range(100, 116))
    kw = {"plan": plan, "prompt": prompt, "tokens": args.tokens, "concurrency": args.concurrency}
    load_before = os.getloadavg()

    def measure(urls: list[str]) -> dict[str, Any]:
        direct_url = urls[0]
        unload_all(urls)
        for name in names:  # straight to one replica: every adapter registered there first
            path = str(adapter_store_dir(args.repo.resolve(), name))
            httpx.post(direct_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=600)
        run(direct_url + "/v1", plan=names, prompt=prompt, tokens=2, concurrency=1)  # warm every adapter once
        direct = run(direct_url + "/v1", **kw)
        common = {"capacity": args.max_cpu_loras, "max_loras": args.max_loras}
        aware = through_router(args.repo, urls, "adapter-aware", **common, **kw)
        robin = through_router(args.repo, urls, "round-robin", **common, **kw)
        return {"direct": direct, "adapter_aware": aware, "round_robin": robin}

    if args.upstream:
        results = measure(args.upstream)
    else:
        from phlora_nim.testing import vllm_servers

        with (
            tempfile.TemporaryDirectory() as tmp,
            vllm_servers.servers(
                args.base, Path(tmp), 2, served_name=SERVED, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras
            ) as pair,
        ):
            results = measure([s.url for s in pair])
    direct, aware, robin = results["direct"], results["adapter_aware"], results["round_robin"]
    summary = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "requests": args.requests,
        "adapters": args.adapters,
        "concurrency": args.concurrency,
        "router_over_direct_tokens_per_s": aware["tokens_per_s"] / direct["tokens_per_s"],
        "added_p50_ms": (aware["p50_s"] - direct["p50_s"]) * 1e3,
        "added_p99_ms": (aware["p99_s"] - direct["p99_s"]) * 1e3,
        "loads": {"adapter_aware": aware["loads"], "round_robin": robin["loads"]},
        "round_robin_over_adapter_aware_tokens_per_s": robin["tokens_per_s"] / aware["tokens_per_s"],
        "runs": results,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
