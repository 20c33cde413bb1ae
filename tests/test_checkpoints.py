"""Checkpoints that cannot hurt: an unreadable last.pt falls back to prev.pt (logged, recorded) or stops with the way
out, never a traceback; a file holding a pickled object is refused and its code never runs; saving refuses anything
but tensors, numbers, strings and containers of them."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill import rundir
from distill.identity import IdentityError
from distill.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false"]
BASE = ["experiment=sdi_2d", "trainer.checkpoint_every=2", *FAST]


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker`` (what a planted checkpoint could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(step: int) -> dict:
    """The keys Trainer.state() always writes, with small values."""
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "scene": {"image": torch.full((2,), float(step))},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.99)}]},
        "generator": g.get_state(),
        "torch_rng": torch.get_rng_state(),
        "seconds": 1.5,
    }


def _interrupted_run(compose_cfg, interrupt_at, run: Path, stop_at: int, max_steps: int = 6):
    """A run killed at step ``stop_at`` (Ctrl-C / preemption): last.pt at stop_at, prev.pt at the periodic one."""
    cfg = compose_cfg([*BASE, f"trainer.max_steps={max_steps}"])
    interrupt_at(cfg, run, stop_at)
    return cfg


def _truncate(path: Path, size: int = 1024) -> None:
    data = path.read_bytes()
    assert len(data) > size  # the cut really removes the archive's end (its central directory)
    path.write_bytes(data[:size])


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_save_rotates_last_into_prev(tmp_path):
    for step in (2, 4, 6):
        rundir.save_checkpoint(tmp_path, _state(step))
    assert rundir.read_checkpoint(tmp_path / rundir.CHECKPOINT)["step"] == 6
    assert rundir.read_checkpoint(tmp_path / rundir.PREVIOUS_CHECKPOINT)["step"] == 4
    # an unreadable last.pt is never rotated over a good prev.pt
    _truncate(tmp_path / rundir.CHECKPOINT)
    rundir.save_checkpoint(tmp_path, _state(8))
    assert rundir.read_checkpoint(tmp_path / rundir.PREVIOUS_CHECKPOINT)["step"] == 4
    # keep / discard (after a fallback / when a run starts over)
    rundir.save_checkpoint(tmp_path, _state(10), previous="keep")
    assert rundir.read_checkpoint(tmp_path / rundir.PREVIOUS_CHECKPOINT)["step"] == 4
    rundir.save_checkpoint(tmp_path, _state(0), previous="discard")
    assert not (tmp_path / rundir.PREVIOUS_CHECKPOINT).exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]  # no temporary file left


def test_saving_refuses_anything_but_tensors_numbers_strings(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['guidance'\]\['held'\] is a pathlib\.PosixPath"):
        rundir.save_checkpoint(tmp_path, {**_state(1), "guidance": {"held": Path("/x")}})
    with pytest.raises(TypeError, match="numpy.ndarray"):
        rundir.save_checkpoint(tmp_path, {**_state(1), "kappa": [torch.zeros(1), __import__("numpy").zeros(1)]})
    assert not (tmp_path / rundir.CHECKPOINT).exists()


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda p: _truncate(p), "not a complete zip archive"),
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_text("not a checkpoint"), "not a complete zip archive"),
    ],
    ids=["truncated", "zero-bytes", "not-a-zip"],
)
def test_an_unreadable_checkpoint_names_its_path_and_the_way_out(tmp_path, damage, says):
    rundir.save_checkpoint(tmp_path, _state(2))
    last = tmp_path / rundir.CHECKPOINT
    damage(last)
    with pytest.raises(rundir.UnreadableCheckpointError, match=re.escape(says)) as e:
        rundir.read_checkpoint(last)
    assert str(last) in str(e.value)
    # no prev.pt (the run's first checkpoint): stop with both files and both ways out named
    with pytest.raises(rundir.UnreadableCheckpointError) as e:
        rundir.find_resume_point(tmp_path)
    msg = str(e.value)
    assert str(last) in msg and "prev.pt does not exist" in msg and "trainer.resume=false" in msg
    # with a good prev.pt the run falls back to it
    rundir.save_checkpoint(tmp_path, _state(4), previous="keep")
    rundir.save_checkpoint(tmp_path, _state(6))  # last (4) -> prev, last = 6
    damage(last)
    point = rundir.find_resume_point(tmp_path)
    assert point.fallback and point.state["step"] == 4 and says in point.note and str(last) in point.note


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    # the payload is live: unpickled the ordinary way it runs
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(RunsCode(live)))
    assert live.exists()
    marker = tmp_path / "ran"
    rundir.save_checkpoint(tmp_path, _state(2))
    rundir.save_checkpoint(tmp_path, _state(4))  # a good prev.pt beside it: no fallback past a planted file
    last = tmp_path / rundir.CHECKPOINT
    torch.save({**_state(4), "scene": RunsCode(marker)}, last)  # a zip archive, as torch.save writes
    with pytest.raises(rundir.UnsafeCheckpointError, match="refused") as e:
        rundir.find_resume_point(tmp_path)
    assert str(last) in str(e.value) and "posix.system" in str(e.value) and "trainer.resume=false" in str(e.value)
    with pytest.raises(rundir.UnsafeCheckpointError):
        rundir.load_checkpoint(tmp_path)  # what eval's load_scene reads
    last.write_bytes(pickle.dumps(RunsCode(marker)))  # a bare pickle (not a zip): never unpickled at all
    with pytest.raises(rundir.UnreadableCheckpointError, match="not a complete zip archive"):
        rundir.read_checkpoint(last)
    assert not marker.exists()


def test_an_unreadable_last_checkpoint_falls_back_to_prev_and_resumes_bit_identically(
    compose_cfg, interrupt_at, tmp_path, caplog
):
    """Killed at step 5 (last.pt at 5, prev.pt at 4), then last.pt cut to 1 kB: the re-launch says so, resumes from
    step 4 and ends equal to the uninterrupted run bit for bit."""
    cfg = compose_cfg([*BASE, "trainer.max_steps=6"])
    train(cfg, tmp_path / "full")
    run = tmp_path / "cut"
    _interrupted_run(compose_cfg, interrupt_at, run, stop_at=5)
    assert rundir.read_checkpoint(run / rundir.PREVIOUS_CHECKPOINT)["step"] == 4
    _truncate(run / rundir.CHECKPOINT)
    with caplog.at_level("WARNING", logger="distill.rundir"):
        m = train(cfg, run)
    assert m["status"] == "finished" and m["resumed_from_step"] == 4
    assert "previous checkpoint" in m["start"] and str(run / rundir.CHECKPOINT) in m["start"]
    assert any("prev.pt" in r.getMessage() for r in caplog.records)
    a, b = rundir.load_checkpoint(tmp_path / "full"), rundir.load_checkpoint(run)
    assert torch.equal(a["scene"]["image"], b["scene"]["image"]) and torch.equal(a["generator"], b["generator"])
    assert rundir.read_checkpoint(run / rundir.PREVIOUS_CHECKPOINT)["step"] == 4  # kept: the cut file was not rotated


def test_no_usable_checkpoint_stops_before_touching_the_run_directory(compose_cfg, interrupt_at, tmp_path):
    run = tmp_path / "run"
    cfg = _interrupted_run(compose_cfg, interrupt_at, run, stop_at=1)  # only the exit checkpoint: no prev.pt
    assert not (run / rundir.PREVIOUS_CHECKPOINT).exists()
    _truncate(run / rundir.CHECKPOINT, size=100)
    before = _snapshot(run)
    with pytest.raises(rundir.UnreadableCheckpointError, match="trainer.resume=false"):
        train(cfg, run)
    assert _snapshot(run) == before
    # the way out it names works: starting over replaces the cut file
    m = train(compose_cfg([*BASE, "trainer.max_steps=3", "trainer.resume=false"]), run)
    assert m["status"] == "finished" and rundir.read_checkpoint(run / rundir.CHECKPOINT)["step"] == 3


def test_starting_over_does_not_keep_the_old_attempts_checkpoint_as_fallback(compose_cfg, interrupt_at, tmp_path):
    _interrupted_run(compose_cfg, interrupt_at, tmp_path, stop_at=5)
    assert (tmp_path / rundir.PREVIOUS_CHECKPOINT).exists()
    train(compose_cfg([*BASE, "trainer.max_steps=1", "trainer.resume=false"]), tmp_path)
    assert not (tmp_path / rundir.PREVIOUS_CHECKPOINT).exists()


def test_cli_reports_an_unusable_checkpoint_in_one_message_exit_2(compose_cfg, interrupt_at, tmp_path):
    _interrupted_run(compose_cfg, interrupt_at, tmp_path, stop_at=1)
    _truncate(tmp_path / rundir.CHECKPOINT)
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *BASE, "trainer.max_steps=6", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(tmp_path / rundir.CHECKPOINT) in r.stderr and "trainer.resume=false" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_checkpoint_of_another_config_is_a_clear_error_not_a_traceback(compose_cfg, interrupt_at, tmp_path):
    _interrupted_run(compose_cfg, interrupt_at, tmp_path, stop_at=1)
    before = _snapshot(tmp_path)
    changed = [*BASE, "trainer.max_steps=6", "scene.height=16", "scene.width=16"]
    # the run's identity (identity.json) refuses it first, naming the changed keys, and touches nothing
    with pytest.raises(IdentityError, match=r"scene\.height: 32 -> 16") as e:
        train(compose_cfg(changed), tmp_path)
    assert "trainer.resume=false" in str(e.value) and "trainer.max_steps" not in str(e.value)
    assert _snapshot(tmp_path) == before
    # a checkpoint whose run recorded no config at all is still checked against the model it is loaded into
    (tmp_path / "identity.json").unlink()
    (tmp_path / rundir.CONFIG).unlink()
    before = rundir.read_metrics(tmp_path)
    with pytest.raises(rundir.CheckpointError, match="does not fit this run's config") as e:
        train(compose_cfg(changed), tmp_path)
    assert "trainer.resume=false" in str(e.value)
    assert rundir.read_metrics(tmp_path) == before  # not recorded as a failed run
