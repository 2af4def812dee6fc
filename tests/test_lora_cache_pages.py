"""LoRA cache pages against PeftCacheManager::getPageManagerConfig's formula, worked by hand."""

from __future__ import annotations

import pytest

from phlora_nim.converters.errors import OptionError
from phlora_nim.converters.lora_cache_pages import cache_pages

# A Llama-3-8B-like engine (hidden 4096, 8 KV heads of 128, intermediate 14336, 32 layers, TP 1),
# all seven modules: in + out per module.
Q = DENSE = 4096 + 4096  # 8192
K = V = 4096 + 1024  # 5120
MLP = 4096 + 14336  # 18432 (h_to_4h, gate, 4h_to_h)
SIZES = [Q, K, V, DENSE, MLP, MLP, MLP]


def test_worked_example_fp16_one_gib() -> None:
    pages = cache_pages(
        SIZES,
        num_layers=32,
        optimal_adapter_size=8,
        max_adapter_size=64,
        max_lora_rank=64,
        itemsize=2,
        cache_bytes=1 << 30,
    )
    # pageWidth = min(in+out) = 5120.
    assert pages.page_width == 5120
    # Slots per layer at the optimal size: 8 · (⌈8192/5120⌉·2 + ⌈5120/5120⌉·2 + ⌈18432/5120⌉·3) = 8 · 18 = 144;
    # × 32 layers = 4608, more than ⌈64 · 18432 / 5120⌉ = 231.
    assert pages.slots_per_page == 4608
    # One max adapter: ⌈64 · (81920 · 32) / 5120⌉ = 32768 slots.
    assert pages.min_total_slots == 32768
    # 2^30 bytes / (5120 · 2) = 104857 slots → ⌈104857 / 4608⌉ = 23 pages.
    assert (pages.total_slots, pages.total_pages) == (104857, 23)
    # 23 · 4608 · 5120 / (64 · 2621440) = 3.23: three adapters of rank 64 fit.
    assert pages.max_sized_loras == 3


def test_adapter_sizes_are_clamped_to_the_engine_rank() -> None:
    wide = cache_pages(
        SIZES,
        num_layers=32,
        optimal_adapter_size=8,
        max_adapter_size=256,
        max_lora_rank=64,
        itemsize=2,
        cache_bytes=1 << 30,
    )
    assert wide.min_total_slots == 32768  # as with max_adapter_size 64


def test_a_cache_too_small_for_one_max_adapter_is_refused() -> None:
    # 32768 slots · 5120 · 2 bytes = 335544320 bytes needed.
    with pytest.raises(OptionError, match=r"hold 1 max sized LoRA 32767 < 32768.*at least 335544320 bytes"):
        cache_pages(
            SIZES,
            num_layers=32,
            optimal_adapter_size=8,
            max_adapter_size=64,
            max_lora_rank=64,
            itemsize=2,
            cache_bytes=335544320 - 10240,
        )
    ok = cache_pages(
        SIZES,
        num_layers=32,
        optimal_adapter_size=8,
        max_adapter_size=64,
        max_lora_rank=64,
        itemsize=2,
        cache_bytes=335544320,
    )
    assert ok.total_slots == ok.min_total_slots
