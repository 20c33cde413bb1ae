"""Analytic SDF objects and sphere tracing for the 3D analytic prior.

Each ground-truth object is a union of a few exact signed-distance primitives (sphere, rounded
box, torus, capsule, capped cylinder), each with its own mean albedo pattern. The world frame is
z-up and azimuth 0 (the "front" of an object) looks from +x, as in :mod:`distill.scene.cameras`.

:func:`trace` sphere-traces one object from a batch of rays and returns, per ray, whether it hit,
the hit point and the mean albedo there. Everything is plain torch, so it runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------
# primitives


def _rotation(axis: tuple[float, float, float], angle_deg: float) -> Tensor:
    """3x3 rotation about ``axis`` (Rodrigues), float64; columns are the local axes in world."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    th = math.radians(angle_deg)
    K = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(th) * K + (1.0 - math.cos(th)) * (K @ K)


def _smoothstep(e0: float, e1: float, x: Tensor) -> Tensor:
    s = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


@dataclass
class Primitive:
    """One SDF primitive in its local frame (q = R^T (p - center)).

    kind: "sphere" (r), "box" (hx, hy, hz, rounding), "torus" (R, r; ring in the local xy plane),
    "capsule" (h, r; segment from -h to h on local z), "cylinder" (h, r; capped, axis local z).
    pattern (mean albedo over the primitive, local coordinates): "plain" (color), "band" (color2
    where |q_z| < p0), "gradient" (color -> color2 from local z = -p0 to p0), "planks" (p0 planks
    along z separated by color2 lines, color2 frame on the box edges).
    """

    kind: str
    params: tuple[float, ...]
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: Tensor = field(default_factory=lambda: torch.eye(3, dtype=torch.float64))
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    color2: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pattern: str = "plain"
    p0: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("sphere", "box", "torus", "capsule", "cylinder"):
            raise ValueError(f"unknown SDF primitive kind {self.kind!r}")
        if self.pattern not in ("plain", "band", "gradient", "planks"):
            raise ValueError(f"unknown albedo pattern {self.pattern!r}")
        self._dev: dict = {}
        self._identity = bool(torch.equal(self.rotation, torch.eye(3, dtype=self.rotation.dtype)))

    def _t(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = (ref.device, ref.dtype)
        if key not in self._dev:
            f = lambda v: torch.as_tensor(v, dtype=ref.dtype).to(ref.device)  # noqa: E731
            self._dev[key] = (f(self.center), f(self.rotation), f(self.color), f(self.color2))
        return self._dev[key]

    def local(self, p: Tensor) -> Tensor:
        c, R, _, _ = self._t(p)
        dp = p - c
        if self._identity:
            return dp
        # (p - c) @ R written out: a (n, 3) x (3, 3) matmul is slow on CPU for float64
        return dp[:, 0:1] * R[0] + dp[:, 1:2] * R[1] + dp[:, 2:3] * R[2]

    def bound(self) -> float:
        """Radius of a ball around ``center`` that holds the primitive."""
        k, a = self.kind, self.params
        if k == "sphere":
            return a[0]
        if k == "box":
            return math.sqrt(a[0] ** 2 + a[1] ** 2 + a[2] ** 2)
        if k == "torus":
            return a[0] + a[1]
        return a[0] + a[1] if k == "capsule" else math.hypot(a[0], a[1])

    def sdf(self, p: Tensor) -> Tensor:
        q = self.local(p)
        k, a = self.kind, self.params
        if k == "sphere":
            return q.norm(dim=-1) - a[0]
        if k == "box":
            b = q.new_tensor(a[:3]) - a[3]
            d = q.abs() - b
            dmax = torch.maximum(torch.maximum(d[:, 0], d[:, 1]), d[:, 2])
            return d.clamp_min(0).norm(dim=-1) + dmax.clamp_max(0) - a[3]
        if k == "torus":
            ring = q[:, :2].norm(dim=-1) - a[0]
            return torch.hypot(ring, q[:, 2]) - a[1]
        if k == "capsule":
            dz = q[:, 2] - q[:, 2].clamp(-a[0], a[0])
            return torch.hypot(q[:, :2].norm(dim=-1), dz) - a[1]
        dr, dz = q[:, :2].norm(dim=-1) - a[1], q[:, 2].abs() - a[0]  # cylinder
        return torch.maximum(dr, dz).clamp_max(0) + torch.hypot(dr.clamp_min(0), dz.clamp_min(0))

    def albedo(self, p: Tensor) -> Tensor:
        """Mean albedo (RGB in [0, 1]) at surface points p (n, 3)."""
        _, _, c1, c2 = self._t(p)
        if self.pattern == "plain":
            return c1.expand(p.shape[0], 3)
        q = self.local(p)
        if self.pattern == "band":
            w = _smoothstep(self.p0 + 0.015, self.p0 - 0.015, q[:, 2].abs())
        elif self.pattern == "gradient":
            w = ((q[:, 2] / self.p0 + 1.0) * 0.5).clamp(0.0, 1.0)
        else:  # planks: thin dark lines between p0 planks along z, dark frame on the box edges
            h = self.params[2]
            f = torch.cos(math.pi * self.p0 * (q[:, 2] + h) / h)
            w = _smoothstep(0.8, 0.97, f)
            edge = (q.abs() > q.new_tensor(self.params[:3]) - 0.05).sum(-1) >= 2
            w = torch.where(edge, torch.ones_like(w), w)
        return c1 + w[:, None] * (c2 - c1)


@dataclass
class SDFObject:
    """A union of primitives; the mean albedo at a surface point is that of the closest primitive."""

    name: str
    primitives: list[Primitive]

    def sdf(self, p: Tensor) -> Tensor:
        d = self.primitives[0].sdf(p)
        for prim in self.primitives[1:]:
            d = torch.minimum(d, prim.sdf(p))
        return d

    def albedo(self, p: Tensor) -> Tensor:
        if len(self.primitives) == 1:
            return self.primitives[0].albedo(p)
        d = torch.stack([prim.sdf(p) for prim in self.primitives], -1)
        idx = d.argmin(-1)
        out = torch.empty(p.shape[0], 3, dtype=p.dtype, device=p.device)
        for i, prim in enumerate(self.primitives):
            m = idx == i
            if m.any():
                out[m] = prim.albedo(p[m])
        return out

    def bounding_sphere(self) -> tuple[tuple[float, float, float], float]:
        """(centre, radius) of a ball holding the object (for ray clipping)."""
        c = torch.tensor([p.center for p in self.primitives], dtype=torch.float64)
        r = torch.tensor([p.bound() for p in self.primitives], dtype=torch.float64)
        lo, hi = (c - r[:, None]).min(0).values, (c + r[:, None]).max(0).values
        mid = 0.5 * (lo + hi)
        rad = ((c - mid).norm(dim=-1) + r).max()
        return tuple(mid.tolist()), float(rad)

    def texture_frame(self) -> tuple[tuple[float, float, float], float]:
        """(centre, half size) of the cube over which the texture basis is defined."""
        c = torch.tensor([p.center for p in self.primitives], dtype=torch.float64)
        r = torch.tensor([p.bound() for p in self.primitives], dtype=torch.float64)
        lo, hi = (c - r[:, None]).min(0).values, (c + r[:, None]).max(0).values
        return tuple((0.5 * (lo + hi)).tolist()), float(0.5 * (hi - lo).max())


# ------------------------------------------------------------------------------------------
# sphere tracing


def trace(
    obj: SDFObject, origins: Tensor, dirs: Tensor, steps: int = 64, hit_eps: float = 1e-4, accept: float = 2e-3
) -> tuple[Tensor, Tensor]:
    """Sphere-trace ``obj`` along rays (n, 3) (unit directions).

    Returns (hit (n,) bool, points (n, 3)); points of missed rays are undefined (zeros). Rays are
    clipped to the object's bounding sphere and only the active ones are evaluated each step.
    A ray still marching after ``steps`` counts as a hit if its distance is below ``accept``.
    """
    n = origins.shape[0]
    dev, dt = origins.device, origins.dtype
    centre, radius = obj.bounding_sphere()
    oc = origins - torch.tensor(centre, dtype=dt, device=dev)
    b = (oc * dirs).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - (radius * 1.001) ** 2)
    inside = disc > 0
    sq = disc.clamp_min(0).sqrt()
    t_far = -b + sq
    t = (-b - sq).clamp_min(0.0)
    hit = torch.zeros(n, dtype=torch.bool, device=dev)
    idx = torch.nonzero(inside & (t_far > 0)).squeeze(-1)
    for _ in range(steps):
        if idx.numel() == 0:
            break
        ti = t[idx]
        d = obj.sdf(origins[idx] + ti[:, None] * dirs[idx])
        done = d < hit_eps
        hit[idx[done]] = True
        t[idx] = ti + d
        keep = (~done) & (ti + d < t_far[idx])
        idx = idx[keep]
    if idx.numel() > 0:  # unfinished grazing rays
        d = obj.sdf(origins[idx] + t[idx, None] * dirs[idx])
        hit[idx[d < accept]] = True
    points = torch.where(hit[:, None], origins + t[:, None] * dirs, torch.zeros_like(origins))
    return hit, points


