"""What ``convert`` does for the llmapi engine (``trtllm`` / ``trtllm-cpu``): the same steps as
:mod:`phlora_nim.engines.trtllm_legacy.staging` (the interface is documented there).

Each adapter is checked exact under the loader rule and written as the PEFT folder the ``llmapi`` model
reads by path (``tensorrt_llm/lora_store/<lora_id>/``: content-keyed, ids never reused); the model.yaml's
``lora_config`` is widened to cover every registered adapter, or, fixed by the operator, must cover them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.architecture import ArchitectureMap
from phlora_nim.converters.formats.peft import WEIGHTS_NAME
from phlora_nim.converters.scale_rules import Layout
from phlora_nim.core.atomic import replace_dir
from phlora_nim.core.errors import OptionError, OutputError, PhloraError, raise_all
from phlora_nim.engines.trtllm_llmapi import model_yaml
from phlora_nim.engines.trtllm_llmapi.adapter_folder import check_servable, modules_and_rank, save_for_trtllm
from phlora_nim.engines.trtllm_llmapi.deploy import STORE, store_dir, yaml_path
from phlora_nim.engines.trtllm_llmapi.interface import MODEL_NAME
from phlora_nim.engines.trtllm_llmapi.loader_rule import trtllm_modules_of
from phlora_nim.engines.trtllm_llmapi.upstream_files import instructions
from phlora_nim.repository.layout import SETTINGS_FILE
from phlora_nim.repository.registry import AdapterEntry, Registry, RegistryState
from phlora_nim.repository.settings import RepositorySettings

# The engine's own folder is the PEFT folder: no second copy in the common store.
PEFT_STORE = False
# The folder's layouts (converters/scale_rules.py): the HF loader (tensorrt_llm/lora_manager.py,
# LoraManager.load_from_hf) scales each module by lora_alpha / its tensor rank, so mixed ranks are exact.
LAYOUTS: tuple[Layout, ...] = ("padded", "mixed")


@dataclasses.dataclass(frozen=True)
class Options:
    """``convert`` options of this engine.

    Args:
        served_base: ``model:`` of model.yaml — the base checkpoint as the replicas see it (default: ``base``).
        model_yaml: an operator's model.yaml to start from (its other LLM() arguments are kept).
        fixed: use that model.yaml's lora_config as is: adapters it does not cover are refused.
    """

    served_base: str | None = None
    model_yaml: Path | None = None
    fixed: bool = False
    pp: int = 1
    max_loras: int = 8
    max_cpu_loras: int = 32


@dataclasses.dataclass(frozen=True)
class EngineForm:
    """One adapter's PEFT folder, staged until it is registered (see the legacy engine's EngineForm)."""

    folder: Path
    layout: dict[str, Any] | None
    nbytes: int
    dtype: str
    need: model_yaml.Need


@dataclasses.dataclass(frozen=True)
class Fit:
    """What :func:`check_fit` decided: the model.yaml to write and what changed in it."""

    config: model_yaml.LlmapiConfig
    notes: list[str]


def _served(settings: RepositorySettings, root: Path) -> Path:
    return Path(settings.served_path) if settings.served_path else Path(root).resolve()


def prepare(
    settings: RepositorySettings, engine_config: Path | None, *, root: Path, options: Any
) -> tuple[RepositorySettings, dict[str, Any] | None]:
    """The settings with the served path filled in, checked before any extraction: an absolute store
    path Triton sees (for the CPU reference: this repository), and a repository of this engine.

    Raises:
        OptionError: every problem found, in one error.
    """
    problems = [*_served_problems(settings, root), *_repository_problems(settings, root)]
    if engine_config is not None:
        problems.append(OptionError("no engine config for this engine", where="--engine-config"))
    raise_all(problems, summary="convert cannot start")
    return dataclasses.replace(settings, served_path=str(_served(settings, root))), None


def _served_problems(settings: RepositorySettings, root: Path) -> list[PhloraError]:
    served = _served(settings, root)
    if not served.is_absolute():
        return [
            OptionError(
                "the store path Triton sees must be absolute",
                where="--served-path",
                found=str(served),
                fix="give the repository's mount path in the Triton pods, e.g. /models",
            )
        ]
    if settings.engine_row.cpu_reference and served != Path(root).resolve():
        return [
            OptionError(
                "store path Triton cannot see: the CPU reference's Triton runs on this machine and reads the "
                "adapters where convert writes them",
                where="--served-path",
                expected=str(Path(root).resolve()),
                found=str(served),
                fix="drop --served-path for trtllm-cpu (or convert on the machine and path Triton uses)",
            )
        ]
    return []


def _repository_problems(settings: RepositorySettings, root: Path) -> list[PhloraError]:
    path = Path(root) / SETTINGS_FILE
    stored = json.loads(path.read_text()).get("backend") if path.is_file() else None
    row = settings.engine_row
    if stored in (None, row.name, *row.aliases):
        return []
    return [
        OptionError(
            "the repository serves another engine",
            where=f"{path} backend",
            expected=row.name,
            found=str(stored),
            fix="convert into a new --model-repository",
        )
    ]


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
    layout: Layout = "padded",
) -> EngineForm:
    """Check ``adapter`` exact under the loader and write its PEFT folder into ``folder`` in ``layout``."""
    check_servable(adapter, name=name)
    folder.mkdir()
    save_for_trtllm(adapter, folder, name=name, dtype=out_dtype, layout=layout)
    modules, rank = modules_and_rank(adapter)
    return EngineForm(
        folder=folder,
        layout=None,
        nbytes=(folder / WEIGHTS_NAME).stat().st_size,
        dtype=str(out_dtype).removeprefix("torch."),
        need=model_yaml.Need(name, frozenset(modules), rank),
    )


def lora_path(settings: RepositorySettings, root: Path, lora_id: int) -> str | None:
    """The path the engine loads the adapter of ``lora_id`` from (registered with it)."""
    return str(Path(settings.served(root)) / STORE / str(lora_id))


def check_staged(
    settings: RepositorySettings, root: Path, staged: dict[str, EngineForm], *, options: Any, tp: int
) -> None:
    """Refuse, before the registry lock is taken, adapters a fixed model.yaml does not cover."""
    _model_yaml(settings, Registry(root).read(), root, staged, options=options, tp=tp)


def check_fit(
    settings: RepositorySettings,
    state: RegistryState,
    root: Path,
    staged: dict[str, EngineForm],
    *,
    options: Any,
    tp: int,
) -> Fit:
    """Refuse, before anything moves, a lora_id whose store folder holds other weights; returns the
    model.yaml covering every registered adapter (those registered meanwhile included)."""
    for name, form in staged.items():
        entry = state.adapters[name]
        _check_no_collision(store_dir(root, entry.task_id), form.folder, name=name, lora_id=entry.task_id)
    config, said = _model_yaml(settings, state, root, staged, options=options, tp=tp)
    return Fit(config=config, notes=list(said))


def _model_yaml(
    settings: RepositorySettings,
    state: RegistryState,
    root: Path,
    staged: dict[str, EngineForm],
    *,
    options: Any,
    tp: int,
) -> tuple[model_yaml.LlmapiConfig, list[str]]:
    """The model.yaml covering this run's adapters and those registered, and what changed in it."""
    opts = options if isinstance(options, Options) else Options()
    existing_yaml = yaml_path(root)
    start_from = opts.model_yaml or (existing_yaml if existing_yaml.exists() else None)
    fresh = model_yaml.LlmapiConfig(
        model=opts.served_base or str(Path(settings.base).resolve()),
        lora_target_modules=(),
        max_lora_rank=1,
        max_loras=opts.max_loras,
        max_cpu_loras=opts.max_cpu_loras,
        tensor_parallel_size=tp,
        pipeline_parallel_size=opts.pp,
    )
    needs = []
    for name, entry in sorted(state.adapters.items()):
        folder = store_dir(root, entry.task_id)
        if name not in staged and folder.is_dir():
            modules, rank = trtllm_modules_of(folder)
            needs.append(model_yaml.Need(name, frozenset(modules), rank))
    needs += [form.need for form in staged.values()]
    existing = model_yaml.read(start_from) if start_from is not None else None
    return model_yaml.plan(existing, fresh, needs, fixed=opts.fixed)


