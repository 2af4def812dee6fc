"""Multi-LoRA serving cost on the CPU reference model: mixed-adapter batches and memory per adapter.

One process, one small Llama-family model (random weights; the shapes are what matters):

1. throughput of a batch whose 8 rows use 8 different adapters vs the same batch on the base model
   alone (target ≥ 0.7×): gathered per-row LoRA in one forward per step, as S-LoRA / Punica do;
2. memory of the base model plus 32 registered adapters vs 32 merged model copies, as a multiple of
   one base model (target ≤ 1.2×).

Run: ``.venv/bin/python bench/reference_multi_lora.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from phlora_nim.demo.toy_models import build_model
from phlora_nim.engines.trtllm_legacy.reference_engine import GenerationRequest, ReferenceEngine

SHAPE = {
    "vocab_size": 2048,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}


def random_adapter(engine: ReferenceEngine, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """LoRA tensors in TensorRT-LLM's layout for every LoRA-able module of the engine's model."""
    rng = np.random.default_rng(seed)
    rows, config = [], []
    for (module_id, layer), shape in sorted(engine.modules.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        a = rng.standard_normal((rank, shape.in_dim), dtype=np.float32) / np.sqrt(shape.in_dim)
        b = rng.standard_normal((shape.out_dim, rank), dtype=np.float32) * 0.01
        rows.append(np.concatenate([a.ravel(), b.ravel()]))
        config.append([module_id, layer, rank])
    width = max(r.size for r in rows)
    weights = np.zeros((1, len(rows), width), dtype=np.float32)
    for i, r in enumerate(rows):
        weights[0, i, : r.size] = r
    return weights, np.asarray([config], dtype=np.int32)


def tokens_per_second(engine: ReferenceEngine, reqs: list[GenerationRequest], repeats: int) -> float:
    engine.generate(reqs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = engine.generate(reqs)
        times.append(time.perf_counter() - start)
    return sum(len(o) for o in out) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model("llama", seed=0, **SHAPE)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = ReferenceEngine(model, dtype="float32", max_lora_rank=64, cache_bytes=8 << 30)

    tasks = []
    for i in range(32):
        w, c = random_adapter(engine, args.rank, seed=i)
        tasks.append(engine.resolve(1000 + i, w, c))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, SHAPE["vocab_size"], (24,), generator=gen).tolist() for _ in range(8)]

    def batch(with_lora: bool) -> list[GenerationRequest]:
        return [
            GenerationRequest(input_ids=p, max_new_tokens=args.new_tokens, lora=tasks[i] if with_lora else None)
            for i, p in enumerate(prompts)
        ]

    base_tps = tokens_per_second(engine, batch(False), args.repeats)
    mixed_tps = tokens_per_second(engine, batch(True), args.repeats)
    adapters_bytes = engine.cache.used_bytes
    print(f"model: llama {SHAPE['hidden_size']}h × {SHAPE['num_hidden_layers']} layers, {base_bytes / 1e6:.1f} MB fp32")
    print(f"adapters: rank {args.rank} on {len(engine.modules)} modules, {adapters_bytes / 32 / 1e6:.2f} MB each")
    print(f"batch of 8, {args.new_tokens} new tokens each, median of {args.repeats}")
    print(f"  base only:           {base_tps:8.1f} tokens/s")
    print(f"  8 different adapters:{mixed_tps:8.1f} tokens/s")
    print(f"throughput mixed / base: {mixed_tps / base_tps:.2f}x   (target >= 0.7x)")
    shared = (base_bytes + adapters_bytes) / base_bytes
    merged = 32 * base_bytes / base_bytes
    print(f"memory, base + 32 adapters:      {shared:.3f}x one base model   (target <= 1.2x)")
    print(f"memory, 32 merged model copies:  {merged:.1f}x one base model")
    print(f"memory ratio shared / merged:    {shared / merged:.4f}x")
    for t in tasks:
        engine.release(t)
    at_scale = production_scale(args.rank)
    print(
        f"memory, base + 32 adapters at Llama-3-8B shapes (fp16, rank {args.rank}; byte accounting of the cache "
        f"over the engine's modules, base on the meta device): {at_scale:.3f}x one base model   (target <= 1.2x)"
    )


def production_scale(rank: int) -> float:
    """(base + 32 adapters) / base for Llama-3-8B shapes, from the wrapped modules' real dims."""
    shape = {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
    }
    with torch.device("meta"):
        model = build_model("llama", seed=0, **shape)
    engine = ReferenceEngine(model, dtype="float16", max_lora_rank=64, cache_bytes=1)
    base_bytes = sum(p.numel() for p in model.parameters()) * 2
    adapter_bytes = sum(rank * (m.in_dim + m.out_dim) * 2 for m in engine.modules.values())
    return (base_bytes + 32 * adapter_bytes) / base_bytes


if __name__ == "__main__":
    main()
