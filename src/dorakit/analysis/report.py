"""Files of ``dorakit analyze``: analysis.csv (one row per weight per checkpoint), analysis.json
(correlation of delta_d with delta_m per method and module), analysis.png (the paper's Fig. 2 scatter)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import atomic
from .decomposition import Row
from ..figures import pyplot, save_png

COLUMNS = ["checkpoint", "method", "step", "layer", "module", "name", "delta_m", "delta_d", "expert"]


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, None when undefined (fewer than 3 points or no spread).

    >>> pearson([1, 2, 3], [2, 4, 7]) > 0.99
    True
    """
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def summarise(rows: list[Row]) -> dict:
    """Per method, and per method and module: points, correlation of delta_d with delta_m, means."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, "all"), []).append(row)
        groups.setdefault((row.method, row.module), []).append(row)
    out: dict = {}
    for (method, module), members in sorted(groups.items()):
        xs, ys = [r.delta_d for r in members], [r.delta_m for r in members]
        out.setdefault(method, {})[module] = {
            "points": len(members), "correlation": pearson(xs, ys),
            "mean_delta_d": sum(xs) / len(xs), "mean_delta_m": sum(ys) / len(ys),
        }
    return out


def plot(rows: list[Row], path: Path) -> Path:
    """Scatter of delta_m against delta_d, one panel per method (columns) and module (rows), points
    coloured by training step, with a least-squares line and the correlation in each title."""
    plt = pyplot()
    order = ["full", "lora", "dora", "vera", "dvora"]
    methods = sorted({r.method for r in rows}, key=lambda m: (order.index(m) if m in order else len(order), m))
    modules = sorted({r.module for r in rows})
    fig, axes = plt.subplots(len(modules), len(methods), figsize=(4 * len(methods), 3.4 * len(modules)), squeeze=False)
    for i, module in enumerate(modules):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            pts = [r for r in rows if r.method == method and r.module == module]
            xs, ys = [r.delta_d for r in pts], [r.delta_m for r in pts]
            steps = [r.step if r.step is not None else 0 for r in pts]
            mappable = ax.scatter(xs, ys, c=steps, cmap="viridis", s=18)
            r = pearson(xs, ys)
            if r is not None:
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                lo, hi = min(xs), max(xs)
                ax.plot([lo, hi], [my + slope * (lo - mx), my + slope * (hi - mx)], "r-", lw=1)
            ax.set_title(f"{method} {module}: r = {r:.2f}" if r is not None else f"{method} {module}")
            ax.set_xlabel("ΔD (direction change)")
            ax.set_ylabel("ΔM (magnitude change)")
            ax.ticklabel_format(style="sci", scilimits=(-3, 3))
            if any(steps):
                fig.colorbar(mappable, ax=ax, label="step")
    fig.tight_layout()
    save_png(fig, path)
    return path


def write_report(rows: list[Row], out: Path) -> dict:
    """analysis.csv, analysis.json and analysis.png in ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_csv(out / "analysis.csv", [r.as_dict() for r in rows], COLUMNS)
    summary = summarise(rows)
    text = json.dumps({"summary": summary, "rows": [r.as_dict() for r in rows]}, indent=1)
    atomic.write_text(out / "analysis.json", text)
    plot(rows, out / "analysis.png")
    return summary
