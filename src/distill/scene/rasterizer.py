"""A differentiable 3D Gaussian Splatting rasterizer in plain PyTorch (CPU and CUDA).

Projection (EWA, gsplat >= 1.5 / graphdeco, OpenCV camera: +z forward, +y down):
    q = q / |q| = (w, x, y, z),  R(q) the rotation,  M = R diag(s),  Sigma = M M^T
    mu_c = R_c mu + t_c,  Sigma_c = R_c Sigma R_c^T;    culled when z = mu_c.z <= near (or >= far)
    u = f_x x / z + c_x,  v = f_y y / z + c_y            pixel (i, j) has its centre at (j + 0.5, i + 0.5)
    J = [[f_x / z, 0, -f_x x~ / z^2], [0, f_y / z, -f_y y~ / z^2]],  x~ = z clamp(x / z, -lim_x-, lim_x+),
        lim_x+ = (W - c_x) / f_x + 0.3 tan_fovx, lim_x- = c_x / f_x + 0.3 tan_fovx  (the "1.3 tan(fov/2)" clamp)
    Sigma_2D = J Sigma_c J^T + eps2d I  (eps2d = 0.3 px: the low-pass dilation)
    conic (A, B, C) = (Sigma_yy, -Sigma_xy, Sigma_xx) / det Sigma_2D
    radius per axis = ceil(e sqrt(Sigma_2D,aa)), e = min(3.33, sqrt(2 ln(255 o)))  (gsplat 1.5: opacity-aware box,
        exactly the pixels where alpha >= 1/255 can hold; Gaussians with o < 1/255 are culled)

Rasterization (per pixel p, Gaussians in increasing camera depth z, T_0 = 1):
    d = mu_2D - p,  sigma = 1/2 (A dx^2 + C dy^2) + B dx dy
    alpha = min(alpha_max, o exp(-sigma)); skipped (alpha := 0) unless sigma >= 0 and alpha >= 1/255
    stop before the first i with T_i (1 - alpha_i) <= T_stop  (gsplat: "le")  or  < T_stop  (graphdeco: "lt")
    w_i = alpha_i T_i,  T_{i+1} = T_i (1 - alpha_i)
    rgb = sum_i w_i c_i + T_final bg,  alpha = sum_i w_i = 1 - T_final,
    depth = sum_i w_i z_i  (the NeRF renderer's convention: not divided by alpha),
    expected_depth = depth / max(alpha, 1e-10)  (gsplat's "ED"),  depth_sq = sum_i w_i z_i^2

Implementation: sparse (pixel, Gaussian) pairs instead of a dense pixels x Gaussians product. Every Gaussian
emits the pixels of its box; pairs with alpha < 1/255 are dropped (no gradient, as in the kernels); the rest are
sorted by pixel (stably, so each pixel's list stays in depth order); the transmittance is a segmented product done
as a float64 cumulative sum of log(1 - alpha). The work is proportional to the pairs that contribute, which is
what tile culling buys the CUDA kernels. The stop rule is a non-differentiable prefix mask, as in the kernels.

Constants that differ between implementations are settings (``RasterConfig``): alpha_max 0.99 (graphdeco, gsplat
after 1.5.3) or 0.999 (gsplat <= 1.5.3), near 0.2 (graphdeco) or 0.01 (gsplat), the stop rule. graphdeco's own
3-sigma circle + 16 px tile culling can drop alpha up to ~0.011 outside the circle; we evaluate every pixel with
alpha >= 1/255 (gsplat's semantics), see README's fidelity list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

STOP_RULES = ("le", "lt")
SH_C0 = 0.28209479177387814


@dataclass
class RasterConfig:
    """Kernel constants (defaults: graphdeco's, the rasterizer of threestudio-3dgs and every public recipe)."""

    alpha_max: float = 0.99  # graphdeco / gsplat > 1.5.3; gsplat <= 1.5.3 uses 0.999
    near_plane: float = 0.2  # graphdeco's hard-coded 0.2; gsplat's default 0.01
    far_plane: float = 1e10
    eps2d: float = 0.3  # low-pass dilation of the 2D covariance (px^2)
    min_alpha: float = 1.0 / 255.0
    transmittance_stop: float = 1e-4
    stop_rule: str = "lt"  # graphdeco: stop when T (1 - a) < 1e-4 | "le": gsplat, <= 1e-4

    def validate(self, where: str = "raster") -> None:
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"{where}.stop_rule={self.stop_rule!r} is not one of {list(STOP_RULES)}")
        if not 0.0 < self.alpha_max < 1.0:
            raise ValueError(f"{where}.alpha_max={self.alpha_max} must lie in (0, 1)")
        if not 0.0 <= self.near_plane < self.far_plane:
            raise ValueError(f"{where}.near_plane={self.near_plane} must be >= 0 and below far_plane")
        if self.eps2d < 0:
            raise ValueError(f"{where}.eps2d={self.eps2d} must be >= 0")
        if not 0.0 < self.min_alpha < self.alpha_max:
            raise ValueError(f"{where}.min_alpha={self.min_alpha} must lie in (0, alpha_max)")
        if not 0.0 <= self.transmittance_stop < 1.0:
            raise ValueError(f"{where}.transmittance_stop={self.transmittance_stop} must lie in [0, 1)")


