"""``phlora_report.json``: what an extraction kept, per module and in total."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from phlora_nim.converters.extract import ExtractionResult, ExtractOptions, ModuleResult, summary_energy
from phlora_nim.converters.whitening import WhitenedFactors, weight_energy
from phlora_nim.core.errors import InputError
from phlora_nim.core.json_files import read_json

REPORT_NAME = "phlora_report.json"
_TOP_SINGULAR = 16
_CURVE_POINTS = 256


def _module_entry(r: ModuleResult) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """The report as a JSON-ready dict (energies in float64 against the full ‖ΔW‖²_F)."""
    modules = [_module_entry(r) for r in result.modules]
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
        min_energy_kept=min(kept) if kept else 1.0,
        mean_energy_kept=sum(kept) / len(kept) if kept else 1.0,
        min_rank=min(ranks) if ranks else 0,
        max_rank=max(ranks) if ranks else 0,
        mean_rank=sum(ranks) / len(ranks) if ranks else 0.0,
        dropped_extra_energy=sum(x.energy for x in result.extras if x.action == "dropped"),
    )
    pol = options.policy
    return {
        "format": "phlora-report/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "base": base,
        "finetuned": finetuned,
        "family": result.plan.family,
        "policy": {
            "kind": pol.kind,
            "rank": pol.rank,
            "energy": pol.energy,
            "budget_params": pol.budget_params,
            "max_rank": pol.max_rank,
            "snap": pol.snap,
        },
        "method": ("exact SVD" if options.exact else "randomized block Krylov SVD")
        + (" of ΔW·L, activation-aware (whitened by the base's input statistics)" if options.calibration else ""),
        "dtype": str(result.plan.out_dtype).removeprefix("torch."),
        "extra": options.non_linear_deltas,
        "warnings": list(result.plan.warnings),
        "belonging": result.plan.similarity.to_json() if result.plan.similarity else None,
        "totals": totals,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "modules": modules,
        "extras": extras,
    }


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
    if data.get("format") != "phlora-report/1":
        raise InputError(
            "not a phlora-nim report",
            where=str(path),
            expected='"format": "phlora-report/1"',
            found=repr(data.get("format")),
        )
    return data
