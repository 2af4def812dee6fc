"""What a cold adapter costs through the router: the request that carries the weights vs one with the id alone.

The adapter is shaped like a rank-16 LoRA of Llama-3-8B on q/k/v/o/gate/up/down (hidden 4096,
intermediate 14336, 32 layers, 8 KV heads of 128 → k/v out 1024): ``lora_weights`` fp16
[1, 224, D] with one row per (layer, module) and D = 16·(4096 + 14336) = 294912 (the widest
in + out of any module, as TensorRT-LLM pads every row), ``lora_config`` int32 [1, 224, 3].
Several registered copies, each with its own name, task id and content (weights summing to a
distinct offset, so every answer proves which adapter it was computed with).

Cold, honestly forced: tritonserver runs the stand-in LoRA model (the one of the router tests;
``lora_weights`` FP16 [-1, -1]) with a LoRA cache of 1 adapter; the router runs in this process
(``RouterThread``) with ``residency_capacity=1`` and ``weight_cache_mb=1`` (an adapter does not
fit, so nothing stays in memory). Requests go round-robin over the copies, so every one finds its
adapter neither in Triton's cache nor in the router's memory: the router memory-maps the npy pair
(from the OS page cache after the first round, and the files are sparse: no disk seek is counted), converts it to bytes,
appends ``lora_weights`` and ``lora_config`` and sends the whole request to Triton, which reads
the tensors and stores the adapter. Warm: the same adapter again and again (the id alone).
What cold costs here is the router's share plus moving ~132 MB over local gRPC plus the stand-in's
reading of them (a numpy sum); a real engine also copies the weights into its device cache.

    .venv/bin/python bench/router_cold_adapter.py                 # ~25 s on 2 cores
    .venv/bin/python bench/router_cold_adapter.py --copies 5 --cold 15 --warm 200
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import logging
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent

from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS  # noqa: E402
from phlora_nim.repository.layout import prefetch_dir  # noqa: E402
from phlora_nim.repository.registry import AdapterEntry, Registry, task_id_for  # noqa: E402
from phlora_nim.router import RouterConfig, RouterThread  # noqa: E402
from phlora_nim.testing.standin import standin_repo  # noqa: E402
from phlora_nim.triton.launcher import LocalTriton  # noqa: E402

log = logging.getLogger("bench.router_cold_adapter")

HIDDEN, INTERMEDIATE, LAYERS, KV = 4096, 14336, 32, 1024
RANK = 16
# module → (TensorRT-LLM module, in dim, out dim)
MODULES = {
    "q_proj": ("attn_q", HIDDEN, HIDDEN),
    "k_proj": ("attn_k", HIDDEN, KV),
    "v_proj": ("attn_v", HIDDEN, KV),
    "o_proj": ("attn_dense", HIDDEN, HIDDEN),
    "gate_proj": ("mlp_gate", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp_h_to_4h", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp_4h_to_h", INTERMEDIATE, HIDDEN),
}
ROWS = LAYERS * len(MODULES)  # 224
WIDTH = RANK * max(i + o for _, i, o in MODULES.values())  # 16·(4096+14336) = 294912
X = [1, 2, 3]


def write_adapters(root: Path, copies: int) -> dict[str, int]:
    """Register ``copies`` 8B-shaped adapters; returns name → offset (the sum of its weights)."""
    offsets = {f"llama8b-r16-{k}": 100 * (k + 1) for k in range(copies)}
    config = np.array(
        [[[TRTLLM_MODULE_IDS[m], layer, RANK] for layer in range(LAYERS) for m, _, _ in MODULES.values()]],
        dtype=np.int32,
    )
    with Registry(root).locked() as state:
        taken: dict[int, str] = {}
        for name, offset in offsets.items():
            digest = hashlib.sha256(f"{name}:{offset}".encode()).hexdigest()
            task_id = task_id_for(digest, taken)
            taken[task_id] = digest
            folder = prefetch_dir(root, task_id)
            folder.mkdir(parents=True, exist_ok=True)
            weights = np.lib.format.open_memmap(folder / "model.lora_weights.npy", "w+", np.float16, (1, ROWS, WIDTH))
            weights[0, :, 0] = 1.0  # ROWS ones, the rest of the offset in one element, zeros elsewhere
            weights[0, 1, 1] = offset - ROWS
            weights.flush()
            del weights
            np.save(folder / "model.lora_config.npy", config)
            state.adapters[name] = AdapterEntry(
                name=name,
                task_id=task_id,
                digest=digest,
                ranks={m: RANK for m in MODULES},
                modules=list(MODULES),
                dtype="float16",
                sources={"bench": name},
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            )
    return offsets


@contextlib.contextmanager
def triton(repo: Path) -> Iterator[LocalTriton]:
    server = LocalTriton(repo).start()
    try:
        yield server
    finally:  # SIGKILL: a graceful stop can wait 30 s for the Python backend stubs
        if server._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server._process.pid, signal.SIGKILL)
        server.stop()


def timed(call: Callable[[], list[int]], expected: list[int]) -> float:
    started = time.perf_counter()
    got = call()
    elapsed = time.perf_counter() - started
    if got != expected:
        raise RuntimeError(f"wrong answer {got}, expected {expected}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=5, help="registered copies of the adapter (≥ 2)")
    parser.add_argument("--cold", type=int, default=15, help="cold requests (round-robin over the copies)")
    parser.add_argument("--warm", type=int, default=200, help="warm requests (one adapter)")
    args = parser.parse_args()
    if args.copies < 2:
        parser.error("--copies must be at least 2 (one copy is always warm after its first request)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    weights_mb = ROWS * WIDTH * 2 / 1e6
    config_kb = ROWS * 3 * 4 / 1e3
    useful = LAYERS * RANK * sum(i + o for _, i, o in MODULES.values()) * 2 / 1e6
    print(f"adapter: lora_weights fp16 [1, {ROWS}, {WIDTH}] = {weights_mb:.1f} MB ({useful:.1f} MB of A/B values,")
    print(f"         the rest row padding), lora_config int32 [1, {ROWS}, 3] = {config_kb:.2f} kB")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        started = time.perf_counter()
        offsets = write_adapters(root, args.copies)
        print(f"wrote {args.copies} copies in {time.perf_counter() - started:.1f} s")
        repo = standin_repo(Path(tmp) / "standin", capacity=1, weights_type="TYPE_FP16")
        with triton(repo) as server:
            cfg = RouterConfig(
                root,
                upstreams=(server.grpc_url,),
                port=0,
                metrics_port=0,
                max_message_mb=512,
                residency_capacity=1,
                weight_cache_mb=1,
            )
            with (
                RouterThread(cfg) as router,
                contextlib.closing(grpcclient.InferenceServerClient(router.address)) as client,
            ):
                x = grpcclient.InferInput("x", [1, len(X)], "INT32")
                x.set_data_from_numpy(np.array([X], np.int32))

                def infer(name: str) -> list[int]:
                    return client.infer(name, [x], client_timeout=60).as_numpy("y")[0].tolist()

                names = list(offsets)
                store, registry = router.router.store, router.router.metrics.registry

                def weight_sends() -> float:
                    labels = {"replica": server.grpc_url}
                    return registry.get_sample_value("phlora_router_replica_weight_sends_total", labels) or 0.0

                for name in names:  # first round: disk → page cache, Triton's Python stub warmed up
                    timed(lambda n=name: infer(n), [v + offsets[name] for v in X])
                sends_before, loads_before = weight_sends(), store.loads
                cold = []
                for k in range(args.cold):
                    name = names[k % len(names)]
                    cold.append(timed(lambda n=name: infer(n), [v + offsets[name] for v in X]))
                cold_sends, cold_loads = weight_sends() - sends_before, store.loads - loads_before
                warm_name = names[0]
                timed(lambda: infer(warm_name), [v + offsets[warm_name] for v in X])  # now resident
                sends_before = weight_sends()
                warm = [timed(lambda: infer(warm_name), [v + offsets[warm_name] for v in X]) for _ in range(args.warm)]
                warm_sends = weight_sends() - sends_before

    cold_ms, warm_ms = statistics.median(cold) * 1e3, statistics.median(warm) * 1e3
    sent_mb = (ROWS * WIDTH * 2 + ROWS * 3 * 4) / 1e6
    print(f"cold requests: {len(cold)}, weight sends {cold_sends:.0f}, router loads from the npy files {cold_loads}")
    print(f"warm requests: {len(warm)}, weight sends {warm_sends:.0f}")
    print(f"{'':18}{'p50 ms':>10}{'min ms':>10}{'max ms':>10}")
    for label, values in (("cold (weights)", cold), ("warm (id only)", warm)):
        print(f"{label:18}{statistics.median(values) * 1e3:10.2f}{min(values) * 1e3:10.2f}{max(values) * 1e3:10.2f}")
    print(f"cold / warm p50: {cold_ms / warm_ms:.1f}×, cold adds {cold_ms - warm_ms:.1f} ms per request")
    print(f"sent per cold request: {sent_mb:.1f} MB of LoRA tensors ({sent_mb / (cold_ms / 1e3):.0f} MB/s end to end)")


if __name__ == "__main__":
    main()
