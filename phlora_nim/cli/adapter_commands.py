"""Commands on single adapters: ``extract``, ``inspect``, ``prune``, ``verify`` and ``export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from phlora_nim.cli.app import (
    BudgetOpt,
    DeviceOpt,
    DtypeOpt,
    EnergyOpt,
    ForceOpt,
    LayoutOpt,
    MaxRankOpt,
    RankOpt,
    SnapOpt,
    StrictOpt,
    command_line,
    err_console,
    out_console,
    rank_policy,
    tensor_progress,
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

ExtraOpt = Annotated[
    str,
    typer.Option(
        "--extra",
        help="Deltas outside linear modules (embeddings, lm_head, norms, biases): drop (measure and "
        "warn), save (as modules_to_save, tied heads and resized vocabularies included; not servable by "
        "vLLM/NIM/TensorRT-LLM) or error.",
    ),
]
TargetModulesOpt = Annotated[
    str | None,
    typer.Option(
        "--target-modules",
        help=r"Regex over module paths to decompose instead of the architecture map, e.g. '.*\.(q_proj|v_proj)'.",
    ),
]


TargetModulesOpt = Annotated[
    str | None,
    typer.Option(
        "--target-modules",
        help="Regex over module paths to decompose instead of the architecture map, "
        r"e.g. '.*\.(q_proj|v_proj)'.",
    ),
]
ComponentsOpt = Annotated[
    str | None,
    typer.Option(
        "--components",
        help="Multi-part models (VLMs): comma-separated parts to write adapters for, e.g. "
        "language_model,vision_tower,multi_modal_projector (default: the language model; the others' "
        "share of the delta is reported). Tower/projector LoRA is served by vLLM with "
        "--enable-tower-connector-lora only.",
    ),
]


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("extract")(extract_command)
    app.command("inspect")(inspect_command)
    app.command("prune")(prune_command)
    app.command("export")(export_command)
    app.command("verify")(verify_command)


def extract_command(
    base: Annotated[
        Path, typer.Option("--base", help="Base checkpoint: HF model folder, .safetensors file or hub id (owner/name).")
    ],
    finetuned: Annotated[
        Path, typer.Option("--finetuned", help="Full fine-tune of the base, same layout (folder, file or hub id).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to create.")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    budget_params: BudgetOpt = None,
    max_rank: MaxRankOpt = None,
    snap_ranks: SnapOpt = None,
    exact: Annotated[bool, typer.Option("--exact", help="Full SVD instead of randomized (slower).")] = False,
    device: DeviceOpt = "cpu",
    extra: ExtraOpt = "drop",
    target_modules: TargetModulesOpt = None,
    components: ComponentsOpt = None,
    dtype: DtypeOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized sketches.")] = 0,
    layout: LayoutOpt = "padded",
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip energy.png.")] = False,
    force: ForceOpt = False,
    target_recovery: TargetRecoveryOpt = None,
    target_kl: TargetKlOpt = None,
    target_top1: TargetTop1Opt = None,
    prompts: PromptsOpt = None,
    self_probes: SelfProbesOpt = False,
    calibration: CalibrationOpt = None,
    allow_mismatch: AllowMismatchOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Extract a LoRA adapter from a base checkpoint and its full fine-tune (PHLoRA).

    Every linear module's delta ΔW = W_ft − W_base is decomposed by SVD and truncated. Writes a
    PEFT adapter (adapter_config.json, adapter_model.safetensors), phlora_report.json and energy.png.
    Default policy: --rank 16. With ranks that differ per module (--energy, --budget-params, a fidelity
    target) the default --layout padded stores every module at the largest rank; the summary and the
    report give the true and the stored parameter counts.
    """
    from phlora_nim.jobs.adapter_jobs import extract

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
        exact=exact,
        device=device,
        non_linear_deltas=extra,
        dtype=dtype,
        target_modules=target_modules,
        seed=seed,
        allow_mismatch=allow_mismatch,
        threads=threads,
        components=tuple(c.strip() for c in components.split(",") if c.strip()) if components else None,
    )
    with tensor_progress("extract") as bar:
        task = bar.add_task("planning", total=None)
        report = extract(
            base,
            finetuned,
            out,
            options,
            force=force,
            command=command_line(),
            plot=not no_plot,
            on_plan=lambda n: bar.update(task, total=n, description=""),
            progress=lambda name: bar.update(task, advance=1, description=name),
            layout=layout,
        )
    _print_extract_summary(report, out)


