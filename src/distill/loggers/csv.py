"""CSV logger: scalars as long-format rows (step, name, value) in ``<run>/scalars.csv``.

Appends, so a resumed run continues the same file; rows an earlier attempt logged after its last checkpoint are
dropped when the run resumes from that checkpoint (``rewind``), so every step appears once.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.loggers.base import Logger


class CSVLogger(Logger):
    @dataclass
    class Config:
        filename: str = "scalars.csv"

    def __init__(self, cfg: CSVLogger.Config, run_dir: Path, run_config: dict | None = None, run_name: str = "run"):
        super().__init__(cfg, run_dir, run_config, run_name)
        self.path = Path(run_dir) / cfg.filename
        new = not self.path.exists()
        self._fh = open(self.path, "a", newline="")
        self._w = csv.writer(self._fh)
        if new:
            self._w.writerow(["step", "name", "value"])

    def rewind(self, step: int) -> None:
        self._fh.flush()
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        keep = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) < step]
        if len(keep) == len(rows):
            return
        self._fh.close()
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)
        tmp.replace(self.path)
        self._fh = open(self.path, "a", newline="")
        self._w = csv.writer(self._fh)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self._w.writerow([step, k, float(v)])
        self._fh.flush()

    def summary(self, metrics: dict[str, Any]) -> None:
        (Path(self.run_dir) / "summary.json").write_text(json.dumps(metrics, indent=2, default=str))

    def finish(self, exit_code: int = 0) -> None:
        if not self._fh.closed:
            self._fh.close()
