"""Sweeps are launches: each ``python train.py -m ...`` records ``<sweep>/launches/<id>/`` (manifest + one record
per job) and the sweep-end table / figure / report cover that launch's runs only; ``python -m eval --launch``
picks another launch or pools them all, labelled. An empty launch changes nothing and exits non-zero; a launch
whose every job failed exits non-zero; failed and interrupted runs are shown with their reason.

The end-to-end tests run the real trainer (``+sweep=kappa_smoke``, 2D analytic prior, 3 steps a job) in a
subprocess; the others build run directories and launch records by hand in the format the trainer writes
(``eval.launches``, ``distill.launches``)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ANALYTIC = "distill.priors.analytic.AnalyticPrior"
IMAGE = "distill.scene.image.ImageScene"
KAPPAS = "kappa=sgd,fixed_point"
DIVERGING = ("optimizer.name=sgd", "guidance.loss_reduction=sum", "scene.lr=0.01,1e30", "trainer.log_every=1")


# ------------------------------------------------------------------------------ helpers
def child_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SDI_LAUNCH") and k != "WANDB_SERVICE"}


def train(out: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "-m", f"paths.output_root={out}", "trainer.threads=1", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=child_env())


def eval_cli(*argv: str) -> tuple[int, str, str]:
    from eval.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def launches(sweep: Path) -> list[dict]:
    ms = [json.loads(p.read_text()) for p in (sweep / "launches").glob("*/manifest.json")]
    return sorted(ms, key=lambda m: m["started"])


def job_dirs(sweep: Path, manifest: dict) -> set[Path]:
    return {(sweep / j["run_dir"]).resolve() for j in manifest["jobs"]}


def runs_csv(eval_dir: Path) -> list[dict]:
    return list(csv.DictReader((eval_dir / "runs.csv").open()))


def csv_dirs(sweep: Path, eval_dir: Path) -> set[Path]:
    return {(sweep / r["path"]).resolve() for r in runs_csv(eval_dir)}


def figure_dirs(sweep: Path, eval_dir: Path) -> set[Path]:
    data = json.loads((eval_dir / "figure.json").read_text())
    return {(sweep / c["run"]).resolve() for c in data["cells"] if c["run"]}


def tree_hashes(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------------ two launches, one directory
@pytest.fixture(scope="module")
def two_launches(tmp_path_factory):
    """Launch A (4 jobs: 2 kappas x 2 SGD learning rates, one diverging) then launch B (the same 2 kappas with the
    defaults) into one sweep directory; A's sweep-end outputs are kept as they were before B."""
    out = tmp_path_factory.mktemp("launches")
    a = train(out, "+sweep=kappa_smoke", KAPPAS, *DIVERGING)
    assert a.returncode == 0, a.stderr[-3000:]
    sweep = out / "sweeps" / "kappa_smoke"
    a_eval = out / "a_eval"
    a_eval.mkdir()
    for f in ("runs.csv", "table.md", "figure.json"):
        (a_eval / f).write_bytes((sweep / "eval" / f).read_bytes())
    b = train(out, "+sweep=kappa_smoke", KAPPAS)
    assert b.returncode == 0, b.stderr[-3000:]
    return {"sweep": sweep, "a_eval": a_eval, "a": a, "b": b}


