"""How close the router is to the fastest possible Python gRPC front on this machine.

The same client load (threads of tritonclient, base-model requests) goes to, in one run:

- Triton directly;
- a pass-through proxy with no logic at all: a ``grpc.aio`` server whose ``ModelInfer`` forwards the
  request bytes upstream and returns the answer bytes (never parsed) — the ceiling of any Python
  gRPC front;
- the router (``phlora-nim serve``).

It prints router / proxy (how much the router's own work costs) and proxy / direct (what a Python
gRPC hop costs here at all).

Run: ``.venv/bin/python bench/router_ceiling.py [--concurrency 16] [--seconds 3]`` (about 30 s).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import tritonclient.grpc as grpcclient
from router_overhead import inputs, router_process, throughput  # a sibling script: its folder is on sys.path

from phlora_nim.testing.standin import STANDIN_REPO, add_adapters
from phlora_nim.triton.launcher import LocalTriton, free_port

PROXY = """
import asyncio, sys, grpc
async def main(upstream, port):
    channel = grpc.aio.insecure_channel(upstream)
    forward = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    async def infer(raw, context):
        return await forward(raw)
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@contextlib.contextmanager
def proxy_process(upstream: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", PROXY, upstream, str(port)])
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(Exception), grpcclient.InferenceServerClient(address) as client:
                client.infer("ensemble", inputs(16, None), client_timeout=1)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the pass-through proxy did not start")
            time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    def maker(address: str) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            client = grpcclient.InferenceServerClient(address)
            data = inputs(16, None)
            return lambda: client.infer("ensemble", data)

        return make

    with tempfile.TemporaryDirectory() as tmp, LocalTriton(STANDIN_REPO) as triton:
        add_adapters(Path(tmp), {"bench": (100, "float16")})
        rates = {"direct": throughput(maker(triton.grpc_url), args.concurrency, args.seconds)}
        with proxy_process(triton.grpc_url) as proxy:
            rates["pass-through proxy"] = throughput(maker(proxy), args.concurrency, args.seconds)
        with router_process(Path(tmp), triton.grpc_url) as routed:
            rates["router"] = throughput(maker(routed), args.concurrency, args.seconds)
    print(f"\nbase-model requests, {args.concurrency} client threads × {args.seconds:.0f} s, one run")
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:8.0f} req/s")
    print(f"router / pass-through proxy: {rates['router'] / rates['pass-through proxy']:.2f}x")
    print(f"pass-through proxy / direct: {rates['pass-through proxy'] / rates['direct']:.2f}x")
    print(f"router / direct:             {rates['router'] / rates['direct']:.2f}x   (target >= 0.8x at 16)")


if __name__ == "__main__":
    main()
