"""The one extraction pipeline behind ``extract`` and ``convert``: open → plan → run → report → plot.

Every fine-tune is opened and planned before any heavy work, so bad input is refused (all problems
at once) before a tensor is decomposed or a file written. Each step returns a frozen result; what
a job writes, and where, stays with the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.calibration import InputStatistics, base_input_statistics
from phlora_nim.converters.checkpoint import Checkpoint, open_checkpoint
from phlora_nim.converters.embeddings import load_instructions
from phlora_nim.converters.extract import (
    ExtractionPlan,
    ExtractionResult,
    ExtractOptions,
    plan_extraction,
    run_extraction,
)
from phlora_nim.converters.extraction_report import ExtractionReport
from phlora_nim.converters.hub import resolve
from phlora_nim.converters.report import build_report, write_report
from phlora_nim.core.cpus import set_torch_threads
from phlora_nim.core.errors import InputError, OptionError, PhloraError, raise_all
from phlora_nim.jobs.plots import PLOT_NAME, plot_energy

log = logging.getLogger("phlora_nim")


@dataclass(frozen=True)
class PlannedPair:
    """One fine-tune, opened, with its extraction plan."""

    path: Path
    checkpoint: Checkpoint
    plan: ExtractionPlan


@dataclass(frozen=True)
class Planned:
    """The base and every fine-tune of one job, opened and planned (valid only inside :func:`planned`)."""

    base_path: Path
    base: Checkpoint
    pairs: tuple[PlannedPair, ...]
    options: ExtractOptions
    statistics: InputStatistics | None = None  # base model's input moments (--calibration)
    calibration_gaps: dict[Path, float] = dataclasses.field(default_factory=dict)  # KL(ft ‖ base) on them

    @property
    def tensor_count(self) -> int:
        """Tensors :func:`extract_adapter` will process over all pairs (for a progress bar)."""
        return sum(len(p.plan.targets) + len(p.plan.extras) for p in self.pairs)


@dataclass(frozen=True)
class Extracted:
    """One fine-tune's adapter, with the report of how it was made."""

    finetuned: Path
    adapter: LoraAdapter
    report: ExtractionReport
    out_dtype: torch.dtype
    seconds: float


@contextlib.contextmanager
def planned(
    base: Path,
    finetuned: Sequence[Path],
    options: ExtractOptions,
    *,
    on_plan: Callable[[int], None] | None = None,
) -> Iterator[Planned]:
    """Open ``base`` and every fine-tune and plan each extraction; the checkpoints close on exit.

    Args:
        base, finetuned: checkpoint folders, ``.safetensors`` files or hub ids (read through the hub cache).
        options: the extraction options every pair is planned with.
        on_plan: called with the number of tensors to process once every pair is planned.

    Raises:
        PhloraError: unreadable or mismatched checkpoints, bad options (every pair's problems in
            one error).
    """
    set_torch_threads(options.threads)
    base_src = resolve(base, flag="--base")
    ft_srcs = [resolve(p, flag="--finetuned") for p in finetuned]
    base = base_src.path
    with contextlib.ExitStack() as stack:
        base_ckpt = stack.enter_context(open_checkpoint(base_src.path))
        base_ckpt.name = base_src.name
        opened = []
        for src in ft_srcs:
            ckpt = stack.enter_context(open_checkpoint(src.path))
            ckpt.name = src.name
            opened.append((src.path, ckpt))
        pairs: list[PlannedPair] = []
        problems: list[PhloraError] = []
        for path, ckpt in opened:
            try:
                pairs.append(PlannedPair(path=path, checkpoint=ckpt, plan=plan_extraction(base_ckpt, ckpt, options)))
            except PhloraError as exc:
                problems.append(exc)
        raise_all(problems, summary="cannot extract an adapter from every fine-tune")
        for pair in pairs:
            for warning in pair.plan.warnings:
                log.warning(warning)
        statistics, gaps = None, {}
        if options.calibration is not None:
            modules = sorted({t.module for pair in pairs for t in pair.plan.targets})
            statistics = base_input_statistics(Path(base), options.calibration, modules)
            measured = {p.path: calibration_gap(Path(base), p.path, options.calibration) for p in pairs}
            gaps = {path: gap for path, gap in measured.items() if gap is not None}
        job = Planned(
            base_path=Path(base),
            base=base_ckpt,
            pairs=tuple(pairs),
            options=options,
            statistics=statistics,
            calibration_gaps=gaps,
        )
        if on_plan:
            on_plan(job.tensor_count)
        yield job


def calibration_gap(base: Path, finetuned: Path, prompts: Path) -> float | None:
    """KL(fine-tuned ‖ base) per token on the calibration prompts, with a warning when the fine-tune
    barely acts there: whitening then weights ΔW by inputs on which it does not act (the generic
    prompts shipped with phlora-nim, for a task fine-tune, often). None: not measurable (a
    checkpoint transformers cannot load as a causal LM)."""
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.jobs.fidelity import prompts_gap
    from phlora_nim.jobs.target_kl import MIN_GAP_KL

    try:
        gap, tokens = prompts_gap(base, finetuned, read_prompts(prompts, where="--calibration"))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError):
        log.debug("calibration gap of %s not measured", finetuned, exc_info=True)
        return None
    if gap < MIN_GAP_KL:
        log.warning(
            "--calibration %s: the fine-tune %s barely changes the model's outputs on these prompts "
            "(KL(fine-tuned ‖ base) %.3g nats/token over %d tokens, below %g): activation-aware extraction "
            "then weights ΔW by inputs where the fine-tune does not act. Calibrate on prompts of its task.",
            prompts, finetuned, gap, tokens, MIN_GAP_KL,
        )  # fmt: skip
    return gap


