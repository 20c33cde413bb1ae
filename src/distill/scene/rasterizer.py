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

Implementation: sparse (pixel, Gaussian) pairs instead of a dense pixels x Gaussians product (what tile culling
buys the CUDA kernels: the work is proportional to the pairs that contribute).
    1. Pairs (``_pairs``, no gradient): each visible Gaussian's box, padded to one of a few sides, is evaluated by
       broadcasting, bucket by bucket; the pairs with alpha >= 1/255 are kept as one integer key
       (pixel << bits | depth rank), and one sort of those unique keys groups them by pixel in depth order.
    2. Compositing (``_Composite``): per pair alpha, the transmittance as a float64 cumulative sum of
       log(1 - alpha) segmented by pixel, the stop rule as a mask on it (log T only decreases, so the kept pairs
       are a prefix), per-pixel sums as one sparse (CSR) product; the backward is the kernels' reverse pass
       written out (suffix sums from one more cumulative sum), so autograd stores no per-pair intermediates.
Measured speed and memory: ``benchmarks/bench_render.py`` (docs/benchmarks.md).

Constants that differ between implementations are settings (``RasterConfig``): alpha_max 0.99 (graphdeco, gsplat
after 1.5.3) or 0.999 (gsplat <= 1.5.3), near 0.2 (graphdeco) or 0.01 (gsplat), the stop rule. graphdeco's own
3-sigma circle + 16 px tile culling can drop alpha up to ~0.011 outside the circle; we evaluate every pixel with
alpha >= 1/255 (gsplat's semantics), see README's fidelity list.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
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


_BOX_SIDES = (1, 2, 3, 4, 6, 8, 12, 16, 24, *(int(2 ** (k / 2)) for k in range(10, 31)))  # <= 1.5x padding per axis
# the offset (px) of a padding pixel: sigma >= lambda_min(conic) / 2 * _FAR^2 overflows no float32 and passes no test
_FAR = 1e15


@torch.no_grad()
def _pairs(
    proj: Projection, opacities: Tensor, width: int, height: int, cfg: RasterConfig, chunk_pairs: int = 2**24
) -> tuple[Tensor, Tensor]:
    """Every (splat, pixel) pair with alpha >= min_alpha, grouped by pixel, each pixel's Gaussians in increasing
    depth: splat row (c * N + i) and global pixel index (c * H * W + y * W + x), both int64.

    Each visible splat's box (clamped to the image) is padded to the next side in ``_BOX_SIDES`` and splats of
    one side are evaluated together by broadcasting (no per-pair gathers), in chunks of at most ``chunk_pairs``
    box pixels. The kept pairs are ordered by one unique integer key, pixel * 2^k + depth rank, so a plain
    (unstable) sort of 32-bit keys both groups them by pixel and keeps each pixel's depth order."""
    C, N = proj.depths.shape
    dev = proj.depths.device
    dt = proj.means2d.dtype
    e = torch.zeros(0, dtype=torch.long, device=dev)
    order = torch.argsort(proj.depths.detach(), dim=1)  # depth order per camera
    splat = (order + torch.arange(C, device=dev)[:, None] * N).reshape(-1)
    r = proj.radii.reshape(-1, 2).index_select(0, splat)
    visible = r[:, 0] > 0
    splat = splat[visible]  # visible splats, camera-major, then by depth: their position is the depth rank
    V = len(splat)
    if V == 0:
        return e, e
    r = r[visible].to(dt)
    m2 = proj.means2d.detach().reshape(-1, 2).index_select(0, splat)
    con = proj.conics.detach().reshape(-1, 3).index_select(0, splat)
    o = opacities.detach().to(dt)[None].expand(C, N).reshape(-1).index_select(0, splat)
    # alpha >= min_alpha  <=>  sigma <= log(o / min_alpha)
    lim = torch.log(o / cfg.min_alpha)
    mx, my = m2[:, 0], m2[:, 1]
    x_lo = torch.ceil(mx - r[:, 0] - 0.5).clamp(0, width).long()
    y_lo = torch.ceil(my - r[:, 1] - 0.5).clamp(0, height).long()
    wx = (torch.floor(mx + r[:, 0] - 0.5).clamp(-1, width - 1).long() - x_lo + 1).clamp_min(0)
    wy = (torch.floor(my + r[:, 1] - 0.5).clamp(-1, height - 1).long() - y_lo + 1).clamp_min(0)
    side = torch.maximum(wx, wy)
    if int(side.max()) > _BOX_SIDES[-1]:
        raise ValueError(f"an image side of {int(side.max())} px is above the rasterizer's {_BOX_SIDES[-1]}")
    bucket = torch.searchsorted(torch.tensor(_BOX_SIDES, device=dev), side)  # smallest side >= the box
    bucket = torch.where(side > 0, bucket, -1)  # empty boxes (off the image after clamping): none
    rank_bits = max(1, (V - 1).bit_length())
    pix_bits = max(1, (C * height * width - 1).bit_length())
    kdt = torch.int32 if rank_bits + pix_bits <= 31 else torch.int64
    # splats grouped by bucket: each bucket is then a slice (views, no per-bucket gathers)
    by = torch.argsort(bucket, stable=True)
    nb = torch.bincount(bucket + 1, minlength=len(_BOX_SIDES) + 1).tolist()
    f = torch.stack([mx, my, con[:, 0], con[:, 1], con[:, 2], lim], 1).index_select(0, by)
    rank = torch.arange(V, device=dev).index_select(0, by).to(kdt)  # the depth rank of each row
    row0 = (torch.div(splat, N, rounding_mode="floor") * height).index_select(0, by)  # first image row of its camera
    x_lo, y_lo, wx, wy = (t.index_select(0, by) for t in (x_lo, y_lo, wx, wy))
    keys = []
    start = nb[0]
    for bi, count in enumerate(nb[1:]):
        sd = _BOX_SIDES[bi]
        ar = torch.arange(sd, device=dev)
        step = max(1, chunk_pairs // (sd * sd))
        for lo in range(start, start + count, step):
            sl = slice(lo, min(lo + step, start + count))
            xs = x_lo[sl, None] + ar  # (n, s) pixel columns / rows (int), pixel centres at + 0.5
            ys = y_lo[sl, None] + ar
            fx, fy, A, B, Cc, lm = (c[:, None] for c in f[sl].unbind(1))
            # outside its own box (the padding) a pixel gets a huge offset, so sigma is huge and the test fails
            dx = torch.where(ar < wx[sl, None], fx - (xs.to(dt) + 0.5), _FAR)
            dy = torch.where(ar < wy[sl, None], fy - (ys.to(dt) + 0.5), _FAR)
            qx, qy, bdy = 0.5 * A * dx * dx, 0.5 * Cc * dy * dy, B * dy
            sigma = (qx[:, None, :] + qy[:, :, None]) + bdy[:, :, None] * dx[:, None, :]
            ok = (sigma >= 0) & (sigma <= lm[..., None])
            # key = (global pixel << rank_bits) | depth rank, built in the box layout, then the kept ones taken
            krow = (((row0[sl, None] + ys) * width).to(kdt) << rank_bits) | rank[sl, None]
            kb = krow[:, :, None] + (xs.to(kdt) << rank_bits)[:, None, :]
            keys.append(kb[ok])
        start += count
    if not keys:
        return e, e
    key = torch.cat(keys)
    if key.device.type == "cpu":  # the keys are unique, so any sort gives the same order; numpy's vectorised
        key = torch.from_numpy(np.sort(key.numpy()))  # quicksort is ~4x faster than torch's radix sort here
    else:
        key = torch.sort(key).values
    key = key.long()
    pix = key >> rank_bits
    sid = splat.index_select(0, key & ((1 << rank_bits) - 1))
    return sid, pix


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of the (splat, pixel) pairs of ``_pairs``, with the kernels' reverse pass written
    out, so that autograd keeps no per-pair intermediates.

    Inputs per splat (S = C * N rows): means2d (S, 2), conics (S, 3), depths (S,), opacities (S,), colors (S, D).
    Forward per pair i of one pixel (in depth order): alpha_i, T_i = prod_{j < i} (1 - alpha_j) as exp of a float64
    cumulative sum of log(1 - alpha), w_i = alpha_i T_i for the kept prefix (stop rule), and per pixel
    (P, D + 3): sum_i w_i c_i, sum_i w_i, sum_i w_i z_i, sum_i w_i z_i^2.
    Backward, with v_i = dL/dw_i = c_i . g_rgb + g_alpha + z_i g_z + z_i^2 g_z2:
        dL/dalpha_i = v_i T_i - (sum_{j > i} v_j w_j) / (1 - alpha_i)
        alpha = min(alpha_max, o G), G = exp(-sigma):  dL/do = dL/dalpha G,  dL/dsigma = -dL/dalpha o G
            (zero where the cap is active)
        sigma = 1/2 (A dx^2 + C dy^2) + B dx dy, dx = mu_x - p_x:  dsigma/dmu = (A dx + B dy, C dy + B dx),
            dsigma/d(A, B, C) = (dx^2 / 2, dx dy, dy^2 / 2)
        dL/dc_i = w_i g_rgb,  dL/dz_i = w_i (g_z + 2 z_i g_z2)
    The pairs are processed in ranges of whole pixels (``_blocks``); in each, the prefix and suffix sums are one
    float64 cumulative sum read at each pixel's first / last pair, the per-pixel sums one sparse (CSR) product, and
    the per-splat gradients one ``scatter_add`` per attribute."""

    @staticmethod
    def forward(ctx, means2d, conics, depths, opacities, colors, sid, pix, width, height, n_pix, cfg, block):
        dt, dev, M = means2d.dtype, means2d.device, len(sid)
        tab = torch.cat([means2d, conics, opacities[:, None]], dim=1).t().contiguous()  # (6, S), for the backward
        # what the forward gathers per pair: mean x y, A / 2, B, C / 2, log o
        half = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.5], dtype=dt, device=dev)[:, None]
        tab_f = torch.cat([tab[:5] * half, torch.log(tab[5:])])
        # what each pair's weight multiplies: colour, 1, z, z^2 (gathered as rows of one (S, D + 3) table)
        feat_tab = torch.cat([colors, torch.ones_like(depths)[:, None], depths[:, None], depths[:, None] ** 2], 1)
        # pixel centres of every image pixel
        cx = (torch.arange(width, device=dev, dtype=dt) + 0.5).repeat(n_pix // width)
        cy = (
            (torch.arange(height, device=dev, dtype=dt) + 0.5)
            .repeat_interleave(width)
            .repeat(n_pix // (width * height))
        )
        counts = torch.bincount(pix, minlength=n_pix)
        ends = torch.cumsum(counts, 0)
        thr = math.log(cfg.transmittance_stop) if cfg.transmittance_stop > 0 else -math.inf
        acc = torch.zeros(n_pix, feat_tab.shape[1], dtype=dt, device=dev)
        ranges, saved, n_kept = [], [], torch.zeros((), dtype=torch.long, device=dev)
        for lo, hi in _blocks(ends, M, block):
            s_, p_ = sid[lo:hi], pix[lo:hi]
            mx, my, A2, B, C2, log_o = (row.index_select(0, s_) for row in tab_f)
            dx = mx - cx.index_select(0, p_)
            dy = my - cy.index_select(0, p_)
            sigma = dx * (A2 * dx + B * dy) + C2 * dy * dy  # = 1/2 (A dx^2 + C dy^2) + B dx dy
            a_raw = torch.exp(log_o - sigma)  # o exp(-sigma)
            alpha = a_raw.clamp_max(cfg.alpha_max)
            # segmented transmittance: log T = cumulative sum of log(1 - alpha) within each pixel (float64: the
            # sum runs over the block's pixels, each pixel's start is subtracted)
            cs = torch.cumsum(torch.log1p(-alpha), 0, dtype=torch.float64)
            cs_prev = torch.empty_like(cs)  # exclusive; log T_excl(i) == log T_incl(i - 1) exactly
            cs_prev[1:], cs_prev[:1] = cs[:-1], 0.0
            p0, p1 = int(p_[0]), int(p_[-1]) + 1
            q = p_ - p0  # block-local pixel of each pair
            e_ = ends[p0:p1] - lo  # block-local end of each of the block's pixels
            base = cs_prev.index_select(0, e_ - counts[p0:p1]).index_select(0, q)  # at each pixel's first pair
            log_t_incl = cs - base  # non-increasing within a pixel, so the kept pairs are a prefix
            keep = log_t_incl > thr if cfg.stop_rule == "le" else log_t_incl >= thr
            Tk = torch.where(keep, torch.exp((cs_prev - base).to(dt)), 0.0)  # T_i of the kept pairs, else 0
            w = alpha * Tk
            # per-pixel sums: the block's pairs are grouped by pixel, so one CSR (pixels x pairs) product
            crow = torch.cat([e_.new_zeros(1), e_])
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                rows = torch.sparse_csr_tensor(
                    crow, torch.arange(hi - lo, device=dev), torch.ones_like(w), (p1 - p0, hi - lo)
                )
            acc[p0:p1] = rows @ (feat_tab.index_select(0, s_) * w[:, None])
            last = (e_ - 1).index_select(0, q)
            ranges.append((lo, hi))
            saved += [last, dx, dy, a_raw, alpha, Tk, w]
            n_kept += keep.sum()
        # intermediates go through save_for_backward too: freed after the backward pass like autograd's own
        ctx.save_for_backward(tab, torch.cat([colors, depths[:, None]], 1).t().contiguous(), sid, pix, *saved)
        ctx.ranges, ctx.alpha_max = ranges, cfg.alpha_max
        ctx.mark_non_differentiable(n_kept)
        return acc, n_kept

    @staticmethod
    def backward(ctx, g_acc, _g_n):
        # per-pair quantities as separate contiguous rows: (M, k) layouts are slow to reduce along k on the CPU
        tab, cz, sid, pix, *saved = ctx.saved_tensors
        D, S = cz.shape[0] - 1, tab.shape[1]
        g_rows = g_acc.t()
        m = g_acc.new_zeros(7 + D, S)  # per splat: sums of the per-pair terms below
        for b, (lo, hi) in enumerate(ctx.ranges):
            last, dx, dy, a_raw, alpha, Tk, w = saved[7 * b : 7 * b + 7]
            s_, p_ = sid[lo:hi], pix[lo:hi]
            *col, z = (row.index_select(0, s_) for row in cz)
            gp = [row.index_select(0, p_) for row in g_rows]
            v = gp[D] + z * (gp[D + 1] + z * gp[D + 2])  # dL/dw per pair
            for c, gc in zip(col, gp[:D]):
                v = v + c * gc
            U = torch.cumsum(v * w, 0, dtype=torch.float64)
            after = (U.index_select(0, last) - U).to(v.dtype)  # sum of v w over the later pairs of the same pixel
            dalpha = v * Tk - after / (1.0 - alpha)  # dropped pairs: Tk = 0 and nothing kept after them: 0
            dsig = torch.where(a_raw <= ctx.alpha_max, dalpha * a_raw, 0.0)  # -dL/dsigma (no gradient at the cap)
            m1, m2 = dsig * dx, dsig * dy
            per_pair = (m1, m2, m1 * dx, m1 * dy, m2 * dy, dsig, w * (gp[D + 1] + 2.0 * z * gp[D + 2]))
            for k, x in enumerate(per_pair + tuple(w * gc for gc in gp[:D])):
                m[k].scatter_add_(0, s_, x)
        A, B, Cc, o = tab[2], tab[3], tab[4], tab[5]
        # sigma is quadratic in (dx, dy) with the splat's own conic: the sums of dsig dx^a dy^b are enough
        grads = torch.stack(
            [
                -(A * m[0] + B * m[1]),
                -(Cc * m[1] + B * m[0]),
                -0.5 * m[2],
                -m[3],
                -0.5 * m[4],
                m[6],
                torch.where(o > 0, m[5] / o, 0.0),  # dalpha/do = alpha / o where not capped
                *m[7:],
            ],
            dim=1,
        )
        return (grads[:, :2], grads[:, 2:5], grads[:, 5], grads[:, 6], grads[:, 7:]) + (None,) * 7


def _blocks(ends: Tensor, n_pairs: int, block: int) -> list[tuple[int, int]]:
    """Cut the pixel-grouped pairs [0, n_pairs) into consecutive ranges of whole pixels, each of at most ``block``
    pairs where one pixel allows it (so that the per-pair temporaries of a range stay in the CPU cache)."""
    if n_pairs <= block:
        return [(0, n_pairs)] if n_pairs else []
    targets = torch.arange(block, n_pairs, block, device=ends.device)
    cuts = ends.index_select(0, (torch.searchsorted(ends, targets, right=True) - 1).clamp_min(0))
    cuts = sorted({0, n_pairs, *cuts.tolist()})
    return list(zip(cuts[:-1], cuts[1:]))


def rasterize(
    proj: Projection,
    opacities: Tensor,
    colors: Tensor,
    width: int,
    height: int,
    cfg: RasterConfig,
    background: Tensor | None = None,
    chunk_pairs: int = 2**24,
    block_pairs: int | None = None,
) -> dict[str, Tensor]:
    """Composite projected Gaussians front to back (module doc). The candidate (box) pixels are evaluated in
    chunks of at most ``chunk_pairs``, which bounds the memory before the alpha filter; the kept pairs are
    composited in ranges of whole pixels of about ``block_pairs`` pairs (default: 2^16 on the CPU, where cache-sized
    ranges measured ~1.3x faster than one range; all pairs at once on CUDA). The result does not depend on it
    beyond float rounding.

    opacities (N,) in [0, 1]; colors (N, D) or (C, N, D); background (C, D) or None (black).
    Returns rgb (C, H, W, D) composited on the background, alpha, depth, expected_depth, depth_sq (C, H, W, 1),
    and n_pairs (0-d): the contributing (pixel, Gaussian) pairs before the stop rule's cut.
    """
    C, N = proj.depths.shape
    D = colors.shape[-1]
    P = C * height * width
    dt = proj.means2d.dtype
    sid, pix = _pairs(proj, opacities, width, height, cfg, chunk_pairs)
    col = colors if colors.dim() == 3 else colors[None].expand(C, *colors.shape)
    acc, n_kept = _Composite.apply(
        proj.means2d.reshape(C * N, 2),
        proj.conics.reshape(C * N, 3),
        proj.depths.reshape(C * N),
        opacities.to(dt)[None].expand(C, N).reshape(C * N),
        col.reshape(C * N, D).to(dt),
        sid,
        pix,
        width,
        height,
        P,
        cfg,
        block_pairs or (2**16 if sid.device.type == "cpu" else max(1, len(sid))),
    )
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
        "n_pairs": n_kept,
    }


def sh0_to_rgb(f_dc: Tensor) -> Tensor:
    """Colour of SH degree 0 coefficients: max(0, 0.5 + C0 f_dc) (graphdeco / gsplat)."""
    return (0.5 + SH_C0 * f_dc).clamp_min(0.0)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / SH_C0
