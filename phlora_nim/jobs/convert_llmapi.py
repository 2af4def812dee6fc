"""``phlora-nim convert --backend trtllm`` (and ``trtllm-cpu``): fine-tunes → PEFT folders in an adapter
store that TensorRT-LLM's ``llmapi`` Triton model reads by path, registered, with the model's
``config.pbtxt`` and a ``model.yaml`` whose ``lora_config`` covers every adapter.

Everything is checked before anything is written: names, checkpoints, what the loader can apply
(:func:`~phlora_nim.engines.trtllm_llmapi.adapter_folder.check_servable`), the store path Triton sees,
and — with an operator's fixed ``model.yaml`` — its coverage. Adapters are staged inside the
repository, then registered and moved into place under the registry lock.

Layout (inside the ``tensorrt_llm`` model folder, which Triton skips but for ``1/``)::

    tensorrt_llm/config.pbtxt            the llmapi model's interface (upstream's)
    tensorrt_llm/1/model.yaml            LLM() arguments, lora_config
    tensorrt_llm/1/model.py              trtllm-cpu: phlora-nim's reference; trtllm: NVIDIA's (+ helpers.py)
    tensorrt_llm/lora_store/<lora_id>/   one PEFT folder per adapter weights (ids never reused)
    tensorrt_llm/tokenizer/              the base tokenizer (the router's OpenAI front)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phlora_nim.converters.adapter import LoraAdapter, adapter_digest
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import WEIGHTS_NAME
from phlora_nim.core.atomic import staging_dir
from phlora_nim.core.errors import OptionError, OutputError, PhloraError, raise_all
from phlora_nim.core.names import validate_adapter_name
from phlora_nim.engines.registry import Engine
from phlora_nim.engines.trtllm_llmapi import model_yaml
from phlora_nim.engines.trtllm_llmapi.adapter_folder import check_servable, modules_and_rank, save_for_trtllm
from phlora_nim.engines.trtllm_llmapi.deploy import STORE, store_dir, write_model, yaml_path
from phlora_nim.engines.trtllm_llmapi.interface import MODEL_NAME
from phlora_nim.engines.trtllm_llmapi.loader_rule import trtllm_modules_of
from phlora_nim.engines.trtllm_llmapi.upstream_files import instructions
from phlora_nim.jobs.pipeline import Extracted, extract_adapter, planned, write_report_files
from phlora_nim.repository.layout import DEFAULT_GRACE_S, REGISTRY_FILE, SETTINGS_FILE, base_tokenizer_dir
from phlora_nim.repository.registry import AdapterEntry, Registry
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.repository.tokenizer_files import copy_tokenizer_files

log = logging.getLogger("phlora_nim")

__all__ = ["STORE", "Converted", "LlmapiJob", "convert_llmapi", "store_dir"]


@dataclass(frozen=True)
class LlmapiJob:
    """One ``convert`` call for the llmapi engine.

    Args:
        engine: the ``trtllm`` or ``trtllm-cpu`` row of the engine table.
        served_root: where the Triton replicas see ``repository`` (lora_path is built under it);
            default: ``repository`` itself (``trtllm-cpu`` requires that: its Triton runs here).
        served_base: ``model:`` of model.yaml — the base checkpoint as the replicas see it (default: ``base``).
        model_yaml: an operator's model.yaml to start from (its other LLM() arguments are kept).
        fixed: use that model.yaml's lora_config as is: adapters it does not cover are refused.
    """

    base: Path
    finetuned: tuple[Path, ...]
    names: tuple[str, ...]
    repository: Path
    options: ExtractOptions
    engine: Engine
    served_root: str | None = None
    served_base: str | None = None
    model_yaml: Path | None = None
    fixed: bool = False
    tp: int = 1
    pp: int = 1
    max_loras: int = 8
    max_cpu_loras: int = 32
    replace: bool = False
    grace: float = DEFAULT_GRACE_S
    notes: list[str] = field(default_factory=list, compare=False)

    def adapter_names(self) -> list[str]:
        return list(self.names) or [Path(p).resolve().name for p in self.finetuned]

    def served(self) -> Path:
        return Path(self.served_root) if self.served_root else Path(self.repository).resolve()


@dataclass(frozen=True)
class Converted:
    entry: AdapterEntry
    report: dict[str, Any]
    seconds: float


def _check(job: LlmapiJob) -> list[str]:
    """Names, flags, the store path and the repository folder: every problem in one error."""
    names = job.adapter_names()
    problems = [*_name_problems(job, names), *_served_problems(job), *_repository_problems(job)]
    raise_all(problems, summary="convert cannot start")
    return names


def _name_problems(job: LlmapiJob, names: list[str]) -> list[PhloraError]:
    problems: list[PhloraError] = []
    if not job.finetuned:
        problems.append(OptionError("no fine-tuned checkpoint given", where="--finetuned", fix="pass --finetuned DIR"))
    if job.names and len(job.names) != len(job.finetuned):
        problems.append(
            OptionError(
                "one --name per --finetuned",
                where="--name",
                expected=f"{len(job.finetuned)} names",
                found=str(len(job.names)),
            )
        )
    for name in names:
        try:
            validate_adapter_name(name)
        except PhloraError as exc:
            problems.append(exc)
    if len(set(names)) != len(names):
        problems.append(OptionError("adapter name given twice", where="--name", found=", ".join(names)))
    return problems


def _served_problems(job: LlmapiJob) -> list[PhloraError]:
    """The store path Triton sees must be absolute, and for the CPU reference the path convert writes."""
    served = job.served()
    if not served.is_absolute():
        return [
            OptionError(
                "the store path Triton sees must be absolute",
                where="--served-path",
                found=str(served),
                fix="give the repository's mount path in the Triton pods, e.g. /models",
            )
        ]
    if job.engine.cpu_reference and served != Path(job.repository).resolve():
        return [
            OptionError(
                "store path Triton cannot see: the CPU reference's Triton runs on this machine and reads the "
                "adapters where convert writes them",
                where="--served-path",
                expected=str(Path(job.repository).resolve()),
                found=str(served),
                fix="drop --served-path for trtllm-cpu (or convert on the machine and path Triton uses)",
            )
        ]
    return []


def _repository_problems(job: LlmapiJob) -> list[PhloraError]:
    """An empty or new folder, or a repository of this engine."""
    root = Path(job.repository)
    if root.exists() and not root.is_dir():
        return [OutputError("model repository is not a folder", where=str(root))]
    if not root.is_dir() or not any(root.iterdir()):
        return []
    if not ((root / REGISTRY_FILE).exists() or (root / SETTINGS_FILE).exists()):
        return [
            OutputError(
                "the folder is neither empty nor a phlora-nim model repository",
                where=str(root),
                expected=f"an empty or new folder, or one holding {REGISTRY_FILE}",
                fix="choose a new --model-repository (it is created)",
            )
        ]
    settings = json.loads((root / SETTINGS_FILE).read_text()) if (root / SETTINGS_FILE).exists() else {}
    if settings.get("backend") in (None, job.engine.name, *job.engine.aliases):
        return []
    return [
        OptionError(
            "the repository serves another engine",
            where=f"{root / SETTINGS_FILE} backend",
            expected=job.engine.name,
            found=str(settings.get("backend")),
            fix="convert into a new --model-repository",
        )
    ]


def _needs_of(state_entries: dict[str, AdapterEntry], root: Path, skip: set[str]) -> list[model_yaml.Need]:
    """What the adapters already registered need (read from their folders)."""
    needs = []
    for name, entry in sorted(state_entries.items()):
        folder = store_dir(root, entry.task_id)
        if name in skip or not folder.is_dir():
            continue
        modules, rank = trtllm_modules_of(folder)
        needs.append(model_yaml.Need(name, frozenset(modules), rank))
    return needs


def convert_llmapi(
    job: LlmapiJob,
    *,
    command: str | None = None,
    on_plan: Callable[[int], None] | None = None,
    progress: Callable[[str], None] | None = None,
    on_adapter: Callable[[str], None] | None = None,
) -> list[Converted]:
    """Extract, check, write and register every fine-tune of ``job``; returns one :class:`Converted` each.

    Raises:
        PhloraError: bad names or options, a store path Triton cannot see, an adapter the loader cannot
            apply exactly, or (``fixed``) one the model.yaml does not cover — nothing is written then.
    """
    names = _check(job)
    root = Path(job.repository)
    extracted: list[tuple[str, Extracted, float]] = []
    with planned(job.base, job.finetuned, job.options, on_plan=on_plan) as plan:
        for name, pair in zip(names, plan.pairs, strict=True):
            if on_adapter:
                on_adapter(name)
            t0 = time.perf_counter()
            extracted.append((name, extract_adapter(plan, pair, command=command, progress=progress), t0))
    problems: list[PhloraError] = []
    for name, ex, _ in extracted:
        try:
            check_servable(ex.adapter, name=name)
        except PhloraError as exc:
            problems.append(exc)
    raise_all(problems, summary="adapters TensorRT-LLM cannot serve exactly (nothing written)")
    config, notes = _model_yaml(job, root, extracted)
    root.mkdir(parents=True, exist_ok=True)
    with staging_dir(root / MODEL_NAME) as stage:  # Triton skips it inside the model folder
        staged = {}
        for name, ex, _ in extracted:
            staged[name] = stage / name
            staged[name].mkdir()
            save_for_trtllm(ex.adapter, staged[name], name=name, dtype=ex.out_dtype)
            write_report_files(ex.report, staged[name], plot=False)
        done = _register(job, root, extracted, staged, config)
        if copy_tokenizer_files(job.base, stage / "base.tokenizer"):  # for the router's OpenAI front
            target = base_tokenizer_dir(root)
            if target.exists():
                shutil.rmtree(target)
            os.replace(stage / "base.tokenizer", target)
    job.notes.extend(notes)
    if not job.engine.cpu_reference:
        job.notes.extend(instructions(str(job.served() / MODEL_NAME / "1")))
    return done


def _model_yaml(
    job: LlmapiJob, root: Path, extracted: list[tuple[str, Extracted, float]]
) -> tuple[model_yaml.LlmapiConfig, list[str]]:
    """The model.yaml covering this run's adapters and those already registered, and what changed."""
    existing_yaml = yaml_path(root)
    start_from = job.model_yaml or (existing_yaml if existing_yaml.exists() else None)
    fresh = model_yaml.LlmapiConfig(
        model=job.served_base or str(Path(job.base).resolve()),
        lora_target_modules=(),
        max_lora_rank=1,
        max_loras=job.max_loras,
        max_cpu_loras=job.max_cpu_loras,
        tensor_parallel_size=job.tp,
        pipeline_parallel_size=job.pp,
    )
    needs = _needs_of(Registry(root).read().adapters, root, skip={name for name, _, _ in extracted})
    needs += [_need(name, ex.adapter) for name, ex, _ in extracted]
    existing = model_yaml.read(start_from) if start_from is not None else None
    return model_yaml.plan(existing, fresh, needs, fixed=job.fixed)


