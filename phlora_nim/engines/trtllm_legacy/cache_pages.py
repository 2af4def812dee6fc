"""The LoRA cache's page arithmetic, as TensorRT-LLM sizes it at start: how many pages an engine's
cache has, how many an adapter takes, and the smallest cache the runtime accepts.

The runtime does not store adapters by bytes. ``PeftCacheManager::getPageManagerConfig``
(cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp) cuts the host and the GPU cache into whole
pages, each sized for one adapter of rank ``lora_cache_optimal_adapter_size`` on every target module
of every (local) layer; ``LoraCache::determineNumPages`` (cpp/tensorrt_llm/runtime/loraCache.cpp)
packs an adapter's rows into pages in order, and an adapter never shares a page with another. The
formulas, restated (nothing copied), with module dims from ``LoraModule::createLoraModules`` and
the per-rank split of ``LoraModule::localInDim`` / ``localOutDim`` (loraModule.h):

- one-d size of a module: ``localIn + localOut``; page width = the smallest one-d size;
- slots per page = max(optimal · Σ_modules ceil(oneD / width) · layers,
  ceil(max_adapter · max_oneD / width));
- host slots = floor(host bytes / (width · itemsize)); pages = ceil(slots / slots per page);
- the cache must hold one adapter of ``max_adapter`` rank on every module and layer:
  slots ≥ ceil(max_adapter · Σ oneD · layers / width), else the constructor throws
  ``Not enough space allocated to host LoRA cache to hold 1 max sized LoRA``;
- the runtime logs ``LoRA host Cache can hold N max sized LoRAs`` with
  N = floor(pages · slots per page · width / (max_adapter · Σ oneD · layers));
- an adapter row of rank r takes ceil(r · (localIn + localOut) / width) slots, rows filling a
  page until the next one does not fit.

``PeftCacheManager``'s constructor first clamps both adapter sizes to the engine's
``max_lora_rank``. Example (Llama-3-8B shape, 7 modules, float16, optimal 16): width 5120, 9216
slots per page (90 MiB), and a rank-16 adapter takes exactly one page.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from phlora_nim.core.dtypes import DTYPES
from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.engines.trtllm_legacy.contract import EngineSpec

# createLoraModules: modules whose *input* is split over TP ranks (inTpSplitDim 1); routers are
# not split at all; every other module splits its output (outTpSplitDim 0).
IN_SPLIT = frozenset({"attn_dense", "cross_attn_dense", "mlp_4h_to_h", "moe_4h_to_h", "shared_expert_4h_to_h"})
NOT_SPLIT = frozenset({"moe_router", "mlp_router"})


def local_dims(name: str, in_dim: int, out_dim: int, tp: int) -> tuple[int, int]:
    """(in, out) of a module on one tensor-parallel rank (``localInDim`` / ``localOutDim``)."""
    if name in NOT_SPLIT:
        return in_dim, out_dim
    if name in IN_SPLIT:
        return in_dim // tp, out_dim
    return in_dim, out_dim // tp


@dataclass(frozen=True)
class CacheShape:
    """What the runtime's cache reads off an engine: target modules with local dims, local layers,
    dtype size, ``max_lora_rank`` and pipeline parallelism."""

    modules: tuple[tuple[str, int, int], ...]  # (name, local in, local out), in lora_target_modules order
    layers: int  # layers per pipeline rank
    itemsize: int
    max_lora_rank: int
    pp: int = 1

    @classmethod
    def of_engine(cls, spec: EngineSpec, *, where: str) -> CacheShape:
        """The shape of an engine config (see :func:`~phlora_nim.engines.trtllm_legacy.contract.engine_spec`).

        Raises:
            InputError: a field the cache is sized from is missing.
        """
        missing = [
            field
            for field, ok in (
                ("build_config.lora_config.lora_target_modules", spec.targets),
                ("build_config.lora_config.max_lora_rank", spec.max_rank),
                ("pretrained_config.num_hidden_layers", spec.num_layers),
                ("pretrained_config.hidden_size / num_attention_heads", spec.dims),
                ("pretrained_config.dtype", spec.dtype in DTYPES),
            )
            if not ok
        ]
        if missing:
            raise InputError(
                "the engine config lacks what TensorRT-LLM sizes its LoRA cache from",
                where=where,
                expected=", ".join(missing),
                found="missing",
                fix="pass the config.json trtllm-build wrote beside the engine",
            )
        modules = tuple((name, *local_dims(name, *spec.dims[name], spec.tp)) for name in spec.targets)
        return cls(
            modules=modules,
            layers=int(spec.num_layers or 0) // max(1, spec.pp),
            itemsize=DTYPES[str(spec.dtype)].itemsize,
            max_lora_rank=int(spec.max_rank or 0),
            pp=spec.pp,
        )

    def one_d(self) -> dict[str, int]:
        return {name: i + o for name, i, o in self.modules}


@dataclass(frozen=True)
class PageConfig:
    """One cache's page geometry (``LoraCachePageManagerConfig``) for given adapter sizes."""

    page_width: int  # values per slot
    slots_per_page: int
    itemsize: int
    optimal_adapter_size: int  # after clamping to max_lora_rank
    max_adapter_size: int
    max_lora_size: int  # values of one adapter of max_adapter_size on every module and layer (maxLoraSize)

    @property
    def min_slots(self) -> int:
        """Slots of one max-sized adapter (``minTotalSlots``)."""
        return math.ceil(self.max_lora_size / self.page_width)

    @property
    def slot_bytes(self) -> int:
        return self.page_width * self.itemsize

    @property
    def page_bytes(self) -> int:
        return self.slots_per_page * self.slot_bytes

    @property
    def min_bytes(self) -> int:
        """The smallest cache the constructor accepts (``… to hold 1 max sized LoRA``)."""
        return self.min_slots * self.slot_bytes

    def pages_of(self, cache_bytes: int) -> int:
        """Pages a cache of ``cache_bytes`` gets (``getMaxNumSlots``, then ``ceilDiv`` by slots per page)."""
        return math.ceil((cache_bytes // self.slot_bytes) / self.slots_per_page)

    def bytes_for(self, pages: int) -> int:
        """The budget giving exactly ``pages`` pages, and no less than :attr:`min_bytes`."""
        return max(pages * self.page_bytes, self.min_bytes)

    def max_sized_loras(self, cache_bytes: int) -> int:
        """Max-sized adapters a cache of ``cache_bytes`` holds (``totalMaxLorasHost`` / ``…Device``)."""
        return self.pages_of(cache_bytes) * self.slots_per_page * self.page_width // self.max_lora_size

    def require_one_max_sized(self, cache_bytes: int, *, cache: str = "host", where: str) -> None:
        """The constructor's check that the cache holds one max-sized adapter.

        Raises:
            OptionError: it does not; the runtime would stop with the words in the message.
        """
        slots = cache_bytes // self.slot_bytes
        if slots < self.min_slots:
            raise OptionError(
                f"Not enough space allocated to {cache} LoRA cache to hold 1 max sized LoRA {slots} < {self.min_slots}"
                f" (lora_cache_max_adapter_size {self.max_adapter_size} on every module and layer): "
                "TensorRT-LLM refuses to start",
                where=where,
                expected=f"≥ {self.min_bytes} bytes ({math.ceil(self.min_bytes / (1 << 20))} MiB)",
                found=f"{cache_bytes} bytes",
                fix="raise --lora-cache-mb, or lower lora_cache_max_adapter_size",
            )


def page_config(shape: CacheShape, *, optimal_adapter_size: int, max_adapter_size: int) -> PageConfig:
    """``PeftCacheManager::getPageManagerConfig`` for ``shape`` (sizes clamped as its constructor does).

    Raises:
        OptionError: an adapter size below 1.
    """
    for flag, value in (("optimal", optimal_adapter_size), ("max", max_adapter_size)):
        if value < 1:
            raise OptionError(f"lora_cache_{flag}_adapter_size must be ≥ 1", where="--llm-parameter", found=str(value))
    optimal = min(optimal_adapter_size, shape.max_lora_rank)
    biggest = min(max_adapter_size, shape.max_lora_rank)
    one_d = shape.one_d().values()
    width = min(one_d)
    per_layer = sum(math.ceil(d / width) for d in one_d)
    slots = max(optimal * per_layer * shape.layers, math.ceil(biggest * max(one_d) / width))
    return PageConfig(
        page_width=width,
        slots_per_page=slots,
        itemsize=shape.itemsize,
        optimal_adapter_size=optimal,
        max_adapter_size=biggest,
        max_lora_size=biggest * sum(one_d) * shape.layers,
    )


def adapter_pages(rows: Iterable[tuple[str, int, int]], shape: CacheShape, config: PageConfig) -> int:
    """Pages one adapter takes in each pipeline rank's cache, the most of any rank
    (``LoraCache::determineNumPages``: rows in order, a row starting a new page when it does not fit).

    Args:
        rows: ``(module name, layer, rank)`` in ``lora_config`` order.

    Raises:
        InputError: a row for a module the engine does not have.
    """
    one_d = shape.one_d()
    rows = list(rows)
    most = 0
    for pp_rank in range(shape.pp):
        first, last = pp_rank * shape.layers, (pp_rank + 1) * shape.layers
        page, slot = 0, 0
        for module, layer, rank in rows:
            if not first <= layer < last:
                continue
            if module not in one_d:
                raise InputError(
                    "an adapter row names a module the engine was not built with",
                    where="lora_config",
                    expected=", ".join(one_d),
                    found=module,
                )
            need = math.ceil(rank * one_d[module] / config.page_width)
            if slot + need > config.slots_per_page:
                page, slot = page + 1, 0
            slot += need
        most = max(most, page + 1)
    return most
