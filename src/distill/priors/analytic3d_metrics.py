"""Ground-truth metrics of the exact 3D prior (:class:`~distill.priors.analytic3d.Analytic3DPrior`), called through
its methods ``fit_texture``, ``blend_weights`` and ``evaluate``.

The metrics (:func:`evaluate`): render the trained scene at held-out orbit cameras, fit the texture coefficients of
every object of the prompt jointly from all views (posterior mean under pixel noise s^2, i.e. least squares
regularised by S), pick the object with the smallest residual, and report PSNR/SSIM against its mean render, texture
realism (the whitened energy sum(a_f^2 / S_f) of the fitted coefficients per frequency band over its expected value
for a true sample: 1 for a sample of the prior, 0 for the over-smoothed mean) and mode commitment (1 - best residual
/ second best residual: ~1 for one object, ~0 for an even blend of two), and the render's contrast relative to the
objects' own mean renders (``contrast_vs_object``: 1 = not faded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.scene.cameras import Cameras, orbit_cameras

if TYPE_CHECKING:
    from distill.priors.analytic3d import Analytic3DPrior


@torch.no_grad()
def fit_texture(prior: Analytic3DPrior, images: Tensor, cameras: Cameras, objects: Sequence[int]) -> dict[str, Tensor]:
    """Fit each object's texture coefficients jointly from all views (images in [0, 1]).

    Posterior mean of a under x = m + R a + N(0, s^2 I) (least squares regularised by S), its
    posterior variance, and the mean squared residual per object.
    """
    geo = prior.geometry(cameras, tuple(objects))
    B, P = len(cameras), cameras.height * cameras.width
    x = prior._rotate(prior.encode(images.to(prior.device, torch.float64)).reshape(B, 3, P))
    y = x[:, None] - geo.mean  # (B, O, 3, P)
    z = torch.einsum("bocp,bopf->ocf", y, geo.phi)
    G = geo.gram.sum(0)  # (O, F, F)
    Ssq = prior.S.sqrt()
    Q = (Ssq[None, :, :, None] * G[:, None] * Ssq[None, :, None, :]) / prior.s2
    Q = Q + torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    L = torch.linalg.cholesky(Q)
    a = Ssq * torch.cholesky_solve((Ssq * z / prior.s2)[..., None], L)[..., 0]  # (O, 3, F)
    Qinv = torch.cholesky_inverse(L)
    post_var = prior.S * torch.diagonal(Qinv, dim1=-2, dim2=-1)
    res = y - torch.einsum("ocf,bopf->bocp", a, geo.phi)
    mse = (res**2).mean((0, 2, 3))
    return {"coeffs": a, "post_var": post_var, "mse": mse, "mean": geo.mean}


@torch.no_grad()
def blend_weights(
    prior: Analytic3DPrior, images: Tensor, cameras: Cameras, objects: Sequence[int], nearest: int
) -> Tensor:
    """Weights c_k (K,) of the objects' mean renders in the views ``images`` (B, 3, H, W in [0, 1]).

    Generalised least squares under the texture model of object ``nearest`` (an index into ``objects``):

        x - bg = sum_k c_k (m_k - bg) + k0 + R a + n,     a ~ N(0, S),  n ~ N(0, s^2 I),

    with m_k the mean renders (pixel space) at the same views, bg the background, k0 a free constant colour and
    R a the nearest object's texture. Integrating out a leaves x - bg ~ N(sum_k c_k (m_k - bg) + k0, Sigma),
    Sigma = R S R^T + s^2 I, so c is the GLS solution with the metric Sigma^-1 (Woodbury per rotated colour
    channel: Sigma_c^-1 = (I - Phi (s^2 S_c^-1 + Phi^T Phi)^-1 Phi^T) / s^2).

    The 3D analogue of the 2D prior's blend weights: sum(c) is the contrast kept relative to the objects' own
    (1 for an object's own render or any blend w m_1 + (1 - w) m_2; f for a copy faded by f toward any constant
    colour, grey or the background), c[nearest] / sum(c) is the share of the nearest object. A true sample's
    texture is what Sigma models, so it leaves the weights at one-hot on average.
    """
    objects = tuple(int(k) for k in objects)
    geo = prior.geometry(cameras, objects)
    B, P, K = len(cameras), cameras.height * cameras.width, len(objects)
    x = prior._rotate(prior.encode(images.to(prior.device, torch.float64)).reshape(B, 3, P))
    bg = prior._rotate((2.0 * prior.background - 1.0)[:, None])  # (3, 1)
    ones = torch.eye(3, dtype=torch.float64, device=prior.device)[None, :, :, None].expand(B, 3, 3, P)
    X = torch.cat([geo.mean - bg, ones], 1)  # (B, K + 3, 3, P): m_k - bg, then a constant in each channel
    y = x - bg
    phi = geo.phi[:, nearest]  # (B, P, F)
    # whitened inner products, channel by channel: <u, v> = (u.v - (Phi^T u)^T M_c^-1 (Phi^T v)) / s^2
    M = prior.s2 / prior.S[:, :, None] * torch.eye(prior.S.shape[1], dtype=torch.float64, device=prior.device)
    L = torch.linalg.cholesky(M + geo.gram[:, nearest].sum(0)[None])  # (3, F, F)
    zX = torch.einsum("bicp,bpf->icf", X, phi)  # (K + 3, 3, F)
    zy = torch.einsum("bcp,bpf->cf", y, phi)  # (3, F)
    solX = torch.cholesky_solve(zX.permute(1, 2, 0), L)  # (3, F, K + 3)
    A = torch.einsum("bicp,bjcp->ij", X, X) - torch.einsum("icf,cfj->ij", zX, solX)
    b = torch.einsum("bicp,bcp->i", X, y) - torch.einsum("cf,cfj->j", zy, solX)
    return torch.linalg.solve(A, b)[:K]


@torch.no_grad()
def evaluate(
    prior: Analytic3DPrior,
    scene: Any,
    prompt: str,
    n_views: int = 8,
    height: int = 64,
    width: int = 64,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Ground-truth metrics of a trained scene at ``n_views`` held-out orbit cameras.

    psnr, ssim: against the nearest object's mean render (in [0, 1]); psnr_fit: against the
    best fit (nearest object, fitted texture); texture_realism[_low/_mid/_high]: energy of
    the fitted texture coefficients over its expectation for a true sample (1 = sample,
    0 = mean texture); mode_commitment: 1 - best/second-best fit residual; nearest_object:
    index within the prompt; residual_rmse: best-fit residual (pixel units); contrast_vs_object:
    the render's luminance contrast relative to the nearest object's own mean render from the same
    views: the sum of the GLS weights of the objects' mean renders (:func:`blend_weights`; 1 = as
    contrasted as the object, f = faded by f toward a constant colour); blend_share_nearest: the
    nearest object's share of those weights (1 = that object alone, 0.5 = an even blend of two).
    Fading and choosing are separate: a faded render has contrast_vs_object < 1 whatever it
    commits to; a blend of two objects has low mode_commitment and contrast_vs_object 1.

    Texture realism per band is sum(a_f^2 / S_f) / sum(1 - Var[a_f | views] / S_f) over the
    band's coefficients a_f (posterior-mean fit): for a true sample both sums have the same
    expectation (law of total variance), for the mean texture the numerator is 0. Residuals of
    the render outside the texture model (wrong geometry, blends, floaters) project onto the
    basis too and push the ratio above 1.
    """
    objs = prior.prompt_objects(prompt)
    cams = orbit_cameras(n_views, height, width, device=prior.device)
    rgb = scene.render(cams, generator=generator, shading="albedo")["rgb"].detach()
    rgb = rgb.to(prior.device, torch.float64)
    fit = fit_texture(prior, rgb, cams, objs)
    mse = fit["mse"]
    best = int(mse.argmin())
    srt = torch.sort(mse).values
    commit = 1.0 - float(srt[0] / srt[1].clamp_min(1e-30)) if len(objs) > 1 else 1.0
    B = n_views
    mean_rgb = prior.decode(prior._unrotate(fit["mean"][:, best])).reshape(B, 3, height, width).clamp(0, 1)
    geo = prior.geometry(cams, tuple(objs))
    fit_x = fit["mean"][:, best] + torch.einsum("cf,bpf->bcp", fit["coeffs"][best], geo.phi[:, best])
    fit_rgb = prior.decode(prior._unrotate(fit_x)).reshape(B, 3, height, width).clamp(0, 1)
    img = rgb.clamp(0, 1)
    out = {
        "psnr": psnr(img, mean_rgb),
        "ssim": ssim(img, mean_rgb),
        "psnr_fit": psnr(img, fit_rgb),
        "nearest_object": float(best),
        "mode_commitment": commit,
        "residual_rmse": float(mse[best].sqrt()),
    }
    # fading vs choosing: how much of the objects' own contrast the render keeps, and the nearest one's share
    w = blend_weights(prior, img, cams, objs, best)
    out["contrast_vs_object"] = float(w.sum())
    out["blend_share_nearest"] = float(w[best] / w.sum()) if float(w.sum()) != 0 else 0.0
    # whitened energy a^2 / S over its expectation for a true sample, 1 - post_var / S per
    # coefficient (law of total variance), so coefficients the views do not determine count little
    a2 = fit["coeffs"][best] ** 2 / prior.S  # (3, F)
    expected = (1.0 - fit["post_var"][best] / prior.S).clamp_min(0)
    out["texture_realism"] = float(a2.sum() / expected.sum())
    names = ["low", "mid", "high"] if prior.cfg.n_bands == 3 else [str(i) for i in range(prior.cfg.n_bands)]
    for i, nm in enumerate(names):
        sel = prior.bands == i
        out[f"texture_realism_{nm}"] = float(a2[:, sel].sum() / expected[:, sel].sum().clamp_min(1e-30))
    return out


def psnr(a: Tensor, b: Tensor) -> float:
    """10 log10(1 / mean (a - b)^2) of images in [0, 1] (the mean squared error floored at 1e-12)."""
    mse = float(((a - b) ** 2).mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Gaussian window, Wang et al. 2004 constants) over a batch (B, C, H, W)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    C = a.shape[1]
    win = min(win, a.shape[-1], a.shape[-2])
    g = torch.exp(-((torch.arange(win, dtype=torch.float64, device=a.device) - (win - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(C, 1, win, win).contiguous()
    filt = lambda x: F.conv2d(x, k, groups=C)  # noqa: E731
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(s.mean())