def _register(
    job: LlmapiJob,
    root: Path,
    extracted: list[tuple[str, Extracted, float]],
    staged: dict[str, Path],
    config: model_yaml.LlmapiConfig,
) -> list[Converted]:
    """Under the registry lock: register every adapter (refusing id collisions), then move its folder in."""
    done: list[Converted] = []
    with Registry(root).locked() as state:
        planned_entries = []
        for name, ex, t0 in extracted:  # registered first, nothing moved: a refusal leaves all as it was
            old = state.adapters.get(name)
            digest = adapter_digest(ex.adapter)
            entry = state.add(
                name,
                digest,
                ex.adapter.ranks(),
                dtype=str(ex.out_dtype).removeprefix("torch."),
                sources={"base": str(Path(job.base).resolve()), "finetuned": str(ex.finetuned.resolve())},
                replace=job.replace,
            )
            served = job.served() / STORE / str(entry.task_id)
            entry = state.add(
                name, digest, ex.adapter.ranks(), dtype=entry.dtype, sources=entry.sources, lora_path=str(served)
            )
            _check_no_collision(store_dir(root, entry.task_id), staged[name], name=name, lora_id=entry.task_id)
            planned_entries.append((entry, old, ex, t0))
        for entry, old, ex, t0 in planned_entries:
            target = store_dir(root, entry.task_id)
            if not target.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged[entry.name], target)
            if old is not None and old.task_id != entry.task_id:
                state.delete_later(root, store_dir(root, old.task_id), grace=job.grace, adapter=old.name)
            done.append(Converted(entry=entry, report=ex.report, seconds=time.perf_counter() - t0))
        write_model(root, config, cpu_reference=job.engine.cpu_reference)
        _write_settings(root, job)
    return done


def _need(name: str, adapter: LoraAdapter) -> model_yaml.Need:
    modules, rank = modules_and_rank(adapter)
    return model_yaml.Need(name, frozenset(modules), rank)


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


def _write_settings(root: Path, job: LlmapiJob) -> None:
    """``phlora_repository.json``: which engine, base and served path (read by later runs and the router)."""
    settings = RepositorySettings(
        backend=job.engine.name, base=str(Path(job.base).resolve()), served_path=str(job.served())
    )
    settings.save(root)
