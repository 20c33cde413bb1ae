"""Densification of a :class:`~distill.scene.gaussians.GaussianScene` (graphdeco, the rules every public
text-to-3DGS recipe uses): the screen-gradient statistics, clone / split / prune under the ``max_num`` cap, the
opacity reset, and the row surgery on parameters and Adam state that keeps the optimiser in step.

After every step the screen-space gradient norm |dL/d mu_2D * (W/2, H/2)| (graphdeco's NDC convention, so the
public thresholds carry over) is accumulated per Gaussian and view where it is visible; every ``interval`` steps in
[start, until) (the scene's schedule, :meth:`GaussianScene.after_optimizer_step`):
    g = accumulated / visible count;  candidates: g >= grad_threshold
    clone  (candidates with size <= split_threshold): an exact copy
    split  (candidates with size >  split_threshold): ``split_n`` samples x ~ N(mu, R diag(s)^2 R^T), each with
           scale s / (0.8 split_n); the original is removed
    prune: o < min_opacity, or max(s) > prune_world_size (if > 0), or the largest screen radius since the last
           densification > max_screen_size px (if > 0)
size is |s|_2 (threestudio-3dgs, threshold 0.02) or max(s) (graphdeco: percent_dense * extent). ``max_num`` caps
the count: the highest-gradient candidates are grown first and the rest wait (never an out-of-memory). The Adam
moments of surviving rows are kept, new rows start at zero (graphdeco). The screen-size prune is off by default:
in every public recipe it is a no-op (max_radii2D is zeroed before the check, graphdeco-inria/gaussian-splatting
#123), and DreamGaussian's max_screen_size=1 would prune almost everything if it worked.

The statistics live on the scene as buffers (``STATS``, saved with it: a resumed run continues the same interval);
the functions here take the scene and change it in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from distill.scene.rasterizer import quat_to_rotmat

if TYPE_CHECKING:
    from distill.scene.gaussians import GaussianScene

SPLIT_MEASURES = ("l2", "max")
PARAMS = ("means", "log_scales", "quats", "opacity_logits", "f_dc")  # the per-Gaussian parameters (rows)
STATS = ("grad_accum", "grad_count", "max_radii")  # the per-Gaussian densification statistics (buffers)


@dataclass
class DensifyConfig:
    """Clone / split / prune (threestudio-3dgs values; see the module doc)."""

    enabled: bool = True
    start: int = 500
    until: int = -1  # -1: to the end of the run
    interval: int = 300
    grad_threshold: float = 0.01
    split_measure: str = "l2"  # l2: |s|_2 (threestudio-3dgs) | max: max(s) (graphdeco)
    split_threshold: float = 0.02  # graphdeco: percent_dense (0.01) * extent (4) = 0.04 with split_measure=max
    split_n: int = 2
    min_opacity: float = 0.005
    prune_world_size: float = 0.0  # prune max(s) > this (graphdeco: 0.1 * extent); 0 = off
    max_screen_size: float = 0.0  # prune a screen radius above this (px); 0 = off (a no-op in every recipe)
    max_num: int = 500000
    opacity_reset_interval: int = 0  # o <- min(o, 0.01) every this many steps (graphdeco); 0 = off

    def validate(self, where: str) -> None:
        if self.split_measure not in SPLIT_MEASURES:
            raise ValueError(f"{where}.split_measure={self.split_measure!r} is not one of {list(SPLIT_MEASURES)}")
        if self.interval <= 0:
            raise ValueError(f"{where}.interval={self.interval} must be a positive integer")
        if self.split_n < 2:
            raise ValueError(f"{where}.split_n={self.split_n} must be >= 2")
        if self.max_num <= 0:
            raise ValueError(f"{where}.max_num={self.max_num} must be positive")
        if self.grad_threshold < 0 or self.split_threshold < 0:
            raise ValueError(f"{where}: grad_threshold and split_threshold must be >= 0")


def reset_stats(scene: GaussianScene) -> None:
    """Zero statistics (``STATS``), one entry per current Gaussian."""
    n = scene.num_gaussians
    for name in STATS:
        setattr(scene, name, torch.zeros(n, dtype=scene.means.dtype, device=scene.means.device))


def accumulate_screen_gradients(scene: GaussianScene, means2d: Tensor, radii: Tensor, W: int, H: int) -> None:
    """grad_accum += |dL/d mu_2D * (W/2, H/2)| and grad_count += 1 per visible (Gaussian, view); max_radii keeps the
    largest screen radius. ``means2d`` (B, N, 2) is the last training render's (its gradient retained)."""
    if means2d.grad is None or means2d.shape[1] != scene.num_gaussians:
        return
    g = means2d.grad.detach() * torch.tensor([W / 2.0, H / 2.0], dtype=means2d.dtype, device=means2d.device)
    vis = (radii > 0).all(-1)
    scene.grad_accum += (g.norm(dim=-1) * vis).sum(0)
    scene.grad_count += vis.sum(0).to(scene.grad_count.dtype)
    r = torch.where(vis, radii.max(-1).values, torch.zeros_like(radii[..., 0])).max(0).values
    scene.max_radii.copy_(torch.maximum(scene.max_radii, r.to(scene.max_radii.dtype)))