@dataclass
class Projection:
    """Per camera c and Gaussian i: screen means (C, N, 2), conics (C, N, 3), depths (C, N), radii (C, N, 2) int."""

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices (N, 3, 3) of quaternions (N, 4) in wxyz order (normalised here)."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.view(*quats.shape[:-1], 3, 3)


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """Sigma = R diag(s) (R diag(s))^T, (N, 3, 3); ``scales`` are the activated (positive) scales."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def camera_matrices(cameras) -> tuple[Tensor, Tensor]:
    """World-to-camera OpenCV view matrices (B, 4, 4) and intrinsics (B, 3, 3) of ``Cameras`` (OpenGL c2w, square
    pixels, focal from fovy, principal point at the image centre; the NeRF renderer's rays go through the same
    pixel centres)."""
    c2w = cameras.c2w.clone()
    c2w[:, :3, 1:3] = -c2w[:, :3, 1:3]  # OpenGL (-z forward, +y up) -> OpenCV (+z forward, +y down)
    viewmats = torch.linalg.inv(c2w)
    f = cameras.focal().to(c2w.dtype)
    K = torch.zeros(len(cameras), 3, 3, dtype=c2w.dtype, device=c2w.device)
    K[:, 0, 0], K[:, 1, 1] = f, f
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = 0.5 * cameras.width, 0.5 * cameras.height, 1.0
    return viewmats, K


def project(
    means: Tensor,
    covars: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    cfg: RasterConfig,
    opacities: Tensor | None = None,
) -> Projection:
    """EWA projection of N Gaussians into C cameras (module doc). ``opacities`` (N,) make the radii opacity-aware
    (gsplat 1.5 CUDA); without them the box is 3.33 sigma (gsplat's torch reference)."""
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    mc = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # (C, N, 3)
    cc = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # (C, N, 3, 3)
    x, y, z = mc.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tanx, tany = 0.5 * width / fx, 0.5 * height / fy
    zs = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))  # culled below; avoids inf in the graph
    xt = zs * torch.clamp(x / zs, min=-(cx / fx + 0.3 * tanx), max=(width - cx) / fx + 0.3 * tanx)
    yt = zs * torch.clamp(y / zs, min=-(cy / fy + 0.3 * tany), max=(height - cy) / fy + 0.3 * tany)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / zs, zero, -fx * xt / zs**2, zero, fy / zs, -fy * yt / zs**2], dim=-1).view(*z.shape, 2, 3)
    cov2d = J @ cc @ J.transpose(-1, -2)
    a = cov2d[..., 0, 0] + cfg.eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + cfg.eps2d
    det = (a * c - b * b).clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)
    with torch.no_grad():
        if opacities is None:
            extend = torch.full_like(z, 3.33)
            alive = torch.ones_like(z, dtype=torch.bool)
        else:
            o = opacities.detach()[None].expand_as(z)
            alive = o >= cfg.min_alpha
            extend = torch.sqrt(2.0 * torch.log(o.clamp_min(cfg.min_alpha) / cfg.min_alpha)).clamp_max(3.33)
        radii = torch.stack([torch.ceil(extend * a.sqrt()), torch.ceil(extend * c.sqrt())], dim=-1)
        valid = alive & (det > 0) & (z > cfg.near_plane) & (z < cfg.far_plane)
        mx, my = means2d[..., 0], means2d[..., 1]
        inside = (mx + radii[..., 0] > 0) & (mx - radii[..., 0] < width) & (my + radii[..., 1] > 0)
        inside &= my - radii[..., 1] < height
        radii = torch.where((valid & inside)[..., None], radii, torch.zeros_like(radii))
        radii = torch.nan_to_num(radii, nan=0.0, posinf=0.0, neginf=0.0).to(torch.int32)
    return Projection(means2d=means2d, conics=conics, depths=z, radii=radii)


