"""``phlora-nim convert``: fine-tuned checkpoints → adapters registered in a Triton model repository.

Plan first (names, options, every checkpoint pair), then extract each adapter, lay it out for the
engine and stage it inside the repository; only then, under the registry lock, register them and move
the staged folders into place. A failure before that point leaves the repository exactly as it was.

The engine is reached through its package's ``staging`` and ``deploy`` modules (the steps are listed
in :mod:`phlora_nim.engines.trtllm_legacy.staging`): the legacy TensorRT-LLM engine (npy pairs in the
prefetch folder) and the llmapi engine (PEFT folders in ``tensorrt_llm/lora_store/<lora_id>/``, a
``model.yaml`` covering them) go through the same job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from phlora_nim.converters.adapter import adapter_digest
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.extraction_report import ExtractionReport
from phlora_nim.converters.formats.peft import stored_parameters
from phlora_nim.converters.hub import resolve
from phlora_nim.converters.scale_rules import Layout
from phlora_nim.core.atomic import replace_dir, staging_dir
from phlora_nim.core.errors import InputError, OptionError, OutputError, PhloraError, raise_all
from phlora_nim.core.names import validate_adapter_name
from phlora_nim.core.outputs import overlapping_input
from phlora_nim.engines.trtllm_legacy.cache_settings import check_served_path
from phlora_nim.engines.trtllm_legacy.nim_store import save_nim_adapter
from phlora_nim.jobs.maintenance import check_grace
from phlora_nim.jobs.pipeline import (
    Extracted,
    Planned,
    PlannedPair,
    extract_adapter,
    planned,
    require_config,
    write_report_files,
)
from phlora_nim.repository.layout import (
    DEFAULT_GRACE_S,
    LLM_MODEL,
    PREFETCH_DIR,
    REGISTRY_FILE,
    SETTINGS_FILE,
    adapter_store_dir,
    base_tokenizer_dir,
)
from phlora_nim.repository.registry import AdapterEntry, Registry
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.repository.tokenizer_files import copy_tokenizer_files

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
        keep_stored: names of ``settings`` fields not given by the user: a repository that has
            settings keeps its values for them (``settings`` holds the defaults).
        replace: allow re-registering a name with different weights.
        grace: seconds the files of a replaced adapter's old weights are kept (a router may still
            route to them until it reads the new registry).
        tp: tensor parallelism of the engine (fused modules are interleaved per rank).
        engine_config: a TensorRT-LLM engine ``config.json`` every adapter must fit.
        strict: refuse a module the engine would compute wrongly (o_proj where heads × head_dim ≠
            hidden size) instead of leaving it out of the TensorRT-LLM rows with a warning.
        check_served_path: refuse unless ``settings.served_path`` is this repository here (run
            where Triton mounts it: the chart's conversion Job).
        engine_options: the engine's own options (its staging module's ``Options``; None: defaults).
        layout: how the engine's PEFT folders store ranks that differ per module (``padded`` or ``mixed``,
            :mod:`~phlora_nim.converters.scale_rules`); an engine whose form cannot take it refuses it.
        notes: filled by ``convert``: what the user should know (model.yaml changes, files to put in place).
    """

    base: Path
    finetuned: tuple[Path, ...]
    names: tuple[str, ...]
    repository: Path
    options: ExtractOptions
    settings: RepositorySettings
    keep_stored: frozenset[str] = frozenset()
    replace: bool = False
    grace: float = DEFAULT_GRACE_S
    tp: int = 1
    engine_config: Path | None = None
    strict: bool = False
    check_served_path: bool = False
    engine_options: Any = None
    layout: Layout = "padded"
    notes: list[str] = dataclasses.field(default_factory=list, compare=False)

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
        check_grace(self.grace)
        unknown = self.keep_stored - {f.name for f in fields(RepositorySettings)} | (self.keep_stored & {"base"})
        if unknown:
            raise ValueError(f"not repository settings that can be kept: {sorted(unknown)}")

    def adapter_names(self) -> list[str]:
        return list(self.names) or [Path(p).resolve().name for p in self.finetuned]