def densify_and_prune(
    scene: GaussianScene, optimizer: torch.optim.Optimizer | None, generator: torch.Generator
) -> dict[str, int]:
    """One graphdeco densification (module doc). Returns counts: cloned, split, pruned, n_gaussians."""
    d = scene.cfg.densify
    N = scene.num_gaussians
    grads = torch.nan_to_num(scene.grad_accum / scene.grad_count, nan=0.0)
    scales = scene.scales
    size = scales.norm(dim=-1) if d.split_measure == "l2" else scales.max(dim=-1).values
    cand = grads >= d.grad_threshold
    is_split = cand & (size > d.split_threshold)
    # the max_num cap: candidates by decreasing gradient, each costing its new rows, while the budget lasts
    cost = torch.where(is_split, d.split_n - 1, 1) * cand
    order = torch.argsort(grads.masked_fill(~cand, -1.0), descending=True, stable=True)
    budget = max(d.max_num - N, 0)
    allowed = torch.zeros_like(cand)
    allowed[order] = torch.cumsum(cost[order], 0) <= budget
    cand &= allowed
    is_split &= cand
    is_clone = cand & ~is_split
    # new rows: clones (exact copies), then split samples from N(mu, R diag(s)^2 R^T) with scale s / (0.8 n)
    clone_idx = torch.nonzero(is_clone).squeeze(1)
    split_idx = torch.nonzero(is_split).squeeze(1).repeat(d.split_n)
    eps = torch.randn(len(split_idx), 3, generator=generator).to(scene.means)
    R = quat_to_rotmat(scene.quats[split_idx])
    new_split = {
        "means": scene.means[split_idx] + (R @ (scales[split_idx] * eps)[..., None])[..., 0],
        "log_scales": torch.log(scales[split_idx] / (0.8 * d.split_n)),
        "quats": scene.quats[split_idx],
        "opacity_logits": scene.opacity_logits[split_idx],
        "f_dc": scene.f_dc[split_idx],
    }
    new_rows = {k: torch.cat([getattr(scene, k)[clone_idx], new_split[k]]) for k in PARAMS}
    # prune (graphdeco: after cloning and splitting, over all rows): the split originals, low opacity, too large
    # in the world; too large on the screen (old rows only: new rows have no screen radius yet, graphdeco's
    # max_radii2D of 0)
    prune = is_split | (scene.opacities < d.min_opacity)
    new_prune = torch.sigmoid(new_rows["opacity_logits"]) < d.min_opacity
    if d.prune_world_size > 0:
        prune |= scales.max(dim=-1).values > d.prune_world_size
        new_prune |= torch.exp(new_rows["log_scales"]).max(dim=-1).values > d.prune_world_size
    if d.max_screen_size > 0:
        prune |= scene.max_radii > d.max_screen_size
    keep = torch.nonzero(~prune).squeeze(1)
    new_rows = {k: v[~new_prune] for k, v in new_rows.items()}
    rebuild(scene, optimizer, keep, new_rows)
    n_split = int(is_split.sum())
    return {
        "cloned": int(len(clone_idx)),
        "split": n_split,
        "pruned": int(N - len(keep) - n_split + int(new_prune.sum())),
        "n_gaussians": scene.num_gaussians,
    }


def reset_opacity(scene: GaussianScene, optimizer: torch.optim.Optimizer | None) -> None:
    """o <- min(o, 0.01) (graphdeco), with the opacity's Adam moments reset to 0."""
    cap = math.log(0.01 / 0.99)
    scene.opacity_logits.data.clamp_(max=cap)
    if optimizer is not None:
        for v in optimizer.state.get(scene.opacity_logits, {}).values():
            if torch.is_tensor(v) and v.shape == scene.opacity_logits.shape:
                v.zero_()


def rebuild(
    scene: GaussianScene, optimizer: torch.optim.Optimizer | None, keep: Tensor, new_rows: dict[str, Tensor]
) -> None:
    """Rows ``keep`` then ``new_rows`` for every per-Gaussian tensor: parameters (same Parameter objects, so the
    optimiser's groups stay valid), their optimiser state (kept rows keep their moments, new rows start at 0),
    and the densification statistics (reset)."""
    n_new = len(next(iter(new_rows.values())))
    # a live graph of the old tensors (the last render's screen means) would keep autograd's cached
    # gradient accumulators with the old shapes: drop it before resizing
    scene._screen = None
    for name in PARAMS:
        p = getattr(scene, name)
        old_n = p.shape[0]
        p.data = torch.cat([p.data[keep], new_rows[name].to(p.dtype)])
        p.grad = None
        state = optimizer.state.get(p) if optimizer is not None else None
        for k, v in (state or {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == old_n:
                state[k] = torch.cat([v[keep], v.new_zeros((n_new, *v.shape[1:]))])
    reset_stats(scene)


def resize(scene: GaussianScene, n: int) -> None:
    """``n`` zero rows for every per-Gaussian tensor, in place (same Parameter objects): a checkpoint with another
    number of Gaussians can then be loaded into the scene."""
    scene._screen = None
    for name in PARAMS:
        p = getattr(scene, name)
        p.data = p.data.new_zeros((n, *p.shape[1:]))
    reset_stats(scene)
