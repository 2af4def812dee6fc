"""Size the ``tensorrt_llm`` model's LoRA cache parameters by the runtime's page rule.

TensorRT-LLM preloads every folder of ``lora_prefetch_dir`` into the host cache at start, without a
check, and a prefetched adapter cannot be evicted until a request using it has finished: when its
pages run out the model fails to load (``Cache is full. There are no done tasks to evict``). So the
host cache must hold every prefetched adapter **plus** room for the adapters the router sends on
misses (``spare``, default the max batch size, of the largest registered kind); the GPU cache must
hold one batch of adapters. Pages follow :mod:`phlora_nim.engines.trtllm_legacy.cache_pages`.

Which adapters are preloaded can be capped: the named ones first, then the most used (request
counts from the router's ``phlora_router_requests_total`` or a JSON object), then by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.engines.trtllm_legacy.cache_pages import CacheShape, PageConfig, adapter_pages, page_config
from phlora_nim.engines.trtllm_legacy.contract import CONFIG_FILE, engine_spec, module_name

_MiB = 1 << 20
DEFAULT_GPU_FRACTION = 0.05  # TensorRT-LLM's default lora_cache_gpu_memory_fraction


@dataclass(frozen=True)
class PlannedAdapter:
    """One registered adapter as the cache sees it: its rows ``(module, layer, rank)`` in order."""

    name: str
    task_id: int
    rows: tuple[tuple[str, int, int], ...]

    @property
    def max_rank(self) -> int:
        return max((r for _, _, r in self.rows), default=1)


@dataclass(frozen=True)
class CacheRequest:
    """What the operator asked for (repository settings, as given or stored).

    Args:
        host_bytes: host cache budget; 0 = sized here to fit.
        spare: adapters of the largest kind the host and GPU caches keep room for (misses).
        prefetch: whether the repository preloads at all (off for bfloat16).
        prefetch_names: adapters preloaded first, in order.
        prefetch_limit: most adapters preloaded (None: all, or only ``prefetch_names`` when given).
        usage: request counts per adapter name (most used preloaded first).
        optimal_adapter_size / max_adapter_size: fixed by the user (None: chosen here).
        gpu_free_bytes: free GPU memory when the cache is allocated (0: unknown, fraction stays 0.05).
        max_batch_size: requests (so adapters) one batch can hold.
    """

    host_bytes: int = 0
    spare: int = 8
    prefetch: bool = True
    prefetch_names: tuple[str, ...] = ()
    prefetch_limit: int | None = None
    usage: Mapping[str, float] | None = None
    optimal_adapter_size: int | None = None
    max_adapter_size: int | None = None
    gpu_free_bytes: int = 0
    max_batch_size: int = 8


@dataclass(frozen=True)
class LoraCachePlan:
    """The cache parameters to write, and the numbers behind them."""

    page: PageConfig
    pages: Mapping[str, int]  # adapter name → pages it takes
    prefetched: tuple[str, ...]
    spare: int
    host_pages_needed: int
    host_bytes: int
    host_pages: int  # what the runtime makes of host_bytes
    gpu_pages_needed: int
    gpu_bytes_needed: int
    gpu_fraction: float

    @property
    def all_prefetched(self) -> bool:
        return len(self.prefetched) == len(self.pages)

    def parameters(self) -> dict[str, str]:
        """The ``tensorrt_llm`` config.pbtxt parameters."""
        return {
            "lora_cache_optimal_adapter_size": str(self.page.optimal_adapter_size),
            "lora_cache_max_adapter_size": str(self.page.max_adapter_size),
            "lora_cache_gpu_memory_fraction": f"{self.gpu_fraction:g}",
            "lora_cache_host_memory_bytes": str(self.host_bytes),
        }

    def summary(self) -> dict[str, object]:
        """JSON-able figures for ``engine-plan`` and logs."""
        return {
            "parameters": self.parameters(),
            "page_bytes": self.page.page_bytes,
            "slots_per_page": self.page.slots_per_page,
            "page_width": self.page.page_width,
            "prefetched": list(self.prefetched),
            "spare_adapters": self.spare,
            "host_pages": self.host_pages,
            "host_pages_needed": self.host_pages_needed,
            "gpu_pages_needed": self.gpu_pages_needed,
            "gpu_bytes_needed": self.gpu_bytes_needed,
            "gpu_free_bytes_needed_at_fraction": math.ceil(self.gpu_bytes_needed / self.gpu_fraction),
        }


def rows_of_config(config: np.ndarray) -> tuple[tuple[str, int, int], ...]:
    """``(module, layer, rank)`` of a ``lora_config`` array ``[1, N, 3|4]`` or ``[N, 3|4]``."""
    rows = np.asarray(config).reshape(-1, np.asarray(config).shape[-1])
    return tuple((module_name(int(m)), int(layer), int(r)) for m, layer, r in rows[:, :3])


def read_rows(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """The rows of the ``lora_config`` npy in an adapter's TensorRT-LLM folder."""
    return rows_of_config(np.load(Path(folder) / CONFIG_FILE, allow_pickle=False))


