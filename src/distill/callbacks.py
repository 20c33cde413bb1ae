"""Hydra callbacks: every sweep ends in an evaluation table, its figure and its report (``python -m eval``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class SweepEvalCallback(Callback):
    """After a multirun, run ``python -m eval <command> <sweep dir> <args...>``, then ``figure`` and ``report``.

    ``command`` is ``table`` for priors with ground-truth metrics (no model needed) or ``all``
    (render + CLIP score + table) when a CLIP model is available. ``figure`` writes
    ``<sweep>/eval/figure.png|pdf|json`` (logged to W&B when the sweep's logger is wandb), ``report``
    ``<sweep>/eval/report.html``; ``figure_args`` / ``report_args`` are passed to them. A failure here is
    logged; it never turns a finished sweep into a failed one.
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

    def commands(self, config: DictConfig) -> list[list[str]]:
        """The ``python -m eval`` argument lists run at the end of the sweep, in order."""
        sweep_dir = str(Path(config.hydra.sweep.dir))
        out = [[self.command, sweep_dir, *self.args]]
        if self.figure and not self.report:
            out.append(["figure", sweep_dir, *self.figure_args, *self._wandb(config)])
        if self.report:  # the report writes the figure too; log it to W&B afterwards from the cached views
            out.append(["report", sweep_dir, *self.report_args])
            if self.figure and self._wandb(config):
                out.append(["figure", sweep_dir, *self.figure_args, *self._wandb(config)])
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
        from eval.__main__ import main as eval_main

        for argv in self.commands(config):
            log.info("sweep finished; evaluating: python -m eval %s", " ".join(argv))
            try:
                code = eval_main(argv)
            except Exception as e:  # noqa: BLE001 - the sweep's runs are done and recorded already
                log.error("python -m eval %s failed: %s (rerun it by hand)", " ".join(argv), e)
                continue
            if code:
                log.warning("python -m eval %s exited with %s", " ".join(argv), code)
