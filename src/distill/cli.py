"""What ``train.py`` does around ``train(cfg)``: resolvers, clear config errors, sweep safety."""

from __future__ import annotations

import logging
import sys
import traceback

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distill.config import ConfigError
from distill.launches import job_failed
from distill.priors.base import PriorError

log = logging.getLogger("distill")


def run_name(override_dirname: str) -> str:
    """Directory name of a run from its overrides ('default' when there are none)."""
    name = override_dirname.replace("/", "_").replace(" ", "_").replace("'", "").replace('"', "")
    return name or "default"


def prompt_from_list(name: str, index: int) -> str:
    """Line ``index`` of ``sweeps/prompts/<name>.txt`` (sweeps over a benchmark's prompts)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "sweeps" / "prompts" / f"{name}.txt"
    if not path.exists():
        raise ValueError(f"prompt list {name!r} not found: expected {path}")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not 0 <= int(index) < len(prompts):
        raise ValueError(
            f"prompt_id={index} is out of range for {name} ({len(prompts)} prompts: 0..{len(prompts) - 1})"
        )
    return prompts[int(index)]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("prompt_list"):
        OmegaConf.register_new_resolver("prompt_list", prompt_from_list)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/train.yaml composed with ``overrides`` outside a Hydra app (scripts, benchmarks, tests)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    register_resolvers()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_job(cfg: DictConfig) -> float | None:
    """Run one job. Bad config / bad input / a refused start: one clear message and exit code 2 (a failed start is
    recorded in the run's metrics.json). In a sweep, a job that fails is recorded in its metrics.json and the sweep
    goes on. A signal (Ctrl-C, SIGTERM) stops at a step boundary: one line, exit code 128 + signal, in a sweep too."""
    from distill.interrupts import Interrupted
    from distill.rundir import CheckpointError
    from distill.train import train

    try:
        metrics = train(cfg)
    except (ConfigError, PriorError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        if _in_multirun():
            job_failed(str(e), 2)  # for the launch's record: a refused start leaves the directory's old metrics
            return None
        sys.exit(2)
    except Interrupted as e:
        print(f"{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"interrupted before training started ({cfg.paths.run_dir}): nothing to resume yet", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not _in_multirun():
            raise
        log.error("job failed (recorded in its metrics.json); the sweep continues:\n%s", traceback.format_exc())
        job_failed(f"{type(e).__name__}: {e}", 1)
        return None
    if metrics.get("nothing_to_do"):
        return metrics.get("loss")
    log.info(
        "status=%s steps=%s seconds=%.1f -> %s",
        metrics.get("status"),
        metrics.get("steps"),
        metrics.get("seconds", 0.0),
        cfg.paths.run_dir,
    )
    return metrics.get("loss")
