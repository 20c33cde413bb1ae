"""Table 6.1 as CSV (``table.csv``, one row per group and paper row) and the per-run listing (``runs.csv``)."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from eval.table.aggregate import Aggregate
from eval.table.cells import rel_path
from eval.table.paper import PAPER_ROWS

CSV_STAT_COLUMNS = ["clip", "quality", "sharpness", "real"]


def csv_rows(agg: Aggregate, paper: bool = True) -> tuple[list[str], list[dict[str, Any]]]:
    gt = agg.gt_names
    cols = (
        [
            "source",
            "method",
            "label",
            "prior",
            "scene",
            "max_steps",
            "n_runs",
            "n_finished",
            "n_diverged",
            "n_running",
            "n_interrupted",
            "n_missing",
            "n_failed",
            "n_scored",
            "n_views",
        ]
        + [f"{s}_{x}" for s in CSV_STAT_COLUMNS for x in ("mean", "std")]
        + ["div_pct", "time_min", "vram_gb", "clip_model"]
        + [f"gt_{n}_{x}" for n in gt for x in ("mean", "std")]
    )
    rows: list[dict[str, Any]] = []
    for g in agg.groups:
        c = g.counts
        row: dict[str, Any] = {
            "source": "ours",
            "method": g.method,
            "label": g.label,
            "prior": g.prior,
            "scene": g.scene,
            "max_steps": g.max_steps,
            "n_runs": len(g.runs),
            "n_finished": c["finished"],
            "n_diverged": c["diverged"],
            "n_running": c["running"],
            "n_interrupted": c["interrupted"],
            "n_missing": c["missing"],
            "n_failed": c["failed"],
            "n_scored": len(g.quality_runs),
            "n_views": g.n_views,
            "div_pct": g.div_pct,
            "time_min": g.time_min,
            "vram_gb": g.vram_gb,
            "clip_model": ";".join(g.models),
        }
        for s in CSV_STAT_COLUMNS:
            st = g.stat(s)
            row[f"{s}_mean"], row[f"{s}_std"] = st if st else (None, None)
        for n in gt:
            st = g.gt_stat(n)
            row[f"gt_{n}_mean"], row[f"gt_{n}_std"] = (st[0], st[1]) if st else (None, None)
        rows.append(row)
    if paper:
        for p in PAPER_ROWS:
            row = {
                "source": "paper",
                "method": p["key"],
                "label": p["label"],
                "prior": "SD 2.1",
                "scene": "NeRF",
                "max_steps": int(re.search(r"(\d+)k", p["label"]).group(1)) * 1000,
                "n_runs": 43,
                "n_views": 43 * 50,
                "div_pct": p["div_pct"],
                "time_min": p["time_min"],
                "vram_gb": p["vram_gb"],
            }
            for s in CSV_STAT_COLUMNS:
                row[f"{s}_mean"], row[f"{s}_std"] = p[s]
            rows.append(row)
    return cols, rows


def to_csv(agg: Aggregate, paper: bool = True) -> str:
    cols, rows = csv_rows(agg, paper)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


RUN_COLUMNS = [
    "path",
    "method",
    "prompt",
    "seed",
    "max_steps",
    "prior",
    "scene",
    "state",
    "reason",
    "status",
    "steps",
    "seconds",
    "peak_memory_mb",
    "clip_mean",
    "clip_std",
    "quality_mean",
    "sharpness_mean",
    "real_mean",
    "n_views",
    "mean_opacity",
    "clip_model",
    "launch",
]


def run_rows(agg: Aggregate) -> list[dict[str, Any]]:
    rows = []
    for r in agg.records:
        m, s, rd = r.info.metrics or {}, r.info.scores or {}, r.info.render or {}
        iqa = s.get("iqa") or {}
        op = rd.get("mean_opacity")
        rows.append(
            {
                "path": rel_path(r.path, agg.root),
                "method": r.info.method,
                "prompt": r.info.prompt,
                "seed": r.info.seed,
                "max_steps": r.info.max_steps,
                "prior": r.info.prior,
                "scene": r.info.scene,
                "state": r.state.state,
                "reason": r.state.reason,
                "status": m.get("status"),
                "steps": m.get("steps"),
                "seconds": m.get("seconds"),
                "peak_memory_mb": m.get("peak_memory_mb"),
                "clip_mean": (s.get("clip_score") or {}).get("mean"),
                "clip_std": (s.get("clip_score") or {}).get("std"),
                "quality_mean": (iqa.get("quality") or {}).get("mean"),
                "sharpness_mean": (iqa.get("sharpness") or {}).get("mean"),
                "real_mean": (iqa.get("real") or {}).get("mean"),
                "n_views": s.get("n_views"),
                "mean_opacity": (sum(op) / len(op)) if op else None,
                "clip_model": (s.get("model") or {}).get("spec"),
                "launch": r.launch,
            }
        )
    return rows


def runs_csv(agg: Aggregate) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RUN_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in run_rows(agg):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RUN_COLUMNS})
    return buf.getvalue()
