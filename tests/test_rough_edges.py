"""Errors and records a new user meets first: group conflicts, non-finite numbers, out of memory, restarts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill import rundir
from distill.config import ConfigError, check_numbers
from distill.train import check_run_config, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false"]


def test_a_key_set_by_another_group_names_both_groups_and_the_fix(compose_cfg):
    cfg = compose_cfg(["scene=image"])  # the default prior (analytic3d) sets scene.shading for a 3D scene
    with pytest.raises(ConfigError) as e:
        check_run_config(cfg)
    msg = str(e.value)
    assert msg.startswith("scene.shading: unknown key")
    assert "prior=analytic3d" in msg and "scene=image" in msg
    assert "experiment=sdi_2d" in msg and "nerf_cpu" in msg  # both ways out: a 2D preset, or a 3D scene
    # the fix it names works
    check_run_config(compose_cfg(["experiment=sdi_2d"]))


def test_a_plain_unknown_key_gets_no_invented_group_hint(compose_cfg):
    cfg = compose_cfg(["experiment=sdi_2d", "+scene.colour=1"])
    with pytest.raises(ConfigError) as e:
        check_run_config(cfg)
    assert str(e.value).startswith("scene.colour: unknown key") and "do not fit together" not in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("scene.lr=nan", "scene.lr"),
        ("scene.lr=inf", "scene.lr"),
        ("scene.lr=-0.01", "scene.lr"),
        ("scene.lr=0", "scene.lr"),
        ("cfg.fwd=nan", "cfg.fwd"),
        ("cfg.inv=-inf", "cfg.inv"),
        ("schedule.t_min=nan", "schedule.t_min"),
    ],
)
def test_non_finite_numbers_and_bad_learning_rates_stop_before_compute(compose_cfg, override, key):
    cfg = compose_cfg(["experiment=sdi_2d", override])
    with pytest.raises(ConfigError) as e:
        check_run_config(cfg)
    assert str(e.value).startswith(f"{key}=")


def test_check_numbers_walks_nested_values():
    check_numbers({"a": [1.0, (2.0, 3)], "b_lr": 1e-4}, "x")
    with pytest.raises(ConfigError, match=r"x\.a\[1\]\[0\]=nan"):
        check_numbers({"a": [1.0, (float("nan"), 3)]}, "x")
    with pytest.raises(ConfigError, match=r"x\.phi_lr=-1"):
        check_numbers({"phi_lr": -1}, "x")


def test_cli_exits_2_on_a_nan_learning_rate(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=sdi_2d",
            "scene.lr=nan",
            f"hydra.run.dir={tmp_path}",
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "scene.lr=nan" in r.stderr


def test_cpu_out_of_memory_is_recorded_as_diverged_with_the_requested_size(compose_cfg, tmp_path):
    cfg = compose_cfg(["camera.height=100000", "camera.width=100000", "trainer.max_steps=2", *FAST])
    m = train(cfg, tmp_path)  # returns: a sweep would go on with its next job
    assert m["status"] == "diverged" and m["diverged_reason"] == "oom"
    assert "100000x100000" in m["diverged_detail"] and "cpu" in m["diverged_detail"]
    assert json.loads((tmp_path / rundir.METRICS).read_text())["diverged_reason"] == "oom"


def test_start_reason_is_logged_and_recorded(compose_cfg, tmp_path, caplog):
    base = ["experiment=sdi_2d", "trainer.checkpoint_every=2", *FAST]
    # a previous attempt killed before its first checkpoint left a "running" metrics.json and nothing to resume
    rundir.write_metrics(tmp_path, {"status": "running", "steps": 0})
    with caplog.at_level("INFO", logger="distill.train"):
        m = train(compose_cfg([*base, "trainer.max_steps=3"]), tmp_path)
    assert m["start"].startswith("no checkpoint: starting at step 0") and "'running'" in m["start"]
    assert any("no checkpoint: starting at step 0" in r.getMessage() for r in caplog.records)
    assert "archive/001" in m["start"]  # the killed attempt's files are kept apart, not mixed into this run
    # killed after a checkpoint (status still "running"): the re-launch resumes from it and says so
    rundir.write_metrics(tmp_path, {**m, "status": "running"})
    m = train(compose_cfg([*base, "trainer.max_steps=3"]), tmp_path)
    assert m["start"].startswith("resuming from step 3") and m["resumed_from_step"] == 3
    m = train(compose_cfg([*base, "trainer.max_steps=3", "trainer.resume=false"]), tmp_path / "fresh")
    assert m["start"] == "trainer.resume=false: starting at step 0"
