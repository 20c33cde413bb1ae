"""Sweeps through submitit: cluster profiles compose, a `hydra/launcher=submitit_local` multirun of
the real project completes, and (marked `slurm`) sweeps through a real SLURM (`+slurm=local`)
complete and a requeued job resumes from its checkpoint.

The `slurm` tests use a SLURM that answers `sinfo` and has the `debug` partition of
slurm/local_cluster.sh; with SDI_START_SLURM=1 they start that cluster themselves (root + apt,
~25 s the first time) and stop it afterwards. Otherwise they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "slurm" / "profiles"
CLUSTER_SH = REPO / "slurm" / "local_cluster.sh"
CHEAP = ["experiment=sdi_2d", "trainer.progress=false", "trainer.image_every=0", "trainer.eval_views=1"]

needs_train = pytest.mark.skipif(
    not (REPO / "train.py").exists() or not (REPO / "conf" / "train.yaml").exists(),
    reason="train.py / conf/train.yaml not written yet",
)


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def profile_overrides(tmp_path_factory) -> list[str]:
    """Overrides that make `+slurm=<profile>` resolvable: none once conf/slurm -> slurm/profiles
    exists, else a search path holding a `slurm` link to slurm/profiles."""
    if (REPO / "conf" / "slurm" / "local.yaml").exists():
        return []
    root = tmp_path_factory.mktemp("searchpath")
    (root / "slurm").symlink_to(PROFILES, target_is_directory=True)
    return [f"hydra.searchpath=[file://{root}]"]


def child_env() -> dict:
    """os.environ without WANDB_SERVICE: a wandb.init earlier in this process exports it, and jobs
    (sbatch passes the environment on) would attach to this process's wandb-core."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def run_train(out: Path, *overrides: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"paths.output_root={out}"]
    r = subprocess.run(
        cmd, cwd=out.parent, capture_output=True, text=True, timeout=timeout, env={**child_env(), **(env or {})}
    )
    assert r.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    return r


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("metrics.json"))


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def submitit_logs(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out.rglob(".submitit/*/*_log.*")))


def sh(*cmd: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ profiles
@needs_train
@pytest.mark.parametrize(
    "name,target,expect",
    [
        ("local", "SlurmLauncher", {"partition": "debug", "gpus_per_node": 0, "cpus_per_task": 1}),
        (
            "a100",
            "SlurmLauncher",
            {
                "gpus_per_node": 1,
                "cpus_per_task": 8,
                "mem_gb": 64,
                "timeout_min": 240,
                "signal_delay_s": 120,
                "max_num_timeout": 3,
            },
        ),
        (
            "h100",
            "SlurmLauncher",
            {
                "gpus_per_node": 1,
                "cpus_per_task": 8,
                "mem_gb": 64,
                "timeout_min": 240,
                "signal_delay_s": 120,
                "max_num_timeout": 3,
            },
        ),
        ("local_submitit", "LocalLauncher", {"gpus_per_node": 0, "cpus_per_task": 1}),
    ],
)
def test_profile_composes_with_the_project(name, target, expect, profile_overrides):
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(REPO / "src"))
    from distill.cli import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"+slurm={name}", "seed=3", "trainer.max_steps=7", *profile_overrides],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("." + target)
    for k, v in expect.items():
        assert launcher[k] == v, (k, launcher[k], v)
    if target == "SlurmLauncher":
        assert launcher.timeout_min * 60 > launcher.signal_delay_s  # USR2 must come before the limit
        assert launcher.setup and all(isinstance(s, str) for s in launcher.setup)
    # the profile touches hydra.launcher only: the run itself is unchanged
    assert cfg.seed == 3 and cfg.trainer.max_steps == 7


def test_profiles_are_global_packages_overriding_the_launcher():
    import yaml

    names = sorted(p.stem for p in PROFILES.glob("*.yaml"))
    assert {"local", "a100", "h100", "local_submitit"} <= set(names)
    for p in PROFILES.glob("*.yaml"):
        text = p.read_text()
        assert text.startswith("# @package _global_"), p
        doc = yaml.safe_load(text)
        (override,) = doc["defaults"]
        assert list(override) == ["override /hydra/launcher"], p
        assert set(doc) == {"defaults", "hydra"} and set(doc["hydra"]) == {"launcher"}, p


