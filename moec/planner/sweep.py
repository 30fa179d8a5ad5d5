"""Sweeping the budget: the Pareto front of plans, as a table and a plot."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from moec.files import write_atomic
from moec.planner.checks import PlanError, _fraction
from moec.planner.plan import expert_widths
from moec.planner.solver import make_plan


def sweep(stats: Mapping, start: float, stop: float, step: float, **plan_options: Any) -> list[dict]:
    """Plan every avg_bits in start, start+step, ..., stop (inclusive) and keep the Pareto front.

    Returns rows {avg_bits, mean_bits, expert_bytes, predicted_loss} sorted by size, each smaller than the
    next and with a higher predicted loss. Size is expert_bytes when known, else mean_bits. `plan_options`
    go to make_plan (scope, bits, alpha, ...).
    """
    first, last, stride = (_fraction(v, name) for v, name in ((start, "start"), (stop, "stop"), (step, "step")))
    if stride <= 0 or last < first:
        raise PlanError(f"sweep {start:g}:{stop:g}:{step:g}: expected start <= stop and step > 0")
    rows = []
    down_share = 1 / len(stats["model"].get("expert_projections", ("gate", "up", "down")))
    for k in range(math.floor((last - first) / stride) + 1):
        plan = make_plan(stats, avg_bits=float(first + k * stride), **plan_options)
        chosen = [(1 - down_share) * whole + down_share * down
                  for layer, row in enumerate(plan["experts"]["bits"]) if row
                  for whole, down in (expert_widths(plan, layer, e) for e in range(len(row)))]
        rows.append({"avg_bits": float(first + k * stride), "mean_bits": sum(chosen) / len(chosen),
                     "expert_bytes": plan["objective"]["predicted_expert_bytes"],
                     "predicted_loss": plan["objective"]["predicted_loss"]})
    rows.sort(key=lambda r: (_row_size(r), r["predicted_loss"]))
    front: list[dict] = []
    for row in rows:
        if not front or row["predicted_loss"] < front[-1]["predicted_loss"]:
            if front and _row_size(row) == _row_size(front[-1]):
                front.pop()
            front.append(row)
    return front


def _row_size(row: dict) -> float:
    return row["expert_bytes"] if row["expert_bytes"] is not None else row["mean_bits"]


def write_sweep_table(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write sweep rows as a markdown table (.md) or TSV (anything else)."""
    header = ["avg_bits", "mean_bits", "expert_bytes", "expert_GB", "predicted_loss"]
    lines = []
    for row in rows:
        size = row["expert_bytes"]
        lines.append([f"{row['avg_bits']:g}", f"{row['mean_bits']:.4f}", "" if size is None else str(size),
                      "" if size is None else f"{size / 1e9:.3f}", f"{row['predicted_loss']:.6g}"])
    if Path(path).suffix.lower() == ".md":
        text = "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines])
    else:
        text = "\n".join("\t".join(cells) for cells in [header, *lines])
    write_atomic(Path(path), (text + "\n").encode())


def plot_sweep(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Plot predicted loss against size as an image (format from the suffix, e.g. .png); needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlanError("plotting the sweep needs matplotlib (pip install matplotlib); "
                        "the table was written without it") from None
    by_bytes = all(row["expert_bytes"] is not None for row in rows)
    xs = [row["expert_bytes"] / 1e9 if by_bytes else row["mean_bits"] for row in rows]
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(xs, [row["predicted_loss"] for row in rows], marker="o")
    for x, row in zip(xs, rows):
        axes.annotate(f"{row['avg_bits']:g}", (x, row["predicted_loss"]), fontsize=7,
                      textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel("routed-expert size (GB)" if by_bytes else "mean expert bits")
    axes.set_ylabel("predicted loss (MC-MoE objective)")
    axes.set_title("bit allocation Pareto front (labels: avg_bits budget)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    write_atomic(Path(path), buffer.getvalue())
