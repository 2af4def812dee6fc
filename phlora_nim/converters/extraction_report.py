"""``phlora_report.json`` of an extraction as a typed value: what was asked (policy, method), what was
kept (totals, per module, per non-linear tensor) and what the pipeline adds (fidelity search, calibration,
loading note). :meth:`ExtractionReport.to_json` writes the file's object, keys in their long-standing order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from phlora_nim.converters.rank_policy import RankPolicy

REPORT_FORMAT = "phlora-report/1"


@dataclass(frozen=True)
class ExtractionReport:
    """One extraction's report.

    Args:
        created: ISO time (UTC) of the extraction.
        command: the command line that ran it.
        base, finetuned: the checkpoints' names.
        family: the architecture family (None: a regex or no map).
        policy: the rank policy the adapter was made with (a fidelity search's chosen budget).
        method: how ΔW was decomposed, in words.
        dtype: the adapter's storage dtype.
        extra: what happened to deltas outside linear modules (drop, save, error).
        warnings: what the planner warned of.
        belonging: how much the fine-tune looks like one of this base (None: not measured).
        totals: the figures over every module (energies, ranks, parameters, layout).
        timings: seconds per step.
        modules: one entry per linear module.
        extras: one entry per non-linear tensor.
        expert_serving: for a MoE family, per engine, what it would miss of the adapter.
        fidelity_target: the budget search (with a fidelity target).
        calibration: the activation statistics (activation-aware extraction).
        loading: how to load the adapter under PEFT (saved embeddings or head).
    """

    created: str
    command: str | None
    base: str
    finetuned: str
    family: str | None
    policy: RankPolicy
    method: str
    dtype: str
    extra: str
    warnings: tuple[str, ...]
    belonging: dict[str, Any] | None
    totals: dict[str, Any]
    timings: dict[str, float]
    modules: tuple[dict[str, Any], ...]
    extras: tuple[dict[str, Any], ...]
    expert_serving: dict[str, list[str]] = field(default_factory=dict)
    fidelity_target: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    loading: str | None = None

    def with_totals(self, **more: Any) -> ExtractionReport:
        """This report with totals set (e.g. the layout a writer stored it in)."""
        return dataclasses.replace(self, totals={**self.totals, **more})

    def with_timings(self, **more: float) -> ExtractionReport:
        """This report with more timings (seconds)."""
        return dataclasses.replace(self, timings={**self.timings, **more})

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``phlora_report.json``."""
        optional = {
            "fidelity_target": self.fidelity_target,
            "calibration": self.calibration,
            "loading": self.loading,
        }
        return {
            "format": REPORT_FORMAT,
            "created": self.created,
            "command": self.command,
            "base": self.base,
            "finetuned": self.finetuned,
            "family": self.family,
            "policy": self.policy.to_json(),
            "method": self.method,
            "dtype": self.dtype,
            "extra": self.extra,
            "warnings": list(self.warnings),
            "belonging": self.belonging,
            "totals": dict(self.totals),
            "timings": dict(self.timings),
            "modules": list(self.modules),
            "extras": list(self.extras),
            **({"expert_serving": self.expert_serving} if self.expert_serving else {}),
            **{key: value for key, value in optional.items() if value is not None},
        }
