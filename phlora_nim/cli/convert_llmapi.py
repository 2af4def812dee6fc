"""``convert --backend trtllm`` / ``trtllm-cpu``: the llmapi engine's options of the ``convert`` command
(the job is :func:`phlora_nim.jobs.convert.convert`, as for every engine)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from phlora_nim.cli.app import out_console

if TYPE_CHECKING:
    from phlora_nim.cli.convert_options import ConvertFlags
    from phlora_nim.converters.extraction_report import ExtractionReport
    from phlora_nim.engines.registry import Engine
    from phlora_nim.jobs.convert import Converted, ConvertJob


def llmapi_engine(backend: str | None, repository: Path) -> Engine | None:
    """The engine row when ``convert`` writes for the llmapi model (by --backend, else the repository's own)."""
    from phlora_nim.engines.registry import engine
    from phlora_nim.repository.layout import SETTINGS_FILE

    name = backend
    if name is None:
        try:
            name = json.loads((Path(repository) / SETTINGS_FILE).read_text()).get("backend")
        except (OSError, ValueError):
            name = None
    if name is None:
        return None
    row = engine(name)
    return row if row.package == "trtllm_llmapi" else None


def convert_llmapi_command(flags: ConvertFlags, row: Engine) -> None:
    """``convert --backend trtllm`` / ``trtllm-cpu`` (``row``: that engine): the legacy engine's options are
    refused, the llmapi model's go into its model.yaml."""
    from phlora_nim.core.errors import OptionError
    from phlora_nim.repository.settings import RepositorySettings

    settings = RepositorySettings(backend=row.name, base=str(flags.inputs.base), served_path=flags.settings.served_path)
    plain = flags.job_of(settings)  # bad rank or fidelity options are refused first, as for every engine
    given = flags.legacy.given()
    if given:
        raise OptionError(
            f"options of the legacy engine's repository do not apply to --backend {row.name}",
            where=", ".join(given),
            fix="drop them (the llmapi model takes its settings from model.yaml: --max-loras, --max-cpu-loras, "
            "--tp, --pp, --model-yaml)",
        )
    llmapi = flags.llmapi
    job = dataclasses.replace(
        plain,
        engine_options=row.module("staging").Options(
            served_base=llmapi.served_base,
            model_yaml=llmapi.model_yaml,
            fixed=llmapi.fixed_model_yaml,
            pp=llmapi.pp,
            max_loras=llmapi.max_loras,
            max_cpu_loras=llmapi.max_cpu_loras,
        ),
    )
    from phlora_nim.cli.repository_commands import convert_with_progress  # imports this module

    done, seconds = convert_with_progress(job)
    _print_summary(job, row, done, seconds)


def rank_and_energy(ranks: dict[str, int], report: ExtractionReport) -> tuple[str, str]:
    """An adapter's rank (or range) and the share of its delta energy kept, as the summaries show them."""
    values = sorted(set(ranks.values()))
    kept = report.totals.get("energy_kept_linear")
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