def _print_extract_summary(report: dict[str, Any], folder: Path) -> None:
    t = report["totals"]
    stored = t.get("stored_parameters", t["adapter_parameters"])
    how = "mixed" if t.get("layout") == "mixed" else f"padded: every module at rank {t['max_rank']}"
    out_console.print(
        f"[bold green]wrote[/] {folder}  ({t['modules']} modules, ranks {t['min_rank']}–{t['max_rank']}, "
        f"{t['adapter_parameters']:,} parameters, {stored:,} stored ({how}))"
    )
    for name, part in (t.get("components") or {}).items():
        out_console.print(
            f"{name}: {part['share_of_delta']:.2%} of the fine-tune's delta, "
            + ("in the adapter" if part["in_adapter"] else "not in the adapter (--components to include it)")
        )
    for problems in (report.get("expert_serving") or {}).values():
        for problem in problems:
            out_console.print(f"serving: {problem}")
    if t.get("rank_capped_modules"):
        out_console.print(
            f"rank capped at the smaller side of {t['rank_capped_modules']} modules (exact: their whole delta is kept)"
        )
    out_console.print(
        f"energy kept: {t['energy_kept_linear']:.2%} of linear-module delta energy "
        f"(min module {t['min_energy_kept']:.2%}); {t['energy_kept_total']:.2%} of the whole fine-tune delta"
    )
    search = report.get("fidelity_target")
    if search:
        _print_search(search)
    if report.get("loading"):
        out_console.print("load it under PEFT (embeddings saved whole):", markup=False)
        out_console.print(report["loading"], markup=False, highlight=False)
    if "output_energy_kept_linear" in t:
        out_console.print(
            f"activation-aware: {t['output_energy_kept_linear']:.2%} of the output change on the calibration "
            f"prompts (energy above is of ΔW itself)"
        )
    if "total_s" in report.get("timings", {}):
        tm = report["timings"]
        out_console.print(
            f"time: {tm['total_s']:.2f} s (reading {tm.get('load_s', 0):.2f} s, "
            f"decomposing {tm.get('decompose_s', 0):.2f} s)"
        )


