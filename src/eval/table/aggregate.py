"""Group the runs of a run or sweep directory by method for Table 6.1 (no torch import).

Per group of runs (method label, trainer.max_steps, prior, scene):

    CLIP, quality, sharpness, real   mean +- std over all views of the finished (non-diverged) runs
                                     that have eval/scores.json (views pooled across runs)
    Div. %                           diverged / (finished + diverged); diverged = nan, oom, empty volume
    Time, VRAM                       mean over runs the trainer finished (status "finished", including
                                     empty-volume ones) of metrics.json ``seconds`` and ``peak_memory_mb``
                                     (GPU peak on CUDA, process max RSS on CPU)
    ground truth (analytic prior)    mean +- std over finished runs of each numeric metrics.json entry
                                     that is not bookkeeping (psnr, ssim, texture_realism, ...)

Runs still running, interrupted, missing (no metrics.json) and failed (with their reason) are counted and
listed, never averaged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.divergence import STATES, RunState, classify
from eval.runs import METRICS, RunInfo, find_runs, load_run, natural_key, steps_label, unique
from eval.table.paper import PAPER_ORDER, method_display, paper_key

if TYPE_CHECKING:
    from eval.launches import Selection

IQA_NAMES = ("quality", "sharpness", "real")

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
    launch: str | None = None  # the launch id(s) the run belongs to (``eval.launches``); None without launches

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
        return {s: self.count(s) for s in STATES}

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
    selection: Selection | None = None  # which launch(es) the runs come from (None: every run under root)

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


def aggregate(root: Path | str, prompts: Sequence[str] | None = None, selection: Selection | None = None) -> Aggregate:
    """Read the runs under ``root`` (a run or a sweep) and group them; never raises for a damaged run.

    ``selection`` (``eval.launches.select``) restricts them to one launch's runs or labels each with its launch;
    without one, every run under ``root``."""
    root = Path(root)
    if selection is not None and selection.runs is not None:
        paths = sorted(selection.runs)
    else:
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
        job = selection.job(p) if selection is not None else None
        own = info.metrics is None or (selection is not None and selection.mode == "one")
        if job is not None and own and job.get("status") == "failed" and state.state != "failed":
            # the launch's job failed, and the directory holds no record of it (no metrics.json) or, for one launch,
            # an earlier run's (a refused start changes nothing there): this launch's failure, with the job's reason
            code = job.get("exit_code")
            reason = str(job.get("reason") or "the job failed") + (f" (exit code {code})" if code is not None else "")
            state = RunState("failed", reason)
        key = (info.method, info.max_steps, info.prior, info.scene)
        g = groups.get(key) or groups.setdefault(key, Group(*key))
        g.runs.append(RunRecord(info, state, selection.label(p) if selection is not None else None))
    agg = Aggregate(
        root,
        sorted(groups.values(), key=_group_sort_key),
        broken,
        expected_prompts=list(prompts) if prompts else None,
        selection=selection,
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


def load_expected_prompts(path: Path | str | None) -> list[str] | None:
    if not path:
        return None
    from eval.runs import read_prompt_file

    return read_prompt_file(path)
