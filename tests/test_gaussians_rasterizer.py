"""The plain-PyTorch Gaussian rasterizer against independent computations: gsplat's own pure-PyTorch projection
(``gsplat.cuda._torch_impl``, CPU, no compile; skipped with the reason when gsplat is not installed), a float64
closed form of the projection, a literal per-pixel front-to-back loop (colour, alpha, depth, stop rule, alpha cap),
and finite differences (torch.autograd.gradcheck)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.scene.cameras import cameras_from_spherical
from distill.scene.rasterizer import (
    RasterConfig,
    camera_matrices,
    covariances,
    project,
    quat_to_rotmat,
    rasterize,
)


def random_gaussians(n: int, seed: int, dtype=torch.float64, scale=(-3.5, -2.0), radius=0.6):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) * 2 - 1) * radius
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = torch.exp(scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=g, dtype=dtype))
    opac = torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, quats, scales, opac, colors


def random_cameras(b: int, h: int, w: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(b, 4, generator=g, dtype=torch.float64)
    cams = cameras_from_spherical(
        -10 + 55 * u[:, 0], -180 + 360 * u[:, 1], 1.5 + 0.5 * u[:, 2], 40 + 30 * u[:, 3], h, w
    )
    cams.c2w = cams.c2w.to(dtype)
    cams.fovy = cams.fovy.to(dtype)
    return cams


# ------------------------------------------------------------------------------------------------ projection
def test_projection_matches_gsplat_torch_reference():
    impl = pytest.importorskip("gsplat.cuda._torch_impl", reason="gsplat not installed (pip install gsplat==1.5.3)")
    means, quats, scales, opac, _ = random_gaussians(400, 0, torch.float32, radius=1.2)
    cams = random_cameras(3, 48, 40, 1, torch.float32)
    viewmats, Ks = camera_matrices(cams)
    cfg = RasterConfig(near_plane=0.01, alpha_max=0.999, stop_rule="le")
    ours = project(means, covariances(quats, scales), viewmats, Ks, 40, 48, cfg)
    covars, _ = impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = impl._fully_fused_projection(
        means, covars, viewmats, Ks, 40, 48, eps2d=0.3, near_plane=0.01
    )
    # gsplat's own tests compare its CUDA and torch projections at rtol = atol = 1e-4 (tests/test_basic.py); the
    # same float32 operations in another order differ by a few ulps of |mean2d| ~ 50 px
    vis = radii.min(-1).values > 0
    assert vis.sum() > 300 and torch.equal(ours.radii.min(-1).values > 0, vis)
    torch.testing.assert_close(ours.means2d[vis], means2d[vis], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.conics[vis], conics[vis], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.depths, depths, rtol=1e-6, atol=1e-6)
    # radii: gsplat's torch reference uses the 3.33-sigma box (no opacities given)
    assert torch.equal(ours.radii[vis], radii[vis])


def test_projection_matches_float64_closed_form():
    """One Gaussian, written out by hand: world -> camera, pinhole, clamped Jacobian, dilation, conic."""
    means, quats, scales, _, _ = random_gaussians(20, 3, radius=1.5)
    cams = random_cameras(2, 32, 48, 4)
    viewmats, Ks = camera_matrices(cams)
    cfg = RasterConfig(near_plane=0.01)
    proj = project(means, covariances(quats, scales), viewmats, Ks, 48, 32, cfg)
    for c in range(2):
        for i in range(20):
            q = quats[i] / quats[i].norm()
            w, x, y, z = q.tolist()
            R = torch.tensor(
                [
                    [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                    [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                    [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
                ],
                dtype=torch.float64,
            )
            S = R @ torch.diag(scales[i] ** 2) @ R.T
            # the camera from its OpenGL pose: camera axes right, down, forward
            c2w = cams.c2w[c]
            right, down, fwd = c2w[:3, 0], -c2w[:3, 1], -c2w[:3, 2]
            Rc = torch.stack([right, down, fwd])
            p = Rc @ (means[i] - c2w[:3, 3])
            f = 0.5 * 32 / math.tan(0.5 * float(cams.fovy[c]))
            u, v = f * p[0] / p[2] + 24, f * p[1] / p[2] + 16
            limx, limy = 24 / f * 1.3, 16 / f * 1.3
            tx = p[2] * min(max(p[0] / p[2], -limx), limx)
            ty = p[2] * min(max(p[1] / p[2], -limy), limy)
            J = torch.tensor([[f / p[2], 0, -f * tx / p[2] ** 2], [0, f / p[2], -f * ty / p[2] ** 2]])
            cov = J @ Rc @ S @ Rc.T @ J.T + 0.3 * torch.eye(2, dtype=torch.float64)
            inv = torch.linalg.inv(cov)
            torch.testing.assert_close(proj.means2d[c, i], torch.stack([u, v]), rtol=1e-10, atol=1e-9)
            torch.testing.assert_close(proj.depths[c, i], p[2], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(proj.conics[c, i], torch.stack([inv[0, 0], inv[0, 1], inv[1, 1]]))


def test_quaternion_rotation_is_orthonormal_and_wxyz():
    q = torch.tensor([[math.cos(0.3), 0.0, 0.0, math.sin(0.3)]], dtype=torch.float64) * 2.5  # not unit
    R = quat_to_rotmat(q)[0]
    # rotation by 0.6 rad about +z
    expect = torch.tensor(
        [[math.cos(0.6), -math.sin(0.6), 0], [math.sin(0.6), math.cos(0.6), 0], [0, 0, 1]], dtype=torch.float64
    )
    torch.testing.assert_close(R, expect)


# ------------------------------------------------------------------------------------------------ rasterizer
def loop_reference(proj, opac, colors, width, height, cfg, background):
    """The kernel, literally: per pixel, Gaussians sorted by depth, sequential float64 compositing."""
    C, N = proj.depths.shape
    out = torch.zeros(C, height, width, 5, dtype=torch.float64)
    for c in range(C):
        order = torch.argsort(proj.depths[c])
        for py in range(height):
            for px in range(width):
                T, rgb, depth = 1.0, torch.zeros(3, dtype=torch.float64), 0.0
                for i in order.tolist():
                    if proj.radii[c, i, 0] <= 0:
                        continue
                    A, B, Cc = proj.conics[c, i].tolist()
                    dx = float(proj.means2d[c, i, 0]) - (px + 0.5)
                    dy = float(proj.means2d[c, i, 1]) - (py + 0.5)
                    sigma = 0.5 * (A * dx * dx + Cc * dy * dy) + B * dx * dy
                    if sigma < 0:
                        continue
                    a = min(cfg.alpha_max, float(opac[i]) * math.exp(-sigma))
                    if a < cfg.min_alpha:
                        continue
                    nT = T * (1 - a)
                    if (nT <= cfg.transmittance_stop) if cfg.stop_rule == "le" else (nT < cfg.transmittance_stop):
                        break
                    rgb += colors[i] * a * T
                    depth += float(proj.depths[c, i]) * a * T
                    T = nT
                out[c, py, px, :3] = rgb + T * background[c]
                out[c, py, px, 3] = 1 - T
                out[c, py, px, 4] = depth
    return out


@pytest.mark.parametrize("stop_rule,alpha_max", [("lt", 0.99), ("le", 0.999)])
def test_rasterizer_matches_per_pixel_loop(stop_rule, alpha_max):
    # dense, opaque Gaussians: many pixels saturate, so the stop rule and the alpha cap are exercised
    means, quats, scales, opac, colors = random_gaussians(60, 5, scale=(-2.5, -1.5), radius=0.4)
    opac = 0.5 + 0.5 * opac
    opac[:10] = 1.0  # alpha reaches the cap at the centres
    cams = random_cameras(2, 14, 12, 6)
    cfg = RasterConfig(alpha_max=alpha_max, stop_rule=stop_rule)
    viewmats, Ks = camera_matrices(cams)
    proj = project(means, covariances(quats, scales), viewmats, Ks, 12, 14, cfg, opacities=opac)
    bg = torch.tensor([[0.2, 0.5, 0.9], [1.0, 1.0, 1.0]], dtype=torch.float64)
    out = rasterize(proj, opac, colors, 12, 14, cfg, background=bg)
    ref = loop_reference(proj, opac, colors, 12, 14, cfg, bg)
    chunked = rasterize(proj, opac, colors, 12, 14, cfg, background=bg, chunk_pairs=37)  # many small chunks
    assert torch.equal(chunked["rgb"], out["rgb"]) and torch.equal(chunked["depth"], out["depth"])
    blocked = rasterize(proj, opac, colors, 12, 14, cfg, background=bg, block_pairs=29)  # many pixel ranges
    assert int(blocked["n_pairs"]) == int(out["n_pairs"])
    for k in ("rgb", "alpha", "depth"):  # only the float64 cumulative sums' starting points differ
        torch.testing.assert_close(blocked[k], out[k], rtol=1e-12, atol=1e-12)
    assert (ref[..., 3] > 1 - 1e-3).sum() > 20  # saturated pixels: the stop rule ends them
    # float64 throughout; the transmittance is exp(sum log(1 - a)) instead of a running product: ~1e-15 relative
    torch.testing.assert_close(out["rgb"], ref[..., :3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["alpha"][..., 0], ref[..., 3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["depth"][..., 0], ref[..., 4], rtol=1e-10, atol=1e-10)


def test_stop_rule_and_alpha_cap_change_the_image():
    """Two Gaussians at one pixel: alpha_max caps the first, the stop rule drops the second."""
    means = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64)  # the second is behind
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2, dtype=torch.float64)
    scales = torch.full((2, 3), 0.2, dtype=torch.float64)
    opac = torch.ones(2, dtype=torch.float64)
    colors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    cams = cameras_from_spherical(*(torch.tensor([v], dtype=torch.float64) for v in (90.0, 0.0, 2.0, 50.0)), 3, 3)
    viewmats, Ks = camera_matrices(cams)
    bg = torch.zeros(1, 3, dtype=torch.float64)
    res = {}
    for am, thr in ((0.99, 1e-4), (0.999, 1e-4), (0.99, 1e-3)):
        cfg = RasterConfig(alpha_max=am, transmittance_stop=thr)
        proj = project(means, covariances(quats, scales), viewmats, Ks, 3, 3, cfg, opacities=opac)
        res[(am, thr)] = rasterize(proj, opac, colors, 3, 3, cfg, bg)["rgb"][0, 1, 1]
    # camera straight above (+z): the Gaussian at z=0.3 is in front. Its alpha is the cap at the centre pixel.
    # (0.99, 1e-4): T after the first = 0.01, after the second 1e-4 -> not < 1e-4: kept: green 0.99, red 0.0099
    torch.testing.assert_close(res[(0.99, 1e-4)], torch.tensor([0.99 * 0.01, 0.99, 0.0], dtype=torch.float64))
    # (0.999, 1e-4): T after the second would be 1e-6 < 1e-4: dropped, green 0.999 only
    torch.testing.assert_close(res[(0.999, 1e-4)], torch.tensor([0.0, 0.999, 0.0], dtype=torch.float64))
    # (0.99, 1e-3): 1e-4 < 1e-3: the second is dropped
    torch.testing.assert_close(res[(0.99, 1e-3)], torch.tensor([0.0, 0.99, 0.0], dtype=torch.float64))


def test_gradcheck_tiny_scene():
    """Analytic gradients of rgb / alpha / depth w.r.t. means, log-scales, quats, opacities and colours against
    central finite differences (float64). The alpha >= 1/255 filter and the stop mask are piecewise constant, as
    in the kernels; this scene has no pair within the finite-difference step of either boundary."""
    means, quats, scales, opac, colors = random_gaussians(6, 8, scale=(-1.8, -1.2), radius=0.3)
    cams = random_cameras(2, 6, 5, 9)
    viewmats, Ks = camera_matrices(cams)
    cfg = RasterConfig()
    bg = torch.full((2, 3), 0.5, dtype=torch.float64)

    def f(m, ls, q, o, c):
        proj = project(m, covariances(q, ls.exp()), viewmats, Ks, 5, 6, cfg, opacities=o)
        out = rasterize(proj, o, c, 5, 6, cfg, bg)
        return out["rgb"], out["alpha"], out["depth"]

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, scales.log(), quats, 0.2 + 0.7 * opac, colors))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def sequential_reference(proj, opac, colors, width, height, cfg, background):
    """The kernel's front-to-back loop over Gaussians (depth order), vectorised over pixels, in differentiable
    float64 torch: autograd of this is an independent check of the rasterizer's hand-written backward."""
    C, N = proj.depths.shape
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    px, py = xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5
    outs = []
    for c in range(C):
        T = torch.ones(height * width, dtype=torch.float64)
        done = torch.zeros(height * width, dtype=torch.bool)
        rgb = torch.zeros(height * width, 3, dtype=torch.float64)
        depth = torch.zeros(height * width, dtype=torch.float64)
        for i in torch.argsort(proj.depths[c].detach()).tolist():
            if proj.radii[c, i, 0] <= 0:
                continue
            A, B, Cc = proj.conics[c, i]
            dx, dy = proj.means2d[c, i, 0] - px, proj.means2d[c, i, 1] - py
            sigma = 0.5 * (A * dx * dx + Cc * dy * dy) + B * dx * dy
            alpha = torch.clamp(opac[i] * torch.exp(-sigma), max=cfg.alpha_max)
            valid = (sigma >= 0) & (alpha >= cfg.min_alpha) & ~done
            nT = T * (1 - alpha)
            stop = (nT <= cfg.transmittance_stop) if cfg.stop_rule == "le" else (nT < cfg.transmittance_stop)
            done = done | (valid & stop)
            use = valid & ~stop
            rgb = rgb + torch.where(use[:, None], (alpha * T)[:, None] * colors[i], 0.0)
            depth = depth + torch.where(use, alpha * T * proj.depths[c, i], 0.0)
            T = torch.where(use, nT, T)
        outs.append(torch.cat([rgb + T[:, None] * background[c], (1 - T)[:, None], depth[:, None]], 1))
    return torch.stack(outs).reshape(C, height, width, 5)


