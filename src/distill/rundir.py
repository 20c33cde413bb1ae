"""Run directories: the files a run leaves behind and how to read them back.

<run>/config.yaml          resolved config
<run>/metrics.json         status (running|finished|diverged|failed), steps, seconds,
                           peak_memory_mb, diverged, diverged_reason, ground-truth metrics
<run>/checkpoints/last.pt  scene, optimiser, RNG and kappa state, step
<run>/images/              intermediate renders; final.png, strip.png; turntable.mp4, mesh.ply (3D)
<run>/scalars.csv          logged scalars (csv logger); wandb_id.txt (wandb logger)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

CONFIG, METRICS, CHECKPOINT = "config.yaml", "metrics.json", "checkpoints/last.pt"


class NotARunError(FileNotFoundError):
    pass


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def require_run_dir(path: Path) -> Path:
    path = Path(path)
    if not is_run_dir(path):
        raise NotARunError(
            f"{path} is not a run directory: expected {CONFIG} (and {METRICS}, {CHECKPOINT}) written by train.py"
        )
    return path


def read_metrics(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / METRICS
    return json.loads(p.read_text()) if p.exists() else {}


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    p = Path(run_dir) / METRICS
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=float))
    os.replace(tmp, p)


def read_config(run_dir: Path) -> DictConfig:
    return OmegaConf.load(require_run_dir(run_dir) / CONFIG)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    p = Path(run_dir) / CHECKPOINT
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, p)  # atomic: a job killed while saving keeps the previous checkpoint


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    p = Path(run_dir) / CHECKPOINT
    if not p.exists():
        return None
    return torch.load(p, map_location=map_location, weights_only=False)


def load_scene(run_dir: Path, device: str | torch.device = "cpu"):
    """Rebuild the trained scene of a run from its config and last checkpoint -> (cfg, scene)."""
    from distill.config import build

    cfg = read_config(run_dir)
    ckpt = load_checkpoint(run_dir, map_location=device)
    if ckpt is None:
        raise NotARunError(f"{run_dir} has no checkpoint ({CHECKPOINT}): the run never saved one")
    scene = build(cfg.scene, "scene").to(device)
    scene.load_state_dict(ckpt["scene"])
    scene.eval()
    return cfg, scene
