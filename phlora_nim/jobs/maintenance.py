"""A repository after ``convert``: read its registry, remove adapters, plan the engine that serves them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phlora_nim.core.dtypes import parse_dtype
from phlora_nim.core.errors import InputError
from phlora_nim.core.json_files import read_json
from phlora_nim.engines.trtllm_legacy.cache_plan import engine_shape, plan_cache
from phlora_nim.engines.trtllm_legacy.cache_settings import cache_request, planned_adapters
from phlora_nim.engines.trtllm_legacy.tensors import TRTLLM_MODULES
from phlora_nim.repository.layout import DEFAULT_GRACE_S, GRACE, PREFETCH_DIR, adapter_store_dir
from phlora_nim.repository.registry import AdapterEntry, Registry, RegistryState, utc_now
from phlora_nim.repository.settings import RepositorySettings


def check_grace(grace: float) -> None:
    GRACE.check(grace, "--grace")


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
        settings = RepositorySettings.load(root) or RepositorySettings(base="(unknown)")
        engine_files = settings.engine_row.module("staging").engine_files(Path(root), entry)
        for folder in (*engine_files, adapter_store_dir(root, name)):
            state.delete_later(Path(root), folder, grace=grace, adapter=name)
        if settings.base != "(unknown)":
            if name in settings.prefetch_names:  # no longer preloaded: it is gone
                kept = tuple(n for n in settings.prefetch_names if n != name)
                settings = dataclasses.replace(settings, prefetch_names=kept)
            settings.engine_row.module("deploy").write_repository(root, settings, state)
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


def planned_engine_config(plan: dict[str, Any], base: Path, *, tp: int = 1) -> dict[str, Any]:
    """The ``config.json`` an engine built with ``plan``'s flags from ``base`` would have (the LoRA and
    shape fields TensorRT-LLM sizes its LoRA cache from)."""
    config = read_json(Path(base) / "config.json", what="base model config")
    heads = int(config["num_attention_heads"])
    return {
        "version": "planned",
        "pretrained_config": {
            "dtype": plan["lora_plugin"],
            "num_hidden_layers": int(config["num_hidden_layers"]),
            "hidden_size": int(config["hidden_size"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
            "head_size": int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            "intermediate_size": int(config.get("intermediate_size") or 0),
            "mapping": {"tp_size": tp},
        },
        "build_config": {
            "lora_config": {"max_lora_rank": plan["max_lora_rank"], "lora_target_modules": plan["lora_target_modules"]},
            "plugin_config": {"lora_plugin": plan["lora_plugin"]},
        },
    }


def cache_plan_summary(
    root: Path, state: RegistryState, plan: dict[str, Any], *, engine_config: Path | None = None
) -> dict[str, Any]:
    """The LoRA cache parameters to serve the registered adapters with, by TensorRT-LLM's page rule.

    From ``engine_config`` when given, else from the engine ``plan`` describes (built from the base
    checkpoint the repository was converted from).

    Raises:
        InputError / OptionError: no settings or base config, or the adapters cannot fit.
    """
    settings = RepositorySettings.load(root)
    if settings is None:
        raise InputError("no repository settings", where=str(Path(root)), fix="run `phlora-nim convert` first")
    if engine_config is not None:
        engine, where = read_json(engine_config, what="engine config"), str(engine_config)
    else:
        tp = max((int(e.trtllm_layout.get("tp", 1)) for e in state.adapters.values()), default=1)
        engine, where = planned_engine_config(plan, Path(settings.base), tp=tp), "the planned engine"
    settings = dataclasses.replace(settings, backend="trtllm-legacy", engine=engine)
    cache = plan_cache(
        planned_adapters(state, root), engine_shape(engine, where=where), cache_request(settings), where=where
    )
    return cache.summary()
