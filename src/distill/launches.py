"""Recording a launch (one ``python train.py -m ...``) in its sweep directory; the files are described in
``eval.launches``, which reads them.

    begin(config)              launching process, before any job: a new launch id, exported to the jobs as
                               SDI_LAUNCH_ID / SDI_LAUNCH_DIR (inherited by in-process jobs, submitit_local's
                               subprocesses and sbatch's environment), ``manifest.json`` (status running) and the
                               launch's ``multirun.yaml``. A launch that plans 0 jobs raises ``EmptyLaunch``
                               before anything is written.
    job_started / job_ended    inside each job's process: ``jobs/<num>.json`` (one file per job: no write races)
    finish(config)             launching process, after the last job: the manifest with every job, its run
                               directory, identity hash, status and reason; idempotent within the process
    outcome(manifest)          (exit code, message) when every job failed, else None

No torch import; the job's status is read from ``<run>/metrics.json``, its identity from ``<run>/identity.json``.
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval.launches import (
    ENV_LAUNCH_DIR,
    ENV_LAUNCH_ID,
    JOBS_DIR,
    LAUNCH_MULTIRUN,
    LAUNCHES_DIR,
    MANIFEST,
    MANIFEST_VERSION,
    read_jobs,
)
from eval.runs import METRICS, read_json, write_json

IDENTITY = "identity.json"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
_finished: dict[str, dict[str, Any]] = {}  # launch dir -> its final manifest (finish() is called by two callbacks)
_failure: dict[str, Any] | None = None  # the failure distill.cli.run_job reported for the job running in this process


class EmptyLaunch(RuntimeError):
    """The multirun's sweep expands to 0 jobs."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}Z"


def new_launch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _container(config: DictConfig, key: str, empty: Any) -> Any:
    node = OmegaConf.select(config, key, default=None)
    return empty if node is None else OmegaConf.to_container(node, resolve=False)


