"""Run directories hold one run: identity, refusals, starting over, failed starts and interrupts (issue 24).

Each test drives the real trainer; the CLI ones run ``python train.py`` in a subprocess and read what a user reads
(exit code, stderr) and what the evaluator reads (metrics.json)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill import identity, rundir
from distill.identity import IdentityError
from distill.images import image_contrast
from distill.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false"]
BASE = ["experiment=sdi_2d", "trainer.checkpoint_every=2", *FAST]


def _snapshot(run: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``run``: content hash and modification time."""
    return {
        str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.threads=1", "trainer.progress=false", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# ----- identity -------------------------------------------------------------------------------------------------------
def test_identity_hash_ignores_exactly_the_non_semantic_keys(compose_cfg):
    base = identity.current(compose_cfg(BASE))
    for same in (
        "trainer.threads=1",
        "trainer.device=cpu",
        "trainer.progress=true",
        "trainer.checkpoint_every=7",
        "trainer.log_every=3",
        "logger=csv",
        "paths.output_root=elsewhere",
    ):
        assert identity.current(compose_cfg([*BASE, same])).hash == base.hash, same
    for other in ("seed=1", "guidance=sds", "cfg.fwd=5", "trainer.max_steps=9", "trainer.image_every=5"):
        ident = identity.current(compose_cfg([*BASE, other]))
        assert ident.hash != base.hash, other
        changed = {k for k, _, _ in identity.diff(base.config, ident.config)}
        assert changed and all(not k.startswith(("trainer.threads", "logger", "paths")) for k in changed), changed


def test_relaunch_with_another_config_is_refused_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    r = _cli("experiment=sdi_2d", "trainer.max_steps=4", *FAST, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    ident = json.loads((run / "identity.json").read_text())
    assert ident["seed"] == 0 and len(ident["hash"]) == 16 and ident["code"]["source_hash"]
    assert json.loads((run / "environment.json").read_text())["libraries"]["torch"]
    before = _snapshot(run)
    r = _cli("experiment=sdi_2d", "trainer.max_steps=20", "guidance=sds", "cfg.fwd=5", *FAST, f"hydra.run.dir={run}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for said in ("guidance.name: ddim_inversion -> sds", "cfg.fwd:", "trainer.max_steps: 4 -> 20", "resume=false"):
        assert said in r.stderr, (said, r.stderr)
    assert _snapshot(run) == before
    # a non-semantic change on a finished run: accepted, nothing to do, nothing rewritten
    r = _cli(
        "experiment=sdi_2d",
        "trainer.max_steps=4",
        *FAST,
        "trainer.log_every=1",
        "trainer.checkpoint_every=1",
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 0 and "already finished; nothing to do" in r.stderr, r.stderr[-2000:]
    assert _snapshot(run) == before


def test_an_interrupted_run_refuses_another_config_and_resumes_its_own(compose_cfg, tmp_path, interrupt_at):
    cfg = compose_cfg([*BASE, "trainer.max_steps=6"])
    interrupt_at(cfg, tmp_path, 3)
    before = _snapshot(tmp_path)
    with pytest.raises(IdentityError, match=r"guidance\.name: ddim_inversion -> sds"):
        train(compose_cfg([*BASE, "trainer.max_steps=6", "guidance=sds"]), tmp_path)
    with pytest.raises(IdentityError, match=r"trainer\.max_steps: 6 -> 8"):  # only a finished run may be extended
        train(compose_cfg([*BASE, "trainer.max_steps=8"]), tmp_path)
    assert _snapshot(tmp_path) == before
    m = train(compose_cfg([*BASE, "trainer.max_steps=6", "trainer.threads=1"]), tmp_path)
    assert m["status"] == "finished" and m["resumed_from_step"] == 3 and m["method"] == "ddim_inversion"
    segments = json.loads((tmp_path / "identity.json").read_text())["segments"]
    assert [(s["action"], s["start_step"]) for s in segments] == [("new", 0), ("same", 3)]


def test_other_code_under_a_resumable_run_is_refused_unless_allowed(compose_cfg, tmp_path, interrupt_at):
    cfg = compose_cfg([*BASE, "trainer.max_steps=6"])
    interrupt_at(cfg, tmp_path, 2)
    recorded = json.loads((tmp_path / "identity.json").read_text())
    recorded["code"]["source_hash"] = "0" * 16  # as if the sources had been edited since the run started
    (tmp_path / "identity.json").write_text(json.dumps(recorded))
    before = _snapshot(tmp_path)
    with pytest.raises(IdentityError, match="allow_code_change=true"):
        train(cfg, tmp_path)
    assert _snapshot(tmp_path) == before
    m = train(compose_cfg([*BASE, "trainer.max_steps=6", "trainer.allow_code_change=true"]), tmp_path)
    assert m["status"] == "finished" and m["resumed_from_step"] == 2
    last = json.loads((tmp_path / "identity.json").read_text())["segments"][-1]
    assert any("sources 0000000000000000" in n for n in last["notes"])


def test_raising_max_steps_extends_a_finished_run(compose_cfg, tmp_path):
    first = train(compose_cfg([*BASE, "trainer.max_steps=3"]), tmp_path)
    assert first["status"] == "finished"
    m = train(compose_cfg([*BASE, "trainer.max_steps=5"]), tmp_path)
    assert m["status"] == "finished" and m["resumed_from_step"] == 3 and m["steps"] == 5
    ident = json.loads((tmp_path / "identity.json").read_text())
    assert ident["config"]["trainer"]["max_steps"] == 5
    assert [(s["action"], s["start_step"]) for s in ident["segments"]] == [("new", 0), ("extend", 3)]
    assert "trainer.max_steps 3 -> 5" in ident["segments"][-1]["notes"][0]
    with pytest.raises(IdentityError, match=r"trainer\.max_steps: 5 -> 4"):  # fewer steps is another run
        train(compose_cfg([*BASE, "trainer.max_steps=4"]), tmp_path)


# ----- starting over --------------------------------------------------------------------------------------------------
def test_resume_false_archives_the_old_run_and_the_new_one_owns_every_output(compose_cfg, tmp_path):
    logged = [
        "experiment=sdi_2d",
        "trainer.progress=false",
        "trainer.export=false",
        "logger=csv",
        "trainer.log_every=1",
        "trainer.image_every=2",
        "trainer.checkpoint_every=2",
    ]
    train(compose_cfg([*logged, "trainer.max_steps=8"]), tmp_path)
    old_frames = sorted(p.name for p in (tmp_path / "images").iterdir())
    m = train(compose_cfg([*logged, "trainer.max_steps=4", "guidance=sds", "trainer.resume=false"]), tmp_path)
    arch = tmp_path / "archive" / "001"
    assert sorted(p.name for p in (arch / "images").iterdir()) == old_frames
    assert (arch / "checkpoints" / "last.pt").is_file() and (arch / "metrics.json").is_file()
    assert json.loads((arch / "ARCHIVED.json").read_text())["reason"].startswith("trainer.resume=false")
    assert rundir.read_checkpoint(arch / "checkpoints" / "last.pt")["step"] == 8
    # the new run: its scalars start at step 0 and end at its own last step, its frames are its own
    with open(tmp_path / "scalars.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps[0] == 0 and max(steps) == 4 and steps == sorted(steps)  # losses 0..3, the frame contrast at 4
    frames = sorted((tmp_path / "images").glob("step_*.png"))
    assert [p.name for p in frames] == ["step_000002.png", "step_000004.png"]
    import imageio.v3 as iio

    assert m["contrast_best_progress"] == max(image_contrast(iio.imread(p)) for p in frames)
    assert (
        not (tmp_path / rundir.PREVIOUS_CHECKPOINT).exists()
        or rundir.read_checkpoint(tmp_path / rundir.PREVIOUS_CHECKPOINT)["step"] <= 4
    )
    assert m["method"] == "sds" and m["start"].startswith("trainer.resume=false")


# ----- failed starts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, said",
    [
        (["experiment=sdi_2d", "prompt=a purple elephant"], "a purple elephant"),
        (["experiment=sdi_2d", "trainer.max_steps=abc"], "trainer.max_steps"),
        (["prior=sd21", "prior.model=/nonexistent/sd21", "scene=image", "experiment=sdi_2d"], "/nonexistent/sd21"),
    ],
    ids=["unknown-prompt", "bad-type", "sd21-offline"],
)
def test_a_failed_start_is_recorded_with_its_reason(tmp_path, args, said):
    run = tmp_path / "run"
    r = _cli(*args, *FAST, f"hydra.run.dir={run}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert said in r.stderr
    m = rundir.read_metrics(run)
    assert m["status"] == "failed" and m["stage"] == "start" and m["exit_code"] == 2, m
    assert said in m["reason"] and "\n" not in m["reason"]
    assert (run / "config.yaml").is_file()
    # the evaluator lists it with that reason
    from eval.runs import find_runs

    assert find_runs(run) == [run]


def test_a_failed_start_in_a_directory_that_holds_a_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    assert _cli("experiment=sdi_2d", "trainer.max_steps=2", *FAST, f"hydra.run.dir={run}").returncode == 0
    before = _snapshot(run)
    r = _cli("experiment=sdi_2d", "trainer.max_steps=abc", *FAST, f"hydra.run.dir={run}")
    assert r.returncode == 2 and "trainer.max_steps" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(run) == before and rundir.read_metrics(run)["status"] == "finished"


# ----- interrupts -----------------------------------------------------------------------------------------------------
def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        try:
            rows = (run / "scalars.csv").read_text().splitlines()[1:]
        except FileNotFoundError:
            rows = []
        if rows and int(rows[-1].split(",")[0]) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.parametrize(
    "preset, sig, steps",
    [
        (["experiment=sdi_2d"], signal.SIGINT, 120),
        (["experiment=gaussians_sdi", "camera.height=24", "camera.width=24", "camera.pool=4"], signal.SIGTERM, 24),
    ],
    ids=["2d-sigint", "gaussians-sigterm"],
)
def test_a_real_signal_stops_at_a_step_boundary_and_the_resumed_run_is_bit_identical(tmp_path, preset, sig, steps):
    common = [
        *preset,
        f"trainer.max_steps={steps}",
        "logger=csv",
        "trainer.log_every=1",
        "trainer.export=false",
        "trainer.checkpoint_every=1000",
        "trainer.image_every=0",
        "trainer.eval_views=2",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = _cli(*common, f"hydra.run.dir={full}", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    at = random.Random(int(time.time())).randrange(2, steps // 2)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "trainer.threads=1",
            "trainer.progress=false",
            *common,
            f"hydra.run.dir={cut}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(cut, at, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and f"interrupted by {signal.Signals(sig).name} at step" in err, err[-2000:]
    stopped = rundir.read_metrics(cut)
    assert stopped["status"] == "interrupted" and stopped["signal"] == signal.Signals(sig).name
    assert at < stopped["steps"] < steps and rundir.read_checkpoint(cut / rundir.CHECKPOINT)["step"] == stopped["steps"]
    r = _cli(*common, f"hydra.run.dir={cut}", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = rundir.load_checkpoint(full), rundir.load_checkpoint(cut)
    assert a["scene"].keys() == b["scene"].keys()
    for k in a["scene"]:
        assert torch.equal(a["scene"][k], b["scene"][k]), k
    ma, mb = rundir.read_metrics(full), rundir.read_metrics(cut)
    assert mb["resumed_from_step"] == stopped["steps"]
    for k, v in ma.items():
        if isinstance(v, float) and k not in ("seconds", "peak_memory_mb"):
            assert mb[k] == v, k
    with open(cut / "scalars.csv") as fh:  # every step logged once, in order
        steps_logged = [int(r["step"]) for r in csv.DictReader(fh) if r["name"] == "loss"]
    assert steps_logged == list(range(steps))


def test_a_key_the_config_gained_since_is_noted_not_refused(compose_cfg, tmp_path, interrupt_at):
    """A new option (its default keeps the old behaviour) comes with new code: the code check decides, not the diff."""
    cfg = compose_cfg([*BASE, "trainer.max_steps=4"])
    interrupt_at(cfg, tmp_path, 2)
    recorded = json.loads((tmp_path / "identity.json").read_text())
    del recorded["config"]["guidance"]["name"]  # as if the run predated that key
    (tmp_path / "identity.json").write_text(json.dumps(recorded))
    m = train(cfg, tmp_path)
    assert m["status"] == "finished" and m["resumed_from_step"] == 2
    notes = json.loads((tmp_path / "identity.json").read_text())["segments"][-1]["notes"]
    assert any("guidance.name" in n for n in notes)
    recorded = json.loads((tmp_path / "identity.json").read_text())
    recorded["config"]["guidance"]["name"] = "sds"  # a key whose value changed is still refused
    (tmp_path / "identity.json").write_text(json.dumps(recorded))
    with pytest.raises(IdentityError, match=r"guidance\.name: sds -> ddim_inversion"):
        train(compose_cfg([*BASE, "trainer.max_steps=4"]), tmp_path)
