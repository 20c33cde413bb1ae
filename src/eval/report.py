"""The offline report of a run or sweep: ``<out>/report.html``, one file that opens from disk with no
server, no network and no script.

    Table 6.1      our groups beside the paper's rows (``eval.table``), the ground-truth table
    Figure         the sweep's figure (``eval.figure``), with links to its PDF and sidecar JSON
    Runs           per run: column, prompt, state (diverged with its reason), steps, time, peak memory
    Turntables     per run a GIF on the evaluation orbit (``eval.views``); a 2D run shows its final image
    Curves         one plot per quantity of ``scalars.csv`` with every run (``eval.curves``)
    Left out       runs not in the averages (diverged, running, missing, failed, unscored, unreadable)

Every picture is embedded as a base64 ``data:`` URI; the only links point at files next to the report
(figure.pdf, figure.json) or at the run directories, all of which exist when it is written.
"""

from __future__ import annotations

import base64
import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.curves import Series, plot_quantity, quantities, read_scalars
from eval.divergence import STATES
from eval.figure import make_figure
from eval.launches import Selection
from eval.sweep import SweepGrid, sweep_grid
from eval.table import MAIN_COLUMNS, Aggregate, RunRecord, aggregate, gt_rows, main_rows, run_lists
from eval.table.cells import rel_path
from eval.views import FIXED_DIR, IMAGE_VIEW, RunRenderer, ViewOptions

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
 padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