# ------------------------------------------------------------------------------------------
# the built-in catalogue

RED, DARK_RED, WHITE = (0.78, 0.16, 0.14), (0.5, 0.08, 0.08), (0.88, 0.88, 0.9)
WOOD, DARK_WOOD = (0.62, 0.42, 0.22), (0.36, 0.22, 0.11)
BLUE, LIGHT_BLUE = (0.16, 0.32, 0.78), (0.5, 0.68, 0.92)
BLACK, ORANGE = (0.1, 0.1, 0.12), (0.92, 0.5, 0.12)
Z, X, Y = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def _face(head_c: tuple[float, float, float], head_r: float, color: tuple = BLACK) -> list[Primitive]:
    """Two eyes and a carrot nose on the +x side of a head sphere."""
    hx, hy, hz = head_c

    def eye(s: float) -> Primitive:
        return Primitive(
            "sphere",
            (0.032,),
            (
                hx + 0.85 * head_r,
                hy + s * 0.38 * head_r,
                hz + 0.3 * head_r,
            ),
            color=color,
        )

    nose = Primitive("capsule", (0.05, 0.036), (hx + head_r + 0.02, hy, hz), rotation=_rotation(Y, 90.0), color=ORANGE)
    return [eye(1.0), eye(-1.0), nose]


