"""A repository after ``convert``: read its registry, remove adapters, plan the engine that serves them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phlora_nim.converters.dtypes import parse_dtype
from phlora_nim.converters.errors import InputError, OptionError
from phlora_nim.converters.formats.trtllm import TRTLLM_MODULES
from phlora_nim.repository.configs import RepositorySettings, write_repository
from phlora_nim.repository.layout import DEFAULT_GRACE_S, PREFETCH_DIR, adapter_store_dir, prefetch_dir
from phlora_nim.repository.registry import AdapterEntry, Registry, RegistryState, utc_now


def check_grace(grace: float) -> None:
    if not grace >= 0:
        raise OptionError("the grace period must be ≥ 0 seconds", where="--grace", found=str(grace))


def remove_adapter(
    root: Path, name: str, *, grace: float = DEFAULT_GRACE_S, now: Callable[[], dt.datetime] = utc_now
) -> AdapterEntry:
    """Unregister ``name``; its folders go ``grace`` seconds later, its task id stays reserved.

    The folders are deleted by the first registry write (``convert`` or ``remove``) after the grace
    period, so a router that has not yet re-read the registry still finds the files it routes to.
    """
    check_grace(grace)
    read_registry(root)  # a clear error when ``root`` is not a repository
    with Registry(Path(root), now=now).locked() as state:
        entry = state.remove(name)
        for folder in (prefetch_dir(root, entry.task_id), adapter_store_dir(root, name)):
            state.delete_later(Path(root), folder, grace=grace, adapter=name)
        settings = RepositorySettings.load(root)
        if settings is not None:
            write_repository(root, settings, state)
    return entry


def read_registry(root: Path) -> RegistryState:
    """The registry of a repository; a clear error when the folder is not one."""
    registry = Registry(Path(root))
    if not registry.path.exists():
        raise InputError(
            "no adapter registry here",
            where=str(registry.path),
            expected="a model repository written by `phlora-nim convert`",
            fix="check --model-repository, or run `phlora-nim convert` first",
        )
    return registry.read()


def engine_plan(state: RegistryState, *, dtype: str | None = None) -> dict[str, Any]:
    """The ``trtllm-build`` LoRA flags that fit every registered adapter."""
    if not state.adapters:
        raise InputError(
            "no adapters registered",
            where="registry",
            fix="run `phlora-nim convert` first: the flags follow from the adapters",
        )
    dtypes = sorted({e.dtype for e in state.adapters.values()})
    modules = sorted(
        {m for e in state.adapters.values() for m in e.trtllm_layout.get("trtllm_modules", [])},
        key=TRTLLM_MODULES.index,
    )
    max_rank = max(e.max_rank for e in state.adapters.values())
    plugin = dtype or (dtypes[0] if len(dtypes) == 1 else "auto")
    if dtype is not None:
        parse_dtype(dtype, "engine dtype")
    flags = ["--lora_plugin", plugin, "--lora_target_modules", *modules, "--max_lora_rank", str(max_rank)]
    return {
        "lora_plugin": plugin,
        "lora_target_modules": modules,
        "max_lora_rank": max_rank,
        "adapter_dtypes": dtypes,
        "adapters": len(state.adapters),
        "prefetch_dir": PREFETCH_DIR,
        "flags": flags,
    }
