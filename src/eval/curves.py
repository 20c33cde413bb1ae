"""Training curves of a sweep from each run's ``scalars.csv`` (the csv logger: long rows ``step,name,value``).

One matplotlib plot per quantity (loss, t, the method's own statistics, in order of first appearance with
``loss`` and ``t`` first), every run of the sweep in it: the colour is the run's column of the figure (the
swept value), the line style its row (prompt). Lines longer than ``max_points`` are thinned to every k-th
point (the last kept) so a 25k-step sweep of 200 runs plots quickly; non-finite values are gaps.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

SCALARS = "scalars.csv"
FIRST = ("loss", "t")
LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class Series:
    label: str
    colour: int  # figure column
    style: int  # figure row
    data: dict[str, tuple[list[int], list[float]]]  # quantity -> (steps, values)


def read_scalars(run_dir: Path | str) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} of ``run_dir/scalars.csv``; {} when absent or unreadable (rows that do not
    parse are skipped)."""
    path = Path(run_dir) / SCALARS
    out: dict[str, tuple[list[int], list[float]]] = {}
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    step, name, value = int(float(row["step"])), str(row["name"]), float(row["value"])
                except (KeyError, TypeError, ValueError):
                    continue
                s, v = out.setdefault(name, ([], []))
                s.append(step)
                v.append(value)
    except OSError:
        return {}
    return out


def quantities(series: list[Series]) -> list[str]:
    names: list[str] = []
    for s in series:
        names += [n for n in s.data if n not in names]
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _thin(steps: list[int], values: list[float], max_points: int) -> tuple[list[int], list[float]]:
    if len(steps) <= max_points:
        return steps, values
    k = math.ceil(len(steps) / max_points)
    idx = list(range(0, len(steps), k))
    if idx[-1] != len(steps) - 1:
        idx.append(len(steps) - 1)
    return [steps[i] for i in idx], [values[i] for i in idx]


def plot_quantity(
    name: str, series: list[Series], column_labels: list[str], max_points: int = 2000, dpi: int = 80
) -> bytes:
    """PNG bytes of one quantity over steps for every run that logged it."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 2.8), dpi=dpi, facecolor="white", layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10"]
    used: dict[int, bool] = {}
    for s in series:
        if name not in s.data:
            continue
        steps, values = _thin(*s.data[name], max_points)
        values = [v if math.isfinite(v) else float("nan") for v in values]
        label = column_labels[s.colour] if s.colour not in used and s.colour < len(column_labels) else None
        used[s.colour] = True
        ax.plot(
            steps,
            values,
            LINESTYLES[s.style % len(LINESTYLES)],
            color=cmap(s.colour % 10),
            marker="o" if len(steps) <= 20 else None,
            markersize=3,
            linewidth=1.2,
            label=label,
        )
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if used and len(used) <= 12:
        ax.legend(fontsize=6, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()
