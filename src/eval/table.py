"""Aggregate runs by method into the layout of the paper's Table 6.1 (Markdown, CSV, LaTeX, W&B).

Per group of runs (method label, trainer.max_steps, prior, scene):

    CLIP, quality, sharpness, real   mean +- std over all views of the finished (non-diverged) runs
                                     that have eval/scores.json (views pooled across runs)
    Div. %                           diverged / (finished + diverged); diverged = nan, oom, empty volume
    Time, VRAM                       mean over runs the trainer finished (status "finished", including
                                     empty-volume ones) of metrics.json ``seconds`` and ``peak_memory_mb``
                                     (GPU peak on CUDA, process max RSS on CPU)
    ground truth (analytic prior)    mean +- std over finished runs of each numeric metrics.json entry
                                     that is not bookkeeping (psnr, ssim, texture_realism, ...)

Runs still running, missing (no metrics.json) and failed for other reasons are counted and listed,
never averaged. No torch import here: ``table`` is quick on a large sweep.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.divergence import RunState, classify
from eval.runs import METRICS, RunInfo, find_runs, load_run, natural_key, steps_label, unique

IQA_NAMES = ("quality", "sharpness", "real")

# The paper's Table 6.1 (43 prompts, 50 views each).
PAPER_ROWS: list[dict[str, Any]] = [
    {
        "key": "sds",
        "label": "SDS 10k",
        "clip": (29.81, 2.49),
        "quality": (76, 6.6),
        "sharpness": (99, 1.2),
        "real": (98, 2.4),
        "div_pct": 18.6,
        "time_min": 66,
        "vram_gb": 6.2,
    },
    {
        "key": "vsd",
        "label": "VSD 25k",
        "clip": (33.31, 2.39),
        "quality": (77, 6.7),
        "sharpness": (98, 1.3),
        "real": (96, 4.4),
        "div_pct": 23.2,
        "time_min": 334,
        "vram_gb": 47.9,
    },
    {
        "key": "esd",
        "label": "ESD 25k",
        "clip": (32.79, 2.15),
        "quality": (77, 7.2),
        "sharpness": (98, 1.2),
        "real": (97, 2.7),
        "div_pct": 14.0,
        "time_min": 331,
        "vram_gb": 46.8,
    },
    {
        "key": "hifa",
        "label": "HiFA 25k",
        "clip": (32.80, 2.35),
        "quality": (81, 6.5),
        "sharpness": (98, 1.5),
        "real": (97, 1.2),
        "div_pct": 4.7,
        "time_min": 235,
        "vram_gb": 46.4,
    },
    {
        "key": "sdi",
        "label": "SDI (ours) 10k",
        "clip": (33.47, 2.49),
        "quality": (82, 6.3),
        "sharpness": (98, 1.3),
        "real": (97, 1.2),
        "div_pct": 4.7,
        "time_min": 119,
        "vram_gb": 39.2,
    },
]
PAPER_ORDER = [r["key"] for r in PAPER_ROWS]
_METHOD_ALIASES = {
    "ddim_inversion": "sdi",
    "ddiminversion": "sdi",
    "sdi": "sdi",
    "sds": "sds",
    "vsd": "vsd",
    "prolificdreamer": "vsd",
    "esd": "esd",
    "hifa": "hifa",
    "csd": "csd",
    "nfsd": "nfsd",
}
# CSD and NFSD are not in the paper's table (related work only): their rows have no paper row beside them
_METHOD_LABELS = {"sds": "SDS", "sdi": "SDI", "vsd": "VSD", "esd": "ESD", "hifa": "HiFA", "csd": "CSD", "nfsd": "NFSD"}

# metrics.json entries that are bookkeeping, not ground-truth metrics
_NOT_GT = {
    "steps",
    "max_steps",
    "seconds",
    "peak_memory_mb",
    "diverged",
    "resumed_from_step",
    "seed",
    "step",
    "status",
    "diverged_reason",
    "method",
    "prompt",
    "device",
    "error",
    "start",
    "diverged_detail",
    "guidance_trainable_params",
}
_NOT_GT_PATTERN = re.compile(r"(mesh|video|vertices|faces|frames|_path$|_file$|^n_)")
_GT_FIRST = ["psnr", "ssim", "texture_realism", "realism_high_band", "realism_low_band", "mode_commitment"]


def paper_key(method: str) -> str | None:
    """Map a run's method label to a row of the paper's table (sds, sdi, vsd, esd, hifa) or None."""
    m = method.lower().strip()
    if m in _METHOD_ALIASES:
        return _METHOD_ALIASES[m]
    squashed = re.sub(r"[^a-z0-9]", "", m)
    if squashed in _METHOD_ALIASES:
        return _METHOD_ALIASES[squashed]
    first = re.split(r"[^a-z0-9]+", m)[0] if m else ""
    return _METHOD_ALIASES.get(first)


def method_display(method: str) -> str:
    key = paper_key(method)
    if key and re.sub(r"[^a-z0-9]", "", method.lower()) in (key, "ddiminversion"):
        return _METHOD_LABELS[key]
    return method


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)) and math.isfinite(float(x)):
        return float(x)
    return None


@dataclass
class RunRecord:
    info: RunInfo
    state: RunState

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def trainer_finished(self) -> bool:
        return (self.info.metrics or {}).get("status") == "finished"

    @property
    def scored(self) -> bool:
        s = self.info.scores
        return bool(s and isinstance(s.get("clip_score"), dict) and s["clip_score"].get("per_view"))

    def per_view(self, name: str) -> list[float]:
        s = self.info.scores or {}
        node = s.get("clip_score") if name == "clip" else (s.get("iqa") or {}).get(name)
        return [float(v) for v in (node or {}).get("per_view", [])]


@dataclass
class Group:
    method: str
    max_steps: int | None
    prior: str | None
    scene: str | None
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{method_display(self.method)} {steps_label(self.max_steps)}"

    @property
    def paper_key(self) -> str | None:
        return paper_key(self.method)

    @property
    def analytic(self) -> bool:
        return any(r.info.is_analytic for r in self.runs)

    def count(self, state: str) -> int:
        return sum(r.state.state == state for r in self.runs)

    @property
    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in ("finished", "diverged", "running", "missing", "failed")}

    @property
    def ended(self) -> int:
        return self.count("finished") + self.count("diverged")

    @property
    def div_pct(self) -> float | None:
        return 100.0 * self.count("diverged") / self.ended if self.ended else None

    @property
    def quality_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.state.state == "finished" and r.scored]

    @property
    def unscored(self) -> list[RunRecord]:
        return [r for r in self.runs if r.state.state == "finished" and not r.scored]

    def stat(self, name: str) -> tuple[float, float] | None:
        vals: list[float] = []
        for r in self.quality_runs:
            vals += r.per_view(name)
        return _mean_std(vals)

    @property
    def n_views(self) -> int:
        return sum(len(r.per_view("clip")) for r in self.quality_runs)

    @property
    def time_min(self) -> float | None:
        v = [_num((r.info.metrics or {}).get("seconds")) for r in self.runs if r.trainer_finished]
        ms = _mean_std([x / 60.0 for x in v if x is not None])
        return ms[0] if ms else None

    @property
    def vram_gb(self) -> float | None:
        v = [_num((r.info.metrics or {}).get("peak_memory_mb")) for r in self.runs if r.trainer_finished]
        ms = _mean_std([x / 1024.0 for x in v if x is not None])
        return ms[0] if ms else None

    @property
    def memory_devices(self) -> list[str]:
        devs = [str((r.info.metrics or {}).get("device") or "") for r in self.runs if r.trainer_finished]
        return unique("cuda" if d.startswith("cuda") else ("cpu" if d == "cpu" else "?") for d in devs if d)

    def gt_names(self) -> list[str]:
        names: list[str] = []
        for r in self.runs:
            if r.state.state != "finished" or not r.info.is_analytic:
                continue
            for k, v in (r.info.metrics or {}).items():
                if k in _NOT_GT or _NOT_GT_PATTERN.search(k) or _num(v) is None:
                    continue
                names.append(k)
        names = unique(names)
        first = [n for n in _GT_FIRST if n in names]
        return first + sorted(n for n in names if n not in first)

    def gt_stat(self, name: str) -> tuple[float, float, int] | None:
        vals = [
            _num((r.info.metrics or {}).get(name))
            for r in self.runs
            if r.state.state == "finished" and r.info.is_analytic
        ]
        vals = [v for v in vals if v is not None]
        ms = _mean_std(vals)
        return (ms[0], ms[1], len(vals)) if ms else None

    @property
    def models(self) -> list[str]:
        return unique(str((r.info.scores or {}).get("model", {}).get("spec")) for r in self.quality_runs)


@dataclass
class Aggregate:
    root: Path
    groups: list[Group]
    broken: list[Path] = field(default_factory=list)  # metrics/checkpoint but no config.yaml
    absent: dict[str, list[str]] = field(default_factory=dict)  # group label -> prompts with no run
    expected_prompts: list[str] | None = None

    @property
    def records(self) -> list[RunRecord]:
        return [r for g in self.groups for r in g.runs]

    def by_state(self, state: str) -> list[RunRecord]:
        return [r for r in self.records if r.state.state == state]

    @property
    def unscored(self) -> list[RunRecord]:
        return [r for g in self.groups for r in g.unscored]

    @property
    def models(self) -> list[str]:
        return unique(m for g in self.groups for m in g.models)

    @property
    def gt_names(self) -> list[str]:
        return unique(n for g in self.groups for n in g.gt_names())


def _group_sort_key(g: Group) -> tuple:
    k = g.paper_key
    return (
        PAPER_ORDER.index(k) if k in PAPER_ORDER else len(PAPER_ORDER),
        natural_key(g.method),
        g.max_steps or 0,
        str(g.prior),
        str(g.scene),
    )


def aggregate(root: Path | str, prompts: Sequence[str] | None = None) -> Aggregate:
    """Read every run under ``root`` (a run or a sweep) and group them; never raises for a damaged run."""
    root = Path(root)
    paths = find_runs(root, include_broken=True)
    groups: dict[tuple, Group] = {}
    broken: list[Path] = []
    for p in paths:
        info = load_run(p)
        if not info.config:
            broken.append(p)
            continue
        metrics_err = next((e for e in info.problems if METRICS in e), None)
        state = classify(info.metrics, info.render, metrics_err)
        key = (info.method, info.max_steps, info.prior, info.scene)
        g = groups.get(key) or groups.setdefault(key, Group(*key))
        g.runs.append(RunRecord(info, state))
    agg = Aggregate(
        root, sorted(groups.values(), key=_group_sort_key), broken, expected_prompts=list(prompts) if prompts else None
    )
    if prompts:
        for g in agg.groups:
            have = {r.info.prompt for r in g.runs}
            missing = [p for p in prompts if p not in have]
            if missing:
                agg.absent[g.label + _where(g)] = missing
    return agg


def _where(g: Group) -> str:
    parts = [p for p in (g.prior, g.scene) if p]
    return f" ({', '.join(parts)})" if parts else ""


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------
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
    parts = [f"{c[s]} {s}" for s in ("running", "missing", "failed") if c[s]]
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


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _rel(p: Path, root: Path) -> str:
    try:
        r = str(p.relative_to(root))
        return r if r != "." else p.name
    except ValueError:
        return str(p)


def run_lists(agg: Aggregate) -> list[tuple[str, list[str]]]:
    """(title, lines) for diverged / running / missing / failed / unscored / broken runs."""
    root = agg.root
    out = []
    for state, title in (
        ("diverged", "Diverged"),
        ("running", "Half-finished (status running)"),
        ("missing", "Missing (no metrics.json)"),
        ("failed", "Failed (not counted as diverged)"),
    ):
        recs = agg.by_state(state)
        if recs:
            out.append(
                (
                    f"{title}: {len(recs)}",
                    [f"{_rel(r.path, root)} [{r.info.method}] {r.state.reason or ''}".rstrip() for r in recs],
                )
            )
    if agg.unscored:
        out.append(
            (
                f"Finished but not scored (no eval/scores.json; run `python -m eval score`): {len(agg.unscored)}",
                [f"{_rel(r.path, root)} [{r.info.method}]" for r in agg.unscored],
            )
        )
    if agg.broken:
        out.append(
            (
                f"Not readable as runs (metrics.json or checkpoint without a readable config.yaml): {len(agg.broken)}",
                [_rel(p, root) for p in agg.broken],
            )
        )
    for label, prompts in agg.absent.items():
        out.append((f"{label}: {len(prompts)} of {len(agg.expected_prompts or [])} prompts have no run", prompts))
    return out


def to_markdown(agg: Aggregate, paper: bool = True) -> str:
    models = agg.models
    lines = [f"# Table 6.1 — {agg.root}", ""]
    lines.append(
        f"CLIP model: {', '.join(models) if models else '(no scored runs)'}"
        + ("  **(mixed models across runs)**" if len(models) > 1 else "")
    )
    n = len(agg.records)
    c = {s: len(agg.by_state(s)) for s in ("finished", "diverged", "running", "missing", "failed")}
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
        "- Runs: finished + diverged runs (the Div.% denominator); Excluded: running / missing / failed runs "
        "and finished runs without scores.",
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
]


def run_rows(agg: Aggregate) -> list[dict[str, Any]]:
    rows = []
    for r in agg.records:
        m, s, rd = r.info.metrics or {}, r.info.scores or {}, r.info.render or {}
        iqa = s.get("iqa") or {}
        op = rd.get("mean_opacity")
        rows.append(
            {
                "path": _rel(r.path, agg.root),
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


def _tex(s: Any) -> str:
    s = str(s).replace("\\", "\x00")
    for a, b in (("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        s = s.replace(a, b)
    return s.replace("\x00", r"\textbackslash{}").replace(PM, r"$\pm$")


def to_latex(agg: Aggregate, paper: bool = True) -> str:
    cols = ["Method", "Source", "CLIP", "quality", "sharpness", "real", "Div.\\%", "Time", "VRAM"]
    keep = [
        MAIN_COLUMNS.index(c)
        for c in ("Method", "Source", "CLIP", "quality", "sharpness", "real", "Div.%", "Time", "VRAM")
    ]
    rows = [[r[i] for i in keep] for r in main_rows(agg, paper)]
    out = [
        r"% generated by python -m eval table " + str(agg.root).replace("%", r"\%"),
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{ll" + "r" * (len(cols) - 2) + "}",
        r"\toprule",
        " & ".join(cols) + r" \\",
        r"\midrule",
    ]
    for r in rows:
        out.append(" & ".join(_tex(c) for c in r) + r" \\")
    out += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\caption{CLIP score and CLIP-IQA (mean $\pm$ std over views), diverged runs, mean run time and peak "
        r"memory; paper rows from Table 6.1. CLIP model: " + _tex(", ".join(agg.models) or "-") + "}",
        r"\end{table}",
    ]
    gcols, grows = gt_rows(agg)
    if grows:
        out += [
            "",
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            r"\begin{tabular}{llll" + "r" * (len(gcols) - 4) + "}",
            r"\toprule",
            " & ".join(_tex(c) for c in gcols) + r" \\",
            r"\midrule",
        ]
        out += [" & ".join(_tex(c) for c in r) + r" \\" for r in grows]
        out += [
            r"\bottomrule",
            r"\end{tabular}",
            r"\caption{Ground-truth metrics of the analytic prior "
            r"(mean $\pm$ std over finished runs).}",
            r"\end{table}",
        ]
    return "\n".join(out) + "\n"


def write_tables(agg: Aggregate, out_dir: Path | str, paper: bool = True) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out_dir / "table.md",
        "csv": out_dir / "table.csv",
        "latex": out_dir / "table.tex",
        "runs": out_dir / "runs.csv",
    }
    files["markdown"].write_text(to_markdown(agg, paper))
    files["csv"].write_text(to_csv(agg, paper))
    files["latex"].write_text(to_latex(agg, paper))
    files["runs"].write_text(runs_csv(agg))
    return files


def log_wandb(
    agg: Aggregate,
    project: str = "sdi-lab",
    name: str | None = None,
    out_dir: Path | str | None = None,
    entity: str | None = None,
    paper: bool = True,
) -> dict[str, Any]:
    """Log the table (and the per-run listing) as ``wandb.Table``s; offline unless a key is configured."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    cols, rows = csv_rows(agg, paper)
    data = [[r.get(c) for c in cols] for r in rows]
    run = wandb.init(
        project=project,
        entity=entity,
        name=name or f"table-{agg.root.name}",
        job_type="eval",
        dir=str(out_dir) if out_dir else None,
        mode=mode,
        config={"root": str(agg.root), "clip_models": agg.models, "n_runs": len(agg.records)},
    )
    try:
        payload = {
            "table_6_1": wandb.Table(columns=cols, data=data),
            "runs": wandb.Table(columns=RUN_COLUMNS, data=[[r.get(c) for c in RUN_COLUMNS] for r in run_rows(agg)]),
        }
        gcols, grows = gt_rows(agg)
        if grows:
            payload["ground_truth"] = wandb.Table(columns=gcols, data=grows)
        run.log(payload)
        info = {"mode": mode, "dir": str(getattr(run, "dir", "")), "id": run.id, "url": getattr(run, "url", None)}
    finally:
        run.finish()
    return info


def load_expected_prompts(path: Path | str | None) -> list[str] | None:
    if not path:
        return None
    from eval.runs import read_prompt_file

    return read_prompt_file(path)


__all__ = [
    "aggregate",
    "Aggregate",
    "Group",
    "to_markdown",
    "to_csv",
    "to_latex",
    "runs_csv",
    "write_tables",
    "log_wandb",
    "PAPER_ROWS",
    "paper_key",
]
