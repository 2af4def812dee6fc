"""Commands on single adapters: ``extract``, ``inspect``, ``prune``, ``verify`` and ``export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from phlora_nim.cli.adapter_options import ExportFlags, ExtractFlags, InspectFlags, PruneFlags, VerifyFlags
from phlora_nim.cli.app import command_line, err_console, out_console, tensor_progress
from phlora_nim.cli.extraction_flags import DecompositionFlags, FidelityFlags, RankFlags, extract_options
from phlora_nim.cli.flags import command


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("extract")(extract_command)
    app.command("inspect")(inspect_command)
    app.command("prune")(prune_command)
    app.command("export")(export_command)
    app.command("verify")(verify_command)


@command(ExtractFlags, RankFlags, FidelityFlags, DecompositionFlags)
def extract_command(
    flags: ExtractFlags, rank: RankFlags, fidelity: FidelityFlags, decomposition: DecompositionFlags
) -> None:
    """Extract a LoRA adapter from a base checkpoint and its full fine-tune (PHLoRA).

    Every linear module's delta ΔW = W_ft − W_base is decomposed by SVD and truncated. Writes a
    PEFT adapter (adapter_config.json, adapter_model.safetensors), phlora_report.json and energy.png.
    Default policy: --rank 16. With ranks that differ per module (--energy, --budget-params, a fidelity
    target) the default --layout padded stores every module at the largest rank; the summary and the
    report give the true and the stored parameter counts.
    """
    from phlora_nim.jobs.adapter_jobs import extract

    options = extract_options(
        rank,
        fidelity,
        decomposition,
        exact=flags.exact,
        non_linear_deltas=flags.extra,
        dtype=flags.dtype,
        target_modules=flags.target_modules,
        seed=flags.seed,
        components=flags.component_names,
    )
    with tensor_progress("extract") as bar:
        task = bar.add_task("planning", total=None)
        report = extract(
            flags.base,
            flags.finetuned,
            flags.out,
            options,
            force=flags.force,
            command=command_line(),
            plot=not flags.no_plot,
            on_plan=lambda n: bar.update(task, total=n, description=""),
            progress=lambda name: bar.update(task, advance=1, description=name),
            layout=flags.layout,  # type: ignore[arg-type]  # checked by the job
        )
    _print_extract_summary(report, flags.out)


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
    decisive = search.get("decisive_positions", 0)
    table = Table(
        title=f"budget search for {goal} on {search['scored_tokens']} tokens of {search['prompts']}, "
        f"{decisive} decisive choices of the fine-tune (base alone: KL {base['kl']:.4g}, top-1 {base['top1']:.2%}"
        f"{reach}); recovery: share of the reachable gap; decisive: share of the fine-tune's decisive choices "
        "kept (what a recovery target holds to when there are enough)"
    )
    columns = ("step", "budget", "parameters", "KL", "top-1", "recovery KL", "recovery top-1", "raw KL / top-1")
    for col in (*columns, "decisive", ""):
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
            "–" if s.get("recovery_decisive") is None else f"{s['recovery_decisive']:.1%}",
            "meets" if s["met"] else "misses",
        )
    out_console.print(table)
    chosen = search["chosen"]
    check = search.get("check_on_own_samples") or {}
    if check.get("checked"):
        out_console.print(
            f"checked on {check['samples']} held-out samples of the fine-tune: "
            f"{'decisive choices kept' if check.get('recovery_decisive') is not None else 'recovery'} "
            f"{check['recovery']:.1%} "
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
    share = chosen.get("recovery_decisive")
    kept = "" if share is None else f"decisive choices kept {share:.1%}, "
    out_console.print(
        f"chosen budget {chosen['budget']:,} ({chosen['params']:,} parameters): {kept}KL {chosen['kl']:.4g}, top-1 "
        f"{chosen['top1']:.2%}, recovery {chosen['recovery_kl']:.1%} (KL) / {chosen['recovery_top1']:.1%} (top-1) "
        f"of the reachable gap, raw {chosen['raw_recovery_kl']:.1%} / {chosen['raw_recovery_top1']:.1%} "
        f"(base alone: KL {base['kl']:.4g}, top-1 {base['top1']:.2%})"
    )


@command(InspectFlags)
def inspect_command(flags: InspectFlags) -> None:
    """Print an adapter's extraction report: energy kept, ranks and error per module."""
    from phlora_nim.converters.report import read_report

    adapter_dir = flags.adapter_dir
    report = read_report(adapter_dir)
    if flags.as_json:
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
    for m in rows[: flags.top or None]:
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


@command(PruneFlags, RankFlags)
def prune_command(flags: PruneFlags, rank: RankFlags) -> None:
    """Re-truncate a LoRA adapter to a lower rank, optimally, without forming ΔW.

    QR of both factors and an SVD of the small r×r core give the exact SVD of the update; keeping
    its top directions is the best lower-rank adapter (equal to extracting at that rank directly).
    """
    from phlora_nim.jobs.adapter_jobs import prune

    report = prune(
        flags.adapter_dir,
        flags.out,
        rank.policy(),
        force=flags.force,
        command=command_line(),
        dtype=flags.dtype,
        layout=flags.layout,  # type: ignore[arg-type]  # checked by the job
    )
    t = report["totals"]
    out_console.print(
        f"[bold green]wrote[/] {flags.out}  ({t['source_parameters']:,} → {t['adapter_parameters']:,} "
        f"parameters, {t['stored_parameters']:,} stored ({t['layout']}); {t['energy_kept_of_adapter']:.2%} of "
        f"the adapter's update energy kept, min module {t['min_energy_kept']:.2%})"
    )


@command(ExportFlags)
def export_command(flags: ExportFlags) -> None:
    """Convert a LoRA adapter into the formats NVIDIA's serving stack takes.

    trtllm writes model.lora_weights.npy [1, N, D] and model.lora_config.npy [1, N, 3] (scales
    folded into B, gate_proj → module 5, up_proj → 7, fused and MoE modules laid out as the runtime
    expects); nim writes OUT/NAME with adapter_config.json, adapter_model.safetensors and
    adapter_model.bin.
    """
    from phlora_nim.jobs.adapter_jobs import export

    target = export(
        flags.adapter_dir,
        flags.out,
        fmt=flags.fmt,
        dtype=flags.dtype,
        tp=flags.tp,
        engine_config=flags.engine_config,
        name=flags.name,
        config=flags.config,
        with_trtllm=flags.with_trtllm,
        strict=flags.strict,
        force=flags.force,
        layout=flags.layout,
    )
    layout = f", {flags.layout}" if flags.fmt == "peft" else ""
    out_console.print(f"[bold green]wrote[/] {target} ({flags.fmt}{layout})")


@command(VerifyFlags)
def verify_command(flags: VerifyFlags) -> None:
    """Check an adapter against its fine-tune: per-module reconstruction error, and for causal LMs,
    base+adapter (through PEFT) vs fine-tuned logits: mean KL and top-1 agreement."""
    from phlora_nim.jobs.verify import gate_failures, verify_adapter

    result = verify_adapter(flags.base, flags.finetuned, flags.adapter, prompts=flags.prompts)
    if flags.as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        _print_verify(result)
    failed, warnings = gate_failures(
        result.get("logits") or {}, max_kl=flags.max_kl, min_top1=flags.min_top1, min_recovery=flags.min_recovery
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
