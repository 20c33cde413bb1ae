"""Logger contract used by the trainer (and the evaluator's tables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class Logger:
    """No-op logger (``logger=none``); subclasses override what they record."""

    @dataclass
    class Config:
        pass

    def __init__(
        self, cfg: Any = None, run_dir: Path | None = None, run_config: dict | None = None, run_name: str = "run"
    ):
        self.cfg, self.run_dir, self.run_config, self.run_name = cfg, run_dir, run_config or {}, run_name

    def rewind(self, step: int) -> None:
        """The run (re)starts at ``step``: forget what an earlier attempt logged at ``step`` or later (it was killed
        after its last checkpoint, and those steps are taken again)."""

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def log_image(self, name: str, image: np.ndarray | Path, step: int) -> None:
        pass

    def log_video(self, name: str, path: Path, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
