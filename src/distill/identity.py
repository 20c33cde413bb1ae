"""Run identity: what makes a run directory's contents one run, and what a re-launch in it may change.

A run directory is named from its overrides (``outputs/runs/<experiment>/<key=value,...>``), so a re-launch or a
requeued SLURM job finds its own directory and resumes. That only works while the directory holds ONE run: the
same semantic config, seed and code. ``<run>/identity.json`` records

    hash      sha256 (16 hex digits) of the semantic config: the resolved config minus the keys that cannot change
              the result (:data:`NON_SEMANTIC`: device, progress bar, threads, checkpoint / log cadence, logger, paths)
    seed      the run's seed (also inside the config, so inside the hash)
    config    the semantic config itself (what ``diff`` lists old -> new)
    code      package version, git commit + dirty flag, hash of the sources (:func:`distill.env.code_version`)
    numerics  torch, CUDA, ATen's CPU capability, the CPU (:func:`distill.env.numerics`)
    segments  one entry per accepted start: when, from which step, under which code / numerics, why

and :func:`check` decides, before anything in the directory is touched, what a new start may do there:

    new       nothing to mix with (no checkpoint, no finished / diverged result): start at step 0
    same      the same identity: resume from the checkpoint, or nothing to do for a finished run
    extend    a finished run whose only change is a larger ``trainer.max_steps``: continue it (users expect this)
    refused   anything else (:class:`IdentityError` lists the changed keys old -> new and the ways out)

Code or torch changed under a run that still has steps to take is refused too (the steps before and after would come
from different programs) unless ``trainer.allow_code_change=true``; a different CPU capability or device is recorded
in the segment and logged (the float kernels change, the semantics do not: SLURM may requeue onto another node).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from distill import env
from distill.config import ConfigError

log = logging.getLogger(__name__)

IDENTITY = "identity.json"
# keys that cannot change what a run computes (dotted prefixes of the resolved config)
NON_SEMANTIC = (
    "trainer.device",
    "trainer.progress",
    "trainer.threads",
    "trainer.resume",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.allow_code_change",
    "logger",
    "paths",
)
EXTENDABLE = "trainer.max_steps"  # a finished run may be continued to more steps
ABSENT = "<absent>"  # diff's value for a key one side lacks
# results a run directory can hold that a new identity would mix with
DURABLE_STATUSES = ("finished", "diverged")


class IdentityError(ConfigError):
    """A start refused because the directory holds another run; nothing in the directory was changed."""


def _drop(d: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return
    if not rest:
        del d[head]
    elif isinstance(d[head], dict):
        _drop(d[head], rest)


def semantic_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config minus :data:`NON_SEMANTIC` (a plain dict)."""
    if isinstance(cfg, DictConfig):
        c = cfg.copy()
        with open_dict(c):
            for k in NON_SEMANTIC:  # blanked before resolving: paths.run_dir interpolates Hydra's runtime
                if OmegaConf.select(c, k, default=None, throw_on_resolution_failure=False) is not None or (
                    "." not in k and k in c
                ):
                    OmegaConf.update(c, k, None, force_add=True)
        data = OmegaConf.to_container(c, resolve=True)
    else:
        data = json.loads(json.dumps(cfg, default=str))
    assert isinstance(data, dict)
    data.pop("hydra", None)
    for k in NON_SEMANTIC:
        _drop(data, k)
    return data


