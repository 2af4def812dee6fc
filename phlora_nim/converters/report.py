"""``phlora_report.json``: what an extraction kept, per module and in total."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from phlora_nim.converters.expert_serving import expert_readers, serving_problems
from phlora_nim.converters.extract import ExtractionResult, ExtractOptions, ModuleResult, rank_capped, summary_energy
from phlora_nim.converters.extraction_report import REPORT_FORMAT, ExtractionReport
from phlora_nim.converters.formats.peft import stored_parameters
from phlora_nim.converters.whitening import WhitenedFactors, weight_energy
from phlora_nim.core.errors import InputError
from phlora_nim.core.json_files import read_json

REPORT_NAME = "phlora_report.json"
_TOP_SINGULAR = 16
_CURVE_POINTS = 256


def _module_entry(r: ModuleResult, *, capped: bool = False) -> dict[str, Any]:
    """One module's entry: plan, rank and energy figures (weight space; for activation-aware
    factors the output-space figures beside them)."""
    p = r.plan
    entry: dict[str, Any] = {
        "name": p.module,
        "type": p.module_type,
        "trtllm": p.trtllm,
        "layer": p.layer,
        "shape": [p.out_dim, p.in_dim],
        "rank": r.rank,
    }
    if capped:
        entry["rank_capped"] = True  # --rank is above this module's smaller side: capped there (exact)
    if r.factors is None:
        entry.update(
            zero_delta=True,
            energy_kept=1.0,
            relative_error=0.0,
            delta_energy=0.0,
            top_singular_values=[],
            energy_curve=[],
        )
    else:
        f = r.factors
        curve = (f.S[:_CURVE_POINTS].double().pow(2).cumsum(0) / f.total_energy).clamp(max=1.0)
        kept = weight_energy(f, r.rank)
        if isinstance(f, WhitenedFactors):
            # Weight-space figures stay what they say; the output-space ones go beside them.
            entry.update(
                activation_aware=True,
                output_energy_kept=f.energy(r.rank),
                output_relative_error=f.relative_error(r.rank),
                output_delta_energy=f.total_energy,
            )
            curve = (f.weight_gain[:_CURVE_POINTS].cumsum(0) / max(f.weight_total, 1e-300)).clamp(0.0, 1.0)
        entry.update(
            zero_delta=False,
            energy_kept=kept,
            relative_error=(1.0 - kept) ** 0.5,
            delta_energy=f.weight_total if isinstance(f, WhitenedFactors) else f.total_energy,
            top_singular_values=[round(float(s), 8) for s in f.S[:_TOP_SINGULAR]],
            energy_curve=[round(float(c), 6) for c in curve],
            method="exact" if f.exact else f"randomized ({f.power_iterations} Krylov steps)",
            seconds=round(r.load_s + r.decompose_s, 4),
        )
    return entry


def build_report(
    result: ExtractionResult,
    options: ExtractOptions,
    *,
    base: str,
    finetuned: str,
    command: str | None = None,
) -> ExtractionReport:
    """The report of ``result`` (energies in float64 against the full ‖ΔW‖²_F)."""
    capped = {t.module for t in rank_capped(result.plan.targets, options.policy)}
    modules = [_module_entry(r, capped=r.plan.module in capped) for r in result.modules]
    extras = [
        {
            "name": x.plan.name,
            "kind": x.plan.kind,
            "base_shape": list(x.plan.base_shape),
            "finetuned_shape": list(x.plan.ft_shape),
            "delta_energy": x.energy,
            "resized": x.plan.resized,
            "added_rows": x.added_rows,
            "added_rows_energy": x.added_energy,
            "action": x.action,
        }
        for x in result.extras
    ]
    kept = [m["energy_kept"] for m in modules if not m["zero_delta"]]
    ranks = [m["rank"] for m in modules if not m["zero_delta"]]
    totals = summary_energy(result)
    totals.update(
        modules=len(modules),
        zero_delta_modules=sum(1 for m in modules if m["zero_delta"]),
        adapter_parameters=result.adapter.num_parameters(),
        # What the default (padded) folder holds; the writer overrides it for the layout it writes.
        stored_parameters=stored_parameters(result.adapter, "padded"),
        layout="padded",
        min_energy_kept=min(kept) if kept else 1.0,
        mean_energy_kept=sum(kept) / len(kept) if kept else 1.0,
        min_rank=min(ranks) if ranks else 0,
        max_rank=max(ranks) if ranks else 0,
        mean_rank=sum(ranks) / len(ranks) if ranks else 0.0,
        dropped_extra_energy=sum(x.energy for x in result.extras if x.action == "dropped"),
        rank_capped_modules=len(capped),
    )
    if result.plan.architecture is not None and result.plan.architecture.components:
        totals["components"] = _component_shares(result, modules, extras)
    return ExtractionReport(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        base=base,
        finetuned=finetuned,
        family=result.plan.family,
        policy=options.policy,
        method=("exact SVD" if options.exact else "randomized block Krylov SVD")
        + (" of ΔW·L, activation-aware (whitened by the base's input statistics)" if options.calibration else ""),
        dtype=str(result.plan.out_dtype).removeprefix("torch."),
        extra=options.non_linear_deltas,
        warnings=tuple(result.plan.warnings),
        belonging=result.plan.similarity.to_json() if result.plan.similarity else None,
        totals=totals,
        timings={k: round(v, 4) for k, v in result.timings.items()},
        modules=tuple(modules),
        extras=tuple(extras),
        expert_serving=_expert_serving(result),
    )


def _expert_serving(result: ExtractionResult) -> dict[str, list[str]]:
    """For a MoE family: per engine, what it would miss of this adapter (``expert_serving.yaml``); the
    written folder pads every module to one rank, so what remains is a router gate some engines ignore."""
    amap = result.plan.architecture
    if amap is None:
        return {}
    modules = result.adapter.modules
    experts = {name: w.rank for name, w in modules.items() if ".experts." in name}
    routers = [name for name, w in modules.items() if amap.match(name) and amap.match(name)[0].trtllm == "moe_router"]
    rank = max((w.rank for w in modules.values()), default=0)
    out = {}
    for reader in expert_readers():
        if reader.family == amap.family and experts:
            out[reader.engine] = serving_problems(reader, dict.fromkeys(experts, rank), routers)
    return out


def _component_shares(
    result: ExtractionResult, modules: list[dict[str, Any]], extras: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each component's share of the fine-tune's delta energy (a VLM's language model, vision tower,
    projector), whether the adapter carries it, and the energy the adapter keeps of it."""
    amap = result.plan.architecture
    assert amap is not None
    carried = {m["name"] for m in modules if not m["zero_delta"]}
    shares: dict[str, dict[str, Any]] = {}
    whole = 0.0
    rows = [(m["name"], m["delta_energy"], m["delta_energy"] * m["energy_kept"], True) for m in modules]
    rows += [
        (x["name"], x["delta_energy"], x["delta_energy"] if x["action"] == "saved" else 0.0, False)
        for x in extras
        if x["delta_energy"] is not None
    ]
    for name, energy, kept, is_module in rows:
        whole += energy
        component = amap.component(name)
        if component is None:
            continue
        entry = shares.setdefault(component.name, {"delta_energy": 0.0, "kept_energy": 0.0, "adapter_modules": 0})
        entry["delta_energy"] += energy
        entry["kept_energy"] += kept
        entry["adapter_modules"] += is_module and name in carried
    for entry in shares.values():
        entry["share_of_delta"] = entry["delta_energy"] / whole if whole else 0.0
        entry["in_adapter"] = entry["adapter_modules"] > 0
    return shares


def write_report(report: dict[str, Any], folder: Path) -> Path:
    path = Path(folder) / REPORT_NAME
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


def read_report(folder: Path) -> dict[str, Any]:
    """Load ``phlora_report.json`` from an adapter folder."""
    path = Path(folder) / REPORT_NAME
    if not path.exists():
        raise InputError(
            "no extraction report in this folder",
            where=str(folder),
            expected=REPORT_NAME,
            found="no such file",
            fix="pass a folder written by `phlora-nim extract` or `prune`",
        )
    data = read_json(path, what="report", fix="re-run the extraction")
    if data.get("format") != REPORT_FORMAT:
        raise InputError(
            "not a phlora-nim report",
            where=str(path),
            expected=f'"format": "{REPORT_FORMAT}"',
            found=repr(data.get("format")),
        )
    return data
