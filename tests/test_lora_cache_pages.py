"""LoRA cache pages against worked examples of the upstream formulas.

Every expected number below is worked out by hand from the runtime's source, not from our code:
``PeftCacheManager::getPageManagerConfig`` / ``getMaxNumSlots`` and the constructor's clamping
(cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp), ``LoraCache::determineNumPages``
(cpp/tensorrt_llm/runtime/loraCache.cpp), module dims and TP splits from
``LoraModule::createLoraModules`` (loraModule.cpp) and ``localInDim`` / ``localOutDim`` (loraModule.h).

The 8B shape (Llama-3-8B): hidden 4096, 32 heads, 8 KV heads of 128, intermediate 14336, 32 layers,
float16, the 7 modules attn_q/k/v, attn_dense, mlp_h_to_4h, mlp_4h_to_h, mlp_gate.
One-d sizes (in + out): q 8192, k 5120, v 5120, dense 8192, each MLP 18432.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS
from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.engines.trtllm_legacy.cache_pages import CacheShape, adapter_pages, page_config
from phlora_nim.engines.trtllm_legacy.cache_plan import (
    CacheRequest,
    PlannedAdapter,
    plan_cache,
    read_usage,
    select_prefetch,
)
from phlora_nim.engines.trtllm_legacy.contract import engine_spec

MODULES = ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]
GiB = 1 << 30
Q = DENSE = 4096 + 4096  # 8192
K = V = 4096 + 1024  # 5120
MLP = 4096 + 14336  # 18432 (h_to_4h, 4h_to_h, gate)


def engine_8b(*, tp: int = 1, pp: int = 1, max_lora_rank: int = 64, modules=MODULES, dtype="float16") -> dict:
    """The config.json trtllm-build writes for the 8B shape (the fields the LoRA cache is sized from)."""
    return {
        "version": "0.20.0",
        "pretrained_config": {
            "dtype": dtype,
            "num_hidden_layers": 32,
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_size": 128,
            "intermediate_size": 14336,
            "mapping": {"tp_size": tp, "pp_size": pp},
        },
        "build_config": {
            "max_batch_size": 8,
            "lora_config": {"max_lora_rank": max_lora_rank, "lora_target_modules": list(modules)},
            "plugin_config": {"lora_plugin": dtype, "use_paged_context_fmha": True},
        },
    }


def shape_of(engine: dict) -> CacheShape:
    return CacheShape.of_engine(engine_spec(engine), where="engine")


def rows(rank: int, layers: int = 32, modules=MODULES) -> list[tuple[str, int, int]]:
    return [(m, layer, rank) for layer in range(layers) for m in modules]


def test_8b_one_d_sizes() -> None:
    assert list(shape_of(engine_8b()).one_d().values()) == [Q, K, V, DENSE, MLP, MLP, MLP]


def test_8b_optimal_8_one_gib() -> None:
    page = page_config(shape_of(engine_8b()), optimal_adapter_size=8, max_adapter_size=64)
    # pageWidth = min(in+out) = 5120.
    assert page.page_width == 5120
    # Slots per layer at the optimal size: 8 · (⌈8192/5120⌉·2 + ⌈5120/5120⌉·2 + ⌈18432/5120⌉·3) = 8 · 18 = 144;
    # × 32 layers = 4608, more than ⌈64 · 18432 / 5120⌉ = 231.
    assert page.slots_per_page == 4608
    # One max adapter: ⌈64 · (81920 · 32) / 5120⌉ = 32768 slots.
    assert page.min_slots == 32768
    # 2^30 bytes / (5120 · 2) = 104857 slots → ⌈104857 / 4608⌉ = 23 pages.
    assert (GiB // page.slot_bytes, page.pages_of(GiB)) == (104857, 23)
    # 23 · 4608 · 5120 / (64 · 2621440) = 3.23: three adapters of rank 64 fit ("can hold 3 max sized LoRAs").
    assert page.max_sized_loras(GiB) == 3


def test_adapter_sizes_above_the_engine_rank_are_clamped() -> None:
    wide = page_config(shape_of(engine_8b()), optimal_adapter_size=8, max_adapter_size=256)
    assert wide.min_slots == 32768  # as with max_adapter_size 64


def test_a_cache_too_small_for_one_max_adapter_is_refused() -> None:
    page = page_config(shape_of(engine_8b()), optimal_adapter_size=8, max_adapter_size=64)
    # 32768 slots · 5120 · 2 bytes = 335544320 bytes needed.
    with pytest.raises(OptionError, match=r"hold 1 max sized LoRA 32767 < 32768.*≥ 335544320 bytes"):
        page.require_one_max_sized(335544320 - 10240, where="lora_cache_host_memory_bytes")
    page.require_one_max_sized(335544320, where="lora_cache_host_memory_bytes")
    assert page.min_bytes == 335544320


def test_8b_pages_with_optimal_16() -> None:
    page = page_config(shape_of(engine_8b()), optimal_adapter_size=16, max_adapter_size=64)
    # page width = smallest one-d size (k, v) = 5120
    assert page.page_width == 5120
    # slots per layer: ceil(oneD / 5120) = q 2, k 1, v 1, dense 2, MLP 4 each -> 18;
    # 16 · 18 · 32 layers = 9216 (> minNumSlots ceil(64 · 18432 / 5120) = 231)
    assert page.slots_per_page == 9216
    assert page.page_bytes == 9216 * 5120 * 2 == 94_371_840  # 90 MiB
    # one max-sized (64) adapter: ceil(64 · 81920 · 32 / 5120) = 32768 slots
    assert page.min_slots == 32768
    # the default 1 GiB host cache: floor(2^30 / 10240) = 104857 slots -> ceil(/9216) = 12 pages
    assert page.pages_of(GiB) == 12


def test_8b_adapter_pages() -> None:
    shape = shape_of(engine_8b())
    page = page_config(shape, optimal_adapter_size=16, max_adapter_size=64)
    # rank 16: per layer 26 + 16 + 16 + 26 + 3·58 = 258 slots, · 32 = 8256 ≤ 9216: one page
    assert adapter_pages(rows(16), shape, page) == 1
    # rank 32: per layer 52 + 32 + 32 + 52 + 3·116 = 516 slots; 17 layers (8772) and the next
    # layer's first six rows (400) fill page 1 to 9172; its mlp_gate row (116) opens page 2
    assert adapter_pages(rows(32), shape, page) == 2
    # rank 8 attention only: 13 + 8 + 8 + 13 = 42 per layer, 1344 in all: one page (pages are never shared)
    assert adapter_pages(rows(8, modules=MODULES[:4]), shape, page) == 1
    # rows an engine does not have cannot be placed
    with pytest.raises(InputError, match="not built with"):
        adapter_pages([("mlp_gate_up", 0, 8)], shape, page)


def test_adapter_sizes_are_clamped_to_max_lora_rank() -> None:
    # PeftCacheManager's constructor: optimal = min(optimal, max_lora_rank); 8 · 18 · 32 = 4608 slots
    page = page_config(shape_of(engine_8b(max_lora_rank=8)), optimal_adapter_size=16, max_adapter_size=64)
    assert (page.optimal_adapter_size, page.max_adapter_size, page.slots_per_page) == (8, 8, 4608)


def test_tensor_parallel_pages() -> None:
    # TP 2 local one-d: q 4096 + 2048, k/v 4096 + 512, dense 2048 + 4096 (input split), MLP in
    # 4096 + 7168 / 7168 + 4096: 6144, 4608, 4608, 6144, 11264 · 3 -> width 4608;
    # ceil: 2 + 1 + 1 + 2 + 3·3 = 15 per layer; 16 · 15 · 32 = 7680 slots of 4608 values
    page = page_config(shape_of(engine_8b(tp=2)), optimal_adapter_size=16, max_adapter_size=16)
    assert (page.page_width, page.slots_per_page, page.page_bytes) == (4608, 7680, 7680 * 4608 * 2)


def test_pipeline_parallel_counts_the_local_layers() -> None:
    # PP 2: 16 layers per rank; a rank-32 adapter's 16 layers take 16 · 516 = 8256 slots of a
    # 16 · 18 · 16 = 4608-slot page: rows spill over two pages on each rank
    shape = shape_of(engine_8b(pp=2))
    page = page_config(shape, optimal_adapter_size=16, max_adapter_size=32)
    assert (shape.layers, page.slots_per_page) == (16, 4608)
    assert adapter_pages(rows(32), shape, page) == 2


# --- the cache plan: preloaded adapters plus spare room, added up as the runtime fills its caches ---
# At start PeftCacheManager::prefetchLoraWeights puts every lora_prefetch_dir adapter into the host
# cache, where it stays in progress (not evictable) until a request using it ends.


def test_a_dozen_prefetched_adapters_fill_the_default_host_cache() -> None:
    """13 rank-16 adapters preloaded into the default 1 GiB: the 13th finds no page and nothing is
    evictable yet (prefetched tasks are in progress): the model would fail to load."""
    shape = shape_of(engine_8b())
    adapters = [PlannedAdapter(f"a{i:02d}", i + 1, tuple(rows(16))) for i in range(13)]
    fixed = CacheRequest(host_bytes=GiB, spare=0, optimal_adapter_size=16, max_adapter_size=64)
    with pytest.raises(OptionError, match=r"has 12 pages of 90\.0 MiB; the 13 preloaded adapters take 13"):
        plan_cache(adapters, shape, fixed, where="engine")
    # Sized by us: every preloaded adapter plus the spare room, in whole pages.
    plan = plan_cache(adapters, shape, CacheRequest(spare=8, optimal_adapter_size=16), where="engine")
    assert plan.host_pages_needed == 13 + 8
    assert plan.host_bytes == 21 * 94_371_840 and plan.host_pages == 21
    # lora_cache_max_adapter_size = the largest registered rank: one such adapter needs
    # ceil(16 · 81920 · 32 / 5120) = 8192 slots < 21 pages, so the constructor's check holds
    assert plan.parameters()["lora_cache_max_adapter_size"] == "16"
    # Capped: 4 preloaded (named first, then most used), the rest sent by the router on first use.
    usage = {"a05": 90.0, "a07": 50.0, "a01": 10.0}
    capped = CacheRequest(host_bytes=GiB, spare=8, prefetch_names=("a12",), prefetch_limit=4, usage=usage)
    plan = plan_cache(adapters, shape, capped, where="engine")
    assert plan.prefetched == ("a12", "a05", "a07", "a01") and plan.host_pages >= plan.host_pages_needed


def test_host_budget_below_one_max_sized_adapter_is_refused() -> None:
    # max 64: 32768 slots of 10240 bytes = 320 MiB; 256 MiB holds 26214 slots
    adapters = [PlannedAdapter("a", 1, tuple(rows(64)))]
    request = CacheRequest(host_bytes=256 << 20, spare=0, optimal_adapter_size=16)
    with pytest.raises(OptionError, match=r"≥ 335544320 bytes \(320 MiB\)"):
        plan_cache(adapters, shape_of(engine_8b()), request, where="engine")


def test_gpu_fraction_from_the_free_memory_given() -> None:
    adapters = [PlannedAdapter(f"a{i}", i + 1, tuple(rows(16))) for i in range(3)]
    request = CacheRequest(spare=1, optimal_adapter_size=16, max_batch_size=8, gpu_free_bytes=10 * GiB)
    plan = plan_cache(adapters, shape_of(engine_8b()), request, where="engine")
    # one batch: min(8, 3 adapters) · 1 page = 3 pages = 283115520 bytes -> 2.64% of 10 GiB -> 0.05
    assert plan.gpu_pages_needed == 3 and plan.gpu_fraction == 0.05
    tight = CacheRequest(spare=1, optimal_adapter_size=16, gpu_free_bytes=1 * GiB)
    assert plan_cache(adapters, shape_of(engine_8b()), tight, where="engine").gpu_fraction == 0.27
    with pytest.raises(OptionError, match="more than the free GPU memory given"):
        plan_cache(adapters, shape_of(engine_8b()), CacheRequest(gpu_free_bytes=100 << 20), where="engine")


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (CacheRequest(prefetch_names=("nope",)), "not registered"),
        (CacheRequest(prefetch_names=("a", "b"), prefetch_limit=1), "more adapters named"),
    ],
)
def test_bad_prefetch_selection(request_: CacheRequest, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        select_prefetch(["a", "b", "c"], request_)


def test_usage_from_router_metrics_or_json(tmp_path: Path) -> None:
    scrape = tmp_path / "metrics.txt"
    scrape.write_text(
        "# HELP phlora_router_requests_total Inference requests by adapter.\n"
        "# TYPE phlora_router_requests_total counter\n"
        'phlora_router_requests_total{adapter="faq"} 12.0\n'
        'phlora_router_requests_total{adapter="legal"} 3.0\n'
    )
    assert read_usage(scrape) == {"faq": 12.0, "legal": 3.0}
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"faq": 1, "legal": 9}))
    assert read_usage(counts) == {"faq": 1.0, "legal": 9.0}
    (tmp_path / "bad.txt").write_text("hello")
    with pytest.raises(InputError, match="no request counts"):
        read_usage(tmp_path / "bad.txt")


def test_rows_come_from_lora_config_files(tmp_path: Path) -> None:
    from phlora_nim.engines.trtllm_legacy.cache_plan import read_rows

    config = np.array([[[TRTLLM_MODULE_IDS["attn_q"], 0, 8], [TRTLLM_MODULE_IDS["mlp_gate"], 3, 4]]], dtype=np.int32)
    np.save(tmp_path / "model.lora_config.npy", config)
    assert read_rows(tmp_path) == (("attn_q", 0, 8), ("mlp_gate", 3, 4))
