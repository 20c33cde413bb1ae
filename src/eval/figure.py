"""The sweep's figure: columns = the swept values in sweep order, rows = prompts, each cell a run's final scene.

    <out>/figure.png, figure.pdf   the grid (matplotlib); a cell holds the run's fixed views (front, side,
                                   back; ``eval.views``) or, for a 2D scene, its final image
    <out>/figure.json              the sidecar: image size, the column and row labels, and per cell the run
                                   (path relative to the sweep), its state and the cell's pixel box; ``launch``:
                                   the launch id the runs come from, ``all`` when pooled (then ``launch`` is
                                   the first column axis), null for a directory without launches

Layout in pixels (``dpi`` 100, so one view pixel is one image pixel): a margin on the left for the
prompts, one on top for the column labels (and the view names), cells ``n_views * size`` wide with
``gap`` pixels between views and ``spacing`` pixels between cells. A diverged run keeps its last
render (grey where it has none) inside a red frame ``frame`` pixels wide, labelled "diverged (<reason>)";
a run that is running, missing or failed, and a grid position without a run, is a grey cell saying so.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.launches import Selection
from eval.runs import EvalError
from eval.sweep import SweepGrid, sweep_grid
from eval.table import aggregate
from eval.table.cells import rel_path
from eval.views import IMAGE_VIEW, RunRenderer, RunViews, ViewOptions

FIGURE_VERSION = 1
DIVERGED_RGB = (214, 39, 40)  # matplotlib's tab:red
EMPTY_GREY = 225


@dataclass
class FigureLayout:
    dpi: int = 100
    gap: int = 2  # between the views of a cell
    spacing: int = 12  # between cells
    left: int = 180  # prompt labels
    top: int = 52  # column labels (+ view names below them)
    view_names: int = 16
    bottom: int = 26  # caption
    right: int = 10
    frame: int = 4  # red frame of a diverged cell


@dataclass
class Figure:
    png: Path
    pdf: Path
    sidecar: Path
    data: dict[str, Any]


def _cell_array(views: RunViews | None, n_views: int, size: int, gap: int) -> np.ndarray:
    w = n_views * size + (n_views - 1) * gap
    arr = np.full((size, w, 3), 255, dtype=np.uint8)
    if not views or not views.images:
        arr[:] = EMPTY_GREY
        return arr
    from PIL import Image

    imgs = views.images
    if len(imgs) == 1 and n_views > 1:  # a 2D run in a 3D sweep: its image in the middle slot
        imgs = [None] * (n_views // 2) + imgs + [None] * (n_views - n_views // 2 - 1)
    for k, img in enumerate(imgs[:n_views]):
        if img is None:
            continue
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))
        x = k * (size + gap)
        arr[:, x : x + size] = img
    return arr


def _paint_frame(arr: np.ndarray, width: int) -> None:
    arr[:width], arr[-width:], arr[:, :width], arr[:, -width:] = (DIVERGED_RGB,) * 4


def _wrap(text: str, px: int, char_px: float = 6.5) -> str:
    return "\n".join(textwrap.wrap(text, max(8, int(px / char_px))) or [text])


def _launch_of(sel: Selection | None) -> str | None:
    if sel is None or sel.mode == "none":
        return None
    return sel.launch.id if sel.mode == "one" and sel.launch is not None else "all"


def make_figure(
    root: Path | str,
    out_dir: Path | str | None = None,
    opts: ViewOptions | None = None,
    layout: FigureLayout | None = None,
    device: str = "auto",
    overwrite: bool = False,
    grid: SweepGrid | None = None,
    load_scene: Any = None,
    selection: Selection | None = None,
) -> Figure:
    """Render the figure of the run or sweep at ``root`` into ``out_dir`` (default ``root/eval``); ``selection``
    (``eval.launches.select``): which launch's runs (default: every run under ``root``)."""
    from matplotlib.figure import Figure as MplFigure

    root = Path(root)
    opts, lay = opts or ViewOptions(), layout or FigureLayout()
    grid = grid or sweep_grid(aggregate(root, selection=selection))
    out = Path(out_dir) if out_dir else root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    if not grid.rows or not grid.columns:
        raise EvalError(f"{root}: no runs to put in a figure")

    views: dict[tuple[int, int], RunViews] = {}
    for (r, c), rec in grid.cells.items():
        if rec.state.state in ("finished", "diverged"):
            views[(r, c)] = RunRenderer(rec.path, opts, device, overwrite, load_scene).fixed_views()
    n_views = max([len(v.names) for v in views.values() if v.images] or [len(opts.views)])
    names = next((v.names for v in views.values() if len(v.names) == n_views), list(opts.views))
    size = opts.size
    cell_w, cell_h = n_views * size + (n_views - 1) * lay.gap, size
    top = lay.top + (lay.view_names if n_views > 1 else 0)
    n_r, n_c = len(grid.rows), len(grid.columns)
    W = lay.left + n_c * cell_w + (n_c - 1) * lay.spacing + lay.right
    H = top + n_r * cell_h + (n_r - 1) * lay.spacing + lay.bottom

    fig = MplFigure(figsize=(W / lay.dpi, H / lay.dpi), dpi=lay.dpi, facecolor="white")
    cells: list[dict[str, Any]] = []
    for r, row in enumerate(grid.rows):
        y0 = top + r * (cell_h + lay.spacing)
        fig.text(
            (lay.left - 8) / W,
            1 - (y0 + cell_h / 2) / H,
            _wrap(row.label, lay.left - 16),
            ha="right",
            va="center",
            fontsize=9,
        )
        for c in range(len(grid.columns)):
            x0 = lay.left + c * (cell_w + lay.spacing)
            rec = grid.cell(r, c)
            v = views.get((r, c))
            arr = _cell_array(v, n_views, size, lay.gap)
            state = rec.state.state if rec else "no run"
            reason = rec.state.reason if rec else None
            if state == "diverged":
                _paint_frame(arr, lay.frame)
            ax = fig.add_axes((x0 / W, 1 - (y0 + cell_h) / H, cell_w / W, cell_h / H))
            ax.imshow(arr, interpolation="none", aspect="auto")
            ax.set_axis_off()
            note = None
            if state == "diverged":
                note = f"diverged ({reason})" if reason else "diverged"
            elif state != "finished":
                note = state if not reason else f"{state}: {reason}"
            elif v is not None and not v.images:
                note = f"no render: {v.error}"
            if note:
                ax.text(
                    0.5,
                    0.5,
                    _wrap(note, cell_w - 12),
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if state == "diverged" else "black",
                    bbox={
                        "facecolor": np.array(DIVERGED_RGB) / 255 if state == "diverged" else "white",
                        "edgecolor": "none",
                        "alpha": 0.85,
                    },
                )
            cells.append(
                {
                    "row": r,
                    "col": c,
                    "run": rel_path(rec.path, root) if rec else None,
                    "state": state,
                    "reason": reason,
                    "views": v.names if v and v.images else [],
                    "nan_pixels": bool(v.nan) if v else False,
                    "box": [x0, y0, cell_w, cell_h],
                    "view_boxes": [[x0 + k * (size + lay.gap), y0, size, size] for k in range(n_views)],
                    "duplicates": [rel_path(d.path, root) for d in grid.duplicates.get((r, c), [])],
                }
            )
    for c, col in enumerate(grid.columns):
        x0 = lay.left + c * (cell_w + lay.spacing)
        fig.text(
            (x0 + cell_w / 2) / W,
            1 - (lay.top - 6) / H,
            _wrap(col.label, cell_w, 8.0),
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold",
        )
        if n_views > 1:
            for k, name in enumerate(names):
                xv = x0 + k * (size + lay.gap) + size / 2
                fig.text(xv / W, 1 - (top - 3) / H, name, ha="center", va="bottom", fontsize=7, color="0.35")
    axes = " x ".join(a.key for a in grid.column_axes) or "method"
    launch = _launch_of(grid.selection)
    which = f" (launch {launch})" if launch and launch != "all" else (" (all launches pooled)" if launch else "")
    caption = f"{root.name}{which}: columns {axes} (sweep order), rows prompts; red frame = diverged"
    fig.text(6 / W, 6 / H, caption, ha="left", va="bottom", fontsize=7, color="0.35")

    png, pdf, side = out / "figure.png", out / "figure.pdf", out / "figure.json"
    fig.savefig(png, dpi=lay.dpi, facecolor="white")
    fig.savefig(pdf, dpi=lay.dpi, facecolor="white")
    data = {
        "version": FIGURE_VERSION,
        "sweep": str(root),
        "png": png.name,
        "pdf": pdf.name,
        "width": W,
        "height": H,
        "source": grid.source,
        "launch": _launch_of(grid.selection),
        "column_axes": [a.key for a in grid.column_axes],
        "row_axes": [a.key for a in grid.row_axes],
        "views": names if n_views > 1 or names == [IMAGE_VIEW] else names[:1],
        "view_size": size,
        "columns": [
            {"index": i, "label": col.label, "values": dict(zip([a.key for a in grid.column_axes], col.values))}
            for i, col in enumerate(grid.columns)
        ],
        "rows": [
            {"index": i, "label": row.label, "prompt": row.prompt, "seed": row.seed} for i, row in enumerate(grid.rows)
        ],
        "cells": cells,
        "unplaced": [rel_path(r.path, root) for r in grid.unplaced],
    }
    tmp = side.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, side)
    return Figure(png, pdf, side, data)


def log_wandb_figure(
    fig: Figure,
    project: str = "sdi-lab",
    name: str | None = None,
    entity: str | None = None,
    out_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Log the figure (``wandb.Image``) and its cell map (``wandb.Table``); offline unless a key is configured."""
    from eval.table.wandb_log import log_eval_run

    d = fig.data
    cols = ["row", "col", "prompt", "column", "run", "state", "reason"]
    rows = [
        [
            c["row"],
            c["col"],
            d["rows"][c["row"]]["label"],
            d["columns"][c["col"]]["label"],
            c["run"],
            c["state"],
            c["reason"],
        ]
        for c in d["cells"]
    ]

    return log_eval_run(
        lambda wandb: {"figure": wandb.Image(str(fig.png)), "figure_cells": wandb.Table(columns=cols, data=rows)},
        project=project,
        name=name or f"figure-{Path(d['sweep']).name}",
        entity=entity,
        out_dir=out_dir,
        config={"root": d["sweep"], "column_axes": d["column_axes"]},
    )
