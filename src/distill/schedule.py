"""Time (noise-level) schedules for score distillation.

uniform (SDS):  t ~ U{int(T t_min), ..., int(T t_max)}
anneal  (SDI):  t = int(T * (t_min + (t_max - t_min) * (1 - step / max_steps)))
The anneal is tied to the trainer's own ``max_steps`` (the official code keeps a separate copy,
``trainer_max_steps``, that silently disagrees when only one is changed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TimeScheduleConfig:
    name: str = "uniform"  # uniform | anneal
    t_min: float = 0.02
    t_max: float = 0.98

    def validate(self) -> None:
        if self.name not in ("uniform", "anneal"):
            raise ValueError(f"schedule.name={self.name!r} is unknown; allowed: uniform, anneal")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(
                f"schedule.t_min={self.t_min}, schedule.t_max={self.t_max}: need 0 <= t_min < t_max <= 1 "
                f"(fractions of the {1000}-step diffusion schedule)"
            )


class TimeSchedule:
    def __init__(self, cfg: TimeScheduleConfig, num_train_timesteps: int = 1000):
        cfg.validate()
        self.cfg, self.T = cfg, num_train_timesteps

    def __call__(self, step: int, max_steps: int, generator: torch.Generator | None = None) -> int:
        lo, hi = int(self.T * self.cfg.t_min), int(self.T * self.cfg.t_max)
        if self.cfg.name == "uniform":
            return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
        frac = min(max(step / max(max_steps, 1), 0.0), 1.0)
        return int(self.T * (self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * (1.0 - frac)))
