"""Cameras: random training views and evaluation orbits.

World frame is z-up. A camera at (elevation e, azimuth a, distance d) sits at
    p = d * (cos e cos a, cos e sin a, sin e)
and looks at the origin. Camera-to-world matrices use the OpenGL convention (the camera looks
along its -z axis, +y is up in the image). Azimuth 0 is the "front" of an object (prompts.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

ELEVATION_SAMPLINGS = ("uniform_deg", "threestudio")


@dataclass
class CameraSamplerConfig:
    """Ranges of the random training cameras (official SDI / threestudio values)."""

    height: int = 64
    width: int = 64
    batch_size: int = 1
    distance: tuple[float, float] = (1.5, 2.0)
    fovy_deg: tuple[float, float] = (40.0, 70.0)
    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    # uniform_deg: elevation uniform in degrees | threestudio: its random-camera data module, one coin per batch
    # between that and uniform on the sphere's band (sin(elevation) uniform), 1:1 (sample_cameras)
    elevation_sampling: str = "uniform_deg"
    # 0: a new random camera every step (official). N > 0: N views drawn once from the same ranges (seed
    # pool_seed) and one of them per step: a prior that caches per-view work (the exact 3D prior's traced
    # geometry) then pays it N times instead of every step
    pool: int = 0
    pool_seed: int = 0
    # render-size milestones [[step, height, width], ...]: from `step` on, train at that size (ProlificDreamer /
    # VSD: 64 -> 512 at step 5000). Previews and evaluation use height x width.
    milestones: list[list[int]] = field(default_factory=list)

    def at_step(self, step: int) -> CameraSamplerConfig:
        """This config with the render size in force at training step ``step``."""
        size = None
        for m in sorted(self.milestones):
            if step >= m[0]:
                size = m
        if size is None:
            return self
        return dataclasses.replace(self, height=int(size[1]), width=int(size[2]), milestones=[])

    def validate(self, where: str = "camera") -> None:
        for name in ("distance", "fovy_deg", "elevation_deg", "azimuth_deg"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(
                    f"{where}.{name}=[{lo}, {hi}] is out of order: the first value is the minimum, write [{hi}, {lo}]"
                )
        if not (0.0 < self.fovy_deg[0] and self.fovy_deg[1] < 180.0):
            raise ValueError(f"{where}.fovy_deg={list(self.fovy_deg)} must lie inside (0, 180) degrees")
        if not (-90.0 <= self.elevation_deg[0] and self.elevation_deg[1] <= 90.0):
            raise ValueError(f"{where}.elevation_deg={list(self.elevation_deg)} must lie inside [-90, 90] degrees")
        if self.distance[0] <= 0:
            raise ValueError(f"{where}.distance={list(self.distance)} must be positive")
        for m in self.milestones:
            if len(m) != 3 or m[0] < 0 or m[1] <= 0 or m[2] <= 0:
                raise ValueError(f"{where}.milestones entry {list(m)} must be [step >= 0, height > 0, width > 0]")
        if self.elevation_sampling not in ELEVATION_SAMPLINGS:
            raise ValueError(
                f"{where}.elevation_sampling={self.elevation_sampling!r}; allowed: {', '.join(ELEVATION_SAMPLINGS)}"
            )
        if self.pool < 0:
            raise ValueError(f"{where}.pool={self.pool} must be >= 0 (0 = a new random camera every step)")
        for name in ("height", "width", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be a positive integer")


@dataclass
class Cameras:
    """A batch of pinhole cameras looking at the origin."""

    c2w: Tensor  # (B, 4, 4)
    fovy: Tensor  # (B,) radians
    elevation: Tensor  # (B,) degrees
    azimuth: Tensor  # (B,) degrees, in [-180, 180)
    distance: Tensor  # (B,)
    height: int
    width: int
    light_positions: Tensor | None = field(default=None)  # (B, 3), set by the scene's shading

    def __len__(self) -> int:
        return int(self.c2w.shape[0])

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def positions(self) -> Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> Cameras:
        lp = None if self.light_positions is None else self.light_positions.to(device)
        return Cameras(
            self.c2w.to(device),
            self.fovy.to(device),
            self.elevation.to(device),
            self.azimuth.to(device),
            self.distance.to(device),
            self.height,
            self.width,
            lp,
        )

    def __getitem__(self, idx) -> Cameras:
        idx = torch.as_tensor([idx]) if isinstance(idx, int) else idx
        lp = None if self.light_positions is None else self.light_positions[idx]
        return Cameras(
            self.c2w[idx],
            self.fovy[idx],
            self.elevation[idx],
            self.azimuth[idx],
            self.distance[idx],
            self.height,
            self.width,
            lp,
        )

    def focal(self) -> Tensor:
        """Focal length in pixels, (B,)."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)

    def rays(self) -> tuple[Tensor, Tensor]:
        """World-space ray origins and unit directions through pixel centres, each (B, H, W, 3)."""
        B, H, W = len(self), self.height, self.width
        dev, dt = self.c2w.device, self.c2w.dtype
        j, i = torch.meshgrid(
            torch.arange(H, device=dev, dtype=dt), torch.arange(W, device=dev, dtype=dt), indexing="ij"
        )
        f = self.focal().to(dt).view(B, 1, 1)
        x = (i + 0.5 - 0.5 * W) / f
        y = -(j + 0.5 - 0.5 * H) / f
        d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (B, H, W, 3)
        d = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], d_cam)
        d = d / d.norm(dim=-1, keepdim=True)
        o = self.c2w[:, None, None, :3, 3].expand_as(d)
        return o, d


