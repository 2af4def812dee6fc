"""Commands on a Triton model repository: ``convert``, ``adapters``, ``remove`` and ``engine-plan``."""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from phlora_nim.cli.app import command_line, out_console, tensor_progress
from phlora_nim.cli.convert_llmapi import convert_llmapi_command, llmapi_engine, rank_and_energy
from phlora_nim.cli.convert_options import ConvertFlags
from phlora_nim.cli.flags import command
from phlora_nim.cli.repository_options import AdaptersFlags, EnginePlanFlags, RemoveFlags

if TYPE_CHECKING:
    from phlora_nim.jobs.convert import Converted, ConvertJob


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("convert")(convert_command)
    app.command("adapters")(adapters_command)
    app.command("remove")(remove_command)
    app.command("engine-plan")(engine_plan_command)


@command(ConvertFlags)
def convert_command(flags: ConvertFlags) -> None:
    """Extract adapters from fine-tunes and register them in a Triton model repository.

    --backend trtllm (TensorRT-LLM ≥ 1.3, GPU) / trtllm-cpu (its CPU reference): each adapter is a PEFT
    folder in the adapter store, read by the llmapi model from its path; config.pbtxt and a model.yaml
    whose lora_config covers every adapter. trtllm-legacy / trtllm-legacy-cpu: TensorRT-LLM npy tensors
    under content-derived task ids, the inflight_batcher_llm models, LoRA cache parameters sized for the
    adapters, the prefetch folder and a NIM adapter store. Default --rank 16. Nothing is changed if any
    step fails; repository settings not given keep the values the repository was written with.
    """
    row = llmapi_engine(flags.settings.backend, flags.inputs.model_repository)
    if row is not None:
        convert_llmapi_command(flags, row)
        return
    job = flags.repository_job()
    index = flags.legacy.index
    fanout: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if index is not None:
        from phlora_nim.jobs.fanout import one_of, siblings_pending

        job, fanout = one_of(job, index), siblings_pending(job, index)
    with fanout:
        done, seconds = convert_with_progress(job)
    _print_convert_summary(done, seconds, flags.inputs.model_repository)


def convert_with_progress(job: ConvertJob) -> tuple[list[Converted], float]:
    """Run ``job`` behind a progress bar; returns what was registered and the wall time."""
    from phlora_nim.jobs.convert import convert

    start = time.perf_counter()
    with tensor_progress("convert") as bar:
        task = bar.add_task("planning", total=None)
        current = {"name": ""}
        done = convert(
            job,
            command=command_line(),
            on_plan=lambda n: bar.update(task, total=n, description=""),
            on_adapter=lambda n: current.update(name=n),
            progress=lambda t: bar.update(task, advance=1, description=f"{current['name']}: {t}"),
        )
    return done, time.perf_counter() - start


def _print_convert_summary(done: list[Converted], seconds: float, repository: Path) -> None:
    table = Table(title=f"registered in {repository}")
    for col in ("adapter", "lora_task_id", "ranks", "energy kept", "MB"):
        table.add_column(col)
    for c in done:
        table.add_row(
            c.entry.name,
            str(c.entry.task_id),
            *rank_and_energy(c.entry.ranks, c.report),
            f"{c.adapter_bytes / 1e6:.2f}",
        )
    out_console.print(table)
    total_mb = sum(c.adapter_bytes for c in done) / 1e6
    out_console.print(
        f"{len(done)} adapter{'' if len(done) == 1 else 's'}, {total_mb:.2f} MB of LoRA tensors in {seconds:.1f} s "
        f"({total_mb / max(seconds, 1e-9):.2f} MB/s). Serve with: phlora-nim triton -m {repository}"
    )


@command(AdaptersFlags)
def adapters_command(flags: AdaptersFlags) -> None:
    """List the adapters registered in a model repository."""
    from dataclasses import asdict

    from phlora_nim.jobs.maintenance import read_registry

    state = read_registry(flags.model_repository)
    if flags.as_json:
        out_console.print_json(json.dumps({n: asdict(e) for n, e in sorted(state.adapters.items())}))
        return
    table = Table(title=f"{len(state.adapters)} adapters in {flags.model_repository}")
    for col in ("name", "lora_task_id", "max rank", "modules", "dtype", "MB", "created"):
        table.add_column(col)
    for e in sorted(state.adapters.values(), key=lambda e: e.name):
        table.add_row(
            e.name,
            str(e.task_id),
            str(e.max_rank),
            " ".join(e.trtllm_layout.get("trtllm_modules", [])) or str(len(e.modules)),
            e.dtype,
            f"{int(e.trtllm_layout.get('bytes', 0)) / 1e6:.2f}",
            e.created,
        )
    out_console.print(table)


@command(RemoveFlags)
def remove_command(flags: RemoveFlags) -> None:
    """Unregister an adapter; its files go after a grace period (its task id is never given to other weights)."""
    from phlora_nim.jobs.maintenance import remove_adapter

    entry = remove_adapter(flags.model_repository, flags.name, grace=flags.grace)
    out_console.print(
        f"[bold]removed[/] {entry.name} (lora_task_id {entry.task_id}); its files are deleted by the first "
        f"convert or remove after {flags.grace:g} s"
    )


@command(EnginePlanFlags)
def engine_plan_command(flags: EnginePlanFlags) -> None:
    """Print the trtllm-build LoRA flags that fit every registered adapter, and the LoRA cache
    parameters of the tensorrt_llm model (TensorRT-LLM's page rule) that hold them."""
    from phlora_nim.jobs.maintenance import cache_plan_summary, engine_plan, read_registry

    state = read_registry(flags.model_repository)
    plan = engine_plan(state)
    plan["lora_cache"] = cache_plan_summary(flags.model_repository, state, plan, engine_config=flags.engine_config)
    if flags.as_json:
        out_console.print_json(json.dumps(plan))
        return
    build = ["trtllm-build", "--checkpoint_dir", flags.checkpoint_dir, "--output_dir", "<engine_dir>", *plan["flags"]]
    out_console.print(shlex.join(build), soft_wrap=True, markup=False, highlight=False)
    cache = plan["lora_cache"]
    mib = 1 << 20
    out_console.print(
        f"# tensorrt_llm LoRA cache: pages of {cache['page_bytes'] / mib:.1f} MiB; {len(cache['prefetched'])} "
        f"adapters preloaded + room for {cache['spare_adapters']} more = {cache['host_pages_needed']} host pages; "
        f"the GPU cache needs {cache['gpu_pages_needed']} pages ({cache['gpu_bytes_needed'] / mib:.0f} MiB, so "
        f"{cache['gpu_free_bytes_needed_at_fraction'] / (1 << 30):.1f} GiB free at the fraction below)",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    for key, value in cache["parameters"].items():
        out_console.print(f"{key}={value}", markup=False, highlight=False)
