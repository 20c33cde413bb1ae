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
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return obj


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

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"trainer.max_steps={self.max_steps} must be >= 0")
        for k in ("checkpoint_every", "log_every", "image_every"):
            if getattr(self, k) < 0:
                raise ValueError(f"trainer.{k}={getattr(self, k)} must be >= 0 (0 disables)")


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | sgd
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    momentum: float = 0.0

    def validate(self) -> None:
        if self.name not in ("adam", "sgd"):
            raise ValueError(f"optimizer.name={self.name!r} is unknown; allowed: adam, sgd")
