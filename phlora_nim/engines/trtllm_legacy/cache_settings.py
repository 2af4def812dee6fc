"""The ``tensorrt_llm`` model's LoRA cache settings for a repository: what the settings ask of the
cache, the adapters it must hold, the page-exact plan, the parameters written and the preload folder.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from phlora_nim.core.errors import InputError, OptionError, OutputError
from phlora_nim.engines.trtllm_legacy.cache_plan import (
    CacheRequest,
    LoraCachePlan,
    PlannedAdapter,
    engine_shape,
    plan_cache,
    read_rows,
)
from phlora_nim.engines.trtllm_legacy.contract import EngineSpec, engine_spec
from phlora_nim.repository.layout import PRELOAD_DIR, prefetch_dir
from phlora_nim.repository.registry import RegistryState
from phlora_nim.repository.settings import RepositorySettings

_MiB = 1 << 20
_DEFAULT_HOST_CACHE = 1 << 30  # TensorRT-LLM's default lora_cache_host_memory_bytes


def engine_spec_of(settings: RepositorySettings) -> EngineSpec | None:
    """The compiled engine's LoRA facts (a GPU engine with its ``config.json`` kept), else None."""
    return engine_spec(settings.engine) if not settings.engine_row.cpu_reference and settings.engine else None


def require_engine_config(settings: RepositorySettings, engine_config: Path | None, *, stored: bool = False) -> None:
    """``--backend trtllm-legacy`` needs the engine's ``config.json`` to check adapters against.

    TensorRT-LLM does not validate ``lora_prefetch_dir`` (``prefetchLoraWeights`` skips
    ``loraValidateRequestTensors``): one adapter with a module, rank, dtype or tensor parallelism
    the engine lacks stops the server at start with an unhelpful message.

    Args:
        stored: the repository already holds the engine config of an earlier ``convert``.

    Raises:
        OptionError: ``tensorrtllm`` without an engine config.
    """
    if not settings.engine_row.cpu_reference and engine_config is None and not stored:
        raise OptionError(
            "--backend trtllm-legacy needs the engine's config.json: TensorRT-LLM does not check "
            "prefetched adapters, so one the engine cannot take stops the server at start",
            where="--engine-config",
            expected="the config.json trtllm-build wrote beside the engine",
            found="none given",
            fix="build the engine with the flags `phlora-nim engine-plan` prints (convert with --backend "
            "trtllm-legacy-cpu first to plan), then convert with --engine-config ENGINE_DIR/config.json",
        )


def with_engine(settings: RepositorySettings, engine_config: dict[str, Any] | None) -> RepositorySettings:
    """``settings`` keeping the engine's ``config.json``: chunked context follows its
    ``use_paged_context_fmha`` and the LoRA cache is sized from it (see :func:`engine_parameters`)."""
    if engine_config is None:
        return settings
    return replace(settings, engine=dict(engine_config))


def _int_parameter(settings: RepositorySettings, key: str) -> int | None:
    value = settings.llm_parameters.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise OptionError(
            "not an integer", where=f"--llm-parameter {key}", expected="a whole number", found=repr(value)
        ) from None


def cache_request(settings: RepositorySettings) -> CacheRequest:
    """What ``settings`` ask of the LoRA cache (``--llm-parameter`` values fix what they name)."""
    host = _int_parameter(settings, "lora_cache_host_memory_bytes")
    spec = engine_spec_of(settings)
    batch = (spec.max_batch_size if spec else None) or settings.max_batch_size
    return CacheRequest(
        host_bytes=host if host is not None else settings.lora_cache_bytes,
        spare=settings.max_batch_size if settings.lora_cache_spare is None else settings.lora_cache_spare,
        prefetch=settings.lora_prefetch,
        prefetch_names=settings.prefetch_names,
        prefetch_limit=settings.prefetch_limit,
        usage=settings.prefetch_usage,
        optimal_adapter_size=_int_parameter(settings, "lora_cache_optimal_adapter_size"),
        max_adapter_size=_int_parameter(settings, "lora_cache_max_adapter_size"),
        gpu_free_bytes=settings.gpu_free_memory_bytes,
        max_batch_size=int(batch),  # the executor batches up to the engine's max_batch_size
    )