def _print_search(search: dict[str, Any]) -> None:
    target = search["target"]
    goal = " and ".join(
        ([f"recovery ≥ {target['min_recovery']:g}"] if target.get("min_recovery") is not None else [])
        + ([f"KL ≤ {target['max_kl']:g}"] if target["max_kl"] is not None else [])
        + ([f"top-1 ≥ {target['min_top1']:g}"] if target["min_top1"] is not None else [])
    )
    base, floor = search["base_alone"], search.get("floor")
    reach = (
        f"; floor, base + every linear delta at full rank: KL {floor['kl']:.4g}, top-1 {floor['top1']:.2%}, "
        f"reachable {floor['reachable_kl']:.1%} / {floor['reachable_top1']:.1%} of the gap"
        if floor and target.get("min_recovery") is not None
        else ""
    )
    table = Table(
        title=f"budget search for {goal} on {search['scored_tokens']} tokens of {search['prompts']} "
        f"(base alone: KL {base['kl']:.4g}, top-1 {base['top1']:.2%}{reach}); recovery: share of the reachable gap"
    )
    for col in ("step", "budget", "parameters", "KL", "top-1", "recovery KL", "recovery top-1", "raw KL / top-1", ""):
        table.add_column(col, justify="right")
    for i, s in enumerate(search["steps"], 1):
        table.add_row(
            str(i),
            f"{s['budget']:,}",
            f"{s['params']:,}",
            f"{s['kl']:.4g}",
            f"{s['top1']:.2%}",
            f"{s['recovery_kl']:.1%}",
            f"{s['recovery_top1']:.1%}",
            f"{s['raw_recovery_kl']:.1%} / {s['raw_recovery_top1']:.1%}",
            "meets" if s["met"] else "misses",
        )
    out_console.print(table)
    chosen = search["chosen"]
    check = search.get("check_on_own_samples") or {}
    if check.get("checked"):
        out_console.print(
            f"checked on {check['samples']} held-out samples of the fine-tune: recovery {check['recovery']:.1%} "
            f"(on the probes {check['recovery_on_probes']:.1%}); greedy continuations reproduced "
            f"{check['adapter']['greedy_same']:.0%} (base alone {check['base_alone']['greedy_same']:.0%})"
        )
    tm = search.get("search_timings") or {}
    if tm:
        out_console.print(
            f"search: decomposed to rank {', '.join(map(str, search.get('decomposed_to_ranks', [])))}; probes "
            f"{tm.get('probes_s', 0):.1f} s, decomposing {tm.get('decompose_s', 0):.1f} s, floor "
            f"{tm.get('floor_s', 0):.1f} s, {tm.get('evaluations', 0):.0f} evaluations {tm.get('evaluate_s', 0):.1f} s"
        )
    out_console.print(
        f"chosen budget {chosen['budget']:,} ({chosen['params']:,} parameters): KL {chosen['kl']:.4g}, top-1 "
        f"{chosen['top1']:.2%}, recovery {chosen['recovery_kl']:.1%} (KL) / {chosen['recovery_top1']:.1%} (top-1) "
        f"of the reachable gap, raw {chosen['raw_recovery_kl']:.1%} / {chosen['raw_recovery_top1']:.1%} "
        f"(base alone: KL {base['kl']:.4g}, top-1 {base['top1']:.2%})"
    )