def config_hash(semantic: dict[str, Any]) -> str:
    blob = json.dumps(semantic, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (an empty dict is a leaf)."""
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """[(dotted key, old value, new value)] for every leaf that differs (``<absent>`` where one side lacks it)."""
    a, b = flatten(old), flatten(new)
    missing = ABSENT
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


@dataclass
class Identity:
    hash: str
    seed: int
    config: dict[str, Any]
    code: dict[str, Any] = field(default_factory=dict)
    numerics: dict[str, Any] = field(default_factory=dict)
    segments: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "seed": self.seed,
            "created": self.created,
            "code": self.code,
            "numerics": self.numerics,
            "segments": self.segments,
            "config": self.config,
        }


def current(cfg: DictConfig) -> Identity:
    """The identity a start with ``cfg`` would have, in this process (code and numerics of this machine)."""
    sem = semantic_config(cfg)
    return Identity(
        hash=config_hash(sem),
        seed=int(sem.get("seed", 0)),
        config=sem,
        code=env.code_version(),
        numerics=env.numerics(),
        created=_now(),
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(run_dir: Path) -> Identity | None:
    """The identity recorded in ``run_dir``; for a directory written before identities existed, the one its
    ``config.yaml`` implies (code and numerics unknown); None when neither exists."""
    p = Path(run_dir) / IDENTITY
    if p.is_file():
        d = json.loads(p.read_text())
        return Identity(
            hash=d["hash"],
            seed=int(d.get("seed", 0)),
            config=d.get("config", {}),
            code=d.get("code", {}),
            numerics=d.get("numerics", {}),
            segments=list(d.get("segments", [])),
            created=d.get("created", ""),
        )
    legacy = Path(run_dir) / "config.yaml"
    if legacy.is_file():
        try:
            sem = semantic_config(OmegaConf.load(legacy))
        except Exception:  # noqa: BLE001 - an unreadable old config: nothing to compare with
            return None
        return Identity(hash=config_hash(sem), seed=int(sem.get("seed", 0)), config=sem)
    return None


def write(run_dir: Path, ident: Identity) -> None:
    p = Path(run_dir) / IDENTITY
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ident.to_json(), indent=2, default=str))
    os.replace(tmp, p)


@dataclass
class Decision:
    """What a start may do in its directory (see the module docstring)."""

    action: str  # new | same | extend
    previous: Identity | None
    notes: list[str] = field(default_factory=list)  # recorded in the segment and logged (CPU changed, ...)


def _fmt(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def check(
    run_dir: Path, new: Identity, *, status: str | None, has_checkpoint: bool, allow_code_change: bool
) -> Decision:
    """Decide what a start of identity ``new`` may do in ``run_dir`` (reads only; raises IdentityError).

    status: metrics.json's status there (None: none); has_checkpoint: whether a checkpoint exists."""
    old = read(run_dir)
    holds_result = has_checkpoint or status in DURABLE_STATUSES
    if not holds_result:
        return Decision("new", old)
    if old is None:  # a checkpoint with no record of its config: resuming checks it against the model it loads into
        return Decision("same", None, [f"{run_dir} records no identity or config: resuming its checkpoint unchecked"])
    changed = diff(old.config, new.config)
    # keys the config gained since the run started (new options whose defaults keep the old behaviour) come with a
    # code change, which is checked below; they are noted, not held against the run
    gained = [k for k, a, _ in changed if a == ABSENT]
    changed = [c for c in changed if c[1] != ABSENT]
    extend = False
    if changed:
        only_steps = [k for k, _, _ in changed] == [EXTENDABLE]
        if only_steps and status == "finished" and _bigger(changed[0][2], changed[0][1]):
            extend = True
        else:
            raise IdentityError(_refusal(run_dir, changed, status))
    notes: list[str] = []
    finished_nothing_to_do = status in DURABLE_STATUSES and not extend
    if old.code and not finished_nothing_to_do:
        code_changes = []
        if old.code.get("source_hash") and old.code.get("source_hash") != new.code.get("source_hash"):
            code_changes.append(
                f"code {old.code.get('commit', '?')!s:.10} (sources {old.code['source_hash']}) -> "
                f"{new.code.get('commit') or '?'!s:.10} (sources {new.code.get('source_hash')})"
            )
        if old.numerics.get("torch") and old.numerics.get("torch") != new.numerics.get("torch"):
            code_changes.append(f"torch {old.numerics['torch']} -> {new.numerics.get('torch')}")
        if code_changes and not allow_code_change:
            raise IdentityError(
                f"{run_dir} holds a run of other code: {'; '.join(code_changes)}. Its steps so far and the rest would "
                f"come from different programs. Ways out: run it at the code it started with (git checkout "
                f"{old.code.get('commit') or 'its commit'}); trainer.resume=false to start it over here (the "
                f"current contents move to {run_dir}/archive/); or trainer.allow_code_change=true to continue under "
                f"the new code (recorded in {IDENTITY})"
            )
        notes += code_changes
    if old.numerics.get("cpu_capability") and old.numerics.get("cpu_capability") != new.numerics.get("cpu_capability"):
        notes.append(
            f"CPU capability {old.numerics['cpu_capability']} -> {new.numerics.get('cpu_capability')}: other float "
            f"kernels, so the steps from here are not bit-identical to an uninterrupted run on the first CPU"
        )
    if gained:
        notes.append(f"config keys added since the run started: {', '.join(gained[:20])}")
    if extend:
        (_, a, b) = changed[0]
        notes.append(f"extended: trainer.max_steps {a} -> {b}")
        return Decision("extend", old, notes)
    return Decision("same", old, notes)


def _bigger(new: Any, old: Any) -> bool:
    try:
        return int(new) > int(old)
    except (TypeError, ValueError):
        return False


def _refusal(run_dir: Path, changed: list[tuple[str, Any, Any]], status: str | None) -> str:
    shown = changed[:12]
    lines = ", ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, a, b in shown)
    more = f" (and {len(changed) - len(shown)} more)" if len(changed) > len(shown) else ""
    what = f"a run ({status})" if status else "a run with a checkpoint"
    extend_hint = (
        "; to continue a finished run for more steps change trainer.max_steps alone (to a larger value)"
        if status == "finished"
        else ""
    )
    return (
        f"{run_dir} holds {what} of another config; changed: {lines}{more}. A run directory holds one run, so this "
        f"start was refused and nothing in it was changed. Ways out: launch it in another directory (another "
        f"experiment_name, or hydra.run.dir=...); or trainer.resume=false to start over here (the current contents "
        f"move to {run_dir}/archive/){extend_hint}"
    )


def new_segment(decision: Decision, *, start_step: int, reason: str, ident: Identity) -> dict[str, Any]:
    return {
        "started": _now(),
        "action": decision.action,
        "start_step": start_step,
        "start": reason,
        "code": ident.code,
        "numerics": ident.numerics,
        "launch": os.environ.get("SDI_LAUNCH_ID"),
        "notes": decision.notes,
    }