def sweep_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """The jobs' overrides as Hydra's basic sweeper will build them (sweeper params, then the command line's
    overrides), or None for another sweeper or overrides that need Hydra's config loader (glob)."""
    if str(OmegaConf.select(config, "hydra.sweeper._target_", default="")) != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = _container(config, "hydra.sweeper.params", {})
    task = _container(config, "hydra.overrides.task", [])
    lines = [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # noqa: BLE001 - glob() sweeps etc.: the count is then known at the end only
        return None


def begin(config: DictConfig) -> Path:
    """Start a launch (see the module docstring); returns its directory."""
    plan = planned_jobs(config)
    overrides = [str(t) for t in _container(config, "hydra.overrides.task", [])]
    if plan is not None and not plan:
        sweep = ", ".join(overrides) or "(none)"
        raise EmptyLaunch(
            f"the sweep expands to 0 jobs (overrides: {sweep}); nothing was run and {sweep_dir(config)} is "
            f"unchanged. Give every swept key at least one value (e.g. seed=range(0,5), not range(0,0))"
        )
    launch_id = new_launch_id()
    launch_dir = (sweep_dir(config) / LAUNCHES_DIR / launch_id).resolve()
    (launch_dir / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, launch_dir / LAUNCH_MULTIRUN)
    params = _container(config, "hydra.sweeper.params", {})
    manifest = {
        "version": MANIFEST_VERSION,
        "launch_id": launch_id,
        "status": "running",
        "started": now(),
        "ended": None,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "overrides": overrides,
        "sweeper_params": {str(k): str(v) for k, v in (params or {}).items()},
        "launcher": str(OmegaConf.select(config, "hydra.launcher._target_", default="")),
        "planned_jobs": None if plan is None else len(plan),
        "jobs": [],
    }
    write_json(launch_dir / MANIFEST, manifest)
    os.environ[ENV_LAUNCH_ID] = launch_id
    os.environ[ENV_LAUNCH_DIR] = str(launch_dir)
    atexit.register(_finish_at_exit, launch_dir)
    return launch_dir


def _finish_at_exit(launch_dir: Path) -> None:
    """A launch stopped before Hydra's end of multirun (Ctrl-C, a job's signal exit): its manifest still gets its
    end, its jobs so far and status ``stopped``."""
    if str(launch_dir) not in _finished:
        try:
            finish(launch_dir=launch_dir, status="stopped")
        except Exception:  # noqa: BLE001 - never turn an exit into a traceback
            pass


def current_launch_dir(config: DictConfig | None = None) -> Path | None:
    """The launch this process belongs to (SDI_LAUNCH_DIR); None outside a multirun (a single run started from a
    process that inherited the variable is no job of that launch)."""
    if config is not None and str(OmegaConf.select(config, "hydra.mode", default="")) != "RunMode.MULTIRUN":
        return None
    d = os.environ.get(ENV_LAUNCH_DIR)
    return Path(d) if d and (Path(d) / MANIFEST).is_file() else None


def _job_file(launch_dir: Path, num: Any) -> Path:
    return launch_dir / JOBS_DIR / f"{int(num):06d}.json"


def _job_identity(config: DictConfig) -> dict[str, Any]:
    hc = config.hydra
    return {
        "num": int(OmegaConf.select(hc, "job.num", default=0) or 0),
        "id": str(OmegaConf.select(hc, "job.id", default="") or ""),
        "run_dir": str(hc.runtime.output_dir),
        "overrides": [str(t) for t in _container(config, "hydra.overrides.task", [])],
    }


def job_failed(reason: str, exit_code: int) -> None:
    """Called by ``distill.cli.run_job`` when a job of a multirun fails: its launch record says so even where the
    run directory still holds an earlier run's metrics.json (a refused start changes nothing there)."""
    global _failure
    lines = str(reason).strip().splitlines()
    _failure = {"reason": lines[0] if lines else "failed", "exit_code": exit_code}


def job_started(config: DictConfig) -> None:
    """In the job's process: ``jobs/<num>.json`` with status started (a requeued job rewrites its own)."""
    global _failure
    _failure = None
    launch_dir = current_launch_dir(config)
    if launch_dir is None:
        return
    job = _job_identity(config)
    root = launch_dir.parent.parent
    job.update(
        run_dir=_rel(Path(job["run_dir"]), root),
        launch_id=os.environ.get(ENV_LAUNCH_ID),
        status="started",
        started=now(),
        host=socket.gethostname(),
        pid=os.getpid(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
    )
    write_json(_job_file(launch_dir, job["num"]), job)


def job_status(run_dir: Path, exception: BaseException | None = None) -> dict[str, Any]:
    """status / reason / exit_code / steps of a job from its run's metrics.json (the trainer's record)."""
    metrics, err = read_json(run_dir / METRICS)
    if metrics is None:
        if exception is not None:
            reason = str(exception).strip().splitlines()[-1:] or [type(exception).__name__]
            return {"status": "failed", "reason": f"{type(exception).__name__}: {reason[0]}", "exit_code": 1}
        reason = err or f"the job ended without writing {METRICS} (its error is in the job's log)"
        return {"status": "failed", "reason": reason, "exit_code": None}
    out: dict[str, Any] = {"status": str(metrics.get("status") or "unknown")}
    reason = metrics.get("reason") or metrics.get("diverged_reason")
    if out["status"] == "failed" and not reason and metrics.get("error"):
        reason = str(metrics["error"]).strip().splitlines()[-1]
    if out["status"] == "interrupted" and not reason:
        reason = f"{metrics.get('signal') or 'signal'} at step {metrics.get('steps')}"
    out["reason"] = str(reason) if reason else None
    out["exit_code"] = metrics.get("exit_code")
    out["steps"] = metrics.get("steps")
    return out


def job_ended(config: DictConfig, job_return: Any) -> None:
    """In the job's process: the job's record completed with its status (from metrics.json) and identity."""
    launch_dir = current_launch_dir(config)
    if launch_dir is None:
        return
    ident = _job_identity(config)
    path = _job_file(launch_dir, ident["num"])
    job, _ = read_json(path)
    job = job or {**ident, "run_dir": _rel(Path(ident["run_dir"]), launch_dir.parent.parent)}
    run_dir = Path(ident["run_dir"])
    exc = getattr(job_return, "_return_value", None)
    exc = exc if isinstance(exc, BaseException) else None
    global _failure
    failure, _failure = _failure, None
    job.update(job_status(run_dir, exc))
    if failure is not None:  # this job's own error (a refused start leaves the directory's earlier metrics.json)
        job.update(status="failed", reason=failure["reason"], exit_code=failure["exit_code"])
    identity, _ = read_json(run_dir / IDENTITY)
    job["identity"] = (identity or {}).get("hash")
    status = getattr(job_return, "status", None)
    job["hydra_status"] = getattr(status, "name", None)
    job["ended"] = now()
    write_json(path, job)


def _refresh(launch_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """A job's record with its status re-read from its run (a job killed before job_ended kept "started")."""
    if job.get("status") not in (None, "started"):
        return job
    rd = Path(str(job.get("run_dir") or ""))
    rd = rd if rd.is_absolute() else launch_dir.parent.parent / rd
    metrics, _ = read_json(rd / METRICS)
    if metrics is None:
        return {**job, "status": "not ended", "reason": "the job's process ended before recording its end"}
    identity, _ = read_json(rd / IDENTITY)
    return {**job, **job_status(rd), "identity": (identity or {}).get("hash")}


def finish(
    config: DictConfig | None = None, launch_dir: Path | None = None, status: str | None = None
) -> dict[str, Any] | None:
    """Complete the manifest of the launch begun in this process (None when none was); idempotent. ``status``:
    finished / all_failed from the jobs unless given."""
    launch_dir = launch_dir or current_launch_dir()
    if launch_dir is None:
        return None
    key = str(launch_dir)
    if key in _finished:
        return _finished[key]
    manifest, _ = read_json(launch_dir / MANIFEST)
    if manifest is None:
        return None
    jobs = [_refresh(launch_dir, j) for j in read_jobs(launch_dir)]
    counts: dict[str, int] = {}
    for j in jobs:
        counts[str(j.get("status"))] = counts.get(str(j.get("status")), 0) + 1
    manifest.update(
        ended=now(),
        jobs=jobs,
        counts=counts,
        status=status or ("all_failed" if jobs and counts.get("failed", 0) == len(jobs) else "finished"),
    )
    write_json(launch_dir / MANIFEST, manifest)
    _finished[key] = manifest
    return manifest


def outcome(manifest: dict[str, Any]) -> tuple[int, str] | None:
    """(exit code, one-line message) when the launch has no jobs or every job failed, else None. Exit code 2
    when every failure was bad input / missing weights (the jobs' exit code 2), else 1."""
    jobs = manifest.get("jobs") or []
    where = f"launches/{manifest.get('launch_id')}/{MANIFEST}"
    if not jobs:
        return 2, f"the launch ran 0 jobs; see {where}"
    if any(j.get("status") != "failed" for j in jobs):
        return None
    code = 2 if all(j.get("exit_code") == 2 for j in jobs) else 1
    reasons: list[str] = []
    for j in jobs:
        r = str(j.get("reason") or "no reason recorded")
        if r not in reasons:
            reasons.append(r)
    more = f" (+{len(reasons) - 1} other reason(s))" if len(reasons) > 1 else ""
    return code, f"all {len(jobs)} jobs of the launch failed: {reasons[0]}{more}; see {where} and each run's {METRICS}"
