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


@pytest.fixture(scope="session")
def conf_dir() -> str:
    return str(ROOT / "conf")


@pytest.fixture
def compose_cfg(conf_dir):
    """compose(overrides) -> DictConfig of conf/train.yaml (no Hydra runtime)."""
    from hydra import compose, initialize_config_dir

    from distill.cli import register_resolvers

    register_resolvers()

    def _compose(overrides=()):
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            return compose("train", overrides=list(overrides))

    return _compose
