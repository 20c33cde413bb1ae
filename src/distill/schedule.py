"""Time (noise-level) schedules for score distillation.

    uniform      (SDS):   t ~ U{int(T t_min), ..., int(T t_max)}
    anneal       (SDI):   t = int(T * (t_min + (t_max - t_min) * (1 - step / max_steps)))
    step         (VSD):   t ~ U{int(T t_min), ..., int(T t_max)} up to step ``milestone``, then
                          t ~ U{int(T t_min), ..., int(T t_max_after)} from step milestone + 1: threestudio's
                          [5000, 0.98, 0.5, 5001] ramps linearly from 0.98 at step 5000 to 0.5 at step 5001
    sqrt_anneal  (HiFA):  t = int(T * (t_min + (t_max - t_min) * (1 - sqrt(step / max_steps))))   (deterministic)
    warmup       (ISM):   t ~ U{int(T t_min), ..., int(T t_max) + int(int(T (t_max_start - t_max)) warm) - 1},
                          warm = 1 - min(step / W, 1),  W = int(warmup * max_steps)   (LucidDreamer: the upper
                          bound falls 0.98 -> 0.5 over its 1500-iteration warm-up of 5000, then t ~ U{20..499};
                          the upper end is exclusive as in the official ``torch.randint``). ``warm`` is also what
                          ISM anneals its interval delta with (:meth:`TimeSchedule.warm`).
The anneals are tied to the trainer's own ``max_steps`` (the official code keeps a separate copy,
``trainer_max_steps``, that silently disagrees when only one is changed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("uniform", "anneal", "step", "sqrt_anneal", "warmup")


@dataclass
class TimeScheduleConfig:
    name: str = "uniform"  # uniform | anneal | step | sqrt_anneal | warmup
    t_min: float = 0.02
    t_max: float = 0.98
    milestone: int = 0  # step: the last optimiser step at t_max; t_max_after from milestone + 1 (reference)
    t_max_after: float = 0.5  # step: the upper end of the t range after the milestone
    horizon: int = 0  # anneals: the step count they span (0 = trainer.max_steps; the 2D notebook: 1000 of 1001)
    warmup: float = 0.3  # warmup: the warm-up's length as a fraction of the horizon (LucidDreamer: 1500 of 5000)
    t_max_start: float = 0.98  # warmup: the upper end of the t range at step 0 (LucidDreamer's max_t_range)

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name={self.name!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(
                f"schedule.t_min={self.t_min}, schedule.t_max={self.t_max}: need 0 <= t_min < t_max <= 1 "
                f"(fractions of the {1000}-step diffusion schedule)"
            )
        if self.horizon < 0:
            raise ValueError(f"schedule.horizon={self.horizon} must be >= 0 (0 = trainer.max_steps)")
        if self.name == "warmup":
            if not 0.0 <= self.warmup <= 1.0:
                raise ValueError(f"schedule.warmup={self.warmup} must be in [0, 1] (a fraction of trainer.max_steps)")
            if not self.t_max <= self.t_max_start <= 1.0:
                raise ValueError(
                    f"schedule.t_max_start={self.t_max_start}: need t_max={self.t_max} <= t_max_start <= 1"
                )
        if self.name == "step":
            if self.milestone < 0:
                raise ValueError(f"schedule.milestone={self.milestone} must be >= 0")
            if not self.t_min < self.t_max_after <= 1.0:
                raise ValueError(f"schedule.t_max_after={self.t_max_after}: need t_min={self.t_min} < t_max_after <= 1")


class TimeSchedule:
    def __init__(self, cfg: TimeScheduleConfig, num_train_timesteps: int = 1000):
        cfg.validate()
        self.cfg, self.T = cfg, num_train_timesteps

    def warm(self, step: int, max_steps: int) -> float:
        """The share of the warm-up still ahead, 1 - min(step / W, 1) (LucidDreamer's ``warm_up_rate``); 0 for the
        schedules without a warm-up and after it."""
        c = self.cfg
        if c.name != "warmup":
            return 0.0
        length = int(c.warmup * (c.horizon or max_steps))
        return 1.0 - min(step / length, 1.0) if length > 0 else 0.0

    def __call__(self, step: int, max_steps: int, generator: torch.Generator | None = None) -> int:
        c = self.cfg
        if c.name == "warmup":  # the official expression, integer for integer
            lo, hi = int(self.T * c.t_min), int(self.T * c.t_max)
            extra = int(int(self.T * (c.t_max_start - c.t_max)) * self.warm(step, max_steps))
            return int(torch.randint(lo, hi + extra, (1,), generator=generator).item())
        if c.name in ("uniform", "step"):
            hi_frac = c.t_max_after if (c.name == "step" and step > c.milestone) else c.t_max
            lo, hi = int(self.T * c.t_min), int(self.T * hi_frac)
            return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
        frac = min(max(step / max(c.horizon or max_steps, 1), 0.0), 1.0)
        if c.name == "sqrt_anneal":  # threestudio's order of operations, so the integer t agrees with it
            return int(self.T * ((c.t_max - c.t_min) * (1.0 - math.sqrt(frac)) + c.t_min))
        return int(self.T * (c.t_min + (c.t_max - c.t_min) * (1.0 - frac)))