# ------------------------------------------------------------------------------ (a) submitit_local
@needs_train
def test_submitit_local_multirun_of_two_jobs(tmp_path):
    out = tmp_path / "out"
    r = run_train(out, "-m", "hydra/launcher=submitit_local", *CHEAP, "trainer.max_steps=3", "seed=0,1")
    dirs = run_dirs(out)
    assert len(dirs) == 2, (dirs, r.stdout[-2000:])
    for d in dirs:
        m = metrics(d)
        assert m["status"] == "finished" and m["steps"] == 3, m
        assert (d / "checkpoints" / "last.pt").is_file()
    assert sorted(metrics(d)["seed"] for d in dirs) == [0, 1]
    # it went through submitit: pickled jobs, per-job logs, results
    assert len(list(out.rglob(".submitit/*/*_result.pkl"))) == 2
    assert "Job completed successfully" in submitit_logs(out)
    # each job recorded itself in the launch from its own process (SDI_LAUNCH_DIR reached the subprocesses)
    (manifest,) = [json.loads(p.read_text()) for p in out.rglob("launches/*/manifest.json")]
    assert "submitit" in manifest["launcher"].lower() and manifest["status"] == "finished"
    jobs = manifest["jobs"]
    assert [j["status"] for j in jobs] == ["finished", "finished"] and len({j["pid"] for j in jobs}) == 2
    assert manifest["pid"] not in {j["pid"] for j in jobs}
    sweep = next(out.rglob("launches")).parent
    assert {(sweep / j["run_dir"]).resolve() for j in jobs} == {d.resolve() for d in dirs}


# ------------------------------------------------------------------------------ (b) real SLURM
def _slurm_answers() -> str | None:
    """None when a SLURM with our `debug` partition answers, else why not."""
    if not shutil.which("sinfo") or not shutil.which("scontrol"):
        return "sinfo not found"
    ping = sh("scontrol", "ping", timeout=30)  # instant, where sinfo retries for ~10 s
    if ping.returncode != 0:
        said = ping.stdout.strip().splitlines()[0] if ping.stdout.strip() else ping.stderr.strip()[:200]
        return f"slurmctld does not answer: {said}"
    r = sh("sinfo", "-h", "-p", "debug", "-o", "%a %T", timeout=30)
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip()[:300]}"
    if not r.stdout.strip():
        return "no partition 'debug' (the profile `+slurm=local` targets slurm/local_cluster.sh)"
    if not any(s in r.stdout for s in ("idle", "mixed", "alloc")):
        return f"partition 'debug' has no usable node: {r.stdout.strip()}"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    why = _slurm_answers()
    started = False
    if why is not None and os.environ.get("SDI_START_SLURM") == "1":
        r = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"SDI_START_SLURM=1 but slurm/local_cluster.sh up failed: {r.stderr.strip()[-500:]}")
        started = True
        why = _slurm_answers()
    if why is not None:
        pytest.skip(f"no SLURM here ({why}); run `slurm/local_cluster.sh up` as root or set SDI_START_SLURM=1")
    accounting = sh("sacct", "-n", "-X", "-S", "now-1minutes").returncode == 0
    yield {"accounting": accounting}
    if started:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], capture_output=True, text=True, timeout=120)


def sacct_states(job_id: str) -> list[str]:
    """Every state the job went through (-D: requeued incarnations too)."""
    r = sh("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State")
    return [s.split()[0] for s in r.stdout.split()] if r.returncode == 0 else []