def _catalogue_templates() -> dict[str, list[SDFObject]]:
    ball = [
        SDFObject("plain ball", [Primitive("sphere", (0.42,), color=RED)]),
        SDFObject(
            "striped ball",
            [Primitive("sphere", (0.36,), (0.0, 0.0, -0.06), color=RED, color2=WHITE, pattern="band", p0=0.07)],
        ),
        SDFObject(
            "big two-tone ball", [Primitive("sphere", (0.48,), color=DARK_RED, color2=RED, pattern="gradient", p0=0.48)]
        ),
    ]
    crate = [
        SDFObject(
            "cube crate",
            [Primitive("box", (0.34, 0.34, 0.34, 0.02), color=WOOD, color2=DARK_WOOD, pattern="planks", p0=3.0)],
        ),
        SDFObject(
            "long crate",
            [
                Primitive(
                    "box",
                    (0.46, 0.3, 0.26, 0.02),
                    rotation=_rotation(Z, 20.0),
                    color=WOOD,
                    color2=DARK_WOOD,
                    pattern="planks",
                    p0=2.0,
                )
            ],
        ),
        SDFObject(
            "turned crate",
            [
                Primitive(
                    "box",
                    (0.3, 0.3, 0.3, 0.03),
                    rotation=_rotation(Z, 45.0),
                    color=DARK_WOOD,
                    color2=WOOD,
                    pattern="planks",
                    p0=4.0,
                )
            ],
        ),
    ]
    torus = [
        SDFObject("flat torus", [Primitive("torus", (0.38, 0.12), color=BLUE)]),
        SDFObject(
            "standing torus",
            [
                Primitive(
                    "torus",
                    (0.34, 0.11),
                    rotation=_rotation(Y, 90.0),
                    color=BLUE,
                    color2=LIGHT_BLUE,
                    pattern="band",
                    p0=0.04,
                )
            ],
        ),
        SDFObject(
            "tilted torus",
            [
                Primitive(
                    "torus",
                    (0.3, 0.15),
                    rotation=_rotation(X, 45.0),
                    color=LIGHT_BLUE,
                    color2=BLUE,
                    pattern="gradient",
                    p0=0.15,
                )
            ],
        ),
    ]
    snow = [
        SDFObject(
            "two-ball snowman",
            [
                Primitive("sphere", (0.3,), (0.0, 0.0, -0.22), color=WHITE),
                Primitive("sphere", (0.2,), (0.0, 0.0, 0.22), color=WHITE),
                *_face((0.0, 0.0, 0.22), 0.2),
            ],
        ),
        SDFObject(
            "three-ball snowman",
            [
                Primitive("sphere", (0.26,), (0.0, 0.0, -0.3), color=WHITE),
                Primitive("sphere", (0.19,), (0.0, 0.0, 0.05), color=WHITE),
                Primitive("sphere", (0.14,), (0.0, 0.0, 0.33), color=WHITE),
                *_face((0.0, 0.0, 0.33), 0.14),
            ],
        ),
        SDFObject(
            "snowman with a hat",
            [
                Primitive("sphere", (0.28,), (0.0, 0.0, -0.25), color=WHITE),
                Primitive("sphere", (0.19,), (0.0, 0.0, 0.17), color=WHITE),
                Primitive("cylinder", (0.015, 0.19), (0.0, 0.0, 0.34), color=BLACK),
                Primitive("cylinder", (0.08, 0.12), (0.0, 0.0, 0.42), color=BLACK),
                *_face((0.0, 0.0, 0.17), 0.19),
            ],
        ),
    ]
    return {"a red ball": ball, "a wooden crate": crate, "a blue torus": torus, "a snowman": snow}


