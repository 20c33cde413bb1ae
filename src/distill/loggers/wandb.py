"""Weights & Biases logger (``logger=wandb``).

What goes where:
  * ``wandb.init`` with the resolved run config, project/entity, a group (the sweep /
    experiment name) and tags (the run's overrides, ``key=value``), ``dir=<run_dir>`` so the
    W&B files live in ``<run_dir>/wandb/``;
  * scalars with ``trainer/step`` as their x axis (not W&B's own monotone ``_step``: a run that
    is requeued resumes from its last checkpoint, which may be a few steps behind what it had
    already logged; W&B would drop those steps), images, turntable videos (MP4 paths), tables;
  * the final metrics as the run summary; ``finish(exit_code)`` always (the trainer calls it
    in ``finally``; it is idempotent and also registered with ``atexit``).

Resume: the run id is kept in ``<run_dir>/wandb_id.txt``; a run re-launched in the same
directory (resume after a crash, SLURM requeue) reuses it with ``resume="allow"`` and so
continues the same W&B run.

Offline: with ``mode: auto`` (default) the run is online only when credentials exist
(``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or a ``wandb login`` entry in ~/.netrc);
otherwise it is written offline and the ``wandb sync`` command is printed at the end.
``WANDB_MODE`` in the environment wins over ``mode: auto``.

Offline and resumed: every ``wandb.init`` writes its own ``wandb/offline-run-<time>-<id>``
directory, so a run interrupted and resumed k times is k directories with one run id. The printed
command names all of them, oldest first, with ``--id <id>``: ``wandb sync`` (wandb >= 0.30, where
it is wandb-core's sync) then uploads the pieces one after another, in start order, into that one
W&B run. Naming only the last piece would upload only the steps logged after the last resume.
"""

from __future__ import annotations

import atexit
import logging
import netrc
import os
import re
import secrets
import shlex
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from distill.loggers.base import Logger

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"
STEP_KEY = "trainer/step"
_MODES = ("auto", "online", "offline", "disabled")
# overrides that say where/how a run ran, not what it is: never used as tags
_NOT_TAGS = {
    "hydra/launcher",
    "slurm",
    "sweep",
    "logger",
    "paths.output_root",
    "trainer.device",
    "trainer.resume",
    "trainer.progress",
}


