"""Hydra callbacks: every multirun records its launch (``LaunchCallback``, ``distill.launches``) and every sweep
ends in an evaluation table, its figure and its report of that launch's runs (``SweepEvalCallback``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class LaunchCallback(Callback):
    """Records each ``python train.py -m ...`` as a launch of its sweep directory (``distill.launches``):
    ``launches/<id>/manifest.json`` and one ``jobs/<num>.json`` per job, written by the job's own process (basic,
    submitit_local and SLURM launchers alike). Registered for every multirun in conf/train.yaml.

    A sweep of 0 jobs stops before anything is written, and a launch whose every job failed exits non-zero,
    each with one message on stderr (exit code 2, or 1 when some job crashed rather than rejected its input).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from distill import launches

        try:
            launch_dir = launches.begin(config)
        except launches.EmptyLaunch as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes Hydra's callback guard: the sweeper never starts
        log.info("launch %s: %s", launch_dir.name, launch_dir / launches.MANIFEST)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from distill import launches

        launches.job_started(config)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from distill import launches

        launches.job_ended(config, job_return)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from distill import launches

        manifest = launches.finish(config)
        if manifest is None:
            return
        bad = launches.outcome(manifest)
        if bad is not None:
            code, message = bad
            print(f"error: {message}", file=sys.stderr)
            sys.exit(code)


class SweepEvalCallback(Callback):
    """After a multirun, run ``python -m eval <command> <sweep dir> <args...>``, then ``figure`` and ``report``.

    ``command`` is ``table`` for priors with ground-truth metrics (no model needed) or ``all``
    (render + CLIP score + table) when a CLIP model is available. ``figure`` writes
    ``<sweep>/eval/figure.png|pdf|json`` (logged to W&B when the sweep's logger is wandb), ``report``
    ``<sweep>/eval/report.html``; ``figure_args`` / ``report_args`` are passed to them. Each covers the runs of
    this launch only (``--launch <id>``, see ``LaunchCallback``); a launch without jobs is not evaluated. A
    failure here is logged; it never turns a finished sweep into a failed one.
    """

    def __init__(
        self,
        command: str = "table",
        args: list[str] | None = None,
        enabled: bool = True,
        figure: bool = True,
        report: bool = True,
        figure_args: list[str] | None = None,
        report_args: list[str] | None = None,
    ):
        self.command, self.args, self.enabled = command, list(args or []), enabled
        self.figure, self.report = figure, report
        self.figure_args, self.report_args = list(figure_args or []), list(report_args or [])

    def commands(self, config: DictConfig, launch_id: str | None = None) -> list[list[str]]:
        """The ``python -m eval`` argument lists run at the end of the sweep, in order (``--launch launch_id``)."""
        sweep_dir = str(Path(config.hydra.sweep.dir))
        launch = ["--launch", launch_id] if launch_id else []
        out = [[self.command, sweep_dir, *launch, *self.args]]
        if self.figure and not self.report:
            out.append(["figure", sweep_dir, *launch, *self.figure_args, *self._wandb(config)])
        if self.report:  # the report writes the figure too; log it to W&B afterwards from the cached views
            out.append(["report", sweep_dir, *launch, *self.report_args])
            if self.figure and self._wandb(config):
                out.append(["figure", sweep_dir, *launch, *self.figure_args, *self._wandb(config)])
        return out

    @staticmethod
    def _wandb(config: DictConfig) -> list[str]:
        target = str(OmegaConf.select(config, "logger._target_", default="") or "")
        if "wandb" not in target.lower():
            return []
        project = OmegaConf.select(config, "logger.project", default=None)
        entity = OmegaConf.select(config, "logger.entity", default=None)
        return (
            ["--wandb"]
            + (["--wandb-project", str(project)] if project else [])
            + (["--wandb-entity", str(entity)] if entity else [])
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from distill import launches
        from eval.__main__ import main as eval_main

        manifest = launches.finish(config)  # this callback ends before LaunchCallback's (Hydra reverses the order)
        if manifest is not None and not manifest.get("jobs"):
            log.warning("launch %s ran no job; the sweep's evaluation is left as it was", manifest.get("launch_id"))
            return
        launch_id = str(manifest["launch_id"]) if manifest else None
        if manifest is None and (Path(config.hydra.sweep.dir) / launches.LAUNCHES_DIR).is_dir():
            log.warning("this launch was not recorded (see the warnings above); evaluating every launch pooled")
            launch_id = "all"
        for argv in self.commands(config, launch_id):
            log.info("sweep finished; evaluating: python -m eval %s", " ".join(argv))
            try:
                code = eval_main(argv)
            except Exception as e:  # noqa: BLE001 - the sweep's runs are done and recorded already
                log.error("python -m eval %s failed: %s (rerun it by hand)", " ".join(argv), e)
                continue
            if code:
                log.warning("python -m eval %s exited with %s", " ".join(argv), code)