def look_at(positions: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """Camera-to-world matrices (B, 4, 4) for cameras at ``positions`` looking at ``target``."""
    B = positions.shape[0]
    target = torch.zeros_like(positions) if target is None else target.expand_as(positions)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=positions.dtype, device=positions.device) if up is None else up
    forward = target - positions
    forward = forward / forward.norm(dim=-1, keepdim=True)
    right = torch.cross(forward, up.expand_as(forward), dim=-1)
    # straight overhead: any right vector perpendicular to forward
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        right[degenerate] = torch.tensor([0.0, 1.0, 0.0], dtype=positions.dtype, device=positions.device)
    right = right / right.norm(dim=-1, keepdim=True)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=positions.dtype, device=positions.device).repeat(B, 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, cam_up, -forward, positions
    return c2w


def cameras_from_spherical(
    elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fovy_deg: Tensor, height: int, width: int
) -> Cameras:
    """Cameras at the given spherical coordinates (degrees), looking at the origin."""
    e, a = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    pos = distance[:, None] * torch.stack([torch.cos(e) * torch.cos(a), torch.cos(e) * torch.sin(a), torch.sin(e)], -1)
    azimuth = (azimuth_deg + 180.0) % 360.0 - 180.0
    return Cameras(look_at(pos), torch.deg2rad(fovy_deg), elevation_deg, azimuth, distance, height, width)


def _uniform(lo: float, hi: float, n: int, generator: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float32)


def sample_elevation(
    cfg: CameraSamplerConfig, n: int, generator: torch.Generator | None = None, per_view: bool = False
) -> Tensor:
    """n elevations (degrees) in ``cfg.elevation_deg`` = [lo, hi].
    uniform_deg:  lo + (hi - lo) u
    threestudio:  (``data/uncond.py``) with probability 1/2 that, else uniform on the sphere's band,
                  asin(sin lo + (sin hi - sin lo) u): one coin for the batch (``per_view``: one per view, for a
                  pool drawn once); the mixture's CDF is F(e) = (e - lo) / (2 (hi - lo)) + (sin e - sin lo) /
                  (2 (sin hi - sin lo))."""
    lo, hi = cfg.elevation_deg
    if cfg.elevation_sampling == "uniform_deg":
        return _uniform(lo, hi, n, generator)
    coin = torch.rand(n if per_view else 1, generator=generator) < 0.5
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    deg = lo + (hi - lo) * u
    s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    sphere = torch.rad2deg(torch.asin((s_lo + (s_hi - s_lo) * u).clamp(-1.0, 1.0)))
    return torch.where(coin, deg, sphere).float()


def sample_cameras(
    cfg: CameraSamplerConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    per_view: bool = False,
) -> Cameras:
    """Random training cameras, uniform in distance, fov and azimuth, elevation by ``cfg.elevation_sampling``
    (:func:`sample_elevation`); with ``cfg.pool`` > 0, ``batch_size`` views picked uniformly from a fixed pool
    drawn once from those ranges."""
    if cfg.pool:
        pool = camera_pool(cfg)
        idx = torch.randint(0, cfg.pool, (cfg.batch_size,), generator=generator)
        return pool[idx].to(device)
    n = cfg.batch_size
    dist = _uniform(*cfg.distance, n, generator)
    fovy = _uniform(*cfg.fovy_deg, n, generator)
    elev = sample_elevation(cfg, n, generator, per_view)
    azim = _uniform(*cfg.azimuth_deg, n, generator)
    return cameras_from_spherical(elev, azim, dist, fovy, cfg.height, cfg.width).to(device)


def camera_pool(cfg: CameraSamplerConfig) -> Cameras:
    """The fixed views of ``cfg.pool`` (deterministic in the config: the same pool in every run and on resume)."""
    key = repr({k: v for k, v in sorted(cfg.__dict__.items()) if k != "batch_size"})
    if key not in _POOLS:
        one = CameraSamplerConfig(**{**cfg.__dict__, "pool": 0, "batch_size": cfg.pool})
        _POOLS[key] = sample_cameras(one, torch.Generator().manual_seed(cfg.pool_seed), per_view=True)
    return _POOLS[key]


_POOLS: dict[str, Cameras] = {}


def orbit_cameras(
    n_views: int,
    height: int,
    width: int,
    elevation_deg: float = 15.0,
    distance: float = 1.75,
    fovy_deg: float = 55.0,
    device: torch.device | str = "cpu",
) -> Cameras:
    """``n_views`` cameras evenly spaced in azimuth on one orbit (evaluation, turntables)."""
    azim = torch.arange(n_views, dtype=torch.float32) * (360.0 / n_views) - 180.0
    full = lambda v: torch.full((n_views,), float(v))  # noqa: E731
    return cameras_from_spherical(full(elevation_deg), azim, full(distance), full(fovy_deg), height, width).to(device)


def fov_to_focal(fovy_rad: float, height: int) -> float:
    return 0.5 * height / math.tan(0.5 * fovy_rad)