def planned_adapters(
    state: RegistryState, root: Path, *, staged: dict[str, Path] | None = None
) -> list[PlannedAdapter]:
    """Every registered adapter with its ``lora_config`` rows (read from its prefetch folder, or from
    ``staged[name]`` for one not moved into place yet).

    Raises:
        InputError: an adapter's ``model.lora_config.npy`` is missing.
    """
    out = []
    for name, entry in sorted(state.adapters.items()):
        folder = (staged or {}).get(name) or prefetch_dir(root, entry.task_id)
        try:
            rows = read_rows(folder)
        except OSError as exc:
            raise InputError(
                f"cannot read the adapter's lora_config ({exc})",
                where=str(folder),
                expected="model.lora_config.npy written by `phlora-nim convert`",
                fix=f"convert {name} again (--replace)",
            ) from None
        out.append(PlannedAdapter(name=name, task_id=entry.task_id, rows=rows))
    return out


def lora_cache_plan(settings: RepositorySettings, adapters: list[PlannedAdapter]) -> LoraCachePlan | None:
    """The page-exact cache plan for a ``tensorrtllm`` repository with an engine config, else None.

    Raises:
        OptionError / InputError: the adapters cannot fit (the numbers in the message).
    """
    if engine_spec_of(settings) is None:
        return None
    where = "engine config.json"
    return plan_cache(adapters, engine_shape(settings.engine, where=where), cache_request(settings), where=where)


def check_served_path(settings: RepositorySettings, root: Path) -> None:
    """The path Triton will see the repository at must be this repository, here (run where Triton runs).

    TensorRT-LLM skips a ``lora_prefetch_dir`` that does not exist without an error (only a debug
    line in ``PeftCacheManager::prefetchLoraWeights``): a wrong served path serves no preloaded adapter.

    Raises:
        OutputError: the served path does not exist here or is another folder.
    """
    served = Path(settings.served(root))
    same = served.is_dir() and Path(root).is_dir() and os.path.samefile(served, root)
    if not same:
        raise OutputError(
            "the served path is not this model repository here: TensorRT-LLM would silently preload nothing",
            where="--served-path",
            expected=f"the folder Triton mounts the repository at, here the same as {Path(root).resolve()}",
            found=f"{served} ({'another folder' if served.is_dir() else 'does not exist'})",
            fix="pass --served-path set to where this pod mounts the repository (Triton mounts it there too)",
        )


def lora_cache_parameters(
    state: RegistryState, settings: RepositorySettings, plan: LoraCachePlan | None = None
) -> dict[str, str]:
    """LoRA cache parameters fitting every registered adapter.

    With an engine config: TensorRT-LLM's page rule (:mod:`phlora_nim.engines.trtllm_legacy.cache_plan`).
    Otherwise (the CPU reference, whose cache counts bytes): ``lora_cache_max_adapter_size`` /
    ``optimal_adapter_size`` in rank units and a host budget holding every adapter twice over.
    """
    if plan is not None:
        return plan.parameters()
    ranks = sorted(e.max_rank for e in state.adapters.values()) or [8]
    sizes = [int(e.trtllm_layout.get("bytes", 0)) for e in state.adapters.values()]
    optimal = 1 << max(0, math.ceil(math.log2(max(1, ranks[len(ranks) // 2]))))
    biggest = max(ranks[-1], settings.max_lora_rank if settings.engine_row.cpu_reference else ranks[-1])
    # An explicit budget is taken as given.
    host = settings.lora_cache_bytes or math.ceil(max(_DEFAULT_HOST_CACHE, 2 * sum(sizes)) / _MiB) * _MiB
    return {
        "lora_cache_optimal_adapter_size": str(min(optimal, biggest)),
        "lora_cache_max_adapter_size": str(max(biggest, 8)),
        "lora_cache_gpu_memory_fraction": "0.05",
        "lora_cache_host_memory_bytes": str(host),
    }


def write_preload(root: Path, state: RegistryState, plan: LoraCachePlan | None) -> None:
    """Make :data:`PRELOAD_DIR` hold exactly the preloaded adapters (hard links to their prefetch
    files; copies where links cannot be made), or remove it when every adapter is preloaded.

    Built beside the old one and renamed into place, so Triton never sees it half made.
    """
    target = Path(root) / PRELOAD_DIR
    if plan is None or plan.all_prefetched or not plan.prefetched:
        if target.exists():
            shutil.rmtree(target)
        return
    ids = {name: state.adapters[name].task_id for name in plan.prefetched}
    scratch = Path(tempfile.mkdtemp(prefix=".lora_preload-", dir=target.parent))
    try:
        for task_id in ids.values():
            source, folder = prefetch_dir(root, task_id), scratch / str(task_id)
            folder.mkdir()
            for item in source.iterdir():
                try:
                    os.link(item, folder / item.name)
                except OSError:
                    shutil.copy2(item, folder / item.name)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".lora_preload-old-", dir=target.parent))
            os.replace(target, old / "old")
        os.replace(scratch, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