def test_each_launch_records_its_manifest_and_jobs(two_launches):
    sweep = two_launches["sweep"]
    ma, mb = launches(sweep)
    assert ma["launch_id"] < mb["launch_id"] and ma["ended"] <= mb["started"]
    assert [x for x in DIVERGING if x in ma["argv"]] == list(DIVERGING) and "optimizer.name=sgd" not in mb["argv"]
    assert ma["overrides"][-5:] == [KAPPAS, *DIVERGING] and mb["overrides"][-1] == KAPPAS
    for m, n in ((ma, 4), (mb, 2)):
        assert m["status"] == "finished" and m["planned_jobs"] == n and len(m["jobs"]) == n
        assert [j["num"] for j in m["jobs"]] == list(range(n))
        for j in m["jobs"]:
            run = sweep / j["run_dir"]
            assert (run / "config.yaml").is_file() and j["launch_id"] == m["launch_id"]
            assert j["status"] == json.loads((run / "metrics.json").read_text())["status"]
            idf = run / "identity.json"  # written by the trainer once run identity exists
            assert j["identity"] == (json.loads(idf.read_text())["hash"] if idf.is_file() else None)
        launch_dir = sweep / "launches" / m["launch_id"]
        assert sorted(p.name for p in (launch_dir / "jobs").iterdir()) == [f"{i:06d}.json" for i in range(n)]
        assert (launch_dir / "multirun.yaml").is_file()
    assert sorted(j["status"] for j in ma["jobs"]) == ["diverged", "diverged", "finished", "finished"]
    assert not job_dirs(sweep, ma) & job_dirs(sweep, mb)


def test_sweep_end_outputs_cover_only_the_launch(two_launches):
    sweep, a_eval = two_launches["sweep"], two_launches["a_eval"]
    ma, mb = launches(sweep)
    # after A: A's 4 runs; after B (the same files, rewritten): B's 2 runs, nothing of A's
    assert csv_dirs(sweep, a_eval) == figure_dirs(sweep, a_eval) == job_dirs(sweep, ma)
    assert csv_dirs(sweep, sweep / "eval") == figure_dirs(sweep, sweep / "eval") == job_dirs(sweep, mb)
    fig = json.loads((sweep / "eval" / "figure.json").read_text())
    assert fig["launch"] == mb["launch_id"] and fig["unplaced"] == [] and fig["column_axes"] == ["kappa"]
    assert {c["state"] for c in fig["cells"]} == {"finished"}
    md = (sweep / "eval" / "table.md").read_text()
    assert f"Launch: {mb['launch_id']}" in md and "Runs: 2 (2 finished, 0 diverged" in md
    assert "Runs: 4 (2 finished, 2 diverged" in (a_eval / "table.md").read_text()
    report = (sweep / "eval" / "report.html").read_text()
    assert mb["launch_id"] in report and "scene.lr=1e+30" not in report and "scene.lr=1e30" not in report
    # the sweep-end evaluation said which launch it used
    assert f"launch: {mb['launch_id']}" in two_launches["b"].stdout


def test_eval_picks_a_launch_or_pools_them_labelled(two_launches, tmp_path):
    sweep = two_launches["sweep"]
    ma, mb = launches(sweep)
    code, out, _ = eval_cli("table", sweep, "--no-paper", "--out", tmp_path / "latest")
    assert code == 0 and out.splitlines()[0].startswith(f"launch: {mb['launch_id']} ")
    assert csv_dirs(sweep, tmp_path / "latest") == job_dirs(sweep, mb)

    prefix = ma["launch_id"][:-2]  # a unique prefix picks the launch
    code, out, _ = eval_cli("figure", sweep, "--launch", prefix, "--out", tmp_path / "a", "--view-size", "16")
    assert code == 0 and out.splitlines()[0].startswith(f"launch: {ma['launch_id']} ")
    assert figure_dirs(sweep, tmp_path / "a") == job_dirs(sweep, ma)
    assert json.loads((tmp_path / "a" / "figure.json").read_text())["column_axes"] == ["kappa", "scene.lr"]

    code, out, _ = eval_cli("table", sweep, "--no-paper", "--launch", "all", "--out", tmp_path / "all")
    assert code == 0 and out.splitlines()[0].startswith("launch: all 2 launches pooled")
    rows = runs_csv(tmp_path / "all")
    assert {(sweep / r["path"]).resolve(): r["launch"] for r in rows} == {
        **{p: ma["launch_id"] for p in job_dirs(sweep, ma)},
        **{p: mb["launch_id"] for p in job_dirs(sweep, mb)},
    }
    assert "Launches pooled (--launch all)" in (tmp_path / "all" / "table.md").read_text()

    code, _, _ = eval_cli("figure", sweep, "--launch", "all", "--out", tmp_path / "allf", "--view-size", "16")
    fig = json.loads((tmp_path / "allf" / "figure.json").read_text())
    assert code == 0 and fig["launch"] == "all" and fig["column_axes"][0] == "launch" and fig["unplaced"] == []
    by_launch = {m["launch_id"]: job_dirs(sweep, m) for m in (ma, mb)}
    for c in fig["cells"]:
        col = fig["columns"][c["col"]]
        assert col["label"].startswith(col["values"]["launch"] + ": ")
        if c["run"]:
            assert (sweep / c["run"]).resolve() in by_launch[col["values"]["launch"]]
    assert {(sweep / c["run"]).resolve() for c in fig["cells"] if c["run"]} == by_launch[ma["launch_id"]] | by_launch[
        mb["launch_id"]
    ]

    code, _, err = eval_cli("table", sweep, "--launch", "19990101-000000-abcdef")
    assert code == 2 and ma["launch_id"] in err and mb["launch_id"] in err and "Traceback" not in err