@dataclass(frozen=True)
class Converted:
    """What ``convert`` registered for one fine-tune (``adapter_bytes``: the engine's form)."""

    entry: AdapterEntry
    report: ExtractionReport
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


def _resolved_sources(job: ConvertJob) -> ConvertJob:
    """Hub ids among the checkpoints replaced by their snapshot folders in the hub cache."""
    base = resolve(job.base, flag="--base")
    if base.hub_id is None and all(Path(f).exists() for f in job.finetuned):
        return job
    finetuned = tuple(resolve(f, flag="--finetuned").path for f in job.finetuned)
    settings = dataclasses.replace(job.settings, base=str(base.path)) if base.hub_id else job.settings
    return dataclasses.replace(job, base=base.path, finetuned=finetuned, settings=settings)


def _settings(job: ConvertJob) -> RepositorySettings:
    """The settings to write: the job's, with the stored ones where the user gave none.

    Raises:
        InputError: the base checkpoint does not exist.
        OptionError: the repository serves adapters of another base or dtype.
    """
    if not Path(job.base).exists():
        # Checked first: a missing base would otherwise read as "another base" below.
        raise InputError(
            "base checkpoint not found",
            where=str(job.base),
            expected="the base model's folder",
            fix="check --base",
        )
    old = RepositorySettings.load(job.repository)
    if old is None:
        return job.settings
    new = dataclasses.replace(job.settings, **{name: getattr(old, name) for name in job.keep_stored})
    for field, new_value, flag in (
        ("base", str(Path(job.settings.base).resolve()), "--base"),
        ("dtype", new.dtype, "--dtype"),
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
    return new


def _is_ours(root: Path) -> bool:
    """An empty folder, a repository ``convert`` wrote, or one another ``convert`` is creating right now.

    Another ``convert`` first stages inside ``tensorrt_llm/``, then takes the registry lock (its
    file marks the folder as ours) before it moves anything into place.
    """
    registry = Registry(root)
    if any(p.exists() for p in (registry.path, registry.lock_path, root / SETTINGS_FILE)):
        return True
    return all(
        entry.name == LLM_MODEL and entry.is_dir() and all(p.name.startswith(".staging-") for p in entry.iterdir())
        for entry in root.iterdir()
    )


def _check_apart_from_inputs(root: Path, inputs: Sequence[Path | str | None]) -> None:
    """A model repository that is, holds or lies inside a checkpoint could overwrite it: refused."""
    overlap = overlapping_input(root, inputs)
    if overlap is not None:
        source, how = overlap
        raise OutputError(
            f"the model repository {how} an input",
            where=f"--model-repository {root}",
            expected="a folder apart from the base and fine-tuned checkpoints",
            found=f"input {source}",
            fix="choose a --model-repository outside the checkpoints",
        )


def _check_repository(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise OutputError("model repository is not a folder", where=str(root), fix="choose another --model-repository")
    if root.is_dir() and not _is_ours(root):
        found = sorted(p.name for p in root.iterdir())
        raise OutputError(
            "the folder is neither empty nor a phlora-nim model repository",
            where=str(root),
            expected=f"an empty or new folder, or one holding {REGISTRY_FILE}",
            found=f"{len(found)} other entries: {', '.join(found[:5])}{', …' if len(found) > 5 else ''}",
            fix="choose a new --model-repository (it is created)",
        )
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise OutputError(
            "model repository is not writable", where=str(probe), found="no write permission", fix="fix permissions"
        )


@contextlib.contextmanager
def _created_on_failure_removed(root: Path) -> Iterator[None]:
    """Create ``root`` (and missing parents); on failure remove those left empty: nothing left behind."""
    created = [p for p in (root, *root.absolute().parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in (root / PREFETCH_DIR, root / LLM_MODEL, *created):
            with contextlib.suppress(OSError):  # not empty: another convert is filling it
                folder.rmdir()
        raise


@contextlib.contextmanager
def _staging(root: Path) -> Iterator[Path]:
    """A scratch folder inside the ``tensorrt_llm`` model folder (same filesystem; Triton ignores it)."""
    with staging_dir(root / LLM_MODEL) as tmp:
        yield tmp


@dataclass(frozen=True)
class StagedAdapter:
    """One fine-tune's adapter, written into the staging folder, waiting to be registered."""

    name: str
    extracted: Extracted
    store: Path  # the PEFT store folder (the engine's form itself where it is one)
    form: Any  # the engine's own form (its staging module's EngineForm): layout, bytes, files
    seconds: float


def _check_layout(layout: str, steps: ModuleType, engine_name: str) -> None:
    """Refuse a ``--layout`` the engine's adapter form cannot take (its staging module's ``LAYOUTS``)."""
    if layout not in steps.LAYOUTS:
        raise OptionError(
            f"--backend {engine_name} cannot take --layout {layout}",
            where="--layout",
            expected=" or ".join(steps.LAYOUTS),
            found=layout,
            fix="drop --layout; mixed-rank PEFT folders are for engines that read them (see README, --layout)",
        )


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
    job = _resolved_sources(job)
    root = Path(job.repository)
    _check_apart_from_inputs(root, (job.base, *job.finetuned, job.options.calibration))
    _check_repository(root)
    job = dataclasses.replace(job, settings=_settings(job), keep_stored=frozenset())
    steps = job.settings.engine_row.module("staging")
    _check_layout(job.layout, steps, job.settings.engine_row.name)
    settings, engine = steps.prepare(job.settings, job.engine_config, root=root, options=job.engine_options)
    job = dataclasses.replace(job, settings=settings)
    if job.check_served_path:
        check_served_path(job.settings, root)
    with planned(job.base, job.finetuned, job.options, on_plan=on_plan) as plan:
        model_config = require_config(plan)
        with _created_on_failure_removed(root), _staging(root) as stage:
            staged = _stage_all(
                job,
                plan,
                names,
                on_adapter=on_adapter,
                stage=stage,
                model_config=model_config,
                engine=engine,
                steps=steps,
                command=command,
                progress=progress,
            )
            # Refused before the registry lock is taken (its file would stay): what the engine's model cannot cover.
            steps.check_staged(
                job.settings, root, {i.name: i.form for i in staged}, options=job.engine_options, tp=job.tp
            )
            tokenizer = stage / "base.tokenizer"  # for the router's HTTP front
            has_tokenizer = copy_tokenizer_files(job.base, tokenizer)
            # Moved into place under the registry lock: concurrent converts (one pod per fine-tune) each
            # replace it, and two renames onto one folder at once would fail.
            return _register(job, root, staged, steps, tokenizer=tokenizer if has_tokenizer else None)


def _stage_all(job: ConvertJob, plan: Planned, names: list[str], **kw: Any) -> list[StagedAdapter]:
    """Every adapter staged; the engine's refusals of all of them collected into one error."""
    staged: list[StagedAdapter] = []
    refused: list[PhloraError] = []
    on_adapter = kw.pop("on_adapter")
    for name, pair in zip(names, plan.pairs, strict=True):
        if on_adapter:
            on_adapter(name)
        item = _stage(job, plan, pair, name=name, **kw)
        if isinstance(item, PhloraError):
            refused.append(item)
        else:
            staged.append(item)
    raise_all(refused, summary="adapters the engine cannot serve exactly (nothing written)")
    return staged


def _stage(
    job: ConvertJob,
    plan: Planned,
    pair: PlannedPair,
    *,
    name: str,
    stage: Path,
    model_config: dict[str, Any],
    engine: dict[str, Any] | None,
    steps: ModuleType,
    command: str | None,
    progress: Callable[[str], None] | None,
) -> StagedAdapter | PhloraError:
    """Extract one adapter and write the PEFT store folder and the engine's own form into ``stage``
    (the engine's refusal returned, so that every adapter's is reported at once)."""
    start = time.perf_counter()
    extracted = extract_adapter(plan, pair, command=command, progress=progress)
    try:
        form = steps.stage(
            extracted.adapter,
            stage / f"{name}.lora",
            name=name,
            settings=job.settings,
            model_config=model_config,
            architecture=pair.plan.architecture,
            engine=engine,
            engine_where=str(job.engine_config),
            tp=job.tp,
            strict=job.strict,
            source=f"{name} ({pair.path})",
            out_dtype=extracted.out_dtype,
            layout=job.layout,
        )
        extracted = dataclasses.replace(
            extracted,
            report=extracted.report.with_totals(
                layout=job.layout, stored_parameters=stored_parameters(extracted.adapter, job.layout)
            ),
        )
    except PhloraError as exc:
        return exc
    if not steps.PEFT_STORE:  # the engine's form is the PEFT folder: the report goes beside its weights
        write_report_files(extracted.report, form.folder, plot=False)
        return StagedAdapter(
            name=name, extracted=extracted, store=form.folder, form=form, seconds=time.perf_counter() - start
        )
    store = stage / f"{name}.store"
    store.mkdir()
    save_nim_adapter(extracted.adapter, store, dtype=extracted.out_dtype)
    write_report_files(extracted.report, store)
    copy_tokenizer_files(pair.path, store)  # the fine-tune's own tokenizer and chat template, if it has them
    return StagedAdapter(name=name, extracted=extracted, store=store, form=form, seconds=time.perf_counter() - start)


def _register(
    job: ConvertJob,
    root: Path,
    staged: list[StagedAdapter],
    steps: ModuleType,
    *,
    tokenizer: Path | None = None,
) -> list[Converted]:
    registry = Registry(root)
    done: list[Converted] = []
    with registry.locked() as state:
        if tokenizer is not None:
            state.after_commit.append(lambda: replace_dir(tokenizer, base_tokenizer_dir(root)))
        entries = []
        for item in staged:
            old = state.adapters.get(item.name)
            digest, ranks = adapter_digest(item.extracted.adapter), item.extracted.adapter.ranks()
            entry = state.add(
                item.name,
                digest,
                ranks,
                dtype=item.form.dtype,
                sources={"base": str(Path(job.base).resolve()), "finetuned": str(item.extracted.finetuned.resolve())},
                replace=job.replace,
                trtllm_layout=item.form.layout,
            )
            path = steps.lora_path(job.settings, root, entry.task_id)  # known once the id is
            if path is not None:
                entry = state.add(item.name, digest, ranks, dtype=entry.dtype, sources=entry.sources, lora_path=path)
            entries.append((entry, old))
        # Refused here, before anything moves: adapters the engine cannot hold.
        fit = steps.check_fit(
            job.settings, state, root, {i.name: i.form for i in staged}, options=job.engine_options, tp=job.tp
        )
        for (entry, old), item in zip(entries, staged, strict=True):
            unchanged = (
                old is not None
                and old.digest == entry.digest
                and steps.unchanged(root, entry)
                and (not steps.PEFT_STORE or adapter_store_dir(root, item.name).is_dir())
            )
            if not unchanged:  # the same weights again: leave its files (and report) as they are
                steps.place(root, state, entry, old, item.form, grace=job.grace)
                if steps.PEFT_STORE:
                    replace_dir(item.store, adapter_store_dir(root, item.name))
            done.append(
                Converted(
                    entry=entry, report=item.extracted.report, adapter_bytes=item.form.nbytes, seconds=item.seconds
                )
            )
        job.settings.engine_row.module("deploy").write_repository(root, job.settings, state, fit)
    job.notes.extend(steps.notes(job.settings, root, fit))
    return done
