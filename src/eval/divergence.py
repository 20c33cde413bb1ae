"""What counts as diverged, and the state of a run for the table.

The paper's "Diverged %" counts runs that ran out of memory, produced NaNs, or ended with an empty
volume. The trainer records the first two in ``metrics.json`` (``status: diverged`` or
``diverged: true`` with ``diverged_reason`` "nan" / "oom"); the third is measured by ``render``
from the rendered opacity and stored in ``eval/render.json``:

    a view is empty   when its mean opacity < ``opacity_threshold`` (default 0.01)
    a volume is empty when more than ``fraction`` (default 0.5) of the views are empty

Renders containing NaN/Inf also mark the run diverged ("nan").

Run states used by ``table``:

    finished  trained to the end, not diverged            -> quality columns, time, memory
    diverged  nan / oom / empty volume                    -> counted in Div.%
    running   metrics.json says running (half-finished)    -> listed, not counted
    interrupted  stopped by a signal (status interrupted)  -> listed with the signal and step, not counted
    missing   config.yaml but no metrics.json              -> listed, not counted
    failed    crashed or refused its input (status failed) -> listed with the reason, not counted
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EMPTY_OPACITY_THRESHOLD = 0.01
EMPTY_VIEW_FRACTION = 0.5
DIVERGED_REASONS = ("nan", "oom", "empty")
STATES = ("finished", "diverged", "running", "interrupted", "missing", "failed")


def empty_views(mean_opacity: Sequence[float], opacity_threshold: float = EMPTY_OPACITY_THRESHOLD) -> list[bool]:
    return [not (float(o) >= opacity_threshold) for o in mean_opacity]  # NaN opacity counts as empty


def is_empty_volume(
    mean_opacity: Sequence[float] | None,
    opacity_threshold: float = EMPTY_OPACITY_THRESHOLD,
    fraction: float = EMPTY_VIEW_FRACTION,
) -> bool:
    """True when more than ``fraction`` of the views have mean opacity below ``opacity_threshold``.

    ``None`` or an empty list (a scene without opacity, e.g. the 2D image scene) is never empty.
    """
    if not mean_opacity:
        return False
    flags = empty_views(mean_opacity, opacity_threshold)
    return sum(flags) > fraction * len(flags)


@dataclass(frozen=True)
class RunState:
    state: str  # one of STATES
    reason: str | None = None  # diverged: nan | oom | empty | unspecified; failed/missing: why

    @property
    def diverged(self) -> bool:
        return self.state == "diverged"


def failure_reason(metrics: dict[str, Any]) -> str:
    """One line: metrics.json ``reason`` (or the last line of ``error``), with the exit code and stage if given."""
    text = metrics.get("reason") or metrics.get("error")
    line = str(text).strip().splitlines()[-1] if text and str(text).strip() else "status failed, no reason recorded"
    extra = [f"{k} {metrics[k]}" for k in ("stage", "exit_code") if metrics.get(k) not in (None, "")]
    return f"{line} ({', '.join(extra).replace('exit_code', 'exit code')})" if extra else line


def classify(
    metrics: dict[str, Any] | None, render: dict[str, Any] | None = None, metrics_error: str | None = None
) -> RunState:
    """The state of a run from its metrics.json (trainer) and eval/render.json (renderer)."""
    if metrics is None:
        if metrics_error:
            return RunState("failed", metrics_error)
        return RunState("missing", "no metrics.json")
    status = metrics.get("status")
    reason = metrics.get("diverged_reason")
    if status == "diverged" or metrics.get("diverged") is True:
        return RunState("diverged", str(reason) if reason else "unspecified")
    if status == "failed":
        if reason in ("nan", "oom"):
            return RunState("diverged", reason)
        return RunState("failed", failure_reason(metrics))
    if status == "interrupted":
        steps, sig = metrics.get("steps"), metrics.get("signal")
        where = f"at step {steps}" + (f"/{metrics['max_steps']}" if metrics.get("max_steps") is not None else "")
        return RunState("interrupted", f"{sig or 'signal'} {where}" if steps is not None else str(sig or "signal"))
    if status == "running":
        steps, max_steps = metrics.get("steps"), metrics.get("max_steps")
        where = f"step {steps}/{max_steps}" if steps is not None else None
        return RunState("running", where)
    if status != "finished":
        return RunState("failed", f"unknown status {status!r} in metrics.json")
    if render:
        if render.get("nan_views"):
            return RunState("diverged", "nan")
        if render.get("empty"):
            return RunState("diverged", "empty")
    return RunState("finished")
