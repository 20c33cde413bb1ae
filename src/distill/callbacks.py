"""Hydra callbacks: every sweep ends in an evaluation table (``python -m eval``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepEvalCallback(Callback):
    """After a multirun, run ``python -m eval <command> <sweep dir> <args...>``.

    ``command`` is ``table`` for priors with ground-truth metrics (no model needed) or ``all``
    (render + CLIP score + table) when a CLIP model is available. A failure here is logged; it
    never turns a finished sweep into a failed one.
    """

    def __init__(self, command: str = "table", args: list[str] | None = None, enabled: bool = True):
        self.command, self.args, self.enabled = command, list(args or []), enabled

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        from eval.__main__ import main as eval_main

        argv = [self.command, str(sweep_dir), *self.args]
        log.info("sweep finished; evaluating: python -m eval %s", " ".join(argv))
        try:
            code = eval_main(argv)
        except Exception as e:  # noqa: BLE001 - the sweep's runs are done and recorded already
            log.error("evaluation of %s failed: %s (rerun: python -m eval %s)", sweep_dir, e, " ".join(argv))
            return
        if code:
            log.warning("python -m eval %s exited with %s", " ".join(argv), code)