PROMPTS: tuple[str, ...] = tuple(_catalogue_templates())


def _jitter(obj: SDFObject, g: torch.Generator, amount: float) -> SDFObject:
    """Scale (+-5%), turn about z (+-10 deg) and recolour (+-0.04) an object, ``amount`` in [0, 1]."""
    u = lambda *s: 2.0 * torch.rand(*s, generator=g, dtype=torch.float64) - 1.0  # noqa: E731
    scale = 1.0 + 0.05 * amount * float(u(1))
    turn = _rotation(Z, 10.0 * amount * float(u(1)))
    dcol = (0.04 * amount * u(3)).tolist()
    prims = []
    for p in obj.primitives:
        centre = (turn @ torch.tensor(p.center, dtype=torch.float64) * scale).tolist()
        params = (
            tuple(v * scale for v in p.params[:3]) + tuple(p.params[3:])
            if p.kind == "box"
            else tuple(v * scale for v in p.params)
        )
        col = lambda c: tuple(min(max(ci + di, 0.05), 0.95) for ci, di in zip(c, dcol))  # noqa: E731
        prims.append(
            Primitive(
                p.kind,
                params,
                tuple(centre),
                turn @ p.rotation,
                col(p.color),
                col(p.color2),
                p.pattern,
                p.p0 * scale if p.pattern in ("band", "gradient") else p.p0,
            )
        )
    return SDFObject(obj.name, prims)


def build_catalogue(seed: int = 0, objects_per_prompt: int = 3, jitter: float = 1.0) -> dict[str, list[SDFObject]]:
    """The built-in prompts and their ground-truth objects, jittered reproducibly by ``seed``."""
    templates = _catalogue_templates()
    if not 1 <= objects_per_prompt <= 3:
        raise ValueError(f"objects_per_prompt={objects_per_prompt} must be 1, 2 or 3")
    g = torch.Generator().manual_seed(int(seed))
    return {k: [_jitter(o, g, jitter) for o in v[:objects_per_prompt]] for k, v in templates.items()}
