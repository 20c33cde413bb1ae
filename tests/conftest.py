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
