"""``phlora-nim convert``: fine-tuned checkpoints → adapters registered in a Triton model repository.

Plan first (names, options, every checkpoint pair), then extract each adapter, lay it out for
TensorRT-LLM and stage both forms inside the repository; only then, under the registry lock,
register them and move the staged folders into place. A failure before that point leaves the
repository exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.checkpoint import open_checkpoint
from phlora_nim.converters.errors import InputError, OptionError, OutputError, PhloraError, raise_all
from phlora_nim.converters.extract import DTYPES, ExtractionPlan, ExtractOptions, plan_extraction, run_extraction
from phlora_nim.converters.formats.nim import save_nim_adapter
from phlora_nim.converters.formats.trtllm import TRTLLM_MODULES, adapter_to_trtllm, check_engine, save_trtllm
from phlora_nim.converters.names import validate_adapter_name
from phlora_nim.converters.report import build_report, write_report
from phlora_nim.jobs.adapter_jobs import read_json
from phlora_nim.jobs.plots import PLOT_NAME, plot_energy
from phlora_nim.repository.configs import RepositorySettings, require_engine_config, write_repository
from phlora_nim.repository.layout import LLM_MODEL, PREFETCH_DIR, adapter_store_dir, prefetch_dir
from phlora_nim.repository.registry import AdapterEntry, Registry, RegistryState

log = logging.getLogger("phlora_nim")


@dataclass(frozen=True)
class ConvertJob:
    """One ``convert`` call: several fine-tunes of one base into one repository.

    Args:
        base: the base checkpoint folder.
        finetuned: fine-tuned checkpoint folders (full fine-tunes of ``base``).
        names: adapter names, one per fine-tune (default: each folder's name).
        repository: the Triton model repository folder.
        options: extraction options (rank policy, device …).
        settings: how the repository's models are generated (backend, engine dtype …).
        replace: allow re-registering a name with different weights.
        tp: tensor parallelism of the engine (fused modules are interleaved per rank).
        engine_config: a TensorRT-LLM engine ``config.json`` every adapter must fit.
    """

    base: Path
    finetuned: tuple[Path, ...]
    names: tuple[str, ...]
    repository: Path
    options: ExtractOptions
    settings: RepositorySettings
    replace: bool = False
    tp: int = 1
    engine_config: Path | None = None

    def __post_init__(self) -> None:
        if not self.finetuned:
            raise OptionError("no fine-tuned checkpoint given", where="--finetuned", fix="pass --finetuned DIR")
        if self.names and len(self.names) != len(self.finetuned):
            raise OptionError(
                "one --name per --finetuned",
                where="--name",
                expected=f"{len(self.finetuned)} names",
                found=f"{len(self.names)}",
                fix="give every fine-tune a name, or none (folder names are used)",
            )
        if self.tp < 1:
            raise OptionError("tensor parallelism must be ≥ 1", where="--tp", found=str(self.tp))

    def adapter_names(self) -> list[str]:
        return list(self.names) or [Path(p).resolve().name for p in self.finetuned]


@dataclass(frozen=True)
class Converted:
    """What ``convert`` registered for one fine-tune."""

    entry: AdapterEntry
    report: dict[str, Any]
    adapter_bytes: int
    seconds: float


def _check_names(job: ConvertJob) -> list[str]:
    names = job.adapter_names()
    problems: list[PhloraError] = []
    for i, name in enumerate(names):
        try:
            validate_adapter_name(name, where=f"--name #{i + 1}" if job.names else f"folder name of {job.finetuned[i]}")
        except PhloraError as exc:
            problems.append(exc)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(OptionError("adapter name given twice", where="--name", found=repr(name)))
        seen.add(name)
    raise_all(problems, summary="bad adapter names")
    return names


def _check_settings(job: ConvertJob) -> None:
    old = RepositorySettings.load(job.repository)
    if old is None:
        return
    for field, new_value, flag in (
        ("base", str(Path(job.settings.base).resolve()), "--base"),
        ("dtype", job.settings.dtype, "--dtype"),
    ):
        old_value = getattr(old, field) if field != "base" else str(Path(old.base).resolve())
        if old_value != new_value:
            raise OptionError(
                f"the repository serves adapters for another {field}",
                where=f"{job.repository} ({flag})",
                expected=old_value,
                found=new_value,
                fix=f"pass {flag} {old_value}, or convert into a new --model-repository",
            )


def _check_repository(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise OutputError("model repository is not a folder", where=str(root), fix="choose another --model-repository")
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise OutputError(
            "model repository is not writable", where=str(probe), found="no write permission", fix="fix permissions"
        )


@contextlib.contextmanager
def _staging(root: Path) -> Iterator[Path]:
    """A scratch folder inside the ``tensorrt_llm`` model folder (same filesystem; Triton ignores it)."""
    parent = root / LLM_MODEL
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` onto ``target`` (replacing it) with renames only."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / "old")
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)


def convert(
    job: ConvertJob,
    *,
    command: str | None = None,
    on_plan: Callable[[int], None] | None = None,
    progress: Callable[[str], None] | None = None,
    on_adapter: Callable[[str], None] | None = None,
) -> list[Converted]:
    """Extract, lay out and register every fine-tune of ``job``.

    Args:
        command: the command line, recorded in each adapter's report.
        on_plan: called once with the total number of tensors to process.
        progress: called per processed tensor.
        on_adapter: called with each adapter's name when its extraction starts.

    Returns:
        One :class:`Converted` per fine-tune, in order.

    Raises:
        PhloraError: bad names, options, checkpoints, or adapters the engine would reject
            (nothing is registered).
    """
    names = _check_names(job)
    root = Path(job.repository)
    _check_repository(root)
    _check_settings(job)
    require_engine_config(job.settings.backend, job.engine_config)
    engine = read_json(job.engine_config, what="engine config") if job.engine_config else None
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(job.base))
        pairs = [stack.enter_context(open_checkpoint(p)) for p in job.finetuned]
        model_config = read_json(Path(job.base) / "config.json", what="base model config")
        plans: list[ExtractionPlan] = []
        problems: list[PhloraError] = []
        for ft in pairs:
            try:
                plans.append(plan_extraction(base, ft, job.options))
            except PhloraError as exc:
                problems.append(exc)
        raise_all(problems, summary="cannot convert every fine-tune")
        for plan in plans:
            for w in plan.warnings:
                log.warning(w)
        if on_plan:
            on_plan(sum(len(p.targets) + len(p.extras) for p in plans))
        root.mkdir(parents=True, exist_ok=True)
        with _staging(root) as stage:
            staged: list[tuple[str, LoraAdapter, dict[str, Any], Path, Path, float, int]] = []
            for name, ft_path, ft, plan in zip(names, job.finetuned, pairs, plans, strict=True):
                if on_adapter:
                    on_adapter(name)
                start = time.perf_counter()
                result = run_extraction(plan, base, ft, job.options, progress=progress)
                adapter = result.adapter
                lora = adapter_to_trtllm(adapter, config=model_config, dtype=job.settings.dtype, tp=job.tp)
                if engine is not None:
                    check_engine(lora, engine, where=str(job.engine_config))
                report = build_report(result, job.options, base=str(job.base), finetuned=str(ft_path), command=command)
                store, tensors = stage / f"{name}.store", stage / f"{name}.lora"
                store.mkdir()
                tensors.mkdir()
                save_nim_adapter(adapter, store, dtype=plan.out_dtype)
                write_report(report, store)
                plot_energy(report, store / PLOT_NAME)
                save_trtllm(lora, tensors, source=f"{name} ({ft_path})")
                modules = sorted({TRTLLM_MODULES[int(m)] for m in lora.config[0, :, 0]})
                nbytes = int(lora.weights.nbytes + lora.config.nbytes)
                extra = {"trtllm_modules": modules, "bytes": nbytes, "rows": lora.num_rows, "tp": job.tp}
                staged.append((name, adapter, extra, store, tensors, time.perf_counter() - start, nbytes))
            return _register(job, root, staged)


def _register(
    job: ConvertJob, root: Path, staged: list[tuple[str, LoraAdapter, dict[str, Any], Path, Path, float, int]]
) -> list[Converted]:
    registry = Registry(root)
    done: list[Converted] = []
    with registry.locked() as state:
        entries = []
        for (name, adapter, extra, *_), ft_path in zip(staged, job.finetuned, strict=True):
            old = state.adapters.get(name)
            entry = Registry.add(
                state,
                name,
                adapter,
                dtype=job.settings.dtype,
                sources={"base": str(Path(job.base).resolve()), "finetuned": str(Path(ft_path).resolve())},
                replace=job.replace,
                extra=extra,
            )
            entries.append((entry, old))
        for (entry, old), (name, _, _, store, tensors, seconds, nbytes) in zip(entries, staged, strict=True):
            unchanged = (
                old is not None
                and old.digest == entry.digest
                and prefetch_dir(root, entry.task_id).is_dir()
                and adapter_store_dir(root, name).is_dir()
            )
            if not unchanged:  # the same weights again: leave its files (and report) as they are
                if old is not None and old.task_id != entry.task_id:
                    stale = prefetch_dir(root, old.task_id)
                    state.after_commit.append(lambda stale=stale: shutil.rmtree(stale, ignore_errors=True))
                _replace_dir(tensors, prefetch_dir(root, entry.task_id))
                _replace_dir(store, adapter_store_dir(root, name))
            report = read_json(adapter_store_dir(root, name) / "phlora_report.json", what="report")
            done.append(Converted(entry=entry, report=report, adapter_bytes=nbytes, seconds=seconds))
        write_repository(root, job.settings, state)
    return done


def remove_adapter(root: Path, name: str) -> AdapterEntry:
    """Unregister ``name`` and delete its folders; its task id stays reserved."""
    read_registry(root)  # a clear error when ``root`` is not a repository
    with Registry(Path(root)).locked() as state:
        entry = Registry.remove(state, name)
        for folder in (prefetch_dir(root, entry.task_id), adapter_store_dir(root, name)):
            # Deleted once the registry no longer lists the adapter: a router never finds it listed
            # without its files.
            state.after_commit.append(lambda folder=folder: shutil.rmtree(folder, ignore_errors=True))
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
        {m for e in state.adapters.values() for m in e.extra.get("trtllm_modules", [])},
        key=TRTLLM_MODULES.index,
    )
    max_rank = max(e.max_rank for e in state.adapters.values())
    plugin = dtype or (dtypes[0] if len(dtypes) == 1 else "auto")
    if dtype is not None and dtype not in DTYPES:
        raise OptionError("unknown dtype", where="--dtype", expected=", ".join(DTYPES), found=repr(dtype))
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
