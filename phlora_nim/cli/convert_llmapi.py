"""``convert --backend trtllm`` / ``trtllm-cpu``: the llmapi engine's options of the ``convert`` command
(the job is :func:`phlora_nim.jobs.convert.convert`, as for every engine)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from phlora_nim.cli.app import out_console

if TYPE_CHECKING:
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.engines.registry import Engine
    from phlora_nim.jobs.convert import Converted, ConvertJob

# Options of the legacy engine's repository that the llmapi engine has no use for (refused when given).
_LEGACY_ONLY = (
    "engine_dir",
    "engine_config",
    "tokenizer_dir",
    "max_batch_size",
    "max_lora_rank",
    "lora_cache_mb",
    "decoupled",
    "trtllm_version",
    "llm_parameter",
    "prefetch",
    "prefetch_limit",
    "prefetch_usage",
    "lora_cache_spare",
    "gpu_free_memory_gib",
    "index",  # one pod per fine-tune: the llmapi engine's convert widens one model.yaml, so one run converts all
)


def llmapi_engine(args: Mapping[str, Any]) -> Engine | None:
    """The engine row when ``convert`` writes for the llmapi model (by --backend, else the repository's own)."""
    from phlora_nim.engines.registry import engine
    from phlora_nim.repository.layout import SETTINGS_FILE

    name = args["backend"]
    if name is None:
        settings = Path(args["model_repository"]) / SETTINGS_FILE
        try:
            name = json.loads(settings.read_text()).get("backend")
        except (OSError, ValueError):
            name = None
    if name is None:
        return None
    row = engine(name)
    return row if row.package == "trtllm_llmapi" else None


def convert_llmapi_command(args: Mapping[str, Any], options: ExtractOptions) -> None:
    """``convert --backend trtllm`` / ``trtllm-cpu``: the options by parameter name, the extraction options."""
    from phlora_nim.core.errors import OptionError
    from phlora_nim.jobs.convert import ConvertJob
    from phlora_nim.repository.settings import RepositorySettings

    row = llmapi_engine(args)
    if row is None:
        raise ValueError("convert_llmapi_command needs an llmapi engine (see llmapi_engine)")
    given = [f"--{k.replace('_', '-')}" for k in _LEGACY_ONLY if args[k] not in (None, False, [], ())]
    if given:
        raise OptionError(
            f"options of the legacy engine's repository do not apply to --backend {row.name}",
            where=", ".join(given),
            fix="drop them (the llmapi model takes its settings from model.yaml: --max-loras, --max-cpu-loras, "
            "--tp, --pp, --model-yaml)",
        )
    job = ConvertJob(
        base=args["base"],
        finetuned=tuple(args["finetuned"]),
        names=tuple(args["name"] or ()),
        repository=args["model_repository"],
        options=options,
        settings=RepositorySettings(backend=row.name, base=str(args["base"]), served_path=args["served_path"]),
        tp=args["tp"],
        replace=args["replace"],
        grace=args["grace"],
        layout=args["layout"],
        engine_options=row.module("staging").Options(
            served_base=args["served_base"],
            model_yaml=args["model_yaml"],
            fixed=args["fixed_model_yaml"],
            pp=args["pp"],
            max_loras=args["max_loras"],
            max_cpu_loras=args["max_cpu_loras"],
        ),
    )
    from phlora_nim.cli.repository_commands import convert_with_progress  # imports this module

    done, seconds = convert_with_progress(job)
    _print_summary(job, row, done, seconds)


def rank_and_energy(ranks: dict[str, int], report: dict[str, Any]) -> tuple[str, str]:
    """An adapter's rank (or range) and the share of its delta energy kept, as the summaries show them."""
    values = sorted(set(ranks.values()))
    kept = report["totals"].get("energy_kept_linear")
    rank = f"{values[0]}–{values[-1]}" if len(values) > 1 else str(values[0])
    return rank, f"{kept:.4f}" if isinstance(kept, float) else "–"


def _print_summary(job: ConvertJob, row: Engine, done: list[Converted], seconds: float) -> None:
    table = Table(title=f"registered in {job.repository} for {row.name}")
    for col in ("adapter", "lora_id", "ranks", "energy kept", "lora_path"):
        table.add_column(col)
    for c in done:
        table.add_row(c.entry.name, str(c.entry.task_id), *rank_and_energy(c.entry.ranks, c.report), c.entry.lora_path)
    out_console.print(table)
    out_console.print(f"{len(done)} adapter{'' if len(done) == 1 else 's'} in {seconds:.1f} s.")
    for note in job.notes:
        out_console.print(note, markup=False, highlight=False)
    if row.cpu_reference:
        out_console.print(f"Serve with: phlora-nim triton -m {job.repository}")
