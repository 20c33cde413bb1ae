"""Table 6.1 as Markdown (``table.md``): the table, the ground-truth table, the runs left out, notes."""

from __future__ import annotations

from eval.divergence import STATES
from eval.runs import unique
from eval.table.aggregate import Aggregate
from eval.table.cells import MAIN_COLUMNS, gt_rows, main_rows, run_lists


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def launch_line(agg: Aggregate) -> str:
    """Which launch(es) the table covers (``eval.launches``)."""
    sel = agg.selection
    assert sel is not None
    if sel.mode == "one" and sel.launch is not None:
        argv = " ".join(str(a) for a in sel.launch.manifest.get("argv") or [])
        return f"Launch: {sel.launch.id} (started {sel.launch.started}){': `' + argv + '`' if argv else ''}"
    per: dict[str, int] = {}
    for r in agg.records:
        for lid in (r.launch or "").split(","):
            per[lid] = per.get(lid, 0) + 1
    return "Launches pooled (--launch all): " + ", ".join(f"{k} ({v} runs)" for k, v in per.items())


def to_markdown(agg: Aggregate, paper: bool = True) -> str:
    models = agg.models
    lines = [f"# Table 6.1 — {agg.root}", ""]
    lines.append(
        f"CLIP model: {', '.join(models) if models else '(no scored runs)'}"
        + ("  **(mixed models across runs)**" if len(models) > 1 else "")
    )
    if agg.selection is not None and agg.selection.mode != "none":
        lines.append(launch_line(agg) + "  ")
    n = len(agg.records)
    c = {s: len(agg.by_state(s)) for s in STATES}
    lines.append(
        f"Runs: {n} ({', '.join(f'{v} {k}' for k, v in c.items())})"
        + (f", {len(agg.broken)} unreadable" if agg.broken else "")
    )
    lines += ["", _md_table(MAIN_COLUMNS, main_rows(agg, paper)), ""]
    cols, rows = gt_rows(agg)
    if rows:
        lines += ["## Ground truth (analytic prior; mean±std over finished runs)", "", _md_table(cols, rows), ""]
    lists = run_lists(agg)
    if lists:
        lines += ["## Runs not in the averages", ""]
        for title, items in lists:
            lines.append(f"**{title}**")
            lines += [f"- {x}" for x in items]
            lines.append("")
    devs = unique(d for g in agg.groups for d in g.memory_devices)
    lines += [
        "Notes:",
        "- Runs: finished + diverged runs (the Div.% denominator); Excluded: running / interrupted / missing / "
        "failed runs and finished runs without scores.",
        "- CLIP: torchmetrics CLIPScore, max(100 cos, 0); quality / sharpness / real: CLIP-IQA in percent; "
        "mean±std (ddof=0) over all views of the finished, non-diverged, scored runs.",
        "- Div.%: runs that produced NaN, ran out of memory or ended with an empty volume "
        "(mean opacity below threshold in most views), over finished + diverged runs.",
        "- Time / VRAM: means over runs the trainer finished; VRAM is metrics.json peak_memory_mb"
        + (" (on CPU runs: process max RSS, not GPU memory)" if "cpu" in devs else "")
        + ".",
        "- paper rows: the paper's Table 6.1 (SD 2.1, NeRF, 43 prompts x 50 views)." if paper else "",
    ]
    return "\n".join(lines).rstrip() + "\n"