def read_usage(path: Path) -> dict[str, float]:
    """Request counts per adapter: a JSON object ``{name: count}``, or the router's ``/metrics`` text
    (``phlora_router_requests_total{adapter="…"}``).

    Raises:
        InputError: neither.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read request counts ({exc})", where=str(path), fix="check --prefetch-usage") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and all(isinstance(v, int | float) for v in data.values()):
        return {str(k): float(v) for k, v in data.items()}
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "phlora_router_requests_total" and "adapter" in sample.labels:
                    name = sample.labels["adapter"]
                    counts[name] = counts.get(name, 0.0) + float(sample.value)
    except ValueError:
        counts = {}
    if not counts:
        raise InputError(
            "no request counts found",
            where=str(path),
            expected='a JSON object {"adapter": count} or the router\'s /metrics text '
            "(phlora_router_requests_total{adapter=…})",
            fix="save `curl ROUTER:METRICS_PORT/metrics` to a file and pass it",
        )
    return counts


def select_prefetch(names: Iterable[str], request: CacheRequest) -> tuple[str, ...]:
    """The adapters to preload: named ones first, then the most used, then by name, up to the limit.

    Raises:
        OptionError: a named adapter is not registered, or more are named than the limit allows.
    """
    names = sorted(names)
    if not request.prefetch:
        return ()
    unknown = [n for n in request.prefetch_names if n not in names]
    if unknown:
        raise OptionError(
            "--prefetch names an adapter that is not registered",
            where="--prefetch",
            expected=", ".join(names[:10]) + (", …" if len(names) > 10 else ""),
            found=", ".join(unknown),
        )
    limit = request.prefetch_limit
    if limit is None:
        return tuple(dict.fromkeys(request.prefetch_names)) if request.prefetch_names else tuple(names)
    if limit < len(set(request.prefetch_names)):
        raise OptionError(
            "more adapters named with --prefetch than --prefetch-limit allows",
            where="--prefetch-limit",
            expected=f"≥ {len(set(request.prefetch_names))}",
            found=str(limit),
        )
    usage = request.usage or {}
    ranked = sorted(names, key=lambda n: (-usage.get(n, 0.0), n))
    return tuple(dict.fromkeys([*request.prefetch_names, *ranked]))[: max(0, limit)]


def _candidate_sizes(shape: CacheShape, request: CacheRequest) -> list[int]:
    if request.optimal_adapter_size is not None:
        return [request.optimal_adapter_size]
    sizes = {1 << k for k in range(max(1, shape.max_lora_rank).bit_length()) if 1 << k <= shape.max_lora_rank}
    return sorted(sizes | {shape.max_lora_rank}, reverse=True)


def plan_cache(
    adapters: list[PlannedAdapter], shape: CacheShape, request: CacheRequest, *, where: str
) -> LoraCachePlan:
    """The cache parameters fitting ``adapters`` on an engine of ``shape``.

    Without a fixed ``lora_cache_optimal_adapter_size`` every size up to ``max_lora_rank`` is tried
    and the one needing the fewest host bytes wins (ties: the larger pages).

    Raises:
        OptionError: an explicit host budget too small for what is preloaded plus the spare room,
            or a GPU cache that cannot fit in the free GPU memory given (the numbers in the message).
    """
    prefetched = select_prefetch((a.name for a in adapters), request)
    biggest = request.max_adapter_size or max((a.max_rank for a in adapters), default=1)
    best: tuple[int, LoraCachePlan] | None = None
    for optimal in _candidate_sizes(shape, request):
        plan = _plan_for(adapters, shape, request, prefetched, optimal=optimal, biggest=biggest)
        if best is None or plan.host_pages_needed * plan.page.page_bytes < best[0]:
            best = (plan.host_pages_needed * plan.page.page_bytes, plan)
    assert best is not None  # at least one candidate size
    plan = best[1]
    _check_host(plan, request, where=where)
    return plan


def _plan_for(
    adapters: list[PlannedAdapter],
    shape: CacheShape,
    request: CacheRequest,
    prefetched: tuple[str, ...],
    *,
    optimal: int,
    biggest: int,
) -> LoraCachePlan:
    page = page_config(shape, optimal_adapter_size=optimal, max_adapter_size=biggest)
    pages = {a.name: adapter_pages(a.rows, shape, page) for a in adapters}
    largest = max(pages.values(), default=1)
    spare = max(0, request.spare)
    needed = sum(pages[n] for n in prefetched) + spare * largest
    host = request.host_bytes or page.bytes_for(needed)
    gpu_pages = max(1, min(request.max_batch_size, max(1, len(adapters)))) * largest
    gpu_bytes = page.bytes_for(gpu_pages)
    fraction = DEFAULT_GPU_FRACTION
    if request.gpu_free_bytes:
        fraction = max(DEFAULT_GPU_FRACTION, math.ceil(100 * gpu_bytes / request.gpu_free_bytes) / 100)
    return LoraCachePlan(
        page=page,
        pages=pages,
        prefetched=prefetched,
        spare=spare,
        host_pages_needed=needed,
        host_bytes=host,
        host_pages=page.pages_of(host),
        gpu_pages_needed=gpu_pages,
        gpu_bytes_needed=gpu_bytes,
        gpu_fraction=fraction,
    )


def _size(nbytes: float) -> str:
    return f"{nbytes / _MiB:.1f} MiB" if nbytes >= _MiB else f"{nbytes / 1024:.1f} KiB"


def _check_host(plan: LoraCachePlan, request: CacheRequest, *, where: str) -> None:
    page = plan.page
    fix = "raise --lora-cache-mb, or preload fewer adapters (--prefetch-limit N, --prefetch NAME)"
    if request.host_bytes:
        page.require_one_max_sized(request.host_bytes, where=f"{where} lora_cache_host_memory_bytes")
    if plan.host_pages < plan.host_pages_needed:
        preloaded = sum(plan.pages[n] for n in plan.prefetched)
        outcome = (
            "TensorRT-LLM would stop at start (Cache is full)"
            if preloaded > plan.host_pages
            else "adapters the router sends on misses would find no room (Cache is full)"
        )
        raise OptionError(
            f"the host LoRA cache has {plan.host_pages} pages of {_size(page.page_bytes)}; the {len(plan.prefetched)} "
            f"preloaded adapters take {preloaded} and {plan.spare} spare adapters "
            f"{plan.host_pages_needed - preloaded}: {outcome}",
            where=f"{where} lora_cache_host_memory_bytes",
            expected=f"≥ {page.bytes_for(plan.host_pages_needed)} bytes ({plan.host_pages_needed} pages)",
            found=f"{plan.host_bytes} bytes",
            fix=fix,
        )
    if request.gpu_free_bytes and plan.gpu_fraction > 1:
        raise OptionError(
            f"the GPU LoRA cache needs {plan.gpu_pages_needed} pages ({plan.gpu_bytes_needed} bytes) for one batch "
            f"of adapters, more than the free GPU memory given ({request.gpu_free_bytes} bytes)",
            where=f"{where} lora_cache_gpu_memory_fraction",
            expected=f"≤ {request.gpu_free_bytes} bytes",
            found=f"{plan.gpu_bytes_needed} bytes",
            fix="lower --max-batch-size, use lower-rank adapters, or a GPU with more free memory",
        )


def engine_shape(engine_config: Mapping[str, object], *, where: str) -> CacheShape:
    """The cache shape of an engine ``config.json``."""
    return CacheShape.of_engine(engine_spec(dict(engine_config)), where=where)
