"""What the noise-replacing baselines (CSD, NFSD, HiFA) share: a noised render at a scheduled t.

    t ~ schedule(step);  eps ~ N(0, I);  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps      (paper eq. 3.1)
Each method then forms a gradient  grad = w(t) * delta  in x0 space from eps branches and returns
``gradient_loss(x0, grad)``, whose derivative w.r.t. x0 is grad / B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.ddim import add_noise
from distill.guidance import WEIGHTINGS, GuidanceOutput, gradient_loss
from distill.kappa import _randn


@dataclass
class NoisedRender:
    t: int
    t_vec: Tensor  # (B,) long
    ab: Tensor  # alpha_bar(t), float64 0-d
    noise: Tensor
    x_t: Tensor


def noised_render(x0: Tensor, schedule, alphas_cumprod: Tensor, step: int, max_steps: int, generator) -> NoisedRender:
    t = schedule(step, max_steps, generator)
    noise = _randn(x0.detach(), generator)
    ab = alphas_cumprod[t]
    t_vec = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    return NoisedRender(t, t_vec, ab, noise, add_noise(x0.detach(), noise, ab))


def check_common(name: str, weighting: str, loss_reduction: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"guidance.weighting={weighting!r} is unknown; allowed: {', '.join(WEIGHTINGS)}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"guidance.loss_reduction={loss_reduction!r}; allowed: mean, sum")


def output(
    x0: Tensor, grad: Tensor, n: NoisedRender, w: Tensor, reduction: str, calls: int, stats: dict
) -> GuidanceOutput:
    """Package a gradient as the trainer expects: eps_hat - kappa = grad / w, x0_hat = x0 - grad."""
    grad = torch.nan_to_num(grad)
    loss = gradient_loss(x0, grad, reduction)
    eps_hat = n.noise + grad / w.to(grad.dtype).clamp_min(1e-12)
    stats = {"t": n.t, "grad_norm": float(grad.norm()), **stats}
    return GuidanceOutput(loss, n.t, n.t, n.x_t, n.noise, eps_hat, x0.detach() - grad, calls, stats)