def inspect_command(
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


def prune_command(
    adapter_dir: Annotated[Path, typer.Argument(help="Any PEFT LoRA adapter folder (ours or third-party).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to create.")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    budget_params: BudgetOpt = None,
    max_rank: MaxRankOpt = None,
    snap_ranks: SnapOpt = None,
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    layout: LayoutOpt = "padded",
) -> None:
    """Re-truncate a LoRA adapter to a lower rank, optimally, without forming ΔW.

    QR of both factors and an SVD of the small r×r core give the exact SVD of the update; keeping
    its top directions is the best lower-rank adapter (equal to extracting at that rank directly).
    """
    from phlora_nim.jobs.adapter_jobs import prune

    report = prune(
        adapter_dir,
        out,
        rank_policy(rank, energy, budget_params, max_rank, snap_ranks),
        force=force,
        command=command_line(),
        dtype=dtype,
        layout=layout,
    )
    t = report["totals"]
    out_console.print(
        f"[bold green]wrote[/] {out}  ({t['source_parameters']:,} → {t['adapter_parameters']:,} "
        f"parameters, {t['stored_parameters']:,} stored ({t['layout']}); {t['energy_kept_of_adapter']:.2%} of "
        f"the adapter's update energy kept, min module {t['min_energy_kept']:.2%})"
    )


def export_command(
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
    strict: Annotated[bool, StrictOpt] = False,
    force: ForceOpt = False,
    layout: LayoutOpt = "padded",
) -> None:
    """Convert a LoRA adapter into the formats NVIDIA's serving stack takes.

    trtllm writes model.lora_weights.npy [1, N, D] and model.lora_config.npy [1, N, 3] (scales
    folded into B, gate_proj → module 5, up_proj → 7, fused and MoE modules laid out as the runtime
    expects); nim writes OUT/NAME with adapter_config.json, adapter_model.safetensors and
    adapter_model.bin.
    """
    from phlora_nim.jobs.adapter_jobs import export

    target = export(
        adapter_dir,
        out,
        fmt=fmt,
        dtype=dtype,
        tp=tp,
        engine_config=engine_config,
        name=name,
        config=config,
        with_trtllm=with_trtllm,
        strict=strict,
        force=force,
        layout=layout,
    )
    out_console.print(f"[bold green]wrote[/] {target} ({fmt}{', ' + layout if fmt == 'peft' else ''})")


def verify_command(
    base: Annotated[Path, typer.Option("--base", help="Base checkpoint folder or hub id (owner/name).")],
    finetuned: Annotated[Path, typer.Option("--finetuned", help="Fine-tuned checkpoint folder or hub id.")],
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
    min_recovery: Annotated[
        float | None,
        typer.Option(
            "--min-recovery",
            help="Fail (exit 1) if the adapter closes less than this share of the reachable base→fine-tune gap, in "
            "KL ((KL_base − KL_adapter)/(KL_base − KL_floor), the floor being base + the fine-tune's whole delta on "
            "every module the adapter carries) or in top-1 disagreement (0–1); the raw share is printed beside it.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check an adapter against its fine-tune: per-module reconstruction error, and for causal LMs,
    base+adapter (through PEFT) vs fine-tuned logits: mean KL and top-1 agreement."""
    from phlora_nim.core.errors import OptionError
    from phlora_nim.jobs.verify import gate_failures, verify_adapter

    if min_recovery is not None and not 0.0 < min_recovery <= 1.0:
        raise OptionError(
            "recovery gate must be a share of the base→fine-tune gap",
            where="--min-recovery",
            expected="a number in (0, 1], e.g. 0.9",
            found=str(min_recovery),
        )
    result = verify_adapter(base, finetuned, adapter, prompts=prompts)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        _print_verify(result)
    failed, warnings = gate_failures(
        result.get("logits") or {}, max_kl=max_kl, min_top1=min_top1, min_recovery=min_recovery
    )
    for warning in [*result.get("warnings", []), *warnings]:
        err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    if failed:
        err_console.print("[bold red]verify failed:[/] " + "; ".join(failed))
        raise typer.Exit(1)


def _share(value: float | None) -> str:
    return "undefined (no reachable gap)" if value is None else f"{value:.1%}"


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
            f"(base alone: {logits['base_top1_agreement']:.2%}); recovery of the reachable base→fine-tune gap "
            f"{_share(logits['recovery_kl'])} (KL) / {_share(logits['recovery_top1'])} (top-1) (floor, every carried "
            f"module at full rank and saved tensors: KL {logits['floor_mean_kl']:.4g}, top-1 "
            f"{logits['floor_top1_agreement']:.2%}; raw recovery of the whole gap {logits['raw_recovery_kl']:.1%} / "
            f"{logits['raw_recovery_top1']:.1%})"
        )
        if logits.get("base_resized_to"):
            out_console.print(f"the base was resized to the fine-tune's vocabulary ({logits['base_resized_to']})")
    image = result.get("image_logits")
    if image:
        out_console.print(
            f"logits on {image['tokens']} tokens after an image: mean KL {image['mean_kl']:.4g} (base alone: "
            f"{image['base_mean_kl']:.4g}, floor {image['floor_mean_kl']:.4g}); top-1 agreement "
            f"{image['top1_agreement']:.2%}; recovery {image['recovery_kl']:.1%} (KL) / {image['recovery_top1']:.1%} "
            f"(top-1) of the reachable gap, {image['raw_recovery_kl']:.1%} / {image['raw_recovery_top1']:.1%} of the "
            "whole gap (a language-model adapter leaves the tower's and projector's change out)"
        )
    if result.get("logits_skipped"):
        out_console.print(f"logits: skipped ({result['logits_skipped']})")
