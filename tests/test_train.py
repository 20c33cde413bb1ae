"""The run path: every config composes and runs, resume is exact, bad input fails early."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill import rundir
from distill.config import ConfigError, base_options
from distill.train import check_run_config, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false"]


def experiments():
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def sweeps():
    return sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", experiments())
def test_every_experiment_composes_and_runs_a_few_steps(compose_cfg, tmp_path, name):
    cfg = compose_cfg([f"experiment={name}", "trainer.max_steps=3", *FAST])
    if "stable_diffusion" in cfg.prior._target_:  # Table 6.1 presets: SD weights are not here; type-check them
        check_run_config(cfg)
        return
    m = train(cfg, tmp_path)
    assert m["status"] == "finished" and m["steps"] == 3
    assert (tmp_path / "final.png").exists() and (tmp_path / rundir.CHECKPOINT).exists()


@pytest.mark.parametrize("name", sweeps())
def test_every_sweep_composes_with_a_valid_run_config(compose_cfg, name):
    cfg = compose_cfg([f"+sweep={name}"])
    check_run_config(cfg)  # types and options of every group, without building models
    assert cfg.hydra.sweeper.params if "hydra" in cfg else True


def test_default_main_job_is_3d_sdi_on_the_analytic_prior(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.max_steps=2", "trainer.eval_views=2", *FAST])
    assert cfg.guidance.name == "ddim_inversion" and "analytic3d" in cfg.prior._target_ and "nerf" in cfg.scene._target_
    assert cfg.kappa.name == "ddim_inversion" and cfg.schedule.name == "anneal"
    # the exact 3D prior picks its own CFG pair (CFG 7.5 over-saturates it); the command line wins
    assert (cfg.cfg.fwd, cfg.cfg.inv) == (3.0, -3.0)
    assert (compose_cfg(["cfg=sdi"]).cfg.fwd, compose_cfg(["prior=sd21"]).cfg.inv) == (7.5, -7.5)
    m = train(cfg, tmp_path)
    assert m["status"] == "finished" and "psnr" in m and "texture_realism" in m


def _final_state(path: Path):
    ckpt = rundir.load_checkpoint(path)
    return ckpt["scene"], ckpt["generator"]


GUIDANCES = base_options("guidance")  # the methods; their per-method variants run in test_preset_matrix
RESUME_CASES = [(g, s) for g in GUIDANCES for s in ((3, 5) if g in ("sds", "ddim_inversion") else (3,))]


def _equal_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("guidance, stop_at", RESUME_CASES)
def test_interrupted_run_resumes_to_the_same_result(compose_cfg, tmp_path, interrupt_at, guidance, stop_at):
    """Killed at step ``stop_at`` (Ctrl-C / SLURM preemption), re-launched in the same directory: the result
    equals the uninterrupted run bit for bit (checkpoint every 4 steps plus one on exit), for every guidance
    config, including the method's own state (VSD's phi and its optimiser, SDI's kappa)."""
    full = compose_cfg(
        ["experiment=sdi_2d", f"guidance={guidance}", "trainer.checkpoint_every=4", "trainer.max_steps=10", *FAST]
    )
    train(full, tmp_path / "full")
    interrupt_at(full, tmp_path / "resumed", stop_at)
    stopped = rundir.read_metrics(tmp_path / "resumed")
    assert stopped["status"] == "interrupted" and stopped["steps"] == stop_at and stopped["signal"] == "SIGINT"
    m = train(full, tmp_path / "resumed")  # same directory: resumes
    assert m["resumed_from_step"] == stop_at and m["steps"] == 10
    a, ga = _final_state(tmp_path / "full")
    b, gb = _final_state(tmp_path / "resumed")
    assert torch.equal(ga, gb)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_g = rundir.load_checkpoint(tmp_path / "full")["guidance"]
    assert _equal_state(full_g, rundir.load_checkpoint(tmp_path / "resumed")["guidance"])


def test_same_seed_same_result_different_seed_different(compose_cfg, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(compose_cfg(["experiment=sdi_2d", "trainer.max_steps=5", f"seed={seed}", *FAST]), tmp_path / name)
        runs[name] = rundir.load_checkpoint(tmp_path / name)["scene"]["image"]
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])


def test_finished_run_is_not_redone(compose_cfg, tmp_path):
    cfg = compose_cfg(["experiment=sdi_2d", "trainer.max_steps=3", *FAST])
    train(cfg, tmp_path)
    before = (tmp_path / rundir.CHECKPOINT).stat().st_mtime_ns
    assert train(cfg, tmp_path)["status"] == "finished"
    assert (tmp_path / rundir.CHECKPOINT).stat().st_mtime_ns == before


def test_nan_is_recorded_as_diverged_not_raised(compose_cfg, tmp_path):
    # a learning rate that overflows the image in a few SGD steps
    cfg = compose_cfg(
        [
            "experiment=sdi_2d",
            "trainer.max_steps=50",
            "optimizer.name=sgd",
            "scene.lr=1e30",
            "guidance.loss_reduction=sum",
            *FAST,
        ]
    )
    m = train(cfg, tmp_path)
    assert m["status"] == "diverged" and m["diverged"] and m["diverged_reason"] == "nan"
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["schedule.t_min=0.9", "schedule.t_max=0.5"], "t_min"),
        (["trainer.max_steps=-3"], "trainer.max_steps=-3"),
        (["kappa.name=magic"], "kappa.name='magic'"),
        (["inversion.n_steps=0"], "inversion.n_steps=0"),
        (["camera.distance=[2.0,1.5]"], "camera.distance"),
        (["trainer.max_steps=ten"], "trainer.max_steps"),
    ],
)
def test_bad_values_fail_before_compute_naming_the_key(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_run_config(compose_cfg(overrides))


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "train.py", *args, "paths.output_root=/tmp/sdi-lab-test-outputs"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["trainer.max_stepz=3"], "trainer.max_stepz"),  # unknown key (Hydra struct mode)
        (["guidance=magic"], "guidance"),  # unknown option of a group
        (["schedule.t_min=0.99"], "t_min"),  # impossible schedule
        (["experiment=sdi_2d", "prompt=a purple hexagon"], "a purple hexagon"),  # unknown prompt for the prior
    ],
)
def test_cli_bad_input_exits_nonzero_with_one_clear_message(args, needle):
    r = _cli(*args, "logger=none", "trainer.progress=false")
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