def test_empty_launch_changes_nothing_and_exits_nonzero(two_launches):
    sweep = two_launches["sweep"]
    before = tree_hashes(sweep)
    assert {"eval/table.md", "eval/figure.png", "eval/figure.json", "eval/report.html"} <= set(before)
    r = train(sweep.parent.parent, "+sweep=kappa_smoke", KAPPAS, "seed=range(0,0)")
    assert r.returncode != 0
    no_traceback(r)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "0 jobs" in errors[0] and "seed=range(0,0)" in errors[0], r.stderr[-2000:]
    assert tree_hashes(sweep) == before  # table, figure, report, multirun.yaml, launches: all byte-identical


def test_all_failed_multirun_exits_nonzero(tmp_path):
    r = train(tmp_path, "+sweep=kappa_smoke", KAPPAS, "prompt=a purple blob")  # not a class of the 2D prior
    assert r.returncode == 2, r.stdout[-2000:]  # every job rejected its input (exit code 2 in its metrics.json)
    no_traceback(r)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: all 2 jobs of the launch failed: prompt 'a purple blob'"), r.stderr[-2000:]
    sweep = tmp_path / "sweeps" / "kappa_smoke"
    (m,) = launches(sweep)
    assert m["status"] == "all_failed" and [j["status"] for j in m["jobs"]] == ["failed", "failed"]
    assert all(j["reason"] for j in m["jobs"])
    md = (sweep / "eval" / "table.md").read_text()  # the evaluation lists them as failed with a reason
    assert "0 missing, 2 failed" in md and "Missing (no metrics.json)" not in md


# ------------------------------------------------------------------------------ hand-made records
def make_run(sweep: Path, name: str, metrics: dict | None, seed: int = 0, config: bool = True) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    if config:
        cfg = {
            "prompt": "a red circle",
            "seed": seed,
            "method": "sds",
            "guidance": {"name": "sds"},
            "trainer": {"max_steps": 60},
            "prior": {"_target_": ANALYTIC},
            "scene": {"_target_": IMAGE},
        }
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def make_launch(sweep: Path, launch_id: str, started: str, runs: list[Path], seeds: str) -> None:
    d = sweep / "launches" / launch_id
    (d / "jobs").mkdir(parents=True)
    (d / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [f"seed={seeds}"]}}}))
    jobs = [{"num": i, "run_dir": r.name, "status": "finished", "launch_id": launch_id} for i, r in enumerate(runs)]
    for j in jobs:
        (d / "jobs" / f"{j['num']:06d}.json").write_text(json.dumps(j))
    manifest = {"version": 1, "launch_id": launch_id, "started": started, "ended": started, "status": "finished"}
    (d / "manifest.json").write_text(json.dumps({**manifest, "argv": ["train.py", "-m"], "jobs": jobs}))


FIN = {"status": "finished", "steps": 60, "max_steps": 60, "seconds": 1.0, "psnr": 20.0}


