import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def compose_cfg():
    """compose(overrides) -> DictConfig of conf/train.yaml (no Hydra runtime)."""
    from distill.cli import compose_config

    return compose_config


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline (UNet, VAE, CLIP text encoder, DDIM scheduler) saved locally."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """The device for tests that take one: ``SDI_TEST_DEVICE`` (cpu | cuda | cuda:N), default cpu.
    benchmarks/gpu/check.sh runs the suite with SDI_TEST_DEVICE=cuda on a GPU machine."""
    name = os.environ.get("SDI_TEST_DEVICE", "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        pytest.fail(f"SDI_TEST_DEVICE={name!r} is not a torch device ({e}); use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"SDI_TEST_DEVICE={name!r} but torch sees no CUDA device here; unset it or use cpu")
    return dev


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """``run(name, *overrides)`` -> the sweep directory of ``python train.py -m +sweep=<name> <overrides>``
    (the real trainer, the sweep-end callback included), each distinct call run once per test session."""
    import subprocess

    done: dict[tuple, Path] = {}

    def run(name: str, *overrides: str) -> Path:
        key = (name, overrides)
        if key not in done:
            out = tmp_path_factory.mktemp(name)
            cmd = [sys.executable, "train.py", "-m", f"+sweep={name}", f"paths.output_root={out}", "trainer.threads=1"]
            r = subprocess.run(cmd + list(overrides), cwd=ROOT, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr[-3000:]
            (sweep,) = (out / "sweeps").iterdir()
            done[key] = sweep
        return done[key]

    return run


@pytest.fixture
def interrupt_at():
    """``interrupt_at(cfg, run_dir, step)``: train ``cfg`` in ``run_dir`` and send this process a real SIGINT (Ctrl-C,
    as a preemption's signal would be) inside step ``step - 1``, after its optimiser update; the trainer finishes the
    step, checkpoints the state at the start of step ``step`` and stops (distill.interrupts.Interrupted). The one place
    the resume tests (every guidance, VSD/ESD, ISM, Gaussians, memory levers, checkpoints) interrupt a run."""
    import signal

    from distill.interrupts import Interrupted
    from distill.train import Trainer, train

    def run(cfg, run_dir, step: int) -> None:
        assert step >= 1, "the signal lands inside step - 1"
        original = Trainer.train_step

        def interrupted(self, logger, bar):
            out = original(self, logger, bar)
            if self.step == step - 1:
                signal.raise_signal(signal.SIGINT)
            return out

        Trainer.train_step = interrupted
        try:
            with pytest.raises(Interrupted) as e:
                train(cfg, run_dir)
            assert e.value.step == step and e.value.exit_code == 130
        finally:
            Trainer.train_step = original

    return run