def _weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()


def _check_no_collision(target: Path, staged: Path, *, name: str, lora_id: int) -> None:
    """A store folder already at ``lora_id`` must hold these very weights: the engine caches by the id.

    Raises:
        OutputError: the folder holds other weights (edited or copied in by hand); nothing is written.
    """
    if not target.is_dir():
        return
    if not (target / WEIGHTS_NAME).is_file() or _weights_digest(target) != _weights_digest(staged):
        raise OutputError(
            "lora_id collision: the store folder of this id holds other weights, and the engine caches "
            "adapters by id (it would serve them for this adapter)",
            where=str(target),
            expected=f"the weights of {name!r} (lora_id {lora_id}) or no folder",
            found="other or unreadable weights",
            fix="move that folder out of the store (it is not registered under this id's weights), then run again",
        )


def place(
    root: Path, state: RegistryState, entry: AdapterEntry, old: AdapterEntry | None, form: EngineForm, *, grace: float
) -> None:
    """Move the staged folder to its lora_id (already there: the same weights); an older id's folder
    goes after ``grace`` seconds."""
    target = store_dir(root, entry.task_id)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(form.folder, target)
    if old is not None and old.task_id != entry.task_id:
        state.delete_later(root, store_dir(root, old.task_id), grace=grace, adapter=old.name)


def unchanged(root: Path, entry: AdapterEntry) -> bool:
    """The folder of a re-registered adapter with the same weights is in place."""
    return store_dir(root, entry.task_id).is_dir()


def engine_files(root: Path, entry: AdapterEntry) -> list[Path]:
    """The engine's files of a registered adapter (removed with it, after the grace period)."""
    return [store_dir(root, entry.task_id)]


def notes(settings: RepositorySettings, root: Path, fit: Fit | None) -> list[str]:
    """What the user should know after ``convert``: model.yaml changes, and where NVIDIA's model files go."""
    said = list(fit.notes) if fit is not None else []
    if not settings.engine_row.cpu_reference:
        said += instructions(str(Path(settings.served(root)) / MODEL_NAME / "1"))
    return said
