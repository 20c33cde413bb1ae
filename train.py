"""Entry point: ``python train.py [overrides]`` (``-m`` for sweeps). The work is in distill.train."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a plain checkout too

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from distill.cli import register_resolvers, run_job  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
