"""The ``phlora-nim`` command line.

User errors (bad input, options, output paths) print one paragraph and exit with code 2; no
traceback. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from phlora_nim.converters.errors import PhloraError

app = typer.Typer(
    name="phlora-nim",
    help="Post-hoc LoRA: turn full fine-tunes into LoRA adapters (data-free, gradient-free) and "
    "serve them from one TensorRT-LLM / Triton engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
out_console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("phlora_nim")


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], format="%(message)s", force=True
    )
    for noisy in ("transformers", "peft", "matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


RankOpt = Annotated[
    int | None,
    typer.Option("--rank", "-r", help="Same rank R for every module.", rich_help_panel="Rank policy (choose one)"),
]
EnergyOpt = Annotated[
    float | None,
    typer.Option(
        "--energy",
        help="Per module, the smallest rank keeping ≥ F of its delta energy ‖ΔW‖²_F (0 < F ≤ 1).",
        rich_help_panel="Rank policy (choose one)",
    ),
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(
        "--budget-params",
        help="One global budget of N LoRA parameters, spent where it buys the most energy "
        "(heterogeneous ranks via rank_pattern).",
        rich_help_panel="Rank policy (choose one)",
    ),
]
MaxRankOpt = Annotated[
    int | None,
    typer.Option(
        "--max-rank",
        help="Cap per module for --energy/--budget-params (default 256).",
        rich_help_panel="Rank policy (choose one)",
    ),
]
SnapOpt = Annotated[
    str | None,
    typer.Option(
        "--snap-ranks",
        help="Round ranks up to a server's allowed set: 'vllm' = {1,8,16,32,64,128,256,320,512}.",
        rich_help_panel="Rank policy (choose one)",
    ),
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Adapter storage dtype: auto (as the fine-tune), float32, float16 or bfloat16.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")]


def _policy(
    rank: int | None,
    energy: float | None,
    budget: int | None,
    max_rank: int | None,
    snap: str | None,
    *,
    default_rank: int | None = None,
) -> Any:
    from phlora_nim.converters.rank_policy import RankPolicy

    if rank is None and energy is None and budget is None:
        rank = default_rank
    return RankPolicy(rank=rank, energy=energy, budget_params=budget, max_rank=max_rank, snap=snap)  # type: ignore[arg-type]


_invocation: list[str] = []


def _tensor_progress(verb: str) -> Any:
    """The progress bar of tensor-by-tensor work (to stderr, gone when done)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn(f"[bold]{verb}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    return Progress(*columns, console=err_console, transient=True)


def _command_line() -> str:
    """The command line as the user typed it, recorded in reports."""
    return shlex.join(["phlora-nim", *(_invocation or sys.argv[1:])])


@app.command()
def extract(
    base: Annotated[Path, typer.Option("--base", help="Base checkpoint: HF model folder or .safetensors file.")],
    finetuned: Annotated[Path, typer.Option("--finetuned", help="Full fine-tune of the base, same layout.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to create.")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    budget_params: BudgetOpt = None,
    max_rank: MaxRankOpt = None,
    snap_ranks: SnapOpt = None,
    exact: Annotated[bool, typer.Option("--exact", help="Full SVD instead of randomized (slower).")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda[:N] for the decomposition.")] = "cpu",
    extra: Annotated[
        str,
        typer.Option(
            "--extra",
            help="Deltas outside linear modules (embeddings, lm_head, norms, biases): drop (measure and "
            "warn), save (as modules_to_save; not servable by vLLM/NIM/TensorRT-LLM) or error.",
        ),
    ] = "drop",
    target_modules: Annotated[
        str | None,
        typer.Option(
            "--target-modules",
            help="Regex over module paths to decompose instead of the architecture map, "
            r"e.g. '.*\.(q_proj|v_proj)'.",
        ),
    ] = None,
    dtype: DtypeOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized sketches.")] = 0,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip energy.png.")] = False,
    force: ForceOpt = False,
) -> None:
    """Extract a LoRA adapter from a base checkpoint and its full fine-tune (PHLoRA).

    Every linear module's delta ΔW = W_ft − W_base is decomposed by SVD and truncated. Writes a
    PEFT adapter (adapter_config.json, adapter_model.safetensors), phlora_report.json and energy.png.
    Default policy: --rank 16.
    """
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.jobs.adapter_jobs import extract as run

    options = ExtractOptions(
        policy=_policy(rank, energy, budget_params, max_rank, snap_ranks, default_rank=16),
        exact=exact,
        device=device,
        extra=extra,
        dtype=dtype,  # type: ignore[arg-type]
        target_modules=target_modules,
        seed=seed,
    )
    with _tensor_progress("extract") as bar:
        task = bar.add_task("planning", total=None)
        report = run(
            base,
            finetuned,
            out,
            options,
            force=force,
            command=_command_line(),
            plot=not no_plot,
            on_plan=lambda n: bar.update(task, total=n, description=""),
            progress=lambda name: bar.update(task, advance=1, description=name),
        )
    _print_summary(report, out)


def _print_summary(report: dict[str, Any], folder: Path) -> None:
    t = report["totals"]
    out_console.print(
        f"[bold green]wrote[/] {folder}  ({t['modules']} modules, ranks {t['min_rank']}–{t['max_rank']}, "
        f"{t['adapter_parameters']:,} parameters)"
    )
    out_console.print(
        f"energy kept: {t['energy_kept_linear']:.2%} of linear-module delta energy "
        f"(min module {t['min_energy_kept']:.2%}); {t['energy_kept_total']:.2%} of the whole fine-tune delta"
    )
    if "total_s" in report.get("timings", {}):
        tm = report["timings"]
        out_console.print(
            f"time: {tm['total_s']:.2f} s (reading {tm.get('load_s', 0):.2f} s, "
            f"decomposing {tm.get('decompose_s', 0):.2f} s)"
        )


@app.command()
def inspect(
    adapter_dir: Annotated[Path, typer.Argument(help="Folder written by `phlora-nim extract` or `prune`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw report as JSON.")] = False,
    top: Annotated[int, typer.Option("--top", help="Rows to show, worst energy kept first (0 = all).")] = 20,
) -> None:
    """Print an adapter's extraction report: energy kept, ranks and error per module."""
    from phlora_nim.converters.report import read_report

    report = read_report(adapter_dir)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return
    t = report["totals"]
    out_console.print(
        f"[bold]{adapter_dir}[/]  family={report.get('family', '-')}  "
        f"policy={report['policy']['kind']}  dtype={report.get('dtype', '-')}"
    )
    for key, value in t.items():
        out_console.print(f"  {key:24s} {value:.6g}" if isinstance(value, float) else f"  {key:24s} {value}")
    rows = sorted(report["modules"], key=lambda m: m["energy_kept"])
    table = Table(title="modules (worst energy kept first)")
    widest = max((len(m["name"]) for m in rows), default=6)
    table.add_column("module", min_width=widest, no_wrap=True)
    for col in ("shape", "rank", "energy", "rel.err", "σ1"):
        table.add_column(col, justify="right")
    for m in rows[: top or None]:
        sv = m.get("top_singular_values") or [0.0]
        table.add_row(
            m["name"],
            "×".join(map(str, m["shape"])),
            str(m["rank"]),
            f"{m['energy_kept']:.2%}",
            f"{m['relative_error']:.4f}",
            f"{sv[0]:.4g}",
        )
    out_console.print(table)
    extras = [x for x in report.get("extras", []) if x["action"] != "unchanged"]
    if extras:
        out_console.print(
            f"{len(extras)} non-linear tensors changed: "
            + ", ".join(f"{x['name']} ({x['action']})" for x in extras[:8])
        )


@app.command()
def prune(
    adapter_dir: Annotated[Path, typer.Argument(help="Any PEFT LoRA adapter folder (ours or third-party).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to create.")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    budget_params: BudgetOpt = None,
    max_rank: MaxRankOpt = None,
    snap_ranks: SnapOpt = None,
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Re-truncate a LoRA adapter to a lower rank, optimally, without forming ΔW.

    QR of both factors and an SVD of the small r×r core give the exact SVD of the update; keeping
    its top directions is the best lower-rank adapter (equal to extracting at that rank directly).
    """
    from phlora_nim.jobs.adapter_jobs import prune as run

    report = run(
        adapter_dir,
        out,
        _policy(rank, energy, budget_params, max_rank, snap_ranks),
        force=force,
        command=_command_line(),
        dtype=dtype,
    )
    t = report["totals"]
    out_console.print(
        f"[bold green]wrote[/] {out}  ({t['source_parameters']:,} → {t['adapter_parameters']:,} "
        f"parameters; {t['energy_kept_of_adapter']:.2%} of the adapter's update energy kept, "
        f"min module {t['min_energy_kept']:.2%})"
    )


@app.command()
def export(
    adapter_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder (ours or third-party).")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="trtllm (npy pair for TensorRT-LLM / Triton), nim (a folder in a NIM adapter store) or peft.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (for nim: the store; the adapter goes into OUT/NAME).")
    ],
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Storage dtype. trtllm: the engine dtype (auto = the "
            "engine config's, else float16); peft/nim: auto keeps the adapter's.",
        ),
    ] = "auto",
    tp: Annotated[
        int,
        typer.Option("--tp", help="Tensor parallelism of the engine (interleaves fused qkv/gate_up rows per rank)."),
    ] = 1,
    engine_config: Annotated[
        Path | None,
        typer.Option("--engine-config", help="A TensorRT-LLM engine config.json: refuse what the engine would reject."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Adapter name in a NIM store (default: the adapter folder's name).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Base model config.json (or its folder), for fused modules at --tp > 1 "
            "(default: found via the adapter's base_model_name_or_path).",
        ),
    ] = None,
    with_trtllm: Annotated[bool, typer.Option("--with-trtllm", help="nim: add the TensorRT-LLM npy pair.")] = False,
    force: ForceOpt = False,
) -> None:
    """Convert a LoRA adapter into the formats NVIDIA's serving stack takes.

    trtllm writes model.lora_weights.npy [1, N, D] and model.lora_config.npy [1, N, 3] (scales
    folded into B, gate_proj → module 5, up_proj → 7, fused and MoE modules laid out as the runtime
    expects); nim writes OUT/NAME with adapter_config.json, adapter_model.safetensors and
    adapter_model.bin.
    """
    from phlora_nim.jobs.adapter_jobs import export as run

    target = run(
        adapter_dir,
        out,
        fmt=fmt,
        dtype=dtype,
        tp=tp,
        engine_config=engine_config,
        name=name,
        config=config,
        with_trtllm=with_trtllm,
        force=force,
    )
    out_console.print(f"[bold green]wrote[/] {target} ({fmt})")


@app.command()
def verify(
    base: Annotated[Path, typer.Option("--base", help="Base checkpoint folder.")],
    finetuned: Annotated[Path, typer.Option("--finetuned", help="Fine-tuned checkpoint folder.")],
    adapter: Annotated[Path, typer.Option("--adapter", help="PEFT LoRA adapter folder.")],
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="Text file, one prompt per line (needs a tokenizer in the checkpoint); "
            "default: random token sequences.",
        ),
    ] = None,
    max_kl: Annotated[float | None, typer.Option("--max-kl", help="Fail (exit 1) if mean KL exceeds this.")] = None,
    min_top1: Annotated[
        float | None, typer.Option("--min-top1", help="Fail (exit 1) if top-1 agreement falls below this (0–1).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check an adapter against its fine-tune: per-module reconstruction error, and for causal LMs,
    base+adapter (through PEFT) vs fine-tuned logits: mean KL and top-1 agreement."""
    from phlora_nim.jobs.verify import verify_adapter

    result = verify_adapter(base, finetuned, adapter, prompts=prompts)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        _print_verify(result)
    failed = []
    logits = result.get("logits") or {}
    if max_kl is not None and (not logits or logits["mean_kl"] > max_kl):
        failed.append(f"mean KL {logits.get('mean_kl', 'n/a')} > --max-kl {max_kl}")
    if min_top1 is not None and (not logits or logits["top1_agreement"] < min_top1):
        failed.append(f"top-1 agreement {logits.get('top1_agreement', 'n/a')} < --min-top1 {min_top1}")
    if failed:
        err_console.print("[bold red]verify failed:[/] " + "; ".join(failed))
        raise typer.Exit(1)


def _print_verify(result: dict[str, Any]) -> None:
    rec = result["reconstruction"]
    out_console.print(
        f"reconstruction: {rec['modules']} modules, relative Frobenius error mean "
        f"{rec['mean_relative_error']:.4g}, max {rec['max_relative_error']:.4g} "
        f"({rec['worst_module']})"
    )
    logits = result.get("logits")
    if logits:
        out_console.print(
            f"logits on {logits['tokens']} tokens: mean KL(fine-tuned ‖ base+adapter) = {logits['mean_kl']:.4g} "
            f"(base alone: {logits['base_mean_kl']:.4g}); top-1 agreement {logits['top1_agreement']:.2%} "
            f"(base alone: {logits['base_top1_agreement']:.2%})"
        )
    elif result.get("logits_skipped"):
        out_console.print(f"logits: skipped ({result['logits_skipped']})")


RepoOpt = Annotated[
    Path,
    typer.Option("--model-repository", "-m", help="Triton model repository folder (created if missing)."),
]


@app.command()
def convert(
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
        str,
        typer.Option(
            "--backend",
            help="tensorrtllm: config for a real TensorRT-LLM engine (GPU). reference: the CPU reference "
            "model with the same LoRA contract.",
        ),
    ] = "reference",
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    budget_params: BudgetOpt = None,
    max_rank: MaxRankOpt = None,
    snap_ranks: SnapOpt = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="Engine dtype: LoRA weights are laid out and sent in it (float16, bfloat16, float32)."
        ),
    ] = "float32",
    engine_dir: Annotated[
        str | None, typer.Option("--engine-dir", help="tensorrtllm: engine folder as Triton sees it (gpt_model_path).")
    ] = None,
    engine_config: Annotated[
        Path | None,
        typer.Option("--engine-config", help="An engine config.json: refuse adapters it would reject."),
    ] = None,
    served_path: Annotated[
        str | None,
        typer.Option(
            "--served-path",
            help="Where Triton will mount this repository (sets lora_prefetch_dir under it); default: "
            "the repository's own path for reference, /models for tensorrtllm.",
        ),
    ] = None,
    tokenizer_dir: Annotated[
        str | None,
        typer.Option("--tokenizer-dir", help="Tokenizer folder as Triton will see it (default: --base)."),
    ] = None,
    tp: Annotated[int, typer.Option("--tp", help="Tensor parallelism of the engine.")] = 1,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Triton max batch size.")] = 8,
    max_lora_rank: Annotated[
        int, typer.Option("--max-lora-rank", help="reference: largest rank accepted on requests.")
    ] = 64,
    lora_cache_mb: Annotated[
        int, typer.Option("--lora-cache-mb", help="Host LoRA cache (0 = sized from the registered adapters).")
    ] = 0,
    decoupled: Annotated[
        bool, typer.Option("--decoupled", help="Stream tokens (ModelStreamInfer) instead of one response.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda[:N] for the decomposition.")] = "cpu",
    replace: Annotated[
        bool, typer.Option("--replace", help="Allow a registered name to get different weights (new task id).")
    ] = False,
) -> None:
    """Extract adapters from fine-tunes and register them in a Triton model repository.

    For each --finetuned: extract the LoRA adapter (default --rank 16), lay it out as TensorRT-LLM
    tensors in the engine dtype, and register it (name, content-derived task id, ranks, modules).
    The repository gets the inflight_batcher_llm models (preprocessing, tensorrt_llm,
    postprocessing, ensemble), LoRA cache parameters sized for the adapters, the prefetch folder
    and a NIM adapter store. Nothing is changed if any step fails.
    """
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.repository.configs import RepositorySettings
    from phlora_nim.repository.convert import ConvertJob
    from phlora_nim.repository.convert import convert as run

    options = ExtractOptions(
        policy=_policy(rank, energy, budget_params, max_rank, snap_ranks, default_rank=16), device=device
    )
    settings = RepositorySettings(
        backend=backend,
        base=str(Path(base).resolve()),
        dtype=dtype,
        engine_dir=engine_dir,
        served_path=served_path,
        tokenizer_dir=tokenizer_dir,
        max_batch_size=max_batch_size,
        decoupled=decoupled,
        max_lora_rank=max_lora_rank,
        lora_cache_bytes=lora_cache_mb << 20,
    )
    job = ConvertJob(
        base=base,
        finetuned=tuple(finetuned),
        names=tuple(name or ()),
        repository=model_repository,
        options=options,
        settings=settings,
        replace=replace,
        tp=tp,
        engine_config=engine_config,
    )
    start = time.perf_counter()
    with _tensor_progress("convert") as bar:
        task = bar.add_task("planning", total=None)
        current = {"name": ""}
        done = run(
            job,
            command=_command_line(),
            on_plan=lambda n: bar.update(task, total=n, description=""),
            on_adapter=lambda n: current.update(name=n),
            progress=lambda t: bar.update(task, advance=1, description=f"{current['name']}: {t}"),
        )
    seconds = time.perf_counter() - start
    table = Table(title=f"registered in {model_repository}")
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
        f"({total_mb / max(seconds, 1e-9):.2f} MB/s). Serve with: phlora-nim triton -m {model_repository}"
    )