def extract_adapter(
    job: Planned,
    pair: PlannedPair,
    *,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
    dropped_hint: str = "",
) -> Extracted:
    """Run one planned extraction and build its report (nothing is written).

    Args:
        job, pair: from :func:`planned`.
        command: the command line, recorded in the report.
        progress: called per processed tensor.
        dropped_hint: appended to the warning about dropped non-linear deltas (how to keep them).

    Raises:
        InputError: a delta holds NaN/Inf, ``--extra error`` with changed non-linear tensors, or
            the fine-tune does not differ from the base.
        OptionError: the rank policy keeps no module.
    """
    start = time.perf_counter()
    if job.options.target is not None:
        from phlora_nim.jobs.target_kl import run_to_target

        outcome = run_to_target(job, pair, progress=progress)
        result, options = outcome.result, dataclasses.replace(job.options, policy=outcome.policy)
    else:
        result = run_extraction(
            pair.plan, job.base, pair.checkpoint, job.options, progress=progress, statistics=job.statistics
        )
        outcome, options = None, job.options
    _check_not_empty(result, pair.path)
    report = build_report(
        result,
        options,
        base=job.base.name or str(job.base_path),
        finetuned=pair.checkpoint.name or str(pair.path),
        command=command,
    )
    if outcome is not None and job.options.target is not None:
        report = dataclasses.replace(report, fidelity_target=outcome.report(job.options.target))
    if job.statistics is not None:
        gap = job.calibration_gaps.get(pair.path)
        calibration = {"prompts": str(job.options.calibration), **job.statistics.summary()}
        report = dataclasses.replace(
            report, calibration=calibration | ({"finetune_gap_kl": gap} if gap is not None else {})
        )
    _warn_dropped(result, report.totals, hint=dropped_hint)
    report = dataclasses.replace(report, loading=_loading_note(result, pair.checkpoint))
    return Extracted(
        finetuned=pair.path,
        adapter=result.adapter,
        report=report,
        out_dtype=pair.plan.out_dtype,
        seconds=time.perf_counter() - start,
    )


def _loading_note(result: ExtractionResult, ft: Checkpoint) -> str | None:
    """With saved embeddings or head, how to load the adapter under PEFT (resize the base first)."""
    saved = [x for x in result.extras if x.action == "saved" and x.plan.kind in ("embedding", "lm_head")]
    if not saved:
        return None
    resized = any(x.plan.resized for x in saved)
    vocab = max((x.plan.ft_shape[0] for x in saved if x.plan.resized), default=None)
    note = load_instructions(
        result.adapter.base_model_name_or_path or "BASE",
        vocab,
        resized=resized,
        tied=result.adapter.ensure_weight_tying,
    )
    if resized:
        log.warning("the fine-tune resized the vocabulary to %s: resize the base before loading the adapter:\n%s",
                    vocab, note)  # fmt: skip
    return note


def _check_not_empty(result: ExtractionResult, finetuned: Path) -> None:
    """An adapter that changes nothing is a mistake (the base passed twice), not an adapter."""
    adapter = result.adapter
    if adapter.modules or adapter.modules_to_save or adapter.lora_biases:
        return
    if all(r.factors is None for r in result.modules):
        changed = [x.plan.name for x in result.extras if x.action != "unchanged"]
        raise InputError(
            "no module differs from the base: there is no adapter to extract",
            where=str(finetuned),
            expected="a fine-tune whose linear weights differ from the base",
            found=f"all {len(result.modules)} LoRA target modules identical to the base"
            + (f" ({len(changed)} other tensors changed, e.g. {changed[0]})" if changed else ""),
            fix="pass the fine-tuned checkpoint, not a copy of the base",
        )
    raise OptionError(
        "the rank policy keeps no module",
        where=str(finetuned),
        expected="at least one module with rank ≥ 1",
        found="rank 0 for every module",
        fix="raise --budget-params or --energy",
    )


def write_report_files(report: ExtractionReport, folder: Path, *, plot: bool = True) -> None:
    """``phlora_report.json`` (and ``energy.png``) into an adapter folder being written."""
    data = report.to_json()
    write_report(data, folder)
    if plot:
        plot_energy(data, Path(folder) / PLOT_NAME)


def _warn_dropped(result: ExtractionResult, totals: dict[str, Any], *, hint: str) -> None:
    dropped = [x for x in result.extras if x.action == "dropped"]
    if not dropped:
        return
    share = totals["dropped_extra_energy"] / max(totals["linear_delta_energy"] + totals["extra_delta_energy"], 1e-300)
    log.warning(
        "dropped the deltas of %d tensors outside linear modules (%s): %.3g%% of the fine-tune's delta energy.%s",
        len(dropped),
        ", ".join(sorted({x.plan.kind for x in dropped})),
        100 * share,
        f" {hint}" if hint else "",
    )


def require_config(job: Planned) -> dict[str, Any]:
    """The base checkpoint's ``config.json`` (as opened), which serving needs.

    Raises:
        InputError: the base has no ``config.json`` (a bare ``.safetensors`` file, or a folder without one).
    """
    if job.base.config is None:
        raise InputError(
            "base model config not found",
            where=str(job.base_path / "config.json"),
            expected="the base model's folder with its config.json",
            fix="pass --base the model folder (config.json, tokenizer, weights)",
        )
    return job.base.config
