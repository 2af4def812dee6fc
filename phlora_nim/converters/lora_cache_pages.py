"""The LoRA cache's page arithmetic, as TensorRT-LLM sizes it at start.

Restated from ``PeftCacheManager::getPageManagerConfig`` and ``PeftCacheManager::getMaxNumSlots``
(``cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp``): a page is ``slots_per_page`` slots of
``page_width`` values; the page width is the smallest module's ``in + out`` (per TP rank), a page
holds one adapter of ``lora_cache_optimal_adapter_size`` across every local layer, and the cache must
hold at least one adapter of ``lora_cache_max_adapter_size`` or the server does not start.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from phlora_nim.converters.errors import OptionError


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CachePages:
    """One cache's layout (host or device), with what it can hold."""

    page_width: int
    slots_per_page: int
    total_slots: int
    total_pages: int
    min_total_slots: int
    max_lora_size: int
    max_sized_loras: int


def cache_pages(
    module_sizes: Iterable[int],
    *,
    num_layers: int,
    optimal_adapter_size: int,
    max_adapter_size: int,
    max_lora_rank: int,
    itemsize: int,
    cache_bytes: int,
    where: str = "lora_cache_host_memory_bytes",
) -> CachePages:
    """Pages of a LoRA cache of ``cache_bytes`` for an engine's LoRA modules.

    Args:
        module_sizes: ``localInDim + localOutDim`` of every LoRA module the engine was built with.
        num_layers: attention layers on this pipeline rank.
        optimal_adapter_size / max_adapter_size: the ``lora_cache_*_adapter_size`` parameters; both
            are first clamped to the engine's ``max_lora_rank`` (``PeftCacheManager`` constructor).
        itemsize: bytes per value of the engine dtype.
        cache_bytes: host budget (``lora_cache_host_memory_bytes``), or the device bytes the GPU
            fraction comes to.

    Raises:
        OptionError: the cache cannot hold one adapter of the maximum size (the runtime stops with
            "Not enough space allocated to … LoRA cache to hold 1 max sized LoRA").
    """
    sizes = list(module_sizes)
    if not sizes:
        raise OptionError("an engine without LoRA modules has no LoRA cache", where="lora_target_modules")
    optimal = min(optimal_adapter_size, max_lora_rank)
    biggest = min(max_adapter_size, max_lora_rank)
    width = min(sizes)
    slots_one_layer = sum(optimal * _ceil_div(s, width) for s in sizes)
    max_1d_lora = sum(sizes) * num_layers
    slots_per_page = max(slots_one_layer * num_layers, _ceil_div(biggest * max(sizes), width))
    min_total = _ceil_div(biggest * max_1d_lora, width)
    total_slots = cache_bytes // (width * itemsize)
    if total_slots < min_total:
        raise OptionError(
            f"Not enough space allocated to LoRA cache to hold 1 max sized LoRA {total_slots} < {min_total}",
            where=where,
            expected=f"at least {min_total * width * itemsize} bytes",
            found=str(cache_bytes),
            fix="raise the cache budget or lower lora_cache_max_adapter_size",
        )
    pages = _ceil_div(total_slots, slots_per_page)
    max_lora = biggest * max_1d_lora
    return CachePages(
        page_width=width,
        slots_per_page=slots_per_page,
        total_slots=total_slots,
        total_pages=pages,
        min_total_slots=min_total,
        max_lora_size=max_lora,
        max_sized_loras=pages * slots_per_page * width // max_lora,
    )
