"""Regularisers of the 3D scene (official SDI / threestudio definitions) and a linear schedule.

All maps are channel-first, (B, C, H, W). Each function returns an unweighted scalar; the scene
weights them with :func:`linear_schedule` (see ``NeRFScene.regularisers``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_schedule(step: int, start: float, end: float, until: int, begin: int = 0) -> float:
    """start + (end - start) * clamp((step - begin) / (until - begin), 0, 1); ``end`` when until <= begin.

    threestudio's [begin, start, end, until] weight lists (``C`` in threestudio/utils/misc.py), e.g.
    prolificdreamer.yaml's lambda_opaque [10000, 0, 1000, 10001]: 0 up to step 10000, 1000 from step 10001.
    """
    if until <= begin:
        return float(end)
    return float(start + (end - start) * min(max((step - begin) / (until - begin), 0.0), 1.0))


def convexity_loss(normals: Tensor, resolution: int = 8) -> Tensor:
    """SDI's convexity loss on a normal map (B, 3, H, W) in world space (z up).

    N = bilinear_resize(normals, resolution x resolution)   (align_corners=False, as the official code)
    h = (N[:, :, :-1] x N[:, :, 1:])_z    (left x right),   v = (N[1:, :] x N[:-1, :])_z   (down x up)
    loss = -(mean(h) + mean(v))
    Negative for a convex surface seen from outside (normals turn with the image axes), positive
    for a concave one.
    """
    if normals.dim() != 4 or normals.shape[1] != 3:
        raise ValueError(f"convexity_loss expects normals of shape (B, 3, H, W), got {tuple(normals.shape)}")
    n = F.interpolate(normals, size=(resolution, resolution), mode="bilinear", align_corners=False)
    left, right = n[..., :, :-1], n[..., :, 1:]
    h = left[:, 0] * right[:, 1] - left[:, 1] * right[:, 0]
    up, down = n[..., :-1, :], n[..., 1:, :]
    v = down[:, 0] * up[:, 1] - down[:, 1] * up[:, 0]
    return -(h.mean() + v.mean())


def orientation_loss(orientation: Tensor, opacity: Tensor) -> Tensor:
    """DreamFusion orientation loss: sum_rays sum_i stopgrad(w_i) max(n_i . d, 0)^2 / #{O > 0}.

    ``orientation`` is the per-pixel inner sum (the renderer's "orientation" map).
    """
    return orientation.sum() / (opacity > 0).sum().clamp_min(1)


def sparsity_loss(opacity: Tensor) -> Tensor:
    """mean(sqrt(O^2 + 0.01))  (threestudio's smooth L1 on the opacity)."""
    return torch.sqrt(opacity**2 + 0.01).mean()


def opacity_loss(opacity: Tensor) -> Tensor:
    """Binary entropy mean(-(O log O + (1 - O) log(1 - O))), O clamped to [1e-3, 1 - 1e-3]."""
    o = opacity.clamp(1e-3, 1.0 - 1e-3)
    return -(o * torch.log(o) + (1.0 - o) * torch.log(1.0 - o)).mean()


def z_variance_loss(z_variance: Tensor, opacity: Tensor) -> Tensor:
    """HiFA's z-variance loss: mean of z_variance over pixels with O > 0.5 (0 when there are none)."""
    mask = opacity > 0.5
    if not bool(mask.any()):
        return z_variance.sum() * 0.0
    return z_variance[mask].mean()
