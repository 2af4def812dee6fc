"""Energy plots: how much of the fine-tune each rank keeps, per module type and per layer."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

PLOT_NAME = "energy.png"


def plot_energy(report: dict[str, Any], path: Path) -> Path | None:
    """Write ``energy.png`` from a report: energy kept vs rank per module type, and per layer.

    Returns the path, or None when the report has no spectra to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = [m for m in report["modules"] if m.get("energy_curve")]
    if not modules:
        return None
    curves: dict[str, list[list[float]]] = defaultdict(list)
    for m in modules:
        curves[m["type"]].append(m["energy_curve"])
    layers = sorted({m["layer"] for m in modules if m["layer"] is not None})
    types = sorted(curves)
    fig, (ax_rank, ax_layer) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.2]})
    for t in types:
        length = min(len(c) for c in curves[t])
        mean = [sum(c[i] for c in curves[t]) / len(curves[t]) for i in range(length)]
        ax_rank.plot(range(1, length + 1), mean, label=f"{t} ({len(curves[t])})")
    ranks = sorted({m["rank"] for m in modules})
    if len(ranks) == 1:
        ax_rank.axvline(ranks[0], color="grey", linestyle="--", linewidth=1, label=f"rank {ranks[0]}")
    ax_rank.set_xlabel("rank")
    ax_rank.set_ylabel("share of ‖ΔW‖²_F kept (mean over layers)")
    ax_rank.set_ylim(0, 1.01)
    ax_rank.grid(alpha=0.3)
    ax_rank.legend(fontsize=8)
    ax_rank.set_title("Energy kept vs rank, per module type")
    if layers:
        grid = [[float("nan")] * len(layers) for _ in types]
        ranks_at: dict[tuple[int, int], int] = {}
        for m in modules:
            if m["layer"] is not None:
                cell = (types.index(m["type"]), layers.index(m["layer"]))
                grid[cell[0]][cell[1]] = m["energy_kept"]
                ranks_at[cell] = m["rank"]
        im = ax_layer.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax_layer.set_yticks(range(len(types)), types, fontsize=8)
        step = max(1, len(layers) // 16)
        ax_layer.set_xticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=8)
        ax_layer.set_xlabel("layer")
        ax_layer.set_title("Energy kept at the chosen rank, per layer")
        fig.colorbar(im, ax=ax_layer, fraction=0.04)
        if len(layers) <= 16:  # small grids: print rank and energy in each cell
            for (row, col), rank in ranks_at.items():
                ax_layer.text(
                    col,
                    row,
                    f"r{rank}\n{grid[row][col]:.0%}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if grid[row][col] < 0.6 else "black",
                )
    else:
        ax_layer.axis("off")
    totals = report.get("totals", {})
    fig.suptitle(
        f"PHLoRA {report.get('family', '')}: {totals.get('energy_kept_linear', 0):.1%} of linear-module delta "
        f"energy kept, {totals.get('adapter_parameters', 0):,} adapter parameters",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
