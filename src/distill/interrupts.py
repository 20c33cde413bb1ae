"""Stopping a run at a step boundary: Ctrl-C, SIGTERM and SLURM's / submitit's signals.

A signal that lands in the middle of a step (after the optimiser update, before the step counter moves) leaves a
state that is neither step k nor step k + 1; a checkpoint of it makes the resumed run repeat a step, so it is no
longer the uninterrupted run. :class:`StopAtStepBoundary` therefore only *records* SIGINT, SIGTERM, SIGUSR1 and
SIGUSR2 while the training loop runs; the loop asks :attr:`StopAtStepBoundary.requested` before every step and, when
set, checkpoints the state at that boundary and stops (:class:`Interrupted`, exit code 128 + signal: 130 for
Ctrl-C, 143 for SIGTERM). The resumed run then equals the uninterrupted one bit for bit on one CPU.

A second Ctrl-C stops at once (KeyboardInterrupt); the run then resumes from its last checkpoint.

A handler that someone else installed before the loop (submitit's USR2 "checkpoint and requeue", its SIGTERM
"bypass") is called at the boundary, after the checkpoint is written, so a requeued job resumes from exactly there.
Signals can only be caught in the main thread; elsewhere the loop runs without this (and a signal acts as usual).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

SIGNALS = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)) if s
)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(Exception):
    """The run stopped on a signal; its checkpoint holds the state at the start of step ``step``."""

    def __init__(self, signum: int, step: int, message: str):
        super().__init__(message)
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class StopAtStepBoundary:
    """Context manager that turns the signals in :data:`SIGNALS` into a request the loop reads between steps."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.active = False

    def __enter__(self) -> StopAtStepBoundary:
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.signals:
            self.previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            for s, h in self.previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            self.active = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now, not at the boundary
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def clear(self) -> None:
        self.signum = None

    def foreign_handler(self, signum: int) -> Callable[[int, Any], Any] | None:
        """The Python handler installed before the loop for ``signum`` (submitit's), or None for the defaults."""
        h = self.previous.get(signum)
        if callable(h) and h is not signal.default_int_handler:
            return h
        return None
