"""Commands on a Triton model repository: ``convert``, ``adapters``, ``remove`` and ``engine-plan``."""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from phlora_nim.cli.app import (
    BudgetOpt,
    DeviceOpt,
    EnergyOpt,
    LayoutOpt,
    MaxRankOpt,
    RankOpt,
    RepoOpt,
    SnapOpt,
    StrictOpt,
    command_line,
    out_console,
    tensor_progress,
)
from phlora_nim.cli.convert_llmapi import convert_llmapi_command, llmapi_engine, rank_and_energy
from phlora_nim.cli.convert_options import (
    BackendOpt,
    BaseOpt,
    CheckServedPathOpt,
    DecoupledOpt,
    EngineConfigOpt,
    EngineDirOpt,
    EngineDtypeOpt,
    FinetunedOpt,
    FixedModelYamlOpt,
    GpuFreeMemoryOpt,
    GraceOpt,
    LlmParameterOpt,
    LoraCacheMbOpt,
    LoraCacheSpareOpt,
    MaxBatchSizeOpt,
    MaxCpuLorasOpt,
    MaxLoraRankOpt,
    MaxLorasOpt,
    ModelYamlOpt,
    NameOpt,
    OldEngineDtypeOpt,
    PpOpt,
    PrefetchLimitOpt,
    PrefetchOpt,
    PrefetchUsageOpt,
    ReplaceOpt,
    ServedBaseOpt,
    ServedPathOpt,
    TokenizerDirOpt,
    TpOpt,
    TrtllmVersionOpt,
)
from phlora_nim.cli.fidelity_options import (
    AllowMismatchOpt,
    CalibrationOpt,
    PromptsOpt,
    SelfProbesOpt,
    TargetKlOpt,
    TargetRecoveryOpt,
    TargetTop1Opt,
    ThreadsOpt,
    extraction_options,
)
from phlora_nim.repository.layout import DEFAULT_GRACE_S


def engine_dtype_of(engine_dtype: str | None, old_spelling: str | None) -> str | None:
    """The engine dtype given as ``--engine-dtype`` or, with a note on stderr, as the old ``--dtype``.

    Raises:
        OptionError: both given, with different values.
    """
    if old_spelling is None:
        return engine_dtype
    if engine_dtype is not None and engine_dtype != old_spelling:
        from phlora_nim.core.errors import OptionError

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
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.jobs.convert import Converted, ConvertJob
    from phlora_nim.repository.settings import RepositorySettings


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("convert")(convert_command)
    app.command("adapters")(adapters_command)
    app.command("remove")(remove_command)
    app.command("engine-plan")(engine_plan_command)


def convert_command(
    base: BaseOpt,
    finetuned: FinetunedOpt,
    model_repository: RepoOpt = Path("model_repository"),
    name: NameOpt = None,
    backend: BackendOpt = None,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    budget_params: BudgetOpt = None,
    max_rank: MaxRankOpt = None,
    snap_ranks: SnapOpt = None,
    engine_dtype: EngineDtypeOpt = None,
    dtype: OldEngineDtypeOpt = None,
    engine_dir: EngineDirOpt = None,
    engine_config: EngineConfigOpt = None,
    served_path: ServedPathOpt = None,
    tokenizer_dir: TokenizerDirOpt = None,
    tp: TpOpt = 1,
    max_batch_size: MaxBatchSizeOpt = None,
    max_lora_rank: MaxLoraRankOpt = None,
    lora_cache_mb: LoraCacheMbOpt = None,
    decoupled: DecoupledOpt = None,
    trtllm_version: TrtllmVersionOpt = None,
    llm_parameter: LlmParameterOpt = None,
    prefetch: PrefetchOpt = None,
    prefetch_limit: PrefetchLimitOpt = None,
    prefetch_usage: PrefetchUsageOpt = None,
    lora_cache_spare: LoraCacheSpareOpt = None,
    gpu_free_memory_gib: GpuFreeMemoryOpt = None,
    check_served_path: CheckServedPathOpt = False,
    strict: Annotated[bool, StrictOpt] = False,
    device: DeviceOpt = "cpu",
    replace: ReplaceOpt = False,
    grace: GraceOpt = DEFAULT_GRACE_S,
    target_recovery: TargetRecoveryOpt = None,
    target_kl: TargetKlOpt = None,
    target_top1: TargetTop1Opt = None,
    prompts: PromptsOpt = None,
    self_probes: SelfProbesOpt = False,
    calibration: CalibrationOpt = None,
    max_loras: MaxLorasOpt = 8,
    max_cpu_loras: MaxCpuLorasOpt = 32,
    pp: PpOpt = 1,
    model_yaml: ModelYamlOpt = None,
    fixed_model_yaml: FixedModelYamlOpt = False,
    served_base: ServedBaseOpt = None,
    allow_mismatch: AllowMismatchOpt = False,
    threads: ThreadsOpt = None,
    layout: LayoutOpt = "padded",
    index: Annotated[
        int | None,
        typer.Option(
            "--index",
            help="Convert only the fine-tune at this 0-based position of the --finetuned list (named as in the "
            "whole list): one pod of a Kubernetes Indexed Job each, e.g. --index $(JOB_COMPLETION_INDEX).",
        ),
    ] = None,
) -> None:
    """Extract adapters from fine-tunes and register them in a Triton model repository.

    --backend trtllm (TensorRT-LLM ≥ 1.3, GPU) / trtllm-cpu (its CPU reference): each adapter is a PEFT
    folder in the adapter store, read by the llmapi model from its path; config.pbtxt and a model.yaml
    whose lora_config covers every adapter. trtllm-legacy / trtllm-legacy-cpu: TensorRT-LLM npy tensors
    under content-derived task ids, the inflight_batcher_llm models, LoRA cache parameters sized for the
    adapters, the prefetch folder and a NIM adapter store. Default --rank 16. Nothing is changed if any
    step fails; repository settings not given keep the values the repository was written with.
    """
    args = dict(locals())  # the options by parameter name
    if llmapi_engine(args) is not None:
        convert_llmapi_command(args, _extraction(args))
        return
    job = _convert_job(args)
    fanout: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if index is not None:
        from phlora_nim.jobs.fanout import one_of, siblings_pending

        job, fanout = one_of(job, index), siblings_pending(job, index)
    with fanout:
        done, seconds = convert_with_progress(job)
    _print_convert_summary(done, seconds, model_repository)