nav a{margin-right:1em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.l,th.l{text-align:left}.scroll{overflow-x:auto}
td.wrap{white-space:normal;word-break:break-all;min-width:18em;font-size:.9em}
tr.paper td{color:#555;background:#fafafa;font-style:italic}
tr.diverged td{background:#fde8e8}tr.diverged td.state{color:#b00;font-weight:bold}
tr.running td,tr.interrupted td,tr.missing td,tr.failed td{background:#fff6df}
img.figure{max-width:100%;height:auto;border:1px solid #eee}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;padding:.4em;font-size:.8em;width:200px;overflow-wrap:anywhere}
.card img{width:100%;height:auto;image-rendering:pixelated}
.card.diverged{border:3px solid #d62728}
.curves{display:flex;flex-wrap:wrap;gap:.5em}.curves img{width:368px;height:auto}
.muted{color:#666;font-size:.85em}
"""


def data_uri(data: bytes | Path, mime: str | None = None) -> str:
    if isinstance(data, Path):
        mime = mime or {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}.get(data.suffix.lower())
        data = data.read_bytes()
    return f"data:{mime or 'application/octet-stream'};base64,{base64.b64encode(data).decode('ascii')}"


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _td_class(col: str, left: bool) -> str:
    names = (["l"] if left or col == "State" else []) + (["state"] if col == "State" else [])
    names += ["wrap"] if col in ("Run", "Prompt") else []
    return f' class="{" ".join(names)}"' if names else ""


def _table(cols: list[str], rows: list[list[Any]], left: int = 1, classes: list[str] | None = None) -> str:
    head = "".join(f'<th class="l">{_e(c)}</th>' if i < left else f"<th>{_e(c)}</th>" for i, c in enumerate(cols))
    body = []
    for k, r in enumerate(rows):
        cls = f' class="{classes[k]}"' if classes and classes[k] else ""
        cells = "".join(f"<td{_td_class(cols[i], i < left)}>{c}</td>" for i, c in enumerate(r))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


@dataclass
class RunEntry:
    record: RunRecord
    column: str
    row: str
    col_index: int
    row_index: int


def run_entries(grid: SweepGrid) -> list[RunEntry]:
    """Every run of the sweep, column by column (sweep order), prompt by prompt; then runs off the grid."""
    out = []
    for c, col in enumerate(grid.columns):
        for r, row in enumerate(grid.rows):
            for rec in ([grid.cell(r, c)] if grid.cell(r, c) else []) + grid.duplicates.get((r, c), []):
                out.append(RunEntry(rec, col.label, row.label, c, r))
    for rec in grid.unplaced:
        out.append(RunEntry(rec, f"(off the grid) {rec.info.method}", str(rec.info.prompt), len(grid.columns), 0))
    return out


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _runs_table(entries: list[RunEntry], root: Path, out: Path, pooled: bool = False) -> str:
    cols = ["Column", "Prompt", "Run", "State", "Reason", "Steps", "Time (s)", "Peak memory (MB)", "Device"]
    cols += ["Launch"] if pooled else []
    rows, classes = [], []
    for e in entries:
        m = e.record.info.metrics or {}
        rel = rel_path(e.record.path, root)
        link = os.path.relpath(e.record.path, out)
        steps = f"{m.get('steps', '-')}/{m.get('max_steps', e.record.info.max_steps or '-')}"
        rows.append(
            [
                _e(e.column),
                _e(e.row),
                f'<a href="{_e(link)}/">{_e(rel)}</a>',
                _e(e.record.state.state),
                _e(e.record.state.reason or ""),
                _e(steps),
                _fmt(m.get("seconds"), ".1f"),
                _fmt(m.get("peak_memory_mb"), ".0f"),
                _e(m.get("device") or "-"),
            ]
            + ([_e(e.record.launch or "-")] if pooled else [])
        )
        classes.append(e.record.state.state)
    return _table(cols, rows, left=3, classes=classes)


def _turntables(entries: list[RunEntry], root: Path, opts: ViewOptions, device: str, overwrite: bool, load: Any):
    cards = []
    for e in entries:
        rec, st = e.record, e.record.state
        img_html, what = "", ""
        if st.state in ("finished", "diverged"):
            rr = RunRenderer(rec.path, opts, device, overwrite, load)
            gif = rr.turntable()
            if gif is not None:
                img_html, what = f'<img src="{data_uri(gif)}" alt="turntable of {_e(rel_path(rec.path, root))}">', ""
            else:
                still = rec.path / FIXED_DIR / f"{IMAGE_VIEW}.png"
                if not still.is_file():
                    rr.fixed_views()
                if still.is_file():
                    img_html = f'<img src="{data_uri(still)}" alt="final image of {_e(rel_path(rec.path, root))}">'
                    what = " (2D: final image)"
        if not img_html:
            img_html = '<div class="muted">no render</div>'
        state = st.state + (f" ({st.reason})" if st.reason else "")
        cls = "card diverged" if st.state == "diverged" else "card"
        cards.append(
            f'<div class="{cls}">{img_html}<div><b>{_e(e.column)}</b> \u00b7 {_e(e.row)}{what}</div>'
            f'<div class="muted">{_e(rel_path(rec.path, root))}: {_e(state)}</div></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _curves(entries: list[RunEntry], grid: SweepGrid) -> tuple[str, int]:
    series = []
    for e in entries:
        data = read_scalars(e.record.path)
        if data:
            series.append(Series(f"{e.column} \u00b7 {e.row}", e.col_index, e.row_index, data))
    if not series:
        return '<p class="muted">No run has a scalars.csv (the csv logger writes it).</p>', 0
    labels = [c.label for c in grid.columns] + ["(off the grid)"]
    imgs = [
        f'<img src="{data_uri(plot_quantity(q, series, labels), "image/png")}" alt="{_e(q)}" title="{_e(q)}">'
        for q in quantities(series)
    ]
    style = ""
    if len(grid.rows) > 1:
        style = (
            " Line style = prompt ("
            + ", ".join(
                f"{['solid', 'dashed', 'dotted', 'dash-dot'][i % 4]}: {_e(r.label)}"
                for i, r in enumerate(grid.rows[:4])
            )
            + (", ..." if len(grid.rows) > 4 else "")
            + ")."
        )
    note = f'<p class="muted">{len(series)} runs; colour = column of the figure.{style}</p>'
    return note + f'<div class="curves">{"".join(imgs)}</div>', len(imgs)


def _table61(agg: Aggregate, paper: bool) -> str:
    rows = main_rows(agg, paper)
    classes = ["paper" if r[1] == "paper" else "ours" for r in rows]
    models = agg.models
    parts = [
        f'<p class="muted">CLIP model: {_e(", ".join(models) if models else "(no scored runs: python -m eval score)")}'
        + (
            ". The paper's rows are SD 2.1 + NeRF over 43 prompts x 50 views; runs on the analytic priors are not "
            "comparable to them."
            if paper
            else ""
        )
        + "</p>",
        _table(MAIN_COLUMNS, [[_e(c) for c in r] for r in rows], left=2, classes=classes),
    ]
    gcols, grows = gt_rows(agg)
    if grows:
        parts += [
            "<h3>Ground truth (analytic prior; mean \u00b1 std over finished runs)</h3>",
            _table(gcols, [[_e(c) for c in r] for r in grows], left=1),
        ]
    return "".join(parts)


def _launch_html(agg: Aggregate) -> str:
    if agg.selection is None or agg.selection.mode == "none":
        return ""
    from eval.table.markdown import launch_line

    return f" {_e(launch_line(agg).replace('`', ''))}."


def build_report(
    root: Path | str,
    out_dir: Path | str | None = None,
    opts: ViewOptions | None = None,
    device: str = "auto",
    overwrite: bool = False,
    paper: bool = True,
    load_scene: Any = None,
    selection: Selection | None = None,
) -> Path:
    """Write ``report.html`` (and the figure beside it) for the run or sweep at ``root``; returns its path.
    ``selection`` (``eval.launches.select``): which launch's runs (default: every run under ``root``)."""
    root = Path(root)
    out = Path(out_dir) if out_dir else root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    opts = opts or ViewOptions()
    agg = aggregate(root, selection=selection)
    grid = sweep_grid(agg)
    fig = make_figure(root, out, opts, device=device, overwrite=overwrite, grid=grid, load_scene=load_scene)
    entries = run_entries(grid)
    counts = {s: len(agg.by_state(s)) for s in STATES}
    curves, n_plots = _curves(entries, grid)
    lists = run_lists(agg)
    left_out = "".join(
        f"<p><b>{_e(title)}</b></p><ul>{''.join(f'<li>{_e(x)}</li>' for x in items)}</ul>" for title, items in lists
    )
    axes = ", ".join(a.key for a in grid.column_axes) or "method"
    launch_html = _launch_html(agg)
    body = f"""
<h1>Sweep report: {_e(root.name)}</h1>
<p class="muted">{_e(root)}; written {_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))} by
<code>python -m eval report</code>.{launch_html}
Runs: {len(agg.records)} ({_e(", ".join(f"{v} {k}" for k, v in counts.items()))}{
        f", {len(agg.broken)} unreadable" if agg.broken else ""
    }). Columns: {_e(axes)} ({len(grid.columns)}), rows: prompts
({len(grid.rows)}).</p>
<nav><a href="#table">Table 6.1</a><a href="#figure">Figure</a><a href="#runs">Runs</a>
<a href="#turntables">Turntables</a><a href="#curves">Training curves</a><a href="#left-out">Left out</a></nav>
<h2 id="table">Table 6.1</h2>
{_table61(agg, paper)}
<h2 id="figure">Figure</h2>
<p class="muted">Columns: the swept values in sweep order; rows: prompts; each cell the final scene (front, side,
back; a 2D run its final image); a red frame marks a diverged run.
<a href="{_e(fig.png.name)}">figure.png</a> (full size) \u00b7 <a href="{_e(fig.pdf.name)}">figure.pdf</a> \u00b7
<a href="{_e(fig.sidecar.name)}">figure.json</a> (which run is
in which cell)</p>
<img class="figure" src="{data_uri(fig.png)}" alt="figure of {_e(root.name)}" width="{fig.data["width"]}"
height="{fig.data["height"]}">
<h2 id="runs">Runs: time, memory, divergence</h2>
{_runs_table(entries, root, out, pooled=agg.selection is not None and agg.selection.mode == "all")}
<h2 id="turntables">Turntables</h2>
{_turntables(entries, root, opts, device, overwrite, load_scene)}
<h2 id="curves">Training curves ({n_plots} quantities, scalars.csv)</h2>
{curves}
<h2 id="left-out">Runs not in the averages</h2>
{left_out or '<p class="muted">none</p>'}
"""
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(root.name)}: sweep report</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
