"""The exact, view-consistent 3D analytic diffusion prior (``prior=analytic3d``).

Data distribution. Each built-in prompt (class) has K ground-truth objects with analytic SDF
geometry (:mod:`distill.priors.sdf_objects`). The albedo of object k at a surface point p is a
Gaussian random field

    albedo(p) = mu_k(p) + sum_{f, c} a_{fc} phi_f(p) u_c,        a_{fc} ~ N(0, S_{fc}) independent,

with phi_f the 3D cosine (DCT) basis over a cube around the object, normalised to unit mean
square, ordered by frequency |k_f|, and u_c an orthonormal colour basis (luminance, two chroma
directions). S_{fc} = texture_std^2 * chroma_c * w_f / sum(w) with the power law
w_f = (1 + (|k_f| / f0)^2)^(-p). Views are rendered in albedo mode (shade = 1): each pixel
averages ``supersample^2`` sphere-traced rays; a ray that misses sees the constant background.
So the view from camera c is linear in a, and in pixel space (x = 2 rgb - 1)

    x0 | object k, camera c ~ N(m_ck, R_ck S R_ck^T + s^2 I),     R_ck = Phi_ck (x) U,

with s = ``image_noise``. The prior is the mixture over the objects of the classes weighted by
the embedding row (uniform within a class).

Denoiser. With x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, x_t | k ~ N(sqrt(ab) m, ab R S R^T + v I),
v = ab s^2 + 1 - ab. Rotating the colours by U^T makes the three colour channels independent,
each with covariance ab Phi S_c Phi^T + v I. Woodbury with the symmetric capacitance
Q = I + (ab / v) S_c^1/2 G S_c^1/2, G = Phi^T Phi (F x F, cached per camera batch), gives the
exact log-density (matrix determinant lemma: log det = D log v + log det Q), the responsibilities
and E[x0 | x_t, k] = m + sqrt(ab) (R S R^T + s^2 I) Sigma^-1 (x_t - sqrt(ab) m). Then
eps_hat = (x_t - sqrt(ab) E[x0 | x_t]) / sqrt(1 - ab). All solves are float64.

Ground-truth metrics of a trained scene (:meth:`Analytic3DPrior.evaluate`, texture fit, blend weights):
:mod:`distill.priors.analytic3d_metrics`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.priors import analytic3d_metrics
from distill.priors.base import NEGATIVE_PROMPTS, DiffusionPrior, PriorError, scaled_linear_alphas_cumprod
from distill.priors.sdf_objects import PROMPTS, SDFObject, build_catalogue, trace
from distill.scene.cameras import Cameras

_VIEW_SUFFIX = re.compile(r",\s*(front|side|back|overhead) view\s*$")
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class Geometry:
    """Sphere-traced ground truth of some objects seen from one camera batch (float64).

    phi: (B, O, P, F) basis per pixel (supersample average, 0 on background); mean: (B, O, 3, P)
    mean view in pixel space [-1, 1] with colours rotated by U^T; gram: (B, O, F, F) = phi^T phi;
    coverage: (B, O, P) fraction of each pixel's rays that hit the object.
    """

    phi: Tensor
    mean: Tensor
    gram: Tensor
    coverage: Tensor
    objects: tuple[int, ...]


@dataclass
class ViewSample:
    """An exact sample of the prior seen from a camera batch.

    rgb: (B, 3, H, W) = (x0 + 1) / 2 (not clipped, so the distribution stays exact); x0: the same
    in pixel space; object: index of the object within the prompt; coeffs: (F, 3) texture
    coefficients a in the rotated colour basis.
    """

    rgb: Tensor
    x0: Tensor
    object: int
    coeffs: Tensor


class Analytic3DPrior(DiffusionPrior):
    """Exact eps-prediction for a mixture of view-consistent Gaussian-textured SDF objects."""

    view_dependent = False

    @dataclass
    class Config:
        image_noise: float = 0.2  # pixel noise std s, pixel units ([-1, 1]); a floor that keeps eps tame off the data
        n_basis: int = 96  # spatial texture basis functions F (x 3 colour channels)
        spectrum_exponent: float = 1.5  # p in w_f = (1 + (|k_f| / f0)^2)^-p
        spectrum_f0: float = 1.0  # f0 in DCT-index units |k| (|k| = 1: half a cosine period across the cube)
        texture_std: float = 0.25  # luminance std of the texture field, pixel units
        chroma_ratio: float = 0.3  # variance of each chroma channel relative to luminance
        background: tuple[float, float, float] = (0.6, 0.65, 0.7)  # RGB in [0, 1]
        seed: int = 0  # jitter of the ground-truth objects (size, turn, colour)
        jitter: float = 1.0  # 0: the canonical objects
        objects_per_prompt: int = 3
        supersample: int = 2  # rays per pixel = supersample^2 (anti-aliased silhouettes)
        trace_steps: int = 64
        n_bands: int = 3  # frequency bands of texture_realism (low, mid, high)
        cache_size: int = 4  # camera batches whose geometry is kept
        num_train_timesteps: int = 1000

        def validate(self, where: str = "prior") -> None:
            bg = list(self.background)
            if len(bg) != 3 or not all(0.0 <= float(c) <= 1.0 for c in bg):
                raise PriorError(f"{where}.background={bg} must be an RGB triple in [0, 1]")
            for name in ("image_noise", "texture_std", "chroma_ratio", "spectrum_f0"):
                if not getattr(self, name) > 0:
                    raise PriorError(f"{where}.{name}={getattr(self, name)} must be positive")
            for name in ("n_basis", "supersample", "trace_steps", "n_bands", "cache_size"):
                if getattr(self, name) < 1:
                    raise PriorError(f"{where}.{name}={getattr(self, name)} must be a positive integer")
            if self.n_bands > self.n_basis:
                raise PriorError(f"{where}.n_bands={self.n_bands} cannot exceed {where}.n_basis={self.n_basis}")
            if not 1 <= self.objects_per_prompt <= 3:
                raise PriorError(f"{where}.objects_per_prompt={self.objects_per_prompt} must be 1, 2 or 3")

    def __init__(self, cfg: Analytic3DPrior.Config | None = None, **overrides: Any):
        if cfg is not None and overrides:
            raise TypeError("pass either a Config or keyword overrides, not both")
        if cfg is None or not isinstance(cfg, self.Config):  # keywords (hydra.utils.instantiate) or a mapping
            fields = dict(overrides if cfg is None else cfg)
            fields.pop("_target_", None)
            cfg = self.Config(**fields)
        cfg.validate()
        cfg.background = tuple(float(c) for c in cfg.background)
        super().__init__(scaled_linear_alphas_cumprod(cfg.num_train_timesteps))
        self.cfg = cfg
        self.catalogue: dict[str, list[SDFObject]] = build_catalogue(cfg.seed, cfg.objects_per_prompt, cfg.jitter)
        self.prompts: tuple[str, ...] = PROMPTS
        self.objects: list[SDFObject] = [o for p in self.prompts for o in self.catalogue[p]]
        self.object_class = [c for c, p in enumerate(self.prompts) for _ in self.catalogue[p]]
        K = cfg.objects_per_prompt

        # DCT frequencies k in {0..n}^3 ordered by |k| (then lexicographically), the first F
        n = 1
        while _count_within(n) < cfg.n_basis:
            n += 1
        ks = torch.cartesian_prod(*(torch.arange(n + 1),) * 3)
        order = sorted(range(ks.shape[0]), key=lambda i: (int((ks[i] ** 2).sum()), tuple(ks[i].tolist())))
        freqs = ks[order[: cfg.n_basis]].to(torch.float64)
        fnorm = freqs.norm(dim=-1)
        w = (1.0 + (fnorm / cfg.spectrum_f0) ** 2) ** (-cfg.spectrum_exponent)
        lam = cfg.texture_std**2 * w / w.sum()
        chroma = torch.tensor([1.0, cfg.chroma_ratio, cfg.chroma_ratio], dtype=torch.float64)
        S = lam[None, :] * chroma[:, None]  # (3, F)
        # orthonormal colour basis (columns): luminance, red-green, yellow-blue
        U = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64).T
        U = U / U.norm(dim=0, keepdim=True)
        bands = torch.div(torch.arange(cfg.n_basis) * cfg.n_bands, cfg.n_basis, rounding_mode="floor")
        frames = [o.texture_frame() for o in self.objects]
        self.register_buffer("freqs", freqs, persistent=False)
        self.register_buffer("S", S, persistent=False)
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("bands", bands, persistent=False)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("frame_centre", torch.tensor([f[0] for f in frames], **f64), persistent=False)
        self.register_buffer("frame_half", torch.tensor([f[1] for f in frames], **f64), persistent=False)
        self.register_buffer("background", torch.tensor(cfg.background, dtype=torch.float64), persistent=False)
        self.register_buffer(
            "log_pi_within", torch.full((len(self.objects),), -math.log(K), dtype=torch.float64), persistent=False
        )
        self._cache: list[tuple[tuple, Geometry]] = []

    # ------------------------------------------------------------------ interface

    @property
    def s2(self) -> float:
        return float(self.cfg.image_noise) ** 2

    def encode(self, images: Tensor) -> Tensor:
        return images * 2.0 - 1.0

    def decode(self, x0: Tensor) -> Tensor:
        return (x0 + 1.0) * 0.5

    def prompt_index(self, prompt: str) -> int:
        """Class index of a built-in prompt (a trailing ", <direction> view" is ignored); C for the negative class."""
        key = _VIEW_SUFFIX.sub("", prompt.strip())
        if key in NEGATIVE_PROMPTS:
            return len(self.prompts)
        if key not in self.prompts:
            known = ", ".join(repr(p) for p in self.prompts)
            raise PriorError(
                f"prompt {prompt!r} is not one of the analytic3d prior's prompts: {known} "
                f"('' is the unconditional mixture; {NEGATIVE_PROMPTS[1]!r} or NFSD's negative prompt the negative "
                f"class)"
            )
        return self.prompts.index(key)

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Class weights (N, C + 1): one-hot for a known prompt or the negative class (index C: every object with a
        dull, dark, low-contrast mean albedo, x -> 0.35 x - 0.4), uniform over the C real classes for ``""``."""
        C = len(self.prompts)
        rows = []
        for p in prompts:
            if _VIEW_SUFFIX.sub("", p.strip()) == "":
                rows.append(torch.cat([torch.full((C,), 1.0 / C), torch.zeros(1)]))
            else:
                rows.append(F.one_hot(torch.tensor(self.prompt_index(p)), C + 1).float())
        return torch.stack(rows).to(self.device)

    def eps(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Any | None = None) -> Tensor:
        post = self.posterior(x_t, t, embeddings, cameras)
        N = x_t.shape[0]
        ab = self.alpha_bar(t.to(self.device).long().reshape(-1).expand(N)).view(N, 1, 1)
        xr = self._rotate(x_t.to(self.device, torch.float64).reshape(N, 3, -1))
        e = (xr - ab.sqrt() * post["x0_rot"]) / (1.0 - ab).sqrt()
        return self._unrotate(e).reshape(x_t.shape).to(x_t.device, x_t.dtype)

    # ------------------------------------------------------------------ exact posterior

    def _dull(self, m_rot: Tensor) -> Tensor:
        """The negative class's mean: x -> 0.35 x - 0.4 (pixel units), in the rotated colour basis."""
        shift = self._rotate(torch.full((3, 1), -0.4, dtype=m_rot.dtype, device=m_rot.device))
        return 0.35 * m_rot + shift

    def _rotate(self, x: Tensor) -> Tensor:  # (..., 3, P) RGB -> U^T x
        return torch.einsum("cd,...cp->...dp", self.U, x)

    def _unrotate(self, x: Tensor) -> Tensor:
        return torch.einsum("cd,...dp->...cp", self.U, x)

    def _class_weights(self, embeddings: Tensor, N: int) -> Tensor:
        w = embeddings.to(self.device, torch.float64).reshape(N, -1)
        if w.shape[1] == len(self.prompts):  # rows without the negative class
            w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
        if w.shape[1] != len(self.prompts) + 1:
            raise PriorError(
                f"analytic3d embeddings must have {len(self.prompts) + 1} class weights per row, "
                f"got shape {tuple(embeddings.shape)}"
            )
        w = w.clamp_min(0.0)
        tot = w.sum(-1, keepdim=True)
        if (tot <= 0).any():
            raise PriorError("an analytic3d embedding row has no positive class weight")
        return w / tot

    def posterior(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None) -> dict[str, Tensor]:
        """Exact posterior quantities for every row, all float64 on the prior's device.

        x0_rot: E[x0 | x_t] (N, 3, P) in the rotated colour basis; resp: (N, O) responsibilities;
        log_prob: (N,) log p(x_t) of the noised mixture.
        """
        if cameras is None:
            raise PriorError("the analytic3d prior needs the cameras of the views (eps(..., cameras=...))")
        N = x_t.shape[0]
        H, W, B = cameras.height, cameras.width, len(cameras)
        if tuple(x_t.shape[1:]) != (3, H, W):
            raise PriorError(f"x_t has shape {tuple(x_t.shape)}, expected (N, 3, {H}, {W}) for these cameras")
        geo = self.geometry(cameras)
        P = H * W
        D = 3 * P
        s2 = self.s2
        t = t.to(self.device).long().reshape(-1).expand(N)
        ab = self.alpha_bar(t)
        v = ab * s2 + (1.0 - ab)
        cf = ab / v
        sab = ab.sqrt()
        cw = self._class_weights(embeddings, N)  # (N, C + 1)
        log_pi = torch.log(cw[:, :-1])[:, self.object_class] + self.log_pi_within  # (N, O)
        negative = bool((cw[:, -1] > 0).any())  # the negative class: a dull copy of every object
        if negative:
            n_obj = len(self.objects)
            log_pi = torch.cat([log_pi, (torch.log(cw[:, -1:]) - math.log(n_obj)).expand(N, n_obj)], 1)
        xr = self._rotate(x_t.to(self.device, torch.float64).reshape(N, 3, P))
        Ssq = self.S.sqrt()  # (3, F)
        O = geo.phi.shape[1] * (2 if negative else 1)  # noqa: E741 - O objects (components), as in the docstring
        x0 = torch.empty(N, 3, P, dtype=torch.float64, device=self.device)
        resp = torch.empty(N, O, dtype=torch.float64, device=self.device)
        logp = torch.empty(N, dtype=torch.float64, device=self.device)
        rows = torch.arange(N, device=self.device)
        for b in range(B):
            idx = rows[b::B]
            if idx.numel() == 0:
                continue
            n = idx.numel()
            phi, m, G = geo.phi[b], geo.mean[b], geo.gram[b]  # (O,P,F), (O,3,P), (O,F,F)
            if negative:
                phi, m, G = torch.cat([phi, phi]), torch.cat([m, self._dull(m)]), torch.cat([G, G])
            cb, vb, sb = cf[idx].view(n, 1, 1), v[idx].view(n, 1, 1), sab[idx].view(n, 1, 1)
            y = xr[idx, None] - sb[..., None] * m[None]  # (n, O, 3, P)
            z = torch.einsum("nocp,opf->nocf", y, phi)
            zeta = Ssq * z  # S^1/2 R^T y
            Q = cb.view(n, 1, 1, 1, 1) * (Ssq[None, None, :, :, None] * G[None, :, None] * Ssq[None, None, :, None, :])
            Q = Q + torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
            L = torch.linalg.cholesky(Q)  # (n, O, 3, F, F)
            u = torch.cholesky_solve(zeta[..., None], L)[..., 0]  # Q^-1 S^1/2 R^T y
            logdet = D * torch.log(vb.view(n, 1)) + 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum((-1, -2))
            quad = ((y * y).sum((-1, -2)) - cb.view(n, 1) * (zeta * u).sum((-1, -2))) / vb.view(n, 1)
            lp = -0.5 * (D * _LOG_2PI + logdet + quad)  # (n, O)
            logits = lp + log_pi[idx]
            logp[idx] = torch.logsumexp(logits, dim=-1)
            r = torch.softmax(logits, dim=-1)
            resp[idx] = r
            # E[x0|x_t,o] = m + sab [ (s2/v) y + Phi h ],  h = S Phi^T w - (s2 cf / v) S^1/2 u,
            # Phi^T w = (z - cf G S^1/2 u) / v
            Su = Ssq * u
            phiw = (z - cb[..., None] * torch.einsum("ofg,nocg->nocf", G, Su)) / vb[..., None]
            h = self.S * phiw - (s2 * cb / vb)[..., None] * Su
            delta = (s2 / vb)[..., None] * y + torch.einsum("nocf,opf->nocp", h, phi)
            x0[idx] = torch.einsum("no,ocp->ncp", r, m) + sb * torch.einsum("no,nocp->ncp", r, delta)
        return {"x0_rot": x0, "resp": resp, "log_prob": logp}

    def log_prob(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras) -> Tensor:
        """log p_t(x_t) (N,) float64 under the noised mixture (exact)."""
        return self.posterior(x_t, t, embeddings, cameras)["log_prob"]

    def denoise(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras) -> Tensor:
        """E[x0 | x_t] in pixel space, (N, 3, H, W) float64."""
        x0 = self.posterior(x_t, t, embeddings, cameras)["x0_rot"]
        return self._unrotate(x0).reshape(x_t.shape[0], 3, cameras.height, cameras.width)

    # ------------------------------------------------------------------ geometry

    def basis(self, points: Tensor, obj: int) -> Tensor:
        """phi_f at world points (n, 3) of object ``obj``: (n, F), unit mean square over its cube."""
        q = (points - self.frame_centre[obj]) / self.frame_half[obj]  # in [-1, 1]^3
        kmax = int(self.freqs.max())
        ks = torch.arange(kmax + 1, dtype=points.dtype, device=points.device)
        tab = torch.cos((q[:, :, None] + 1.0) * (0.5 * math.pi) * ks)  # (n, 3, kmax + 1), separable
        k = self.freqs.long()
        norm = torch.sqrt(2.0 ** (k > 0).sum(-1).to(points.dtype))
        return tab[:, 0, k[:, 0]] * tab[:, 1, k[:, 1]] * tab[:, 2, k[:, 2]] * norm

    def _rays(self, cameras: Cameras) -> tuple[Tensor, Tensor]:
        """Supersampled rays (B, P, s*s, 3) in float64, same convention as Cameras.rays."""
        B, H, W, s = len(cameras), cameras.height, cameras.width, self.cfg.supersample
        dev, dt = self.device, torch.float64
        c2w = cameras.c2w.to(dev, dt)
        f = (0.5 * H / torch.tan(0.5 * cameras.fovy.to(dev, dt))).view(B, 1, 1, 1, 1)
        off = (torch.arange(s, device=dev, dtype=dt) + 0.5) / s
        j = torch.arange(H, device=dev, dtype=dt)[:, None, None, None] + off[None, None, :, None]  # (H,1,s,1)
        i = torch.arange(W, device=dev, dtype=dt)[None, :, None, None] + off[None, None, None, :]  # (1,W,1,s)
        j, i = torch.broadcast_tensors(j, i)  # (H, W, s, s)
        x = (i - 0.5 * W)[None] / f
        y = -(j - 0.5 * H)[None] / f
        d = torch.stack([x, y, -torch.ones_like(x)], -1).reshape(B, H * W, s * s, 3)
        d = torch.einsum("bij,bpsj->bpsi", c2w[:, :3, :3], d)
        d = d / d.norm(dim=-1, keepdim=True)
        o = c2w[:, None, None, :3, 3].expand_as(d)
        return o, d

    def _render_geometry(self, cameras: Cameras, objects: tuple[int, ...]) -> Geometry:
        B, P, s2 = len(cameras), cameras.height * cameras.width, self.cfg.supersample**2
        o, d = self._rays(cameras)
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        nF = self.freqs.shape[0]
        phi = torch.zeros(B, len(objects), P, nF, dtype=torch.float64, device=self.device)
        mean = torch.zeros(B, len(objects), 3, P, dtype=torch.float64, device=self.device)
        cov = torch.zeros(B, len(objects), P, dtype=torch.float64, device=self.device)
        pix = torch.arange(B * P, device=self.device).repeat_interleave(s2)  # ray -> (b, p) flat
        bg = 2.0 * self.background - 1.0
        for oi, k in enumerate(objects):
            hit, pts = trace(self.objects[k], o, d, steps=self.cfg.trace_steps)
            hp, hpix = pts[hit], pix[hit]
            acc_phi = torch.zeros(B * P, nF, dtype=torch.float64, device=self.device)
            acc_phi.index_add_(0, hpix, self.basis(hp, k))
            acc_mu = torch.zeros(B * P, 3, dtype=torch.float64, device=self.device)
            acc_mu.index_add_(0, hpix, 2.0 * self.objects[k].albedo(hp) - 1.0)
            n_hit = torch.zeros(B * P, dtype=torch.float64, device=self.device)
            n_hit.index_add_(0, hpix, torch.ones_like(hpix, dtype=torch.float64))
            c = n_hit / s2
            mu = acc_mu / s2 + (1.0 - c)[:, None] * bg
            phi[:, oi] = (acc_phi / s2).view(B, P, nF)
            mean[:, oi] = self._rotate(mu.view(B, P, 3).transpose(1, 2))
            cov[:, oi] = c.view(B, P)
        gram = phi.transpose(-1, -2) @ phi
        return Geometry(phi, mean, gram, cov, objects)

    def geometry(self, cameras: Cameras, objects: Sequence[int] | None = None) -> Geometry:
        """Sphere-traced basis and mean views for a camera batch (cached on the camera values)."""
        objects = tuple(range(len(self.objects))) if objects is None else tuple(int(k) for k in objects)
        key = (
            cameras.height,
            cameras.width,
            objects,
            cameras.c2w.detach().to("cpu", torch.float64).numpy().tobytes(),
            cameras.fovy.detach().to("cpu", torch.float64).numpy().tobytes(),
            str(self.device),
        )
        for k, g in self._cache:
            if k == key:
                return g
        g = self._render_geometry(cameras, objects)
        self._cache = ([(key, g)] + self._cache)[: max(int(self.cfg.cache_size), 1)]
        return g

    def _apply(self, fn, *args, **kwargs):  # .to(device) etc.: drop cached geometry
        self._cache = []
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ sampling

    def prompt_objects(self, prompt: str) -> list[int]:
        c = self.prompt_index(prompt)
        return [k for k, ck in enumerate(self.object_class) if ck == c]

    def sample_views(
        self,
        prompt: str,
        cameras: Cameras,
        generator: torch.Generator | None = None,
        object_index: int | None = None,
        texture: str = "sample",
        noise: bool = True,
    ) -> ViewSample:
        """One exact draw (object, texture, pixel noise) of the prompt, seen from every camera.

        ``prompt=""`` draws from the unconditional mixture. ``object_index`` (within the prompt)
        fixes the object; ``texture="mean"`` gives the mean texture; ``noise=False`` leaves out
        the pixel noise. Random numbers come from ``generator`` (a CPU generator).
        """
        x0, obj, a = self.sample_batch(prompt, cameras, 1, generator, object_index, texture, noise)
        return ViewSample(self.decode(x0[0]), x0[0], int(obj[0]), a[0])

    def sample_batch(
        self,
        prompt: str,
        cameras: Cameras,
        n: int,
        generator: torch.Generator | None = None,
        object_index: int | None = None,
        texture: str = "sample",
        noise: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` independent exact draws: x0 (n, B, 3, H, W) float64 in pixel space, the object
        index within the prompt (n,) and the texture coefficients (n, F, 3) (rotated colours)."""
        if texture not in ("sample", "mean"):
            raise PriorError(f"texture={texture!r} must be 'sample' or 'mean'")
        cands = (
            list(range(len(self.objects)))
            if _VIEW_SUFFIX.sub("", prompt.strip()) == ""
            else self.prompt_objects(prompt)
        )
        if object_index is None:
            obj = torch.randint(len(cands), (n,), generator=generator)
        else:
            if not 0 <= object_index < len(cands):
                raise PriorError(f"object_index={object_index} out of range for {len(cands)} objects")
            obj = torch.full((n,), int(object_index))
        nF = self.freqs.shape[0]
        a = torch.randn(n, 3, nF, generator=generator, dtype=torch.float64).to(self.device) * self.S.sqrt()
        if texture == "mean":
            a = torch.zeros_like(a)
        used = sorted(set(obj.tolist()))
        geo = self.geometry(cameras, tuple(cands[i] for i in used))
        sel = torch.tensor([used.index(i) for i in obj.tolist()], device=self.device)
        x = geo.mean[:, sel].transpose(0, 1) + torch.einsum("ncf,nbpf->nbcp", a, geo.phi[:, sel].transpose(0, 1))
        if noise:
            eta = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(self.device)
            x = x + self.cfg.image_noise * eta
        B, H, W = len(cameras), cameras.height, cameras.width
        x0 = self._unrotate(x).reshape(n, B, 3, H, W)
        return x0, obj, a.transpose(1, 2).contiguous()

    def view_moments(self, prompt: str, cameras: Cameras) -> tuple[Tensor, Tensor]:
        """Exact mean (D,) and covariance (D, D) of x0 (pixel space, RGB-major (3, H, W) flattening)
        for the prompt's mixture at a camera batch of ONE camera (dense: tiny images only)."""
        if len(cameras) != 1:
            raise PriorError("view_moments takes a single camera")
        ks = self.prompt_objects(prompt) if prompt else list(range(len(self.objects)))
        means, covs = [], []
        for k in ks:
            m, C = self.component_moments(cameras, k)
            means.append(m)
            covs.append(C)
        M = torch.stack(means)
        mean = M.mean(0)
        cov = torch.stack(covs).mean(0) + (M[:, :, None] * M[:, None, :]).mean(0) - mean[:, None] * mean[None]
        return mean, cov

    def component_moments(self, cameras: Cameras, k: int) -> tuple[Tensor, Tensor]:
        """Mean (D,) and dense covariance R S R^T + s^2 I (D, D) of object k's view (one camera)."""
        geo = self.geometry(cameras, (k,))
        phi, P = geo.phi[0, 0], geo.phi.shape[2]
        m = self._unrotate(geo.mean[0, 0]).reshape(-1)
        R = torch.einsum("pf,cd->cpdf", phi, self.U).reshape(3 * P, -1)  # (D, 3F), column (d, f)
        C = R @ torch.diag(self.S.reshape(-1)) @ R.T + self.s2 * torch.eye(3 * P, dtype=R.dtype, device=R.device)
        return m, C

    # ------------------------------------------------------------------ ground-truth metrics
    # (distill.priors.analytic3d_metrics; methods, so that callers holding any prior ask it for its metrics)

    def fit_texture(self, images: Tensor, cameras: Cameras, objects: Sequence[int]) -> dict[str, Tensor]:
        """Each object's texture fit from all views (:func:`distill.priors.analytic3d_metrics.fit_texture`)."""
        return analytic3d_metrics.fit_texture(self, images, cameras, objects)

    def blend_weights(self, images: Tensor, cameras: Cameras, objects: Sequence[int], nearest: int) -> Tensor:
        """GLS weights of the objects' mean renders (:func:`distill.priors.analytic3d_metrics.blend_weights`)."""
        return analytic3d_metrics.blend_weights(self, images, cameras, objects, nearest)

    def evaluate(
        self,
        scene: Any,
        prompt: str,
        n_views: int = 8,
        height: int = 64,
        width: int = 64,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """Ground-truth metrics of a trained scene at ``n_views`` held-out orbit cameras
        (:func:`distill.priors.analytic3d_metrics.evaluate`)."""
        return analytic3d_metrics.evaluate(self, scene, prompt, n_views, height, width, generator)


def _count_within(n: int) -> int:
    """How many k in {0..n}^3 have |k|^2 <= n^2 (those are ordered correctly by |k|)."""
    ks = torch.cartesian_prod(*(torch.arange(n + 1),) * 3)
    return int(((ks**2).sum(-1) <= n * n).sum())
