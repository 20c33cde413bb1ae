"""Typed views of the Hydra config, built and checked before any compute.

Each component carries a small dataclass (``Cls.Config``); its YAML node names the class with
``_target_`` and holds the fields. ``typed(node, schema)`` merges the node into the dataclass
(so an unknown key or a wrong type fails with the key named) and runs ``validate()`` when the
dataclass has one. ``check_run_config`` does this for the whole run: a bad config stops before a
prior or a scene is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad value in the run configuration; the message names the key and what is allowed."""


def _fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def as_dataclass(node: Any, schema: type[T]) -> T:
    """A component's own config from None (the defaults), an instance of ``schema``, or a dict / DictConfig node
    (``_target_`` dropped), validated by ``schema.validate()``: what a scene's constructor accepts when it is built
    from Python or by Hydra's ``_target_``. ``typed`` is the checked path the trainer runs first, with errors that
    name the key."""
    if node is None:
        cfg = schema()
    elif isinstance(node, schema):
        cfg = node
    else:
        node = OmegaConf.create(node) if isinstance(node, dict) else node
        node = OmegaConf.masked_copy(node, [k for k in node.keys() if k != "_target_"]) if "_target_" in node else node
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    cfg.validate()
    return cfg


def typed(node: Any, schema: type[T], where: str) -> T:
    """Merge a config node into a dataclass schema; errors name ``where.key`` and the fix."""
    if node is None:
        node = {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = {k: v for k, v in dict(node).items() if k != "_target_"}
    allowed = _fields(schema)
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key; allowed keys of {where}: {', '.join(allowed)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}.{key}: {msg}" if key else f"{where}: {msg}") from None
    check_numbers(obj, where)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return obj


def _is_rate(name: str) -> bool:
    return name == "lr" or name.endswith("_lr") or name == "learning_rate"


def check_numbers(value: Any, where: str, name: str = "") -> None:
    """Every float of a typed config must be finite (nan / inf are never a setting: a CFG scale, a weight, a
    threshold of inf or nan only surfaces as a diverged run later), and learning rates (``lr``, ``*_lr``) must be
    > 0. Walks dataclasses, dicts, lists and tuples; raises ConfigError naming the key."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_numbers(getattr(value, f.name), f"{where}.{f.name}", f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_numbers(v, f"{where}.{k}", str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_numbers(v, f"{where}[{i}]", name)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}={value}: must be a finite number")
    if _is_rate(name) and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise ConfigError(f"{where}={value}: a learning rate must be > 0")


def _conf_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "conf"


def _group_options(group: str) -> dict[str, dict]:
    """option name -> its YAML (as a plain dict) for one config group of conf/."""
    raw = {}
    folder = _conf_dir() / group
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            raw[path.stem] = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        except Exception:  # noqa: BLE001 - a hint must never hide the real error
            continue
    options = {}
    for name, option in raw.items():  # an option that extends another of its group (defaults: [nerf]) inherits it
        bases = [d for d in option.get("defaults", []) if isinstance(d, str) and d in raw]
        merged = OmegaConf.merge(*(raw[b] for b in bases), {k: v for k, v in option.items() if k != "defaults"})
        options[name] = OmegaConf.to_container(merged, resolve=False) | {"defaults": option.get("defaults", [])}
    return options


def base_options(group: str) -> list[str]:
    """The options of a conf/ group that extend no other option of it: for ``guidance`` the methods, without the
    per-method variants (``sds_x0``, ``sds_notebook``, ...) whose defaults list names the option they extend."""
    options = _group_options(group)
    return [n for n, o in options.items() if not any(isinstance(d, str) and d in options for d in o["defaults"])]


def _target_of(option: dict, group: str) -> str | None:
    node = option.get(group, option) if isinstance(option.get(group), dict) else option
    return node.get("_target_") if isinstance(node, dict) else None


def explain_group_conflict(cfg: Any, key: str) -> str:
    """A hint for an unknown key that another config group put there (``scene.shading`` set by ``prior=analytic3d``
    while ``scene=image`` does not have it): names both groups and the fix. Returns "" when no group explains it."""
    group, _, field = key.partition(".")
    field = field.split(".")[0]
    if not field or group not in ("scene", "prior", "camera", "logger"):
        return ""
    node = cfg.get(group) if cfg is not None else None
    target = node.get("_target_") if node is not None else None
    here = [n for n, o in _group_options(group).items() if _target_of(o, group) == target] or ["?"]
    accepting = [n for n, o in _group_options(group).items() if _accepts(o, group, field)]
    for other in ("prior", "scene", "guidance", "camera"):
        if other == group or cfg.get(other) is None:
            continue
        other_target = cfg[other].get("_target_")
        for name, option in _group_options(other).items():
            sets = option.get(group) if isinstance(option.get(group), dict) else {}
            if field in sets and _target_of(option, other) == other_target:
                two_d = [
                    n
                    for n, o in _group_options("experiment").items()
                    if any(isinstance(d, dict) and d.get(f"override /{group}") in here for d in o.get("defaults", []))
                ]
                fix = f"with {other}={name} use " + " or ".join(f"{group}={a}" for a in accepting) if accepting else ""
                if two_d:
                    two_d.sort(key=len)  # the plainest preset first
                    fix += f"; for a {group}={here[0]} run use " + " or ".join(f"experiment={e}" for e in two_d)
                    fix += f", which picks a {other} that fits it"
                return (
                    f" -- {group}.{field} is set by {other}={name} (conf/{other}/{name}.yaml), and {group}={here[0]} "
                    f"has no such key: {other}={name} and {group}={here[0]} do not fit together ({fix})"
                )
    return ""


def _accepts(option: dict, group: str, field: str) -> bool:
    target = _target_of(option, group)
    if not target:
        return False
    try:
        schema = getattr(get_class(target), "Config", None)
    except Exception:  # noqa: BLE001
        return False
    return schema is not None and dataclasses.is_dataclass(schema) and field in _fields(schema)


def component_class(node: Any, where: str) -> type:
    target = node.get("_target_") if node is not None else None
    if not target:
        raise ConfigError(f"{where}._target_ is missing: the config node must name its class")
    try:
        return get_class(target)
    except Exception as e:  # noqa: BLE001 - import errors of optional backends surface here
        raise ConfigError(f"{where}._target_={target!r} cannot be imported: {e}") from None


def component_config(node: Any, where: str) -> tuple[type, Any]:
    cls = component_class(node, where)
    schema = getattr(cls, "Config", None)
    if schema is None or not dataclasses.is_dataclass(schema):
        raise ConfigError(f"{where}._target_={cls.__qualname__} has no dataclass Config")
    return cls, typed(node, schema, where)


def build(node: Any, where: str, **kwargs: Any) -> Any:
    """Instantiate ``node._target_`` with its typed Config (plus the kwargs its constructor takes)."""
    cls, cfg = component_config(node, where)
    params = inspect.signature(cls.__init__).parameters
    accepted = {k: v for k, v in kwargs.items() if k in params}
    return cls(cfg, **accepted)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    checkpoint_every: int = 200
    log_every: int = 10
    image_every: int = 100
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = True
    export: bool = True  # turntable video / mesh at the end (3D scenes)
    eval_views: int = 8  # held-out views for ground-truth metrics (analytic priors)
    progress: bool = True
    threads: int = 0  # torch CPU threads (0 = torch's default)
    allow_code_change: bool = False  # resume / extend a run under other code or torch (distill.identity)
    # hold each guidance target for N optimiser steps, on one camera (official 2D notebook: 25; distill.held)
    target_every: int = 1

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"trainer.max_steps={self.max_steps} must be >= 0")
        if self.target_every < 1:
            raise ValueError(
                f"trainer.target_every={self.target_every} must be >= 1 (1 = a new guidance target every step)"
            )
        for k in ("checkpoint_every", "log_every", "image_every"):
            if getattr(self, k) < 0:
                raise ValueError(f"trainer.{k}={getattr(self, k)} must be >= 0 (0 disables)")


@dataclass
class OptimizerConfig:
    """The scene's optimiser. Per-group lr / betas / eps come from the scene (``scene.optim``).
    adamw: decoupled weight decay ``weight_decay`` (prolificdreamer.yaml's AdamW keeps torch's default 0.01)."""

    name: str = "adam"  # adam | adamw | sgd
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    momentum: float = 0.0
    weight_decay: float = 0.0  # adamw only

    def validate(self) -> None:
        if self.name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer.name={self.name!r} is unknown; allowed: adam, adamw, sgd")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if self.weight_decay != 0 and self.name != "adamw":
            raise ValueError(
                f"optimizer.weight_decay={self.weight_decay} with optimizer.name={self.name!r}: weight decay is "
                "AdamW's (decoupled); use optimizer.name=adamw or weight_decay=0"
            )