@pytest.mark.parametrize("stop_rule,alpha_max,block_pairs", [("lt", 0.99, None), ("le", 0.999, 23)])
def test_backward_matches_autograd_of_the_sequential_loop(stop_rule, alpha_max, block_pairs):
    """The hand-written reverse pass (suffix sums, alpha cap, stop rule) against autograd through the literal
    per-Gaussian loop, on a scene where many pixels saturate (so the cap and the stop rule are both hit).
    float64 on both sides; the only difference is exp(sum log(1 - a)) against a running product: ~1e-13.
    block_pairs=23 composites (and differentiates) in many ranges of whole pixels."""
    means, quats, scales, opac, colors = random_gaussians(40, 11, scale=(-2.5, -1.5), radius=0.4)
    opac = 0.5 + 0.5 * opac
    opac[:8] = 1.0
    cams = random_cameras(2, 10, 9, 4)
    cfg = RasterConfig(alpha_max=alpha_max, stop_rule=stop_rule)
    viewmats, Ks = camera_matrices(cams)
    bg = torch.tensor([[0.2, 0.5, 0.9], [1.0, 1.0, 1.0]], dtype=torch.float64)
    weights = torch.randn(2, 10, 9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for impl in ("ours", "loop"):
        leaves = [t.clone().requires_grad_(True) for t in (means, scales, quats, opac, colors)]
        m, s, q, o, c = leaves
        proj = project(m, covariances(q, s), viewmats, Ks, 9, 10, cfg, opacities=o)
        if impl == "ours":
            out = rasterize(proj, o, c, 9, 10, cfg, background=bg, block_pairs=block_pairs)
            maps = torch.cat([out["rgb"], out["alpha"], out["depth"]], -1)
        else:
            maps = sequential_reference(proj, o, c, 9, 10, cfg, bg)
        (maps * weights).sum().backward()
        grads.append([t.grad for t in leaves])
        if impl == "ours":
            assert int(out["n_pairs"]) > 0
            saturated = int((out["alpha"] > 1 - 1e-3).sum())
    assert saturated > 10
    for name, a, b in zip(("means", "scales", "quats", "opacities", "colors"), *grads):
        assert float(b.abs().max()) > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_empty_and_offscreen_scenes_render_background():
    means, quats, scales, opac, colors = random_gaussians(5, 1)
    means = means + torch.tensor([0.0, 0.0, 50.0], dtype=torch.float64)  # far above every camera's view
    cams = random_cameras(1, 8, 8, 2)
    viewmats, Ks = camera_matrices(cams)
    cfg = RasterConfig()
    proj = project(means, covariances(quats, scales), viewmats, Ks, 8, 8, cfg, opacities=opac)
    bg = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    out = rasterize(proj, opac, colors, 8, 8, cfg, bg)
    assert int(out["n_pairs"]) == 0
    torch.testing.assert_close(out["rgb"], bg.view(1, 1, 1, 3).expand(1, 8, 8, 3))
    assert float(out["alpha"].abs().max()) == 0.0
