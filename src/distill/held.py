"""Held guidance targets: a protocol that forms a new target only every N optimiser steps (``trainer.target_every``).

The official 2D notebook (threestudio 2dplayground_SDI_version.ipynb) forms its target x0_hat every 25 Adam steps and
pulls the image towards it in between. This is a property of the training protocol, so it wraps any method:

    step % N == 0 (or nothing held yet):  out = method.step(...)             the method's own step; out is held
    otherwise:                             loss = method.held_loss(x0, held)  no model call, no random draw

``held_loss`` is the method's own loss against the held target: for SDS / SDI the notebook's
0.5 mse(x0, x0_hat) / B (or, with ``guidance.loss=threestudio``, the held gradient itself); for the other methods,
whose x0_hat is x0 - grad at the step that formed it, the same pull towards x0_hat with the method's
``loss_reduction`` (:meth:`distill.guidance.Guidance.held_loss`). So a held step runs none of the method's other work:
VSD / ESD's phi trains, HiFA's image-space term and a cached kappa's update happen on the recomputing steps only.
The trainer keeps the camera of a held target (``Trainer.cameras``): the target is an image of one view. The held
target is part of the guidance's checkpoint state, so a run resumed in the middle of a hold continues it exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.guidance import Guidance, GuidanceOutput
from distill.prompts import Conditioning

_HELD = ("t", "level", "x_t", "kappa", "eps_hat", "x0_hat")


class HeldTarget(Guidance):
    """``method`` with its target recomputed every ``every`` steps and held in between (module docstring)."""

    def __init__(self, method: Guidance, every: int):
        if every < 1:
            raise ValueError(f"trainer.target_every={every} must be >= 1 (1 = a new guidance target every step)")
        self.method, self.every = method, every
        self.needs_images = method.needs_images
        self.held: GuidanceOutput | None = None

    def step(
        self,
        x0: Tensor,
        cond: Conditioning,
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
        **extra,
    ) -> GuidanceOutput:
        held = self.held
        if held is not None and step % self.every != 0:
            loss = self.method.held_loss(x0, held)
            stats = {"t": held.t, "level": held.level, "grad_norm": float((x0.detach() - held.x0_hat).norm())}
            return GuidanceOutput(loss, held.t, held.level, held.x_t, held.kappa, held.eps_hat, held.x0_hat, 0, stats)
        out = self.method.step(x0, cond, step, max_steps, generator, **extra)
        self.held = GuidanceOutput(None, **{k: getattr(out, k) for k in _HELD}, model_calls=0)
        return out

    def state_dict(self) -> dict:
        state = self.method.state_dict()
        if self.held is not None:
            state["held"] = {k: getattr(self.held, k) for k in _HELD}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict({k: v for k, v in state.items() if k != "held"})
        held = state.get("held")
        self.held = GuidanceOutput(None, model_calls=0, **held) if held else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.method.trainable_parameters()

    def extra_prompts(self) -> dict[str, str]:
        return self.method.extra_prompts()

    def held_loss(self, x0: Tensor, held: GuidanceOutput) -> Tensor:
        return self.method.held_loss(x0, held)
