"""The cells of the table, shared by every renderer: number formats, our rows beside the paper's,
the ground-truth rows and the lists of runs left out of the averages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.table.aggregate import Aggregate, Group
from eval.table.paper import PAPER_ROWS

PM = "\u00b1"


def fmt_pm(ms: tuple[float, ...] | None, dm: int, ds: int, pm: str = PM) -> str:
    if not ms:
        return "-"
    return f"{ms[0]:.{dm}f}{pm}{ms[1]:.{ds}f}"


def fmt_time(minutes: float | None) -> str:
    if minutes is None:
        return "-"
    return f"{minutes:.0f}min" if minutes >= 10 else f"{minutes:.2g}min"


def fmt_mem(gb: float | None) -> str:
    if gb is None:
        return "-"
    return f"{gb:.1f}GB" if gb >= 1 else f"{gb:.2f}GB"


def fmt_pct(p: float | None) -> str:
    return "-" if p is None else f"{p:.1f}"


def _excluded(g: Group) -> str:
    c = g.counts
    parts = [f"{c[s]} {s}" for s in ("running", "interrupted", "missing", "failed") if c[s]]
    if g.unscored:
        parts.append(f"{len(g.unscored)} unscored")
    return ", ".join(parts) if parts else "-"


MAIN_COLUMNS = [
    "Method",
    "Source",
    "Prior",
    "Scene",
    "Runs",
    "Excluded",
    "CLIP",
    "quality",
    "sharpness",
    "real",
    "Div.%",
    "Time",
    "VRAM",
]


def _our_cells(g: Group, pm: str = PM) -> list[str]:
    return [
        g.label,
        "ours",
        g.prior or "-",
        g.scene or "-",
        f"{g.ended}",
        _excluded(g),
        fmt_pm(g.stat("clip"), 2, 2, pm),
        fmt_pm(g.stat("quality"), 0, 1, pm),
        fmt_pm(g.stat("sharpness"), 0, 1, pm),
        fmt_pm(g.stat("real"), 0, 1, pm),
        fmt_pct(g.div_pct),
        fmt_time(g.time_min),
        fmt_mem(g.vram_gb),
    ]


def _paper_cells(row: dict[str, Any], pm: str = PM) -> list[str]:
    return [
        row["label"],
        "paper",
        "SD 2.1",
        "NeRF",
        "43",
        "-",
        fmt_pm(row["clip"], 2, 2, pm),
        fmt_pm(row["quality"], 0, 1, pm),
        fmt_pm(row["sharpness"], 0, 1, pm),
        fmt_pm(row["real"], 0, 1, pm),
        fmt_pct(row["div_pct"]),
        fmt_time(row["time_min"]),
        fmt_mem(row["vram_gb"]),
    ]


def main_rows(agg: Aggregate, paper: bool = True, pm: str = PM) -> list[list[str]]:
    """Our groups, each non-analytic one followed by the paper's row of the same method; then the
    paper's remaining rows."""
    rows: list[list[str]] = []
    used: set[str] = set()
    last_of_key: dict[str, int] = {}
    for i, g in enumerate(agg.groups):
        if g.paper_key and not g.analytic:
            last_of_key[g.paper_key] = i
    paper_by_key = {r["key"]: r for r in PAPER_ROWS}
    for i, g in enumerate(agg.groups):
        rows.append(_our_cells(g, pm))
        k = g.paper_key
        if paper and k in paper_by_key and last_of_key.get(k) == i:
            rows.append(_paper_cells(paper_by_key[k], pm))
            used.add(k)
    if paper:
        rows += [_paper_cells(r, pm) for r in PAPER_ROWS if r["key"] not in used]
    return rows


def gt_rows(agg: Aggregate, pm: str = PM) -> tuple[list[str], list[list[str]]]:
    names = agg.gt_names
    cols = ["Method", "Prior", "Scene", "Runs"] + names
    rows = []
    for g in agg.groups:
        if not g.analytic or not g.gt_names():
            continue
        cells = [g.label, g.prior or "-", g.scene or "-", str(g.count("finished"))]
        for n in names:
            st = g.gt_stat(n)
            cells.append(fmt_pm(st, 3, 3, pm) if st else "-")
        rows.append(cells)
    return cols, rows


def rel_path(p: Path, root: Path) -> str:
    try:
        r = str(p.relative_to(root))
        return r if r != "." else p.name
    except ValueError:
        return str(p)


def _broken_line(p: Path, root: Path) -> str:
    """A run without a readable config.yaml, with the status and reason of its metrics.json when it has one."""
    from eval.divergence import classify
    from eval.runs import METRICS, read_json

    metrics, err = read_json(p / METRICS)
    if metrics is None:
        return rel_path(p, root) + (f" ({err})" if err else "")
    st = classify(metrics)
    return f"{rel_path(p, root)} ({st.state}{': ' + st.reason if st.reason else ''})"


def run_lists(agg: Aggregate) -> list[tuple[str, list[str]]]:
    """(title, lines) for diverged / running / missing / failed / unscored / broken runs."""
    root = agg.root
    out = []
    for state, title in (
        ("diverged", "Diverged"),
        ("running", "Half-finished (status running)"),
        ("interrupted", "Interrupted (re-launch the same command to resume)"),
        ("missing", "Missing (no metrics.json)"),
        ("failed", "Failed (not counted as diverged)"),
    ):
        recs = agg.by_state(state)
        if recs:
            out.append(
                (
                    f"{title}: {len(recs)}",
                    [f"{rel_path(r.path, root)} [{r.info.method}] {r.state.reason or ''}".rstrip() for r in recs],
                )
            )
    if agg.unscored:
        out.append(
            (
                f"Finished but not scored (no eval/scores.json; run `python -m eval score`): {len(agg.unscored)}",
                [f"{rel_path(r.path, root)} [{r.info.method}]" for r in agg.unscored],
            )
        )
    if agg.broken:
        out.append(
            (
                f"Not readable as runs (metrics.json or checkpoint without a readable config.yaml): {len(agg.broken)}",
                [_broken_line(p, root) for p in agg.broken],
            )
        )
    sel = agg.selection
    if sel is not None and sel.jobs_without_run:
        out.append(
            (
                f"Jobs of the launch that left no run (no config.yaml / metrics.json): {len(sel.jobs_without_run)}",
                [
                    f"{j.get('run_dir') or '(no run directory)'} [launch {lid}, job {j.get('num')}] "
                    f"{j.get('status') or ''}{': ' + str(j['reason']) if j.get('reason') else ''}".rstrip()
                    for lid, j in sel.jobs_without_run
                ],
            )
        )
    for label, prompts in agg.absent.items():
        out.append((f"{label}: {len(prompts)} of {len(agg.expected_prompts or [])} prompts have no run", prompts))
    return out
