"""What ``convert`` does for the legacy TensorRT-LLM engine besides the PEFT store every engine gets:
check the engine config, lay each adapter out as the npy pair, refuse adapters the LoRA cache cannot
hold, and move the pair into the prefetch folder Triton reads (``lora_prefetch_dir``).

Every engine package has a ``staging`` module with these four steps (see :mod:`phlora_nim.jobs.convert`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.architecture import ArchitectureMap
from phlora_nim.core.atomic import replace_dir
from phlora_nim.core.json_files import read_json
from phlora_nim.engines.trtllm_legacy.cache_plan import engine_shape
from phlora_nim.engines.trtllm_legacy.cache_settings import (
    lora_cache_plan,
    planned_adapters,
    require_engine_config,
    with_engine,
)
from phlora_nim.engines.trtllm_legacy.deploy import engine_parameters
from phlora_nim.engines.trtllm_legacy.tensors import TRTLLM_MODULES, adapter_to_trtllm, check_engine, save_trtllm
from phlora_nim.repository.layout import prefetch_dir
from phlora_nim.repository.registry import AdapterEntry, RegistryState
from phlora_nim.repository.settings import RepositorySettings


@dataclasses.dataclass(frozen=True)
class EngineForm:
    """One adapter laid out for the engine, staged beside the repository until it is registered.

    Attributes:
        folder: the staged files (the npy pair).
        layout: what the registry records of it (modules, bytes, rows, tensor parallelism).
        nbytes: the size the engine holds in its LoRA cache.
    """

    folder: Path
    layout: dict[str, Any]
    nbytes: int


def prepare(
    settings: RepositorySettings, engine_config: Path | None
) -> tuple[RepositorySettings, dict[str, Any] | None]:
    """The settings with the engine config stored (given now, or kept from an earlier run), checked
    before any extraction: the cache can be sized from it and its chunked-context setting holds.

    Returns:
        The settings, and the engine config every adapter must fit (None: no engine to check against).
    """
    require_engine_config(settings, engine_config, stored=bool(settings.engine))
    if engine_config is not None:
        settings = with_engine(settings, read_json(engine_config, what="engine config"))
    if settings.engine_row.cpu_reference:  # an engine config given anyway still checks the adapters
        return settings, settings.engine or None
    where = str(engine_config or "the engine config stored in the repository")
    engine_shape(settings.engine, where=where)
    engine_parameters(settings)
    return settings, settings.engine


def stage(
    adapter: LoraAdapter,
    folder: Path,
    *,
    settings: RepositorySettings,
    model_config: dict[str, Any],
    architecture: ArchitectureMap | None,
    engine: dict[str, Any] | None,
    engine_where: str,
    tp: int,
    strict: bool,
    source: str,
) -> EngineForm:
    """Write the npy pair of ``adapter`` into ``folder`` (which must not exist)."""
    lora = adapter_to_trtllm(
        adapter, config=model_config, architecture=architecture, dtype=settings.dtype, tp=tp, strict=strict
    )
    if engine is not None:
        check_engine(lora, engine, where=engine_where)
    folder.mkdir()
    save_trtllm(lora, folder, source=source)
    nbytes = int(lora.weights.nbytes + lora.config.nbytes)
    layout = {
        "trtllm_modules": sorted({TRTLLM_MODULES[int(m)] for m in lora.config[0, :, 0]}),
        "bytes": nbytes,
        "rows": lora.num_rows,
        "tp": tp,
    }
    return EngineForm(folder=folder, layout=layout, nbytes=nbytes)


def check_fit(settings: RepositorySettings, state: RegistryState, root: Path, staged: dict[str, EngineForm]) -> None:
    """Refuse, before anything moves, adapters the engine's LoRA cache cannot hold."""
    lora_cache_plan(settings, planned_adapters(state, root, staged={n: f.folder for n, f in staged.items()}))


def place(
    root: Path, state: RegistryState, entry: AdapterEntry, old: AdapterEntry | None, form: EngineForm, *, grace: float
) -> None:
    """Move the staged pair to its prefetch folder; an older id's files go after ``grace`` seconds."""
    if old is not None and old.task_id != entry.task_id:
        state.delete_later(root, prefetch_dir(root, old.task_id), grace=grace, adapter=old.name)
    replace_dir(form.folder, prefetch_dir(root, entry.task_id))


def unchanged(root: Path, entry: AdapterEntry) -> bool:
    """The engine's files of a re-registered adapter with the same weights are in place."""
    return prefetch_dir(root, entry.task_id).is_dir()


def engine_files(root: Path, entry: AdapterEntry) -> list[Path]:
    """The engine's files of a registered adapter (removed with it, after the grace period)."""
    return [prefetch_dir(root, entry.task_id)]