def _splat_features(proj: Projection, opacities: Tensor, colors: Tensor) -> Tensor:
    """Per splat (camera c, Gaussian i), row c * N + i: mean2d x y, conic A B C, depth, opacity, colour (C * N, 7 + D).
    One packed table makes every per-pair gather a single index_select (and its backward one index_add)."""
    C, N = proj.depths.shape
    col = colors if colors.dim() == 3 else colors[None].expand(C, *colors.shape)
    opac = opacities[None, :, None].expand(C, N, 1)
    feats = torch.cat([proj.means2d, proj.conics, proj.depths[..., None], opac.to(col.dtype), col], dim=-1)
    return feats.reshape(C * N, -1)


@torch.no_grad()
def _pairs(
    proj: Projection, feats: Tensor, width: int, height: int, cfg: RasterConfig, chunk_pairs: int = 2**24
) -> tuple[Tensor, ...]:
    """Every (splat, pixel) pair with alpha >= min_alpha, grouped by pixel, each pixel's Gaussians in increasing
    depth: splat row (c * N + i), global pixel index (c * H * W + y * W + x), pixel centre x and y."""
    C, N = proj.depths.shape
    dev = proj.depths.device
    order = torch.argsort(proj.depths.detach(), dim=1)  # depth order per camera
    splat = (order + torch.arange(C, device=dev)[:, None] * N).reshape(-1)
    r = proj.radii.reshape(-1, 2).index_select(0, splat)
    splat = splat[r[:, 0] > 0]
    if len(splat) == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e, feats.new_zeros(0), feats.new_zeros(0)
    # mean x y, conic A B C, and log(o / min_alpha): alpha >= min_alpha  <=>  sigma <= log(o / min_alpha)
    f = feats.detach().index_select(0, splat)[:, :7]
    f[:, 5] = torch.log(f[:, 6] / cfg.min_alpha)
    f = f[:, :6].contiguous()
    r = proj.radii.reshape(-1, 2).index_select(0, splat).to(f.dtype)
    mx, my = f[:, 0], f[:, 1]
    x_lo = torch.ceil(mx - r[:, 0] - 0.5).clamp(0, width).long()
    x_hi = torch.floor(mx + r[:, 0] - 0.5).clamp(-1, width - 1).long()
    y_lo = torch.ceil(my - r[:, 1] - 0.5).clamp(0, height).long()
    y_hi = torch.floor(my + r[:, 1] - 0.5).clamp(-1, height - 1).long()
    wx = (x_hi - x_lo + 1).clamp_min(0)
    cnt = wx * (y_hi - y_lo + 1).clamp_min(0)
    total = int(cnt.sum())
    if total == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e, feats.new_zeros(0), feats.new_zeros(0)
    # the box pairs in chunks of splats (at most ``chunk_pairs`` each): only the contributing pairs are kept
    csum = torch.cumsum(cnt, 0)
    sids, pxs, pys = [], [], []
    lo = 0
    while lo < len(cnt):
        base = int(csum[lo - 1]) if lo > 0 else 0
        hi = max(int(torch.searchsorted(csum, base + chunk_pairs, right=True)), lo + 1)
        c = cnt[lo:hi]
        n_pairs = int(c.sum())
        k = torch.repeat_interleave(torch.arange(lo, hi, device=dev), c)
        local = torch.arange(n_pairs, device=dev) - (csum[lo:hi] - c - base).repeat_interleave(c)
        w = wx.index_select(0, k)
        py = local // w
        px = x_lo.index_select(0, k) + (local - py * w)
        py = py + y_lo.index_select(0, k)
        fk = f.index_select(0, k)
        dx, dy = fk[:, 0] - (px.to(f.dtype) + 0.5), fk[:, 1] - (py.to(f.dtype) + 0.5)
        sigma = 0.5 * (fk[:, 2] * dx * dx + fk[:, 4] * dy * dy) + fk[:, 3] * dx * dy
        ok = torch.nonzero((sigma >= 0) & (sigma <= fk[:, 5])).squeeze(1)
        sids.append(splat.index_select(0, k.index_select(0, ok)))
        pxs.append(px.index_select(0, ok))
        pys.append(py.index_select(0, ok))
        lo = hi
    sid, px, py = torch.cat(sids), torch.cat(pxs), torch.cat(pys)
    pix = torch.div(sid, N, rounding_mode="floor") * (height * width) + py * width + px
    # stable radix sort on 32-bit keys (an int64 stable sort is ~50x slower on the CPU)
    key = pix.to(torch.int32) if C * height * width < 2**31 else pix
    perm = torch.sort(key, stable=True).indices
    return (
        sid.index_select(0, perm),
        pix.index_select(0, perm),
        px.index_select(0, perm).to(f.dtype) + 0.5,
        py.index_select(0, perm).to(f.dtype) + 0.5,
    )