@app.command()
def adapters(
    model_repository: RepoOpt = Path("model_repository"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry entries as JSON.")] = False,
) -> None:
    """List the adapters registered in a model repository."""
    from dataclasses import asdict

    from phlora_nim.repository.convert import read_registry

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
            " ".join(e.extra.get("trtllm_modules", [])) or str(len(e.modules)),
            e.dtype,
            f"{int(e.extra.get('bytes', 0)) / 1e6:.2f}",
            e.created,
        )
    out_console.print(table)


@app.command()
def remove(
    name: Annotated[str, typer.Argument(help="Adapter to unregister.")],
    model_repository: RepoOpt = Path("model_repository"),
) -> None:
    """Unregister an adapter and delete its files (its task id is never given to other weights)."""
    from phlora_nim.repository.convert import remove_adapter

    entry = remove_adapter(model_repository, name)
    out_console.print(f"[bold]removed[/] {entry.name} (lora_task_id {entry.task_id})")


@app.command("engine-plan")
def engine_plan(
    model_repository: RepoOpt = Path("model_repository"),
    checkpoint_dir: Annotated[
        str, typer.Option("--checkpoint-dir", help="TensorRT-LLM checkpoint folder to show in the command.")
    ] = "<trtllm_checkpoint_dir>",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print the trtllm-build LoRA flags that fit every registered adapter."""
    from phlora_nim.repository.convert import engine_plan as plan_for
    from phlora_nim.repository.convert import read_registry

    plan = plan_for(read_registry(model_repository))
    if as_json:
        out_console.print_json(json.dumps(plan))
        return
    command = ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", "<engine_dir>", *plan["flags"]]
    out_console.print(shlex.join(command), soft_wrap=True, markup=False, highlight=False)


@app.command()
def triton(
    model_repository: RepoOpt = Path("model_repository"),
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="KServe v2 gRPC port.")] = 8001,
    http_port: Annotated[int, typer.Option("--http-port", help="KServe v2 HTTP port.")] = 8000,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port.")] = 8002,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    exit_timeout: Annotated[
        int, typer.Option("--exit-timeout", help="Seconds in-flight requests get to finish on Ctrl-C / SIGTERM.")
    ] = 30,
) -> None:
    """Run the real Triton server (from the nvidia-pytriton wheel, CPU) on a model repository.

    Waits until every model is ready, streams Triton's log, and stops cleanly on Ctrl-C / SIGTERM.
    """
    import signal

    from phlora_nim.triton.launcher import LocalTriton

    server = LocalTriton(
        model_repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        host=host,
        exit_timeout=exit_timeout,
        on_log=lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True),
    )

    def _stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    server.start()
    out_console.print(f"[bold green]Triton ready[/]: gRPC {server.grpc_url}, HTTP {server.http_url}")
    try:
        code = server.wait()
        err_console.print(f"tritonserver exited with code {code}", markup=False)
    except KeyboardInterrupt:
        code = 0
    finally:
        # Always: stops what is left of Triton's process group (stubs) and frees its shared memory.
        stopped = server.stop()
    raise typer.Exit(code or stopped or 0)


def _register_serve() -> None:
    """``phlora-nim serve``: the router (its options live beside it, in ``phlora_nim.router.cli``)."""
    from phlora_nim.router.cli import serve

    app.command("serve")(serve)


_register_serve()


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder for the demo (replaced).")] = Path(
        "demo-output"
    ),
    steps: Annotated[int, typer.Option("--steps", help="Full fine-tuning steps per checkpoint.")] = 40,
    energy: Annotated[
        float, typer.Option("--energy", help="Share of each module's delta energy the adapters keep.")
    ] = 0.99,
) -> None:
    """Run the whole job on an embedded default, on CPU.

    Builds a small Llama with its tokenizer and three full fine-tunes of it (each taught its own
    rule), converts them into one Triton model repository, starts the real tritonserver and the
    router, sends mixed concurrent requests through the router (an adapter per request, by model
    name), and prints each answer beside the fine-tuned model's own output. Stops everything at the end.
    """
    from phlora_nim.demo.run import run_demo

    rows = run_demo(out, steps=steps, energy=energy, console=out_console)
    if not all(r.match for r in rows):
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``phlora-nim`` script."""
    _invocation[:] = list(sys.argv[1:] if argv is None else argv)
    try:
        # Standalone mode: usage errors print and exit 2, --help exits 0, typer.Exit(n) exits n.
        app(args=argv, prog_name="phlora-nim")
    except PhloraError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
