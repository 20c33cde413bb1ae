"""Volume rendering in plain torch: ray/sphere bounds, an occupancy grid, alpha compositing.

For a ray r(t) = o + t d sampled at t_1 < ... < t_S with bin width delta (all bins of one ray have
the same width) and densities sigma_i:
    alpha_i = 1 - exp(-sigma_i delta),   T_i = exp(-sum_{j<i} sigma_j delta),   w_i = T_i alpha_i
    rgb = sum_i w_i c_i   (premultiplied foreground),   opacity O = sum_i w_i
    depth = sum_i w_i t_i                          (threestudio's convention: not divided by O)
    z_variance ("threestudio", nerf_volume_renderer.py; HiFA's depth variance):
        w^_i = w_i / max(O, 1e-5),  z_mean = sum_i w^_i t_i,  Var = sum_i w^_i (t_i - z_mean)^2,
        zeroed where O <= 0.5: the variance of the sample depth under the normalised weights
    z_variance ("unnormalised", this project's earlier formula):  sum_i w_i (t_i - depth)^2
        = O Var + O (z_mean (1 - O))^2: equal to the above only when O = 1
    normal_sum = sum_i w_i n_i,   orientation = sum_i stopgrad(w_i) max(n_i . d, 0)^2

Sampling: a ray is clipped to the bounding sphere |x| <= radius (and t >= near). When the
occupancy grid is on, ``probe_samples`` evenly spaced points look the grid up and the interval is
shrunk to [first occupied probe - 1 spacing, last occupied probe + 1 spacing]; then
``samples_per_ray`` stratified samples t_i = t_a + (i + u_i) delta (u_i ~ U[0,1), or 0.5 when not
stratified) cover it, and only samples inside occupied cells are sent to the field. This is
threestudio's nerfacc estimator (fixed step, grid skipping) recast with a fixed sample count, so
that the whole ray batch is one dense (rays, samples) tensor: no CUDA kernels needed.

Occupancy grid (nerfacc's OccGridEstimator over the cube [-radius, radius]^3): every
``update_interval`` steps each cell is re-evaluated at a random point inside it,
    occ <- max(decay * occ, sigma(x_cell)),   occupied = occ > min(mean(occ), density_threshold).
The threshold is threestudio's: its estimator compares density x render step with nerfacc's occ_thre 0.01, the
render step being 1.732 x 2 radius / 512 (``num_samples_per_ray``), so in density units
    density_threshold = occ_threshold / (1.732 * 2 * radius / render_step_samples)    (0.739 at radius 2, 1.478 at 1)
(``density_threshold: null``, derived from the scene's radius); a number sets it directly (0.74: this project's value
for every radius before it was derived).

Memory levers (issue 20; the math above is unchanged, only what is held for the backward):
``chunk_rays`` > 0 marches the rays with an occupied interval in chunks of that many rays, and
``checkpoint`` recomputes each chunk's field and compositing in the backward
(``torch.utils.checkpoint``, non-reentrant) instead of keeping its activations: the backward then
holds one chunk's activations at a time. Results equal the unchunked render up to the summation
order of the parameter gradients (and of the field's matrix products when a chunk boundary
changes the batch size), i.e. fp32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint


@dataclass
class OccupancyConfig:
    enabled: bool = True
    resolution: int = 32  # cells per axis over [-radius, radius]^3 (threestudio: 32, one level)
    update_interval: int = 16  # steps between grid updates (nerfacc default n=16)
    decay: float = 0.95  # EMA decay of the max-density estimate
    density_threshold: float | None = None  # upper bound of the threshold (density units); None: derived (below)
    occ_threshold: float = 0.01  # nerfacc's occ_thre, in density x render step (threestudio's estimator)
    render_step_samples: int = 512  # threestudio's num_samples_per_ray: render step = 1.732 * 2 radius / this
    probe_samples: int = 64  # grid look-ups per ray to find the occupied interval (2 per cell width)
    chunk: int = 65536  # points per density call during updates


@dataclass
class RendererConfig:
    samples_per_ray: int = 64  # field evaluations per ray inside the occupied interval
    near: float = 0.0  # smallest ray parameter t
    stratified: bool = True  # jittered samples in training renders (midpoints otherwise)
    # threestudio: variance under w / O, zeroed where O <= 0.5 (the reference's); unnormalised: sum w (t - depth)^2
    z_variance: str = "threestudio"
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)
    # memory levers (see the module doc): rays per chunk (0 = all at once) and activation
    # checkpointing of each chunk (needs chunk_rays > 0). On by default: results equal the plain
    # render to fp32 rounding, and at 512 px the plain render's activations alone exceed a 24 GB
    # GPU (docs/benchmarks.md, "Memory"); conf/scene/nerf_cpu.yaml turns them off (small renders)
    chunk_rays: int = 16384
    checkpoint: bool = True

    def validate(self, where: str = "renderer") -> None:
        if self.samples_per_ray <= 0:
            raise ValueError(f"{where}.samples_per_ray={self.samples_per_ray} must be a positive integer")
        if self.z_variance not in Z_VARIANCES:
            raise ValueError(
                f"{where}.z_variance={self.z_variance!r} is unknown; allowed: {', '.join(Z_VARIANCES)} "
                "(threestudio: the reference's opacity-normalised variance)"
            )
        if self.chunk_rays < 0:
            raise ValueError(f"{where}.chunk_rays={self.chunk_rays} must be >= 0 (0 = no chunking)")
        if self.checkpoint and self.chunk_rays == 0:
            raise ValueError(
                f"{where}.checkpoint=true needs {where}.chunk_rays > 0 (e.g. 16384): checkpointing recomputes "
                "one chunk of rays at a time"
            )
        o = self.occupancy
        for name in ("resolution", "update_interval", "probe_samples", "chunk", "render_step_samples"):
            if getattr(o, name) <= 0:
                raise ValueError(f"{where}.occupancy.{name}={getattr(o, name)} must be a positive integer")
        for name in ("density_threshold", "occ_threshold"):
            v = getattr(o, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{where}.occupancy.{name}={v} must be a number > 0 (density_threshold: or null)")
        if not 0.0 <= o.decay <= 1.0:
            raise ValueError(f"{where}.occupancy.decay={o.decay} must lie in [0, 1]")


Z_VARIANCES = ("threestudio", "unnormalised")


def z_variance(w: Tensor, t: Tensor, opacity: Tensor, formula: str = "threestudio") -> Tensor:
    """Per-ray depth variance (R, 1) from weights w (R, S), sample depths t (R, S) and opacity O = sum w (R, 1).

    threestudio:   w^ = w / max(O, 1e-5), z_mean = sum w^ t, Var = sum w^ (t - z_mean)^2, times [O > 0.5]
    unnormalised:  sum w (t - sum w t)^2  (= O Var + O (z_mean (1 - O))^2)
    """
    if formula == "unnormalised":
        depth = (w * t).sum(1, keepdim=True)
        return (w * (t - depth) ** 2).sum(1, keepdim=True)
    w_hat = w / opacity.clamp_min(1e-5)
    z_mean = (w_hat * t).sum(1, keepdim=True)
    var = (w_hat * (t - z_mean) ** 2).sum(1, keepdim=True)
    return var * (opacity > 0.5).to(var.dtype)


# field(points (M, 3), ray_index (M,)) -> {"density": (M,), "rgb": (M, 3), "normal": (M, 3)}
# ("normal" only when the render asks for normals)
FieldFn = Callable[[Tensor, Tensor], dict]


def density_threshold(cfg: OccupancyConfig, radius: float) -> float:
    """The occupancy threshold in density units: ``cfg.density_threshold``, or threestudio's
    occ_threshold / render step with render step = 1.732 * 2 radius / render_step_samples."""
    if cfg.density_threshold is not None:
        return float(cfg.density_threshold)
    return cfg.occ_threshold / (1.732 * 2.0 * float(radius) / cfg.render_step_samples)


class OccupancyGrid(nn.Module):
    """Binary occupancy of a res^3 grid of cells over [-radius, radius]^3 (state: buffers)."""

    def __init__(self, cfg: OccupancyConfig, radius: float):
        super().__init__()
        self.cfg, self.radius = cfg, float(radius)
        self.threshold = density_threshold(cfg, radius)
        n = cfg.resolution**3
        self.register_buffer("occ", torch.zeros(n))  # EMA of the max density per cell
        self.register_buffer("binary", torch.ones(n, dtype=torch.bool))  # all occupied until the first update
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.int64))

    def cell_index(self, points: Tensor, check: bool = True) -> tuple[Tensor, Tensor | None]:
        """Flat cell index of each point and (if ``check``) whether it lies inside the cube."""
        res = self.cfg.resolution
        u = (points + self.radius) * (res / (2 * self.radius))
        inside = ((u >= 0) & (u < res)).all(dim=-1) if check else None
        ijk = u.long().clamp_(0, res - 1)
        return (ijk[..., 0] * res + ijk[..., 1]) * res + ijk[..., 2], inside

    def lookup(self, points: Tensor, inside_cube: bool = False) -> Tensor:
        """True where a point lies in an occupied cell (and inside the cube, unless the caller
        guarantees it with ``inside_cube``: points beyond the faces then map to the border cells)."""
        if not self.cfg.enabled:
            return torch.ones(points.shape[:-1], dtype=torch.bool, device=points.device)
        idx, inside = self.cell_index(points, check=not inside_cube)
        return self.binary[idx] if inside_cube else self.binary[idx] & inside

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], generator: torch.Generator | None = None) -> None:
        """occ <- max(decay * occ, sigma(random point in each cell)); re-threshold."""
        res = self.cfg.resolution
        dev = self.occ.device
        r = torch.arange(res, device=dev, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).view(-1, 3)
        gen_dev = generator.device if generator is not None else dev
        jitter = torch.rand(grid.shape, generator=generator, device=gen_dev).to(dev)
        pts = ((grid + jitter) / res * 2.0 - 1.0) * self.radius
        sig = torch.cat([density_fn(c).reshape(-1).float() for c in pts.split(self.cfg.chunk)])
        self.occ.copy_(torch.maximum(self.occ * self.cfg.decay, sig.nan_to_num(0.0)))
        thre = torch.clamp(self.occ.mean(), max=self.threshold)
        self.binary.copy_(self.occ > thre)
        self.n_updates += 1


def ray_sphere(origins: Tensor, dirs: Tensor, radius: float, near: float) -> tuple[Tensor, Tensor, Tensor]:
    """t_near, t_far of |o + t d| <= radius (d unit), clipped to t >= near, and a hit mask."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius**2
    disc = b * b - c
    sq = torch.sqrt(disc.clamp_min(0.0))
    t0 = torch.clamp(-b - sq, min=near)
    t1 = -b + sq
    return t0, t1, (disc > 0) & (t1 > t0)


