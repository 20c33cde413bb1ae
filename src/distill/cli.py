"""What ``train.py`` does around ``train(cfg)``: resolvers, clear config errors, sweep safety."""

from __future__ import annotations

import logging
import sys
import traceback

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distill.config import ConfigError
from distill.priors.base import PriorError

log = logging.getLogger("distill")


def run_name(override_dirname: str) -> str:
    """Directory name of a run from its overrides ('default' when there are none)."""
    name = override_dirname.replace("/", "_").replace(" ", "_")
    return name or "default"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_job(cfg: DictConfig) -> float | None:
    """Run one job. Bad config / bad input: one clear message and exit code 2. In a sweep, a job
    that fails is recorded in its metrics.json and the sweep goes on."""
    from distill.train import train

    try:
        metrics = train(cfg)
    except (ConfigError, PriorError) as e:
        print(f"error: {e}", file=sys.stderr)
        if _in_multirun():
            return None
        sys.exit(2)
    except Exception:
        if not _in_multirun():
            raise
        log.error("job failed (recorded in its metrics.json); the sweep continues:\n%s", traceback.format_exc())
        return None
    log.info("status=%s steps=%s seconds=%.1f -> %s", metrics.get("status"), metrics.get("steps"),
             metrics.get("seconds", 0.0), cfg.paths.run_dir)
    return metrics.get("loss")
