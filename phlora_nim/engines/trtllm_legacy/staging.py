"""What ``convert`` does for the legacy TensorRT-LLM engine besides the PEFT store every engine gets:
check the engine config, lay each adapter out as the npy pair, refuse adapters the LoRA cache cannot
hold, and move the pair into the prefetch folder Triton reads (``lora_prefetch_dir``).

Every engine package ``convert`` writes for has a ``staging`` module with these steps, called by
:mod:`phlora_nim.jobs.convert` in this order (the llmapi engine's is :mod:`phlora_nim.engines.trtllm_llmapi.staging`):

- ``PEFT_STORE``: whether the job also writes the PEFT store folder (``adapters/<name>``) beside the
  engine's own form (False where that form is itself the PEFT folder).
- ``Options``: the engine's own ``convert`` options (``ConvertJob.engine_options``).
- ``prepare(settings, engine_config, *, root, options)``: checks before any extraction; the settings
  to write and the engine config adapters must fit (or None).
- ``stage(adapter, folder, *, name, settings, model_config, architecture, engine, engine_where, tp,
  strict, source, out_dtype)``: write the engine's form of one adapter into ``folder``; an ``EngineForm``
  (``folder``, ``layout`` for the registry, ``nbytes``, ``dtype`` registered).
- ``check_staged(settings, root, staged, *, options, tp)``: every adapter staged, before the registry
  lock is taken: refuse what the engine's model cannot cover (nothing is written then).
- ``lora_path(settings, root, lora_id)``: the path registered for the engine to load it from (or None).
- ``check_fit(settings, state, root, staged, *, options, tp)``: under the registry lock, with this
  run's adapters registered but nothing moved: refuse what the engine cannot hold; returns a fit
  handed to ``deploy.write_repository`` and ``notes``.
- ``unchanged(root, entry)``, ``place(root, state, entry, old, form, *, grace)``: move the form into place.
- ``engine_files(root, entry)``: what ``remove`` deletes with an adapter.
- ``notes(settings, root, fit)``: lines printed after ``convert``.

And its ``deploy`` module has ``write_repository(root, settings, state, fit=None)`` (``fit``: None after ``remove``).
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

PEFT_STORE = True
# The npy pair pads every row to the largest rank by its format, and the PEFT store beside it may be
# served by vLLM (one lora_alpha / r for every module): padded only.
LAYOUTS: tuple[str, ...] = ("padded",)


@dataclasses.dataclass(frozen=True)
class Options:
    """No options of its own: those of this engine are repository settings."""


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
    dtype: str


def prepare(
    settings: RepositorySettings, engine_config: Path | None, *, root: Path, options: Any
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
    name: str,
    settings: RepositorySettings,
    model_config: dict[str, Any],
    architecture: ArchitectureMap | None,
    engine: dict[str, Any] | None,
    engine_where: str,
    tp: int,
    strict: bool,
    source: str,
    out_dtype: Any,
    layout: str = "padded",
) -> EngineForm:
    """Write the npy pair of ``adapter`` into ``folder`` (which must not exist); ``layout``: padded only
    (:data:`LAYOUTS`)."""
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
    return EngineForm(folder=folder, layout=layout, nbytes=nbytes, dtype=settings.dtype)


def check_staged(
    settings: RepositorySettings, root: Path, staged: dict[str, EngineForm], *, options: Any, tp: int
) -> None:
    """Nothing to check before the lock: the cache fit needs the registered adapters (:func:`check_fit`)."""


def lora_path(settings: RepositorySettings, root: Path, lora_id: int) -> str | None:
    """None: the router sends the weights (or the server preloads them from the prefetch folder)."""
    return None


def check_fit(
    settings: RepositorySettings,
    state: RegistryState,
    root: Path,
    staged: dict[str, EngineForm],
    *,
    options: Any,
    tp: int,
) -> None:
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


def notes(settings: RepositorySettings, root: Path, fit: None) -> list[str]:
    return []