def rasterize(
    proj: Projection,
    opacities: Tensor,
    colors: Tensor,
    width: int,
    height: int,
    cfg: RasterConfig,
    background: Tensor | None = None,
    chunk_pairs: int = 2**24,
) -> dict[str, Tensor]:
    """Composite projected Gaussians front to back (module doc). The candidate (box) pairs are generated in
    chunks of at most ``chunk_pairs``, which bounds the memory before the alpha filter.

    opacities (N,) in [0, 1]; colors (N, D) or (C, N, D); background (C, D) or None (black).
    Returns rgb (C, H, W, D) composited on the background, alpha, depth, expected_depth, depth_sq (C, H, W, 1),
    and n_pairs (0-d): the contributing (pixel, Gaussian) pairs.
    """
    C, N = proj.depths.shape
    D = colors.shape[-1]
    P = C * height * width
    dt = proj.means2d.dtype
    feats = _splat_features(proj, opacities, colors)
    sid, pix, pxc, pyc = _pairs(proj, feats, width, height, cfg, chunk_pairs)
    # unbind, not column slices: a slice's backward writes a full-size zero tensor per column
    mx, my, ca, cb, cc, z, o, *col = feats.index_select(0, sid).unbind(1)
    dx, dy = mx - pxc, my - pyc
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    alpha = (o * torch.exp(-sigma)).clamp_max(cfg.alpha_max)
    # segmented front-to-back transmittance: log T = cumulative sum of log(1 - alpha) within each pixel
    la = torch.log1p(-alpha).double()
    cs = torch.cumsum(la, 0)
    counts = torch.bincount(pix, minlength=P)
    first = (torch.cumsum(counts, 0) - counts).index_select(0, pix)  # index of each pixel's first pair
    cs_excl = cs - la
    log_t_excl = cs_excl - cs_excl.index_select(0, first)
    with torch.no_grad():
        log_t_incl = log_t_excl + la
        thr = math.log(cfg.transmittance_stop) if cfg.transmittance_stop > 0 else -math.inf
        keep = log_t_incl > thr if cfg.stop_rule == "le" else log_t_incl >= thr
        # the first dropped pair ends the pixel: keep only the prefix before it
        dropped = (~keep).to(torch.int32)
        seen = torch.cumsum(dropped, 0)
        keep = (seen - (seen - dropped).index_select(0, first)) == 0
    w = alpha * torch.exp(log_t_excl).to(dt) * keep.to(dt)
    wz = w * z
    vals = torch.stack([*(w * c for c in col), w, wz, wz * z], dim=1)
    acc = torch.zeros(P, D + 3, dtype=dt, device=w.device)
    acc = acc.index_add(0, pix, vals)
    rgb, out_alpha, depth, depth_sq = acc[:, :D], acc[:, D], acc[:, D + 1], acc[:, D + 2]
    if background is not None:
        bg = background.to(dt).reshape(C, 1, D).expand(C, height * width, D).reshape(P, D)
        rgb = rgb + (1.0 - out_alpha)[:, None] * bg
    shape = (C, height, width)
    return {
        "rgb": rgb.reshape(*shape, D),
        "alpha": out_alpha.reshape(*shape, 1),
        "depth": depth.reshape(*shape, 1),
        "expected_depth": (depth / out_alpha.clamp_min(1e-10)).reshape(*shape, 1),
        "depth_sq": depth_sq.reshape(*shape, 1),
        "n_pairs": keep.sum(),
    }


def sh0_to_rgb(f_dc: Tensor) -> Tensor:
    """Colour of SH degree 0 coefficients: max(0, 0.5 + C0 f_dc) (graphdeco / gsplat)."""
    return (0.5 + SH_C0 * f_dc).clamp_min(0.0)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / SH_C0
