"""Regularisers: convexity sign on convex vs concave surfaces, closed forms, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from distill import losses
from distill.scene.cameras import orbit_cameras


def sphere_normal_map(inside: bool, elevation: float = 0.0, size: int = 32) -> torch.Tensor:
    """World normals (1, 3, H, W) of a unit sphere at the origin, seen by a camera at distance 3.

    Outside: the camera sees the convex front, normals point out (towards the camera).
    Inside: the camera sits at the centre and sees the concave far wall, whose surface normal
    (pointing out of the medium, i.e. into the cavity) faces the camera: n = -p.
    """
    cams = orbit_cameras(1, size, size, elevation_deg=elevation, distance=0.0 if inside else 3.0, fovy_deg=40.0)
    if inside:  # a camera at the centre looking along the orbit direction of azimuth -180
        from distill.scene.cameras import look_at

        az, el = math.radians(-180.0), math.radians(elevation)
        target = torch.tensor([[math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]])
        c2w = look_at(torch.zeros(1, 3), target=target)
        cams.c2w = c2w
    o, d = cams.rays()
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1.0
    disc = b * b - c
    hit = disc > 0
    t = -b - torch.sqrt(disc.clamp_min(0)) if not inside else -b + torch.sqrt(disc.clamp_min(0))
    p = o + t[..., None] * d
    n = p if not inside else -p
    n = torch.where(hit[..., None], n, torch.zeros_like(n))
    return n.permute(0, 3, 1, 2)


@pytest.mark.parametrize("elevation", [0.0, 20.0])
def test_convexity_sign_convex_vs_concave(elevation):
    convex = losses.convexity_loss(sphere_normal_map(inside=False, elevation=elevation))
    concave = losses.convexity_loss(sphere_normal_map(inside=True, elevation=elevation))
    assert convex < 0 < concave
    # the threestudio input encoding (n + 1) / 2 * opacity keeps the signs on a filled view
    enc = lambda n: (n + 1) / 2  # noqa: E731  (opacity 1 everywhere inside the view)
    assert losses.convexity_loss(enc(sphere_normal_map(inside=False, elevation=elevation))) < 0
    assert losses.convexity_loss(enc(sphere_normal_map(inside=True, elevation=elevation))) > 0


def test_convexity_definition_on_a_hand_built_map():
    # constant normals: no turning, zero loss; a map whose x-component grows to the right and
    # y-component grows downwards gives h = n_l.x n_r.y - n_l.y n_r.x etc.
    assert losses.convexity_loss(torch.ones(2, 3, 8, 8)).item() == 0.0
    n = torch.zeros(1, 3, 2, 2)
    n[0, 1, :, 1] = 1.0  # right column: y = 1;  left column: x = 1
    n[0, 0, :, 0] = 1.0
    # h = x_l * y_r - y_l * x_r = 1 for both rows, v = 0 -> loss = -(1 + 0)
    assert losses.convexity_loss(n, resolution=2).item() == pytest.approx(-1.0)


def test_opacity_sparsity_orientation_zvariance_closed_forms():
    o = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2)
    ent = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    want = (ent(1e-3) + ent(0.5) + ent(1 - 1e-3) + ent(0.25)) / 4
    assert losses.opacity_loss(o).item() == pytest.approx(want, rel=1e-6)
    assert losses.sparsity_loss(o).item() == pytest.approx(
        sum(math.sqrt(v**2 + 0.01) for v in (0.0, 0.5, 1.0, 0.25)) / 4, rel=1e-6
    )
    orient = torch.tensor([0.3, 0.1, 0.0, 0.2]).view(1, 1, 2, 2)
    assert losses.orientation_loss(orient, o).item() == pytest.approx(0.6 / 3)  # 3 pixels with O > 0
    zv = torch.tensor([5.0, 1.0, 2.0, 7.0]).view(1, 1, 2, 2)
    assert losses.z_variance_loss(zv, o).item() == pytest.approx(2.0)  # only O = 1 is > 0.5
    assert losses.z_variance_loss(zv, o * 0).item() == 0.0  # empty mask: 0, not NaN
    assert losses.orientation_loss(orient, o * 0).item() == pytest.approx(0.6)


def test_linear_schedule():
    s = losses.linear_schedule
    assert [s(k, 1.0, 0.1, 4000) for k in (0, 2000, 4000, 9000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert s(10, 0.15, 0.0, 3000) == pytest.approx(0.15 - 0.15 * 10 / 3000)
    assert s(5, 0.1, 0.1, 0) == 0.1 and s(5, 0.3, 0.2, 0) == 0.2
