"""The 2D scene: the optimised parameter is the image itself (paper Fig. 2.1).

render() returns the image in [0, 1]; cameras are ignored. Adam (the default, as for the 3D
scenes) is invariant to the loss scale; with SGD and ``guidance.loss_reduction=sum`` a step moves
the image by lr * d x0/d g * (x0_hat - x0), so lr = 1 / (d x0/d g)^2 jumps straight to x0_hat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ImageSceneConfig:
    height: int = 32
    width: int = 32
    init: str = "gray"  # gray | noise | x0_hat (the trainer sets x0_hat(x_T), x_T ~ N(0, I): the 2D notebook)
    lr: float = 0.01

    def validate(self) -> None:
        if self.init not in ("gray", "noise", "x0_hat"):
            raise ValueError(f"scene.init={self.init!r} is unknown; allowed: gray, noise, x0_hat")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"scene.height/width must be positive, got {self.height}x{self.width}")


class ImageScene(nn.Module):
    Config = ImageSceneConfig

    def __init__(self, cfg: ImageSceneConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        init = torch.full((1, 3, cfg.height, cfg.width), 0.5)
        if cfg.init == "noise":
            init = torch.rand((1, 3, cfg.height, cfg.width))
        self.image = nn.Parameter(init)

    def render(
        self, cameras=None, generator: torch.Generator | None = None, shading: str | None = None
    ) -> dict[str, Tensor]:
        return {"rgb": self.image}

    def update_step(self, step: int, max_steps: int) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return [{"params": [self.image], "lr": self.cfg.lr, "name": "image"}]

    def regularisers(self, out: dict, step: int) -> dict[str, Tensor]:
        return {}