def new_run_id(length: int = 8) -> str:
    """A W&B-style run id: lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def has_credentials() -> bool:
    """True when W&B could authenticate without a prompt (env key/token, or ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path("~/.netrc").expanduser())
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str) -> str:
    """auto -> $WANDB_MODE if set, else online with credentials, offline without."""
    if mode not in _MODES:
        raise ValueError(f"logger.mode={mode!r} is unknown; allowed: {', '.join(_MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_credentials() else "offline"


def _hydra_overrides() -> tuple[list[str], set[str], str | None]:
    """(task overrides, excluded keys, sweep dir name) of the current Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not inside a Hydra job (tests, scripts)
        return [], set(), None
    overrides = list(hc.overrides.task)
    try:
        excluded = set(hc.job.config.override_dirname.exclude_keys)
    except Exception:  # noqa: BLE001
        excluded = set()
    sweep = None
    try:
        if str(hc.mode) == "RunMode.MULTIRUN":
            sweep = Path(str(hc.sweep.dir)).name
    except Exception:  # noqa: BLE001
        pass
    return overrides, excluded, sweep


def override_tags(overrides: list[str], excluded: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``key=value`` tags from overrides, minus where/how keys (W&B tags are at most 64 characters)."""
    skip = {k.lstrip("+~") for k in excluded} | _NOT_TAGS
    tags = []
    for o in overrides:
        if "=" not in o:
            continue
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith(("hydra.", "hydra/")) or any(key == k or key.startswith(k + ".") for k in skip):
            continue  # also logger.* (W&B settings themselves are not what the run is)
        tags.append(o.lstrip("+~").replace('"', "").replace("'", "")[:64])
    return tags


def split_run_name(run_name: str) -> list[str]:
    """Overrides recovered from a run directory name ``k=v,k2=v2`` (fallback outside Hydra)."""
    if "=" not in run_name:
        return []
    return [p for p in re.split(r",(?=[^,=]+=)", run_name) if "=" in p]


def _piece_of(dirname: str, run_id: str) -> bool:
    """True for ``offline-run-<YYYYMMDD_HHMMSS>-<run_id>`` or ``...-<run_id>-<N>`` (not another id
    that merely starts with this one)."""
    m = re.fullmatch(r"offline-run-\d{8}_\d{6}-(.+)", dirname)
    return bool(m) and re.fullmatch(re.escape(run_id) + r"(-\d+)?", m.group(1)) is not None


def _version(v: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``0.31.0`` or ``0.30.0rc1``."""
    nums = [int(re.match(r"\d*", p).group() or 0) for p in v.split(".")[:2]]
    return tuple(nums + [0] * (2 - len(nums)))


class WandbLogger(Logger):
    @dataclass
    class Config:
        project: str = "sdi-lab"
        entity: str | None = None
        group: str | None = None  # default: the sweep / experiment name
        tags: list[str] = field(default_factory=list)  # added to the tags taken from the overrides
        tags_from_overrides: bool = True
        name: str | None = None  # default: the run directory name
        job_type: str = "train"
        notes: str | None = None
        mode: str = "auto"  # auto | online | offline | disabled
        log_config: bool = True  # the resolved config as the W&B run config

        def validate(self) -> None:
            if self.mode not in _MODES:
                raise ValueError(f"logger.mode={self.mode!r} is unknown; allowed: {', '.join(_MODES)}")

    def __init__(self, cfg: WandbLogger.Config, run_dir: Path, run_config: dict | None = None, run_name: str = "run"):
        super().__init__(cfg, run_dir, run_config, run_name)
        import wandb

        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = resolve_mode(cfg.mode)
        self._finished = False
        self._broken = False

        id_file = self.run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = new_run_id()
            id_file.write_text(run_id + "\n")
        self.run_id = run_id
        # an earlier piece of this run in this directory: wandb/{run,offline-run}-<time>-<id>[-N]
        self.resumed = any((self.run_dir / "wandb").glob(f"*run-*-{run_id}*"))

        os.environ["WANDB_DIR"] = str(self.run_dir)  # also for wandb's own helpers (artifacts cache, ...)
        self.group = cfg.group or self._default_group()
        self.tags = self._tags()
        init = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=self.group,
            tags=self.tags,
            name=cfg.name or run_name,
            job_type=cfg.job_type,
            notes=cfg.notes,
            config=dict(self.run_config) if cfg.log_config else None,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
        )
        try:
            self.run = wandb.init(mode=self.mode, **init)
        except Exception as e:  # noqa: BLE001
            if not (cfg.mode == "auto" and self.mode == "online"):
                raise
            # credentials but no way to the server (typical of compute nodes): keep the run offline
            log.warning("wandb: online init failed (%s: %s); logging offline instead", type(e).__name__, e)
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, **init)
        try:
            self.sync_dir: Path | None = Path(self.run.settings.sync_dir)
        except Exception:  # noqa: BLE001 - settings layout of other wandb versions
            self.sync_dir = None
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        atexit.register(self._atexit)
        log.info(
            "wandb: %s run %s (%s/%s, group=%s)%s",
            self.mode,
            run_id,
            cfg.entity or "-",
            cfg.project,
            self.group,
            " resumed" if self.resumed else "",
        )

    # ----- naming -------------------------------------------------------------------------------
    def _default_group(self) -> str | None:
        _, _, sweep = _hydra_overrides()
        exp = self.run_config.get("experiment_name") if isinstance(self.run_config, dict) else None
        return exp or sweep

    def _tags(self) -> list[str]:
        tags = list(self.cfg.tags)
        if self.cfg.tags_from_overrides:
            overrides, excluded, _ = _hydra_overrides()
            if not overrides:
                overrides = split_run_name(self.run_name)
            tags += override_tags(overrides, excluded)
        method = self.run_config.get("method") if isinstance(self.run_config, dict) else None
        if isinstance(method, str) and method:
            tags.append(f"method={method}"[:64])
        seen, out = set(), []
        for t in tags:
            if t and t not in seen:
                seen.add(t)
                out.append(t)
        return out

    # ----- the contract -------------------------------------------------------------------------
    # A logger must never stop training: every W&B call goes through _call, which turns an error
    # into one warning and then no-ops. This matters on SLURM: a requeue/preemption sends SIGTERM
    # to every process of the job step, wandb-core included, which exits at once, so the next
    # wandb call raises ConnectionResetError. Raised from the trainer's `finally`, that error would
    # replace submitit's SystemExit and make a requeued job look like a failed one.
    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if self._broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - see above
            self._broken = True
            log.warning(
                "wandb: %s failed (%s: %s); W&B logging is off for the rest of this process", what, type(e).__name__, e
            )
            return None

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        row: dict[str, Any] = {k: float(v) for k, v in values.items() if v is not None}
        row[STEP_KEY] = int(step)
        self._call("log", self.run.log, row)

    def log_image(self, name: str, image: np.ndarray | Path, step: int) -> None:
        img = image if isinstance(image, np.ndarray) else str(image)
        self._call("log_image", lambda: self.run.log({name: self._wandb.Image(img), STEP_KEY: int(step)}))

    def log_video(self, name: str, path: Path, step: int) -> None:
        path = Path(path)
        fmt = path.suffix.lstrip(".").lower() or "mp4"
        self._call(
            "log_video", lambda: self.run.log({name: self._wandb.Video(str(path), format=fmt), STEP_KEY: int(step)})
        )

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._call(
            "log_table",
            lambda: self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}),
        )

    def summary(self, metrics: dict[str, Any]) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, list, dict)) or v is None}
        self._call("summary", self.run.summary.update, clean)

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        self._call("finish", self.run.finish, exit_code=exit_code)
        if self.mode == "offline":
            print(self.sync_message(), file=sys.stderr)

    def offline_dir(self) -> Path | None:
        """The directory ``wandb sync`` takes for this (offline) piece of the run."""
        if self.sync_dir is not None and self.sync_dir.is_dir():
            return self.sync_dir
        dirs = self.offline_dirs()
        return dirs[-1] if dirs else None

    def offline_dirs(self) -> list[Path]:
        """Every offline piece of this run (``wandb/offline-run-<time>-<id>[-N]`` with a .wandb file),
        oldest first: by the start time in the name, then by the .wandb file's age."""
        dirs = [
            d
            for d in (self.run_dir / "wandb").glob(f"offline-run-*-{self.run_id}*")
            if d.is_dir() and _piece_of(d.name, self.run_id) and any(d.glob("*.wandb"))
        ]
        this = self.sync_dir if self.sync_dir is not None and self.sync_dir.is_dir() else None
        if this is not None and this not in dirs:
            dirs.append(this)

        def start(d: Path) -> tuple[str, float]:
            m = re.match(r"offline-run-(\d{8}_\d{6})-", d.name)
            ages = [f.stat().st_mtime for f in d.glob("*.wandb")] or [d.stat().st_mtime]
            return (m.group(1) if m else "", min(ages))

        return sorted(dirs, key=start)

    def sync_command(self) -> list[str]:
        """``wandb sync`` for all offline pieces of this run (argv); pieces of one run id are synced in
        start order into that run (``--id``)."""
        dirs = self.offline_dirs()
        if not dirs:
            return ["wandb", "sync", str(self.run_dir / "wandb")]
        cmd = ["wandb", "sync"]
        if len(dirs) > 1:
            cmd += ["--id", self.run_id]
        return cmd + [str(d) for d in dirs]

    def sync_message(self) -> str:
        """What ``finish`` prints for an offline run: the one command that uploads all of it."""
        dirs = self.offline_dirs()
        what = "offline run saved" if len(dirs) <= 1 else f"offline run saved in {len(dirs)} pieces (resumed)"
        msg = f"wandb: {what}; upload it with:\n  {shlex.join(self.sync_command())}"
        if len(dirs) > 1 and _version(self._wandb.__version__) < (0, 30):
            msg += (
                f"\n  (wandb {self._wandb.__version__} here: syncing several pieces into one run needs wandb>=0.30,"
                " `pip install -U wandb` on the machine that uploads)"
            )
        return msg

    def _atexit(self) -> None:
        if not self._finished:
            try:
                self.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