def settled_states(job_id: str, timeout_s: float = 60.0) -> list[str]:
    """sacct states once the last one is final (slurmdbd hears of the end a moment after it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = sacct_states(job_id)
        if (
            states and states[-1] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING")
        ) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


@pytest.mark.slurm
@needs_train
def test_slurm_sweep_of_two_jobs(slurm_cluster, profile_overrides, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = run_train(out, "-m", "+slurm=local", *profile_overrides, *CHEAP, "trainer.max_steps=3", "seed=0,1")
    elapsed = time.monotonic() - t0
    dirs = run_dirs(out)
    assert len(dirs) == 2, (dirs, r.stdout[-2000:])
    for d in dirs:
        m = metrics(d)
        assert m["status"] == "finished" and m["steps"] == 3, m
    # it went through sbatch: an array job whose script asks for the profile's resources
    (script,) = list(out.rglob(".submitit/*/*_submission.sh"))
    text = script.read_text()
    for flag in (
        "#SBATCH --partition=debug",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --signal=USR2@30",
        "#SBATCH --array=0-1%2",
        "#SBATCH --time=10",
        "#SBATCH --mem=2GB",
    ):
        assert flag in text, (flag, text)
    array_id = script.name.split("_")[0]
    logs = submitit_logs(out)
    assert f"job_id={array_id}_" in logs and "Job completed successfully" in logs
    if slurm_cluster["accounting"]:
        for task in ("0", "1"):
            assert settled_states(f"{array_id}_{task}")[-1:] == ["COMPLETED"]
    print(f"2-job +slurm=local sweep: {elapsed:.1f} s")


@pytest.mark.slurm
@needs_train
@pytest.mark.parametrize("how", ["usr2", "scontrol_requeue"])
def test_requeued_slurm_job_resumes_from_its_checkpoint(how, slurm_cluster, profile_overrides, tmp_path):
    """usr2: what submitit does `signal_delay_s` before the time limit (SIGUSR2 -> `scontrol
    requeue` + exit); scontrol_requeue: an admin / node-failure requeue (SIGTERM, ignored by
    submitit, then SIGKILL). Either way the relaunched job finds its run directory and resumes
    from checkpoints/last.pt."""
    out = tmp_path / "out"
    every, steps = 20, 1000
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "+slurm=local",
        *profile_overrides,
        *CHEAP,
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={every}",
        "trainer.log_every=100",
        "seed=11",
        f"paths.output_root={out}",
    ]
    env = child_env()
    if how == "usr2":  # also: the requeued job continues the same (offline) W&B run
        cmd += ["logger=wandb", "logger.project=sdi-test"]
        env.pop("WANDB_API_KEY", None)
        env.update(
            WANDB_MODE="offline",
            WANDB_SILENT="true",
            WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
            WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
            WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        )
    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        # wait for the first checkpoint of the running job
        deadline = time.monotonic() + 300
        ckpt, job_id = None, None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(out.rglob("checkpoints/last.pt"))
            scripts = list(out.rglob(".submitit/*/*_submission.sh"))
            if found and scripts:
                ckpt, job_id = found[0], scripts[0].name.split("_")[0]
                break
            time.sleep(0.1)
        assert ckpt is not None, f"no checkpoint appeared; sweep log:\n{(tmp_path / 'sweep.log').read_text()[-3000:]}"
        state = sh("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()
        assert state == "RUNNING", f"job {job_id} is {state!r}, expected RUNNING (finished too fast?)"

        if how == "usr2":
            r = sh("scancel", "--signal=USR2", job_id)
            assert r.returncode == 0, r.stderr
        else:
            # the job's own processes (step 0: python + wandb-core), before SLURM forgets them
            pids = [
                int(line.split()[0])
                for line in sh("scontrol", "listpids", job_id).stdout.splitlines()[1:]
                if line.split()[2:3] == ["0"]
            ]
            r = sh("scontrol", "requeue", job_id)
            assert r.returncode == 0, r.stderr
            # submitit ignores the SIGTERM of the requeue, so the job would train on until SIGKILL
            # after KillWait; deliver that SIGKILL now (what a node failure or a slow save meets)
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        # a requeued job may start again only after cred_expire (15 s here, 120 s by default): nudge it
        t_req = time.monotonic()
        while proc.poll() is None and time.monotonic() - t_req < 400:
            st = sh("squeue", "-h", "-j", job_id, "-o", "%T %r").stdout.strip()
            if st.startswith("PENDING") and "BeginTime" in st:
                sh("scontrol", "update", f"jobid={job_id}", "StartTime=now")
            time.sleep(1)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            sh("scancel", job_id) if job_id else None
        log.close()
    sweep_log = (tmp_path / "sweep.log").read_text()
    assert rc == 0, sweep_log[-3000:]

    (run_dir,) = run_dirs(out)
    m = metrics(run_dir)
    assert m["status"] == "finished" and m["steps"] == steps, m
    assert m["resumed_from_step"] is not None, f"the first incarnation finished before it was stopped: {m}"
    resumed = m["resumed_from_step"]
    assert resumed and 0 < resumed < steps, m
    # scontrol_requeue: the SIGTERM before the SIGKILL is submitit's to bypass; the trainer still checkpoints at the
    # next step boundary (distill.interrupts) when it gets there first, else a periodic checkpoint is what survives.
    # usr2: at the next step boundary the trainer checkpoints, then calls submitit's handler (requeue + exit)
    logs = submitit_logs(out)
    if how == "usr2":
        assert "Caught signal SIGUSR2" in logs and f"Requeued job {job_id}" in logs
        run_id = (run_dir / "wandb_id.txt").read_text().strip()
        pieces = sorted((run_dir / "wandb").glob("offline-run-*"))
        assert len(pieces) == 2 and all(f"-{run_id}" in p.name for p in pieces), pieces
    (job_out,) = list(out.rglob(f".submitit/{job_id}*/*_log.out"))
    assert job_out.read_text().count("Starting with JobEnvironment") == 2  # two incarnations of one job
    restarts = sh("scontrol", "show", "job", job_id).stdout
    if "Restarts=" in restarts:
        assert "Restarts=1" in restarts
    if slurm_cluster["accounting"]:
        states = settled_states(job_id)
        assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