def test_latest_launch_is_the_latest_started_and_older_dirs_keep_todays_behaviour(tmp_path):
    from eval.launches import select

    sweep = tmp_path / "sweep"
    runs = [make_run(sweep, f"seed={s}", FIN, seed=s) for s in range(4)]
    # ids sort the other way round from start times: "latest" goes by the recorded start
    make_launch(sweep, "20300101-000000-bbbbbb", "2030-01-01T00:00:00.000000Z", runs[:2], "0,1")
    make_launch(sweep, "20300101-000000-aaaaaa", "2030-01-01T00:00:01.000000Z", runs[2:3], "2")
    sel = select(sweep)
    assert sel.mode == "one" and sel.launch.id.endswith("aaaaaa") and sel.runs == [runs[2]]
    assert "2 of 2" in sel.describe()
    pooled = select(sweep, "all")  # seed=3 belongs to no launch: pooled and labelled as such
    assert pooled.runs == runs and pooled.label(runs[3]) == "(no launch record)"
    assert pooled.label(runs[0]) == "20300101-000000-bbbbbb"
    assert select(sweep, "20300101-000000-b").runs == runs[:2]
    code, _, err = eval_cli("table", sweep, "--launch", "20300101")
    assert code == 2 and "matches several launches" in err

    old = tmp_path / "old"  # no launches/: every run below it, no launch line
    for s in range(3):
        make_run(old, f"seed={s}", FIN, seed=s)
    code, out, _ = eval_cli("table", old, "--no-paper")
    assert code == 0 and "launch:" not in out and "Runs: 3 (3 finished" in out
    code, _, err = eval_cli("table", old, "--launch", "20300101-000000-aaaaaa")
    assert code == 2 and "records no launches" in err


def test_failed_and_interrupted_runs_are_shown_with_their_reason(tmp_path):
    """metrics.json as the trainer writes it (status failed: reason + exit_code + stage; interrupted: steps +
    signal): the table, runs.csv, figure and report name the reason; none of them is called missing."""
    sweep = tmp_path / "sweep"
    bad = "unknown prompt 'a purple blob' for the analytic prior; use one of its classes"
    make_run(sweep, "seed=0", FIN, seed=0)
    make_run(sweep, "seed=1", {"status": "failed", "reason": bad, "exit_code": 2, "stage": "start"}, seed=1)
    make_run(sweep, "seed=2", {"status": "interrupted", "steps": 27, "max_steps": 60, "signal": "SIGINT"}, seed=2)
    make_run(sweep, "seed=3", {"status": "failed", "reason": "RuntimeError: boom", "exit_code": 1}, seed=3)
    make_run(sweep, "seed=4", {"status": "failed", "reason": "bad value", "exit_code": 2}, seed=4, config=False)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["seed=0,1,2,3,4"]}}}))
    code, out, _ = eval_cli("table", sweep, "--no-paper")
    assert code == 0
    assert "Runs: 4 (1 finished, 0 diverged, 0 running, 1 interrupted, 0 missing, 2 failed), 1 unreadable" in out
    assert f"seed=1 [sds] {bad} (stage start, exit code 2)" in out
    assert "seed=3 [sds] RuntimeError: boom (exit code 1)" in out
    assert "seed=2 [sds] SIGINT at step 27/60" in out and "Interrupted" in out
    assert "seed=4 (failed: bad value (exit code 2))" in out
    assert "missing" not in out.split("## Runs not in the averages")[1].split("Notes:")[0].lower()
    states = {r["path"]: (r["state"], r["reason"]) for r in runs_csv(sweep / "eval")}
    assert states["seed=2"] == ("interrupted", "SIGINT at step 27/60") and states["seed=1"][0] == "failed"

    from eval.report import build_report

    html = build_report(sweep, paper=False).read_text()
    fig = json.loads((sweep / "eval" / "figure.json").read_text())
    cells = {c["run"]: (c["state"], c["reason"]) for c in fig["cells"] if c["run"]}
    assert cells["seed=1"] == ("failed", f"{bad} (stage start, exit code 2)")
    assert cells["seed=2"] == ("interrupted", "SIGINT at step 27/60")
    assert "SIGINT at step 27/60" in html and "RuntimeError: boom" in html and "1 interrupted" in html


