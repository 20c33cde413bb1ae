"""Run directories: the files a run leaves behind and how to read them back.

<run>/config.yaml          resolved config
<run>/identity.json        what makes it this run: semantic config + hash, seed, code, numerics, segments
                           (distill.identity: a start with another identity is refused)
<run>/environment.json     torch, CUDA, CPU capability, library versions of the latest start (distill.env)
<run>/metrics.json         status (running|finished|diverged|failed|interrupted), steps, seconds,
                           peak_memory_mb, diverged, diverged_reason, ground-truth metrics;
                           failed: stage (start|train), reason (one line), exit_code; interrupted: signal
<run>/archive/NNN/         what an earlier attempt left, moved there by trainer.resume=false (ARCHIVED.json says why)
<run>/checkpoints/last.pt  scene, optimiser, RNG and method state (kappa, VSD's phi), step
<run>/checkpoints/prev.pt  the checkpoint before last.pt (the automatic fallback when last.pt is unreadable)
<run>/images/              intermediate renders; final.png, strip.png; turntable.mp4, mesh.ply (3D)
<run>/scalars.csv          logged scalars (csv logger); wandb_id.txt (wandb logger)

Checkpoints hold only tensors, numbers, strings, None and dicts / lists / tuples of them (checked on save) and are read
with ``torch.load(weights_only=True)``: a file that holds anything else (a pickled object, whose unpickling could run
code) is refused with :class:`UnsafeCheckpointError`, and its code never runs. A file that cannot be read (empty,
truncated by a full disk or a killed copy, not a zip archive) is reported with its path; resuming then falls back to
``prev.pt`` (logged, and recorded in metrics.json ``start``), or, when that is unusable too, stops with the way out.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

CONFIG, METRICS, CHECKPOINT = "config.yaml", "metrics.json", "checkpoints/last.pt"
ENVIRONMENT = "environment.json"
log = logging.getLogger(__name__)


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


PREVIOUS_CHECKPOINT = "checkpoints/prev.pt"
_REQUIRED = ("step", "scene", "optimizer", "generator", "torch_rng")  # what Trainer.state() always writes
_PLAIN = (torch.Tensor, bool, int, float, str, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the way out (printed without a traceback)."""


class UnreadableCheckpointError(CheckpointError):
    """Empty, truncated, not a zip archive, or not a checkpoint of train.py."""


class UnsafeCheckpointError(CheckpointError):
    """Holds an object other than tensors, numbers, strings and containers of them: refused, never unpickled."""


