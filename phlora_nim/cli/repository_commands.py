"""Commands on a Triton model repository: ``convert``, ``adapters``, ``remove`` and ``engine-plan``."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from phlora_nim.cli.app import (
    BudgetOpt,
    DeviceOpt,
    EnergyOpt,
    MaxRankOpt,
    RankOpt,
    RepoOpt,
    SnapOpt,
    StrictOpt,
    command_line,
    out_console,
    tensor_progress,
)
from phlora_nim.cli.fidelity_options import (
    CalibrationOpt,
    PromptsOpt,
    SelfProbesOpt,
    TargetKlOpt,
    TargetRecoveryOpt,
    TargetTop1Opt,
    extraction_options,
)
from phlora_nim.repository.layout import DEFAULT_GRACE_S

# The help panel of the options a later convert into the same repository need not repeat.
_KEPT = "Repository settings (kept when not given)"

EngineDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--engine-dtype",
        help="Engine dtype: LoRA weights are laid out and sent in it (float16, bfloat16, float32; default float32).",
        rich_help_panel=_KEPT,
    ),
]
# ``convert --dtype`` named the engine's dtype; everywhere else --dtype is adapter storage.
OldEngineDtypeOpt = Annotated[
    str | None, typer.Option("--dtype", hidden=True, help="Old spelling of --engine-dtype (still accepted).")
]


def engine_dtype_of(engine_dtype: str | None, old_spelling: str | None) -> str | None:
    """The engine dtype given as ``--engine-dtype`` or, with a note on stderr, as the old ``--dtype``.

    Raises:
        OptionError: both given, with different values.
    """
    if old_spelling is None:
        return engine_dtype
    if engine_dtype is not None and engine_dtype != old_spelling:
        from phlora_nim.converters.errors import OptionError

        raise OptionError(
            "two engine dtypes",
            where="--engine-dtype / --dtype",
            found=f"{engine_dtype} and {old_spelling}",
            fix="give --engine-dtype only",
        )
    typer.echo(
        "note: `convert --dtype` is deprecated: it is spelled --engine-dtype now (the engine's dtype; "
        "elsewhere --dtype is the adapter's storage dtype). The old spelling still works.",
        err=True,
    )
    return old_spelling


if TYPE_CHECKING:
    from phlora_nim.repository.configs import RepositorySettings
    from phlora_nim.repository.convert import Converted, ConvertJob


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("convert")(convert_command)
    app.command("adapters")(adapters_command)
    app.command("remove")(remove_command)
    app.command("engine-plan")(engine_plan_command)


def convert_command(
    base: Annotated[Path, typer.Option("--base", help="Base checkpoint folder (its tokenizer is served too).")],
    finetuned: Annotated[
        list[Path], typer.Option("--finetuned", help="Full fine-tune of the base; repeat for several.")
    ],
    model_repository: RepoOpt = Path("model_repository"),
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="Adapter name per --finetuned, in order (default: folder names)."),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help="tensorrtllm: config for a real TensorRT-LLM engine (GPU). reference (the default): the CPU "
            "reference model with the same LoRA contract.",
            rich_help_panel=_KEPT,
        ),
    ] = None,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    budget_params: BudgetOpt = None,
    max_rank: MaxRankOpt = None,
    snap_ranks: SnapOpt = None,
    engine_dtype: EngineDtypeOpt = None,
    dtype: OldEngineDtypeOpt = None,
    engine_dir: Annotated[
        str | None,
        typer.Option(
            "--engine-dir", help="tensorrtllm: engine folder as Triton sees it (gpt_model_path).", rich_help_panel=_KEPT
        ),
    ] = None,
    engine_config: Annotated[
        Path | None,
        typer.Option(
            "--engine-config",
            help="The engine's config.json: refuse adapters it would reject (required with --backend tensorrtllm).",
        ),
    ] = None,
    served_path: Annotated[
        str | None,
        typer.Option(
            "--served-path",
            help="Where Triton will mount this repository (sets lora_prefetch_dir under it); default: "
            "the repository's own path for reference, /models for tensorrtllm.",
            rich_help_panel=_KEPT,
        ),
    ] = None,
    tokenizer_dir: Annotated[
        str | None,
        typer.Option(
            "--tokenizer-dir",
            help="Tokenizer folder as Triton will see it (default: --base).",
            rich_help_panel=_KEPT,
        ),
    ] = None,
    tp: Annotated[int, typer.Option("--tp", help="Tensor parallelism of the engine.")] = 1,
    max_batch_size: Annotated[
        int | None,
        typer.Option("--max-batch-size", help="Triton max batch size (default 8).", rich_help_panel=_KEPT),
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            "--max-lora-rank", help="reference: largest rank accepted on requests (default 64).", rich_help_panel=_KEPT
        ),
    ] = None,
    lora_cache_mb: Annotated[
        int | None,
        typer.Option(
            "--lora-cache-mb",
            help="Host LoRA cache (default 0 = sized from the registered adapters).",
            rich_help_panel=_KEPT,
        ),
    ] = None,
    decoupled: Annotated[
        bool | None,
        typer.Option(
            "--decoupled/--no-decoupled",
            help="Stream tokens (ModelStreamInfer) instead of one response (default: one response).",
            rich_help_panel=_KEPT,
            show_default=False,
        ),
    ] = None,
    trtllm_version: Annotated[
        str | None,
        typer.Option(
            "--trtllm-version",
            help="TensorRT-LLM Triton backend release whose input names are written: 0.20 (v0.20.0 and later: "
            "seed, min_tokens; the default) or 0.19 (random_seed, min_length).",
            rich_help_panel=_KEPT,
        ),
    ] = None,
    llm_parameter: Annotated[
        list[str] | None,
        typer.Option(
            "--llm-parameter",
            help="KEY=VALUE parameter of the tensorrt_llm model, repeatable (e.g. max_input_len=1024, "
            "max_seq_len=2048, max_num_tokens=8192 for the reference model's limits).",
            rich_help_panel=_KEPT,
        ),
    ] = None,
    strict: Annotated[bool, StrictOpt] = False,
    device: DeviceOpt = "cpu",
    replace: Annotated[
        bool, typer.Option("--replace", help="Allow a registered name to get different weights (new task id).")
    ] = False,
    grace: Annotated[
        float,
        typer.Option(
            "--grace", help="Seconds the old tensors of a replaced adapter are kept for routers still using them."
        ),
    ] = DEFAULT_GRACE_S,
    target_recovery: TargetRecoveryOpt = None,
    target_kl: TargetKlOpt = None,
    target_top1: TargetTop1Opt = None,
    prompts: PromptsOpt = None,
    self_probes: SelfProbesOpt = False,
    calibration: CalibrationOpt = None,
) -> None:
    """Extract adapters from fine-tunes and register them in a Triton model repository.

    For each --finetuned: extract the LoRA adapter (default --rank 16), lay it out as TensorRT-LLM
    tensors in the engine dtype, and register it (name, content-derived task id, ranks, modules).
    The repository gets the inflight_batcher_llm models (preprocessing, tensorrt_llm,
    postprocessing, ensemble), LoRA cache parameters sized for the adapters, the prefetch folder
    and a NIM adapter store. Nothing is changed if any step fails.

    Repository settings not given keep the values the repository was written with.
    """
    from phlora_nim.repository.convert import ConvertJob

    options = extraction_options(
        rank=rank,
        energy=energy,
        budget=budget_params,
        max_rank=max_rank,
        snap=snap_ranks,
        target_kl=target_kl,
        target_top1=target_top1,
        target_recovery=target_recovery,
        self_probes=self_probes,
        prompts=prompts,
        calibration=calibration,
        device=device,
    )
    settings, keep_stored = _repository_settings(
        base=base,
        backend=backend,
        dtype=engine_dtype_of(engine_dtype, dtype),
        engine_dir=engine_dir,
        served_path=served_path,
        tokenizer_dir=tokenizer_dir,
        max_batch_size=max_batch_size,
        decoupled=decoupled,
        max_lora_rank=max_lora_rank,
        lora_cache_mb=lora_cache_mb,
        trtllm_version=trtllm_version,
        llm_parameters=_key_values(llm_parameter, flag="--llm-parameter"),
    )
    job = ConvertJob(
        base=base,
        finetuned=tuple(finetuned),
        names=tuple(name or ()),
        repository=model_repository,
        options=options,
        settings=settings,
        keep_stored=keep_stored,
        replace=replace,
        grace=grace,
        tp=tp,
        engine_config=engine_config,
        strict=strict,
    )
    done, seconds = _convert_with_progress(job)
    _print_convert_summary(done, seconds, model_repository)


def _key_values(items: list[str] | None, *, flag: str) -> dict[str, str] | None:
    """``KEY=VALUE`` options as a dict (None when none was given: the repository keeps its own)."""
    from phlora_nim.converters.errors import OptionError

    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError("not a KEY=VALUE pair", where=flag, expected="e.g. max_input_len=1024", found=repr(item))
        out[key.strip()] = value.strip()
    return out


def _repository_settings(
    *,
    base: Path,
    lora_cache_mb: int | None,
    **given: str | int | bool | dict[str, str] | None,
) -> tuple[RepositorySettings, frozenset[str]]:
    """The repository settings of ``convert``'s options, and the names of those not given (``None``).

    Settings not given take their defaults here; an existing repository keeps its own values for them.
    """
    from dataclasses import fields

    from phlora_nim.repository.configs import RepositorySettings

    values = {k: v for k, v in given.items() if v is not None}
    if lora_cache_mb is not None:
        values["lora_cache_bytes"] = lora_cache_mb << 20
    settings = RepositorySettings(base=str(Path(base).resolve()), **values)  # type: ignore[arg-type]
    keep = frozenset(f.name for f in fields(RepositorySettings)) - {"base"} - values.keys()
    return settings, keep


def _convert_with_progress(job: ConvertJob) -> tuple[list[Converted], float]:
    """Run ``job`` behind a progress bar; returns what was registered and the wall time."""
    from phlora_nim.repository.convert import convert

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
        ranks = sorted(set(c.entry.ranks.values()))
        kept = c.report["totals"].get("energy_kept_linear")
        table.add_row(
            c.entry.name,
            str(c.entry.task_id),
            f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0]),
            f"{kept:.4f}" if isinstance(kept, float) else "–",
            f"{c.adapter_bytes / 1e6:.2f}",
        )
    out_console.print(table)
    total_mb = sum(c.adapter_bytes for c in done) / 1e6
    out_console.print(
        f"{len(done)} adapter{'' if len(done) == 1 else 's'}, {total_mb:.2f} MB of LoRA tensors in {seconds:.1f} s "
        f"({total_mb / max(seconds, 1e-9):.2f} MB/s). Serve with: phlora-nim triton -m {repository}"
    )


def adapters_command(
    model_repository: RepoOpt = Path("model_repository"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry entries as JSON.")] = False,
) -> None:
    """List the adapters registered in a model repository."""
    from dataclasses import asdict

    from phlora_nim.repository.maintenance import read_registry

    state = read_registry(model_repository)
    if as_json:
        out_console.print_json(json.dumps({n: asdict(e) for n, e in sorted(state.adapters.items())}))
        return
    table = Table(title=f"{len(state.adapters)} adapters in {model_repository}")
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


def remove_command(
    name: Annotated[str, typer.Argument(help="Adapter to unregister.")],
    model_repository: RepoOpt = Path("model_repository"),
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            help="Seconds its files are kept for routers that have not yet re-read the registry; the first "
            "convert or remove after that deletes them.",
        ),
    ] = DEFAULT_GRACE_S,
) -> None:
    """Unregister an adapter; its files go after a grace period (its task id is never given to other weights)."""
    from phlora_nim.repository.maintenance import remove_adapter

    entry = remove_adapter(model_repository, name, grace=grace)
    out_console.print(
        f"[bold]removed[/] {entry.name} (lora_task_id {entry.task_id}); its files are deleted by the first "
        f"convert or remove after {grace:g} s"
    )


def engine_plan_command(
    model_repository: RepoOpt = Path("model_repository"),
    checkpoint_dir: Annotated[
        str, typer.Option("--checkpoint-dir", help="TensorRT-LLM checkpoint folder to show in the command.")
    ] = "<trtllm_checkpoint_dir>",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print the trtllm-build LoRA flags that fit every registered adapter."""
    from phlora_nim.repository.maintenance import engine_plan, read_registry

    plan = engine_plan(read_registry(model_repository))
    if as_json:
        out_console.print_json(json.dumps(plan))
        return
    command = ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", "<engine_dir>", *plan["flags"]]
    out_console.print(shlex.join(command), soft_wrap=True, markup=False, highlight=False)