class VolumeRenderer(nn.Module):
    """Composites a field along rays; owns the occupancy grid."""

    def __init__(self, cfg: RendererConfig, radius: float):
        super().__init__()
        cfg.validate()
        self.cfg, self.radius = cfg, float(radius)
        self.grid = OccupancyGrid(cfg.occupancy, radius)

    @torch.no_grad()
    def _interval(self, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t0, t1, hit = ray_sphere(o, d, self.radius, self.cfg.near)
        if not self.cfg.occupancy.enabled:
            return t0, t1, hit
        P = self.cfg.occupancy.probe_samples
        span = (t1 - t0).clamp_min(0.0)
        step = span / P
        k = torch.arange(P, device=o.device, dtype=o.dtype) + 0.5
        tp = t0[:, None] + k[None, :] * step[:, None]
        occ = self.grid.lookup(o[:, None, :] + tp[..., None] * d[:, None, :], inside_cube=True)  # (R, P)
        any_occ = occ.any(dim=1)
        first = occ.float().argmax(dim=1)
        last = P - 1 - occ.flip(1).float().argmax(dim=1)
        ta = torch.maximum(t0 + (first.to(o.dtype) - 1.0) * step, t0)
        tb = torch.minimum(t0 + (last.to(o.dtype) + 2.0) * step, t1)
        return ta, tb, hit & any_occ

    def forward(
        self, field_fn: FieldFn, origins: Tensor, dirs: Tensor, jitter: Tensor | None = None, normals: bool = True
    ) -> dict:
        """origins, dirs (R, 3) (dirs unit); jitter (R, S) in [0, 1) or None for midpoints.

        Returns per-ray tensors: rgb (R, 3) premultiplied foreground, opacity, depth, z_variance,
        orientation (R, 1), normal_sum (R, 3); and ``n_samples`` (int tensor): field evaluations.
        With ``normals=False`` the field returns no normals and orientation / normal_sum are absent.
        """
        R, S = origins.shape[0], self.cfg.samples_per_ray
        dev = origins.device
        if jitter is not None and jitter.shape != (R, S):
            raise ValueError(f"jitter must have shape (rays, samples_per_ray)=({R}, {S}), got {tuple(jitter.shape)}")
        ta, tb, valid = self._interval(origins, dirs)
        vidx = valid.nonzero().squeeze(1)
        keys = ("rgb", "opacity", "depth", "z_variance") + (("orientation", "normal_sum") if normals else ())
        out = {k: origins.new_zeros(R, 3 if k in ("rgb", "normal_sum") else 1) for k in keys}
        out["n_samples"] = torch.zeros((), dtype=torch.int64, device=dev)
        if vidx.numel() == 0:
            return out
        u = jitter[vidx] if jitter is not None else None
        chunk = self.cfg.chunk_rays or vidx.numel()
        parts, n_samples = [], []
        for lo in range(0, vidx.numel(), chunk):
            args = (origins[vidx[lo : lo + chunk]], dirs[vidx[lo : lo + chunk]], ta[vidx[lo : lo + chunk]])
            args += (tb[vidx[lo : lo + chunk]], None if u is None else u[lo : lo + chunk], vidx[lo : lo + chunk])

            def march(*a, _fn=field_fn, _normals=normals):
                return self._march(_fn, *a, normals=_normals)

            if self.cfg.checkpoint and torch.is_grad_enabled():
                vals, n = _checkpoint(march, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                vals, n = march(*args)
            parts.append(vals)
            n_samples.append(n)
        out["n_samples"] = torch.stack(n_samples).sum()
        for k in keys:
            v = parts[0][k] if len(parts) == 1 else torch.cat([p[k] for p in parts])
            out[k] = out[k].to(v.dtype).index_put((vidx,), v)
        return out

    def _march(
        self,
        field_fn: FieldFn,
        o: Tensor,
        d: Tensor,
        ta: Tensor,
        tb: Tensor,
        u: Tensor | None,
        vidx: Tensor,
        normals: bool = True,
    ) -> tuple[dict, Tensor]:
        """Sample, evaluate and composite the rays o, d (Rv, 3) over [ta, tb] (jitter u (Rv, S) or
        None); per-ray values (Rv, C) and the number of field evaluations (0-d int tensor)."""
        S = self.cfg.samples_per_ray
        dev, dt = o.device, o.dtype
        Rv = o.shape[0]
        delta = ((tb - ta) / S)[:, None]  # (Rv, 1)
        u = u.to(dt) if u is not None else torch.full((1, S), 0.5, device=dev, dtype=dt)
        t = ta[:, None] + (torch.arange(S, device=dev, dtype=dt)[None, :] + u) * delta  # (Rv, S)
        pts = o[:, None, :] + t[..., None] * d[:, None, :]
        with torch.no_grad():
            mask = self.grid.lookup(pts, inside_cube=True)  # samples lie in [t_near, t_far]: inside the sphere
        sel = mask.nonzero()
        n = torch.tensor(sel.shape[0], device=dev)
        if sel.shape[0] == 0:
            zeros = {k: o.new_zeros(Rv, 1) for k in ("opacity", "depth", "z_variance", "orientation")}
            zeros.update(rgb=o.new_zeros(Rv, 3), normal_sum=o.new_zeros(Rv, 3))
            if not normals:
                del zeros["orientation"], zeros["normal_sum"]
            return zeros, n
        f = field_fn(pts[sel[:, 0], sel[:, 1]], vidx[sel[:, 0]])
        ij = (sel[:, 0], sel[:, 1])
        sigma = torch.zeros(Rv, S, device=dev, dtype=f["density"].dtype).index_put(ij, f["density"])
        rgb = torch.zeros(Rv, S, 3, device=dev, dtype=f["rgb"].dtype).index_put(ij, f["rgb"])

        tau = sigma * delta
        alpha = 1.0 - torch.exp(-tau)
        trans = torch.exp(-(torch.cumsum(tau, dim=1) - tau))
        w = trans * alpha  # (Rv, S)
        opacity = w.sum(1, keepdim=True)
        depth = (w * t).sum(1, keepdim=True)
        zvar = z_variance(w, t, opacity, self.cfg.z_variance)
        vals = {"rgb": (w[..., None] * rgb).sum(1), "opacity": opacity, "depth": depth, "z_variance": zvar}
        if normals:
            nrm = torch.zeros(Rv, S, 3, device=dev, dtype=f["normal"].dtype).index_put(ij, f["normal"])
            cos = (nrm * d[:, None, :]).sum(-1).clamp_min(0.0)
            vals["orientation"] = (w.detach() * cos**2).sum(1, keepdim=True)
            vals["normal_sum"] = (w[..., None] * nrm).sum(1)
        return vals, n