# convert's options stored under the same name in the repository settings.
_SETTING_OPTIONS = (
    "backend",
    "engine_dir",
    "served_path",
    "tokenizer_dir",
    "max_batch_size",
    "decoupled",
    "max_lora_rank",
    "trtllm_version",
    "prefetch_limit",
    "lora_cache_spare",
)


def _convert_job(args: Mapping[str, Any]) -> ConvertJob:
    """``convert``'s options (by parameter name) as a job: what to extract, into which repository, how."""
    from phlora_nim.jobs.convert import ConvertJob

    settings, keep_stored = _convert_settings(args)
    return ConvertJob(
        base=args["base"],
        finetuned=tuple(args["finetuned"]),
        names=tuple(args["name"] or ()),
        repository=args["model_repository"],
        options=_extraction(args),
        settings=settings,
        keep_stored=keep_stored,
        replace=args["replace"],
        grace=args["grace"],
        tp=args["tp"],
        engine_config=args["engine_config"],
        strict=args["strict"],
        check_served_path=args["check_served_path"],
        layout=args["layout"],
    )


def _extraction(args: Mapping[str, Any]) -> ExtractOptions:
    """The rank policy or fidelity target ``convert`` extracts each adapter with."""
    return extraction_options(
        rank=args["rank"],
        energy=args["energy"],
        budget=args["budget_params"],
        max_rank=args["max_rank"],
        snap=args["snap_ranks"],
        target_kl=args["target_kl"],
        target_top1=args["target_top1"],
        target_recovery=args["target_recovery"],
        self_probes=args["self_probes"],
        prompts=args["prompts"],
        calibration=args["calibration"],
        device=args["device"],
        allow_mismatch=args["allow_mismatch"],
        threads=args["threads"],
    )


def _convert_settings(args: Mapping[str, Any]) -> tuple[RepositorySettings, frozenset[str]]:
    """The repository settings ``convert``'s options give, and the names of those not given."""
    gib = args["gpu_free_memory_gib"]
    return _repository_settings(
        base=args["base"],
        lora_cache_mb=args["lora_cache_mb"],
        dtype=engine_dtype_of(args["engine_dtype"], args["dtype"]),
        **{key: args[key] for key in _SETTING_OPTIONS},
        llm_parameters=_key_values(args["llm_parameter"], flag="--llm-parameter"),
        prefetch_names=tuple(args["prefetch"]) if args["prefetch"] else None,
        prefetch_usage=_usage(args["prefetch_usage"]),
        gpu_free_memory_bytes=None if gib is None else int(gib * (1 << 30)),
    )


def _usage(path: Path | None) -> dict[str, float] | None:
    """Request counts from ``--prefetch-usage`` (None when not given: the repository keeps its own)."""
    if path is None:
        return None
    from phlora_nim.engines.trtllm_legacy.cache_plan import read_usage

    return read_usage(path)


def _key_values(items: list[str] | None, *, flag: str) -> dict[str, str] | None:
    """``KEY=VALUE`` options as a dict (None when none was given: the repository keeps its own)."""
    from phlora_nim.core.errors import OptionError

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
    **given: str | int | bool | dict[str, str] | dict[str, float] | tuple[str, ...] | None,
) -> tuple[RepositorySettings, frozenset[str]]:
    """The repository settings of ``convert``'s options, and the names of those not given (``None``).

    Settings not given take their defaults here; an existing repository keeps its own values for them.
    """
    from dataclasses import fields

    from phlora_nim.repository.settings import RepositorySettings

    values = {k: v for k, v in given.items() if v is not None}
    if lora_cache_mb is not None:
        values["lora_cache_bytes"] = lora_cache_mb << 20
    settings = RepositorySettings(base=str(Path(base).resolve()), **values)  # type: ignore[arg-type]
    keep = frozenset(f.name for f in fields(RepositorySettings)) - {"base"} - values.keys()
    return settings, keep


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


def adapters_command(
    model_repository: RepoOpt = Path("model_repository"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry entries as JSON.")] = False,
) -> None:
    """List the adapters registered in a model repository."""
    from dataclasses import asdict

    from phlora_nim.jobs.maintenance import read_registry

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
    from phlora_nim.jobs.maintenance import remove_adapter

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
    engine_config: Annotated[
        Path | None,
        typer.Option(
            "--engine-config",
            help="A built engine's config.json: size the LoRA cache for it (default: the engine these flags build).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print the trtllm-build LoRA flags that fit every registered adapter, and the LoRA cache
    parameters of the tensorrt_llm model (TensorRT-LLM's page rule) that hold them."""
    from phlora_nim.jobs.maintenance import cache_plan_summary, engine_plan, read_registry

    state = read_registry(model_repository)
    plan = engine_plan(state)
    plan["lora_cache"] = cache_plan_summary(model_repository, state, plan, engine_config=engine_config)
    if as_json:
        out_console.print_json(json.dumps(plan))
        return
    command = ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", "<engine_dir>", *plan["flags"]]
    out_console.print(shlex.join(command), soft_wrap=True, markup=False, highlight=False)
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
