"""Launches of a sweep directory: which ``python train.py -m ...`` produced which runs (no torch import).

Every multirun records itself (``distill.launches`` writes, this module reads) under the sweep directory:

    launches/<launch_id>/manifest.json   the launch: id, started / ended (UTC), argv, cwd, the command line's
                                         overrides, the sweeper's params, launcher, planned job count, status
                                         (running | finished | all_failed | stopped: a signal or an exit ended
                                         it before Hydra's end of multirun) and, once it ended, its jobs
    launches/<launch_id>/multirun.yaml   the launch's own multirun config (the sweep's axes; the sweep
                                         directory's multirun.yaml is the last launch's)
    launches/<launch_id>/jobs/<num>.json one per job, written by the job's own process (any launcher): num, run_dir
                                         (relative to the sweep directory), overrides, started / ended, status,
                                         reason, exit_code, identity (``<run>/identity.json`` hash)

A launch id is ``YYYYmmdd-HHMMSS-xxxxxx`` (UTC start time + random hex), so ids sort by start time.

``select(root, launch)`` picks the runs an evaluation covers: the latest launch by default, one launch by id
(or a unique prefix), or ``all`` (every run under the directory, each labelled with its launches). A directory
without ``launches/`` (an older sweep, one run) is evaluated as before: every run below it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from eval.runs import CONFIG, METRICS, EvalError, find_runs

LAUNCHES_DIR = "launches"
MANIFEST = "manifest.json"
LAUNCH_MULTIRUN = "multirun.yaml"
JOBS_DIR = "jobs"
ENV_LAUNCH_ID = "SDI_LAUNCH_ID"
ENV_LAUNCH_DIR = "SDI_LAUNCH_DIR"
MANIFEST_VERSION = 1
ALL = "all"
LATEST = "latest"
NO_LAUNCH = "(no launch record)"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def job_sort_key(job: dict[str, Any]) -> tuple:
    num = job.get("num")
    return (0, num) if isinstance(num, int) else (1, str(job.get("run_dir")))


def read_jobs(launch_dir: Path) -> list[dict[str, Any]]:
    """The per-job records of a launch (written by each job's process), in job order."""
    jobs = [j for p in sorted((launch_dir / JOBS_DIR).glob("*.json")) if (j := _read(p)) is not None]
    return sorted(jobs, key=job_sort_key)


@dataclass
class Launch:
    """One launch of a sweep directory, read from ``launches/<id>/``."""

    id: str
    dir: Path
    manifest: dict[str, Any]
    jobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.dir.parent.parent

    @property
    def started(self) -> str:
        return str(self.manifest.get("started") or "")

    @property
    def status(self) -> str:
        return str(self.manifest.get("status") or "unknown")

    @property
    def multirun(self) -> Path:
        return self.dir / LAUNCH_MULTIRUN

    def run_dir(self, job: dict[str, Any]) -> Path | None:
        rd = job.get("run_dir")
        if not rd:
            return None
        p = Path(rd)
        return p if p.is_absolute() else self.root / p

    @property
    def run_dirs(self) -> list[Path]:
        """The run directories of the launch's jobs that hold a run (``config.yaml`` or ``metrics.json``)."""
        out: list[Path] = []
        for j in self.jobs:
            p = self.run_dir(j)
            if p is not None and p not in out and ((p / CONFIG).is_file() or (p / METRICS).is_file()):
                out.append(p)
        return out

    @property
    def jobs_without_run(self) -> list[dict[str, Any]]:
        """Jobs that left no run record (no run directory, or one without config.yaml / metrics.json)."""
        have = set(self.run_dirs)
        return [j for j in self.jobs if self.run_dir(j) not in have]

    def describe(self) -> str:
        argv = " ".join(str(a) for a in self.manifest.get("argv") or [])
        ended = self.manifest.get("ended")
        return (
            f"{self.id} (started {self.started or '?'}, {len(self.jobs)} job(s), {self.status}"
            + ("" if ended else ", not ended")
            + (f"): {argv}" if argv else ")")
        )


def load_launch(launch_dir: Path) -> Launch | None:
    manifest = _read(launch_dir / MANIFEST)
    if manifest is None:
        return None
    jobs = read_jobs(launch_dir)  # the jobs' own records are authoritative (also for a launch that never ended)
    if not jobs:
        jobs = [j for j in manifest.get("jobs") or [] if isinstance(j, dict)]
    return Launch(str(manifest.get("launch_id") or launch_dir.name), launch_dir, manifest, jobs)


def list_launches(root: Path | str) -> list[Launch]:
    """The launches recorded under ``root/launches``, oldest first (by start time, then id)."""
    d = Path(root) / LAUNCHES_DIR
    if not d.is_dir():
        return []
    out = [la for p in sorted(d.iterdir()) if p.is_dir() and (la := load_launch(p)) is not None]
    return sorted(out, key=lambda la: (la.started, la.id))


@dataclass
class Selection:
    """The runs one evaluation covers, and where they came from.

    mode   ``none`` (no launches recorded: every run below ``root``), ``one`` (one launch) or ``all`` (pooled)
    runs   the run directories (None: every run below ``root``, as ``find_runs``)
    """

    root: Path
    mode: str
    launches: list[Launch] = field(default_factory=list)
    runs: list[Path] | None = None
    labels: dict[Path, str] = field(default_factory=dict)  # run -> its launch id(s) (mode all)
    n_recorded: int = 0  # launches recorded under root
    index: int = -1  # mode one: the launch's position among them (oldest first)

    @property
    def launch(self) -> Launch | None:
        return self.launches[0] if self.mode == "one" else None

    @property
    def multirun(self) -> Path | None:
        """The multirun.yaml whose axes lay out the grid (the launch's own; the directory's without launches)."""
        if self.mode == "one" and self.launch is not None and self.launch.multirun.is_file():
            return self.launch.multirun
        return None

    @property
    def jobs_without_run(self) -> list[tuple[str, dict[str, Any]]]:
        return [(la.id, j) for la in self.launches for j in la.jobs_without_run]

    @cached_property
    def _jobs_by_run(self) -> dict[Path, dict[str, Any]]:
        return {p: j for la in self.launches for j in la.jobs if (p := la.run_dir(j)) is not None}  # later wins

    def job(self, run: Path) -> dict[str, Any] | None:
        """The latest selected launch's record of the job that ran in ``run`` (None if none did)."""
        return self._jobs_by_run.get(Path(run))

    def label(self, run: Path) -> str | None:
        if self.mode == "all":
            return self.labels.get(Path(run), NO_LAUNCH)
        if self.mode == "one" and self.launch is not None:
            return self.launch.id
        return None

    def describe(self) -> str:
        """The one line ``python -m eval`` prints about what it evaluates."""
        if self.mode == "none":
            return f"launch: none recorded under {self.root}; every run below it"
        if self.mode == "one":
            assert self.launch is not None
            nth = f"{self.index + 1} of {self.n_recorded}"
            return f"launch: {self.launch.describe()} [{nth}; --launch ID picks another, --launch all pools them]"
        n_free = sum(1 for v in self.labels.values() if v == NO_LAUNCH)
        extra = f" + {n_free} run(s) without a launch record" if n_free else ""
        return f"launch: all {len(self.launches)} launches pooled ({', '.join(la.id for la in self.launches)}){extra}"


def select(root: Path | str, launch: str | None = None) -> Selection:
    """The runs of ``root`` an evaluation covers (see the module docstring). ``launch``: None / ``latest`` (the
    latest launch), an id or unique id prefix, or ``all``. Raises ``EvalError`` naming the known launches."""
    root = Path(root)
    launches = list_launches(root) if root.is_dir() and not (root / CONFIG).is_file() else []
    if not launches:
        if launch not in (None, LATEST, ALL):
            raise EvalError(
                f"--launch {launch}: {root} records no launches (no {LAUNCHES_DIR}/*/{MANIFEST}); "
                f"leave --launch out to evaluate every run below it"
            )
        return Selection(root, "none")
    if launch == ALL:
        labels: dict[Path, list[str]] = {}
        for la in launches:
            for p in la.run_dirs:
                labels.setdefault(p, []).append(la.id)
        try:
            every = find_runs(root, include_broken=True)
        except EvalError:
            every = []
        runs = sorted(set(every) | set(labels))
        return Selection(
            root,
            "all",
            launches,
            runs,
            {p: ",".join(labels[p]) if p in labels else NO_LAUNCH for p in runs},
            len(launches),
        )
    if launch in (None, LATEST):
        index = len(launches) - 1
    else:
        hits = [i for i, la in enumerate(launches) if la.id == launch] or [
            i for i, la in enumerate(launches) if la.id.startswith(launch)
        ]
        if len(hits) != 1:
            known = ", ".join(la.id for la in launches)
            what = "matches several launches" if hits else "is not a launch of this directory"
            raise EvalError(f"--launch {launch} {what}; {root} has: {known} (or use --launch all / latest)")
        index = hits[0]
    la = launches[index]
    return Selection(root, "one", [la], la.run_dirs, {}, len(launches), index)