# ------------------------------------------------------------------------------ 200 jobs
SMOKE_2D = [
    "prior=analytic",
    "scene=image",
    "guidance=sds",
    "prompt=a red circle",
    "trainer.max_steps=2",
    "trainer.checkpoint_every=0",
    "trainer.image_every=0",
    "trainer.export=false",
    "trainer.progress=false",
    "experiment_name=launch_200",
    "+hydra.callbacks.eval._target_=distill.callbacks.SweepEvalCallback",
    "+hydra.callbacks.eval.args=[--no-paper]",
    "+hydra.callbacks.eval.figure=false",
    "+hydra.callbacks.eval.report=false",
]
LRS = ["0.01", "0.02", "0.03", "0.04", "0.05"]


def test_200_job_sweep_every_job_accounted_for(tmp_path):
    """200 jobs (40 seeds x 5 learning rates, 2 steps each) through Hydra's basic launcher: the manifest holds every
    job with its run directory and status, the sweep-end table every run. (submitit_local would start all 200 jobs
    as processes at once, each importing torch: ~200 x 0.5 GB of memory and minutes of CPU on a 2-core runner; its
    path, each job recording itself from its own process, is covered by tests/test_slurm.py with 2 jobs.)

    Default tier (in CI): the jobs' cost is Hydra composing each job's config twice (validation + launch) plus 2
    steps; about 0.7 s a job on an idle 2-core machine, 2-3 s at load 8 (docs/benchmarks.md)."""
    r = train(tmp_path, *SMOKE_2D, "seed=range(0,40)", f"scene.lr={','.join(LRS)}", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    no_traceback(r)
    sweep = tmp_path / "sweeps" / "launch_200"
    (m,) = launches(sweep)
    jobs = m["jobs"]
    assert m["planned_jobs"] == 200 and len(jobs) == 200 and [j["num"] for j in jobs] == list(range(200))
    assert {j["status"] for j in jobs} == {"finished"} and m["counts"] == {"finished": 200}
    dirs = job_dirs(sweep, m)
    assert len(dirs) == 200 and all((d / "metrics.json").is_file() for d in dirs)
    combos = set()
    for j in jobs:
        ov = dict(o.split("=", 1) for o in j["overrides"] if o.startswith(("seed=", "scene.lr=")))
        combos.add((int(ov["seed"]), ov["scene.lr"]))
    assert combos == {(s, lr) for s in range(40) for lr in LRS}
    assert csv_dirs(sweep, sweep / "eval") == dirs
    assert "Runs: 200 (200 finished, 0 diverged" in (sweep / "eval" / "table.md").read_text()
    assert f"launch: {m['launch_id']}" in r.stdout


def test_refused_relaunch_is_a_failed_job_of_its_launch(tmp_path):
    """A job whose start is refused (its directory holds a run of another config; here both launches name the
    directory ``the_run``) leaves the earlier run's files alone: its launch records it failed with the refusal,
    and that launch's table shows it failed, not the earlier run as finished."""
    first = train(tmp_path, "+sweep=kappa_smoke", "kappa=sgd", "hydra.sweep.subdir=the_run")
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "kappa_smoke"
    metrics_before = (sweep / "the_run" / "metrics.json").read_bytes()
    r = train(tmp_path, "+sweep=kappa_smoke", "kappa=fixed_point", "hydra.sweep.subdir=the_run")
    assert r.returncode == 2, r.stderr[-3000:]  # its only job failed on its input
    no_traceback(r)
    assert (sweep / "the_run" / "metrics.json").read_bytes() == metrics_before
    m1, m2 = launches(sweep)
    assert m1["jobs"][0]["status"] == "finished"
    (job,) = m2["jobs"]
    assert job["status"] == "failed" and job["exit_code"] == 2 and "kappa" in job["reason"], job
    md = (sweep / "eval" / "table.md").read_text()
    assert f"Launch: {m2['launch_id']}" in md and "Runs: 1 (0 finished, 0 diverged" in md and "1 failed" in md
    assert "kappa" in md.split("**Failed")[1]