def check_plain(state: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of ``state`` that is not a tensor, number, string, None or a
    dict / list / tuple of them (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(state, _PLAIN):
        return
    if isinstance(state, dict):
        for k, v in state.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoint keys are strings or ints")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(state).__module__}.{type(state).__qualname__}: a checkpoint holds only tensors, numbers, "
        f"strings, None and dicts / lists / tuples of them (convert it in the component's state_dict())"
    )


def save_checkpoint(run_dir: Path, state: dict[str, Any], previous: str = "rotate") -> None:
    """Write ``state`` to checkpoints/last.pt atomically (a temporary file, then a rename).

    previous: what becomes of the checkpoint already there. ``rotate``: last.pt becomes prev.pt (when it is a
    complete zip archive: an unreadable last.pt never replaces a good prev.pt). ``keep``: prev.pt stays as it is
    (after resuming from prev.pt because last.pt was unreadable). ``discard``: prev.pt is removed (a run started over
    with trainer.resume=false: the old attempt's checkpoint must not become the fallback of the new one).
    """
    if previous not in ("rotate", "keep", "discard"):
        raise ValueError(f"previous={previous!r}: expected rotate, keep or discard")
    check_plain(state)
    p, prev = Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS_CHECKPOINT
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    if previous == "discard":
        prev.unlink(missing_ok=True)
    elif previous == "rotate" and zipfile.is_zipfile(p):
        # a job killed between the two renames leaves prev.pt and no last.pt: resuming then uses prev.pt
        os.replace(p, prev)
    os.replace(tmp, p)  # atomic: a job killed while saving keeps the previous checkpoint


def read_checkpoint(path: Path, map_location: Any = "cpu", required: tuple[str, ...] = _REQUIRED) -> dict[str, Any]:
    """One checkpoint file, read with ``torch.load(weights_only=True)``.

    Raises UnreadableCheckpointError (empty, truncated, not a zip archive, lacks one of ``required``) or
    UnsafeCheckpointError (holds a pickled object: refused before any of it is built, so its code does not run)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpointError(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise UnreadableCheckpointError(f"{path} is empty (0 bytes)")
    # torch.save writes a zip archive whose directory sits at the end: a cut file has none. Not unpickled at all then.
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpointError(
            f"{path} ({size} bytes) is not a complete zip archive (torch.save writes one): truncated, e.g. by a full "
            f"disk or a killed copy, or not a checkpoint"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = re.search(r"[^\n]*(?:unsupported|Unsupported)[^\n]*", str(e))
            raise UnsafeCheckpointError(
                f"{path} holds more than tensors, numbers and strings ({found.group(0).strip() if found else e}); "
                f"it was refused without running any of it. A checkpoint written by train.py never holds such an "
                f"object: do not resume from a file you did not write. Way out: move it away and re-launch (resumes "
                f"from {PREVIOUS_CHECKPOINT} if that is yours), or trainer.resume=false to start over at step 0"
            ) from None
        raise UnreadableCheckpointError(f"{path} cannot be unpickled ({e})") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged archive raises (RuntimeError, EOFError, KeyError...)
        raise UnreadableCheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
        ) from None
    missing = [k for k in required if k not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise UnreadableCheckpointError(f"{path} is not a checkpoint of train.py (missing {', '.join(missing)})")
    return state


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from: its state, its file, and what happened on the way (for the log and
    metrics.json ``start``; empty when last.pt was read)."""

    state: dict[str, Any]
    path: Path
    note: str = ""

    @property
    def fallback(self) -> bool:
        return self.path.name != Path(CHECKPOINT).name


def find_resume_point(run_dir: Path, map_location: Any = "cpu") -> ResumePoint | None:
    """last.pt, or prev.pt when last.pt is missing or unreadable; None when the run has no checkpoint at all.

    Raises UnsafeCheckpointError for a file holding objects (never falls back past it: the directory holds a file
    train.py did not write), and UnreadableCheckpointError naming both files and the way out when neither can be read.
    Reads only: nothing in the run directory is changed."""
    last, prev = Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS_CHECKPOINT
    if not last.exists() and not prev.exists():
        return None
    try:
        return ResumePoint(read_checkpoint(last, map_location), last)
    except UnreadableCheckpointError as e:
        why_last = str(e)
    try:
        state = read_checkpoint(prev, map_location)
    except UnreadableCheckpointError as e:
        raise UnreadableCheckpointError(
            f"no usable checkpoint in {run_dir}: {why_last}; and the previous one: {e}. Way out: trainer.resume=false "
            f"starts this run over at step 0 in the same directory (its checkpoints are then replaced), or put a good "
            f"copy of the checkpoint back at {last}"
        ) from None
    note = (
        f"{why_last}: resuming from the previous checkpoint {prev} (step {int(state['step'])}); {last} is left as "
        f"it is until the next checkpoint replaces it"
    )
    log.warning("%s", note)
    return ResumePoint(state, prev, note)


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The run's last checkpoint (``torch.load(weights_only=True)``), None if it has none; raises CheckpointError
    for an unreadable or unsafe file (no fallback: a finished run's result is its last checkpoint)."""
    p = Path(run_dir) / CHECKPOINT
    if not p.exists():
        return None
    return read_checkpoint(p, map_location, required=("step", "scene"))


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


# ----- starting over, failed starts ---------------------------------------------------------------------------------
ARCHIVE = "archive"
KEPT_ON_ARCHIVE = (ARCHIVE, "train.log")  # Hydra's job log is open in this process: it stays and logs every launch


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).exists() or (Path(run_dir) / PREVIOUS_CHECKPOINT).exists()


def leftovers(run_dir: Path) -> list[Path]:
    """What a start at step 0 would otherwise mix with: every entry of ``run_dir`` but the archive and the log."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name not in KEPT_ON_ARCHIVE)


def is_failed_start(run_dir: Path) -> bool:
    """The directory holds only the record of a start that failed before its first step (nothing to keep)."""
    m = read_metrics(run_dir)
    names = {p.name for p in leftovers(run_dir)}
    return m.get("status") == "failed" and m.get("stage") == "start" and names <= {CONFIG, METRICS, ".hydra"}


def archive(run_dir: Path, reason: str) -> Path | None:
    """Move everything a previous attempt left in ``run_dir`` (checkpoints, frames, scalars, metrics, exports, config)
    into ``<run>/archive/NNN/`` with ``ARCHIVED.json`` saying when and why, so a new start at step 0 mixes with none
    of it and none of it is lost. Returns the archive folder (None when there was nothing to move)."""
    import datetime
    import shutil

    run_dir = Path(run_dir)
    items = leftovers(run_dir)
    if not items:
        return None
    root = run_dir / ARCHIVE
    root.mkdir(exist_ok=True)
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    dest = root / f"{n:03d}"
    dest.mkdir()
    for p in items:
        shutil.move(str(p), str(dest / p.name))
    (dest / "ARCHIVED.json").write_text(
        json.dumps(
            {
                "archived": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "reason": reason,
                "moved": [p.name for p in items],
            },
            indent=2,
        )
    )
    log.info("%s: the previous contents moved to %s (%s)", run_dir, dest, reason)
    return dest


def one_line(e: BaseException) -> str:
    """An exception as one line: its first line of text, or its type."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:400]}" if text else type(e).__name__
