"""The 2D analytic prior: an exact diffusion model of a class-conditional Gaussian mixture.

Each prompt (class) c has K component means mu_k (coloured shapes); every component shares the
covariance Lambda, diagonal in the orthonormal 2D DCT basis with a natural-image spectrum
    lambda(f) = A / (1 + (f / f0)^2)^p,   f = sqrt(u^2 + v^2) (DCT frequency indices).
For x_t = sqrt(ab) x0 + sqrt(1 - ab) eps and z = DCT(x) (orthonormal, so densities carry over):
    z_t | k ~ N(sqrt(ab) mu_k, ab Lambda + (1 - ab) I)
    E[z0 | z_t, k] = mu_k + sqrt(ab) Lambda / (ab Lambda + 1 - ab) (z_t - sqrt(ab) mu_k)
    r_k(z_t) = softmax_k(log w_k - 0.5 ||z_t - sqrt(ab) mu_k||^2_{(ab Lambda + 1 - ab)^-1})
    eps_hat = (x_t - sqrt(ab) sum_k r_k E[x0 | x_t, k]) / sqrt(1 - ab)            (exact)
The conditioning row of a prompt is its one-hot class weight; "" (unconditional) is uniform over
classes, so CFG mixes an exact conditional and an exact unconditional model.

Realism is measurable: for the nearest component k, the energy of z0 - mu_k in a DCT band divided
by its expected value sum_band lambda is ~1 for a true sample and ~0 for an over-smoothed mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill.priors.base import NEGATIVE_PROMPTS, DiffusionPrior, PriorError, scaled_linear_alphas_cumprod

# class name -> (shape, RGB colour); each class gets K components (positions / sizes vary).
SHAPES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "a red circle": ("circle", (0.85, 0.15, 0.15)),
    "a blue square": ("square", (0.15, 0.3, 0.85)),
    "a green triangle": ("triangle", (0.15, 0.7, 0.25)),
    "a yellow ring": ("ring", (0.95, 0.8, 0.1)),
}
BACKGROUND = (0.5, 0.5, 0.5)


def dct_matrix(n: int, dtype=torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix C (n x n): X = C x C^T for an n x n image x."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    c = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> Tensor:
    """Anti-aliased mask in [0, 1] of a shape centred at (cx, cy) with radius r (unit image)."""
    ss = 4  # supersampling
    g = (torch.arange(size * ss, dtype=torch.float64) + 0.5) / (size * ss)
    y, x = torch.meshgrid(g, g, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "square":
        m = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    elif shape == "triangle":
        m = (dy <= 0.7 * r) & (dy >= -r + 1.7 * dx.abs() * 1.0) & (dy >= -r)
        m = m & (dy >= 2.0 * dx.abs() - r)
    elif shape == "ring":
        d2 = dx**2 + dy**2
        m = (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.double().reshape(size, ss, size, ss).mean(dim=(1, 3))


@dataclass
class AnalyticPriorConfig:
    image_size: int = 32
    scale: float = 1.0  # x0 = scale * (2 g - 1): like SD's VAE scaling factor, sets the texture SNR
    components_per_class: int = 3
    amplitude: float = 0.04  # per-pixel texture variance (in [-1, 1] pixel units), spread over the spectrum
    f0: float = 2.0  # spectrum knee (DCT index units)
    power: float = 1.0  # lambda ~ f^(-2 p) above the knee
    low_band: float = 0.25  # band edges as fractions of the highest radial frequency
    high_band: float = 0.5
    seed: int = 0  # placement of the component shapes
    negative_blur: float = 4.0  # the negative class's blur: DCT low-pass exp(-(f / negative_blur)^2)
    prompts: list[str] = field(default_factory=lambda: list(SHAPES))


class AnalyticPrior(DiffusionPrior):
    Config = AnalyticPriorConfig
    """Exact eps-prediction for the class-conditional DCT Gaussian mixture (module docstring)."""

    view_dependent = False

    def __init__(self, cfg: AnalyticPriorConfig | None = None, device: torch.device | str = "cpu"):
        super().__init__(scaled_linear_alphas_cumprod())
        self.cfg = cfg = cfg or AnalyticPriorConfig()
        unknown = [p for p in cfg.prompts if p not in SHAPES]
        if unknown:
            raise PriorError(f"prior.prompts has unknown classes {unknown}; built-in: {list(SHAPES)}")
        n, K = cfg.image_size, cfg.components_per_class
        self.prompts = list(cfg.prompts)
        C = dct_matrix(n)
        u = torch.arange(n, dtype=torch.float64)
        f = torch.sqrt(u[:, None] ** 2 + u[None, :] ** 2)
        lam = 1.0 / (1.0 + (f / cfg.f0) ** 2) ** cfg.power
        lam = lam * (cfg.amplitude * n * n / lam.sum()) * cfg.scale**2  # mean pixel variance = amplitude
        fn = f / f.max()
        gen = torch.Generator().manual_seed(cfg.seed)
        means, owner = [], []
        for ci, name in enumerate(self.prompts):
            shape, colour = SHAPES[name]
            for _ in range(K):
                cx, cy = (0.35 + 0.3 * torch.rand(2, generator=gen, dtype=torch.float64)).tolist()
                r = 0.2 + 0.1 * float(torch.rand(1, generator=gen, dtype=torch.float64))
                m = _shape_mask(shape, n, cx, cy, r)
                img = torch.stack([BACKGROUND[c] * (1 - m) + colour[c] * m for c in range(3)])
                means.append(cfg.scale * (2 * img - 1))
                owner.append(ci)
        # the "negative" class (NFSD's negative prompt): every component made dark, low-contrast and blurred
        blur = torch.exp(-((f / cfg.negative_blur) ** 2))
        for k in range(len(means)):
            dull = cfg.scale * (2 * (0.3 + 0.35 * ((means[k] / cfg.scale + 1) / 2 - 0.5)) - 1)
            means.append(C.T @ ((C @ dull @ C.T) * blur) @ C)
            owner.append(len(self.prompts))
        self.register_buffer("dct", C, persistent=False)
        self.register_buffer("lam", lam.expand(3, n, n).clone(), persistent=False)  # (3, n, n)
        self.register_buffer("means", torch.stack(means), persistent=False)  # (Kc, 3, n, n) pixel space
        self.register_buffer("means_dct", self.to_dct(self.means), persistent=False)
        self.register_buffer("owner", torch.tensor(owner), persistent=False)  # component -> class (C = negative)
        self.register_buffer("class_size", torch.bincount(self.owner).double(), persistent=False)
        self.register_buffer("low_mask", (fn < cfg.low_band).expand(3, n, n).clone(), persistent=False)
        self.register_buffer("high_mask", (fn >= cfg.high_band).expand(3, n, n).clone(), persistent=False)
        self.to(device)

    # ----- transforms -------------------------------------------------------------------------
    def to_dct(self, x: Tensor) -> Tensor:
        C = self.dct.to(x.dtype)
        return C @ x @ C.T

    def from_dct(self, z: Tensor) -> Tensor:
        C = self.dct.to(z.dtype)
        return C.T @ z @ C

    def encode(self, images: Tensor) -> Tensor:
        n = self.cfg.image_size
        if images.shape[-2:] != (n, n):
            raise PriorError(
                f"the analytic prior models {n}x{n} images, got {tuple(images.shape[-2:])}; "
                f"set the scene resolution to {n} or prior.image_size={images.shape[-1]}"
            )
        return self.cfg.scale * (2.0 * images - 1.0)

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0 / self.cfg.scale + 1.0) / 2.0).clamp(0.0, 1.0)

    # ----- conditioning -----------------------------------------------------------------------
    def class_index(self, prompt: str) -> int:
        if prompt in NEGATIVE_PROMPTS:
            return len(self.prompts)
        if prompt not in self.prompts:
            raise PriorError(
                f"prompt {prompt!r} is not a class of the analytic prior; "
                f"use one of {self.prompts}, or {NEGATIVE_PROMPTS[1]!r} / NFSD's negative prompt for the negative "
                f"class (or prior=sd21 for free text)"
            )
        return self.prompts.index(prompt)

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Class weights (N, C + 1): one-hot for a class or the negative class, uniform over the C real classes for
        "" (the unconditional mixture does not include the negative class)."""
        C = len(self.prompts)
        rows = []
        for p in prompts:
            if p == "":
                rows.append(torch.cat([torch.full((C,), 1.0 / C, dtype=torch.float64), torch.zeros(1).double()]))
            else:
                rows.append(torch.nn.functional.one_hot(torch.tensor(self.class_index(p)), C + 1).double())
        return torch.stack(rows).to(self.device)

    def component_log_weights(self, embeddings: Tensor) -> Tensor:
        """(N, C) class weights -> (N, Kc) log mixture weights over components."""
        w = embeddings.to(torch.float64)[:, self.owner] / self.class_size[self.owner]
        return torch.log(w.clamp_min(0.0))

    # ----- the exact model ----------------------------------------------------------------------
    def posterior(self, x_t: Tensor, t: Tensor, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """E[x0 | x_t] (pixel space) and responsibilities (N, Kc), both float64."""
        ab = self.alpha_bar(t).view(-1, 1, 1, 1)
        z = self.to_dct(x_t.to(torch.float64))
        v = ab * self.lam + (1 - ab)  # (N, 3, n, n)
        mu = self.means_dct  # (Kc, 3, n, n)
        diff = z[:, None] - ab.sqrt()[:, None] * mu[None]  # (N, Kc, 3, n, n)
        quad = (diff**2 / v[:, None]).flatten(2).sum(-1)  # (N, Kc)
        resp = torch.softmax(self.component_log_weights(embeddings) - 0.5 * quad, dim=1)
        gain = ab.sqrt() * self.lam / v  # (N, 3, n, n)
        mean_mu = torch.einsum("nk,kchw->nchw", resp, mu)
        z0 = mean_mu + gain * (z - ab.sqrt() * mean_mu)
        return self.from_dct(z0), resp

    def eps(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Any | None = None) -> Tensor:
        ab = self.alpha_bar(t).view(-1, 1, 1, 1)
        x0, _ = self.posterior(x_t, t, embeddings)
        return ((x_t.to(torch.float64) - ab.sqrt() * x0) / (1 - ab).sqrt()).to(x_t.dtype)

    def log_prob(self, x_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        """log p_t(x_t) (N,), exact (float64)."""
        ab = self.alpha_bar(t).view(-1, 1, 1, 1)
        z = self.to_dct(x_t.to(torch.float64))
        v = ab * self.lam + (1 - ab)
        diff = z[:, None] - ab.sqrt()[:, None] * self.means_dct[None]
        quad = (diff**2 / v[:, None]).flatten(2).sum(-1)
        logdet = torch.log(v).flatten(1).sum(-1)  # (N,)
        D = z[0].numel()
        comp = self.component_log_weights(embeddings) - 0.5 * quad
        return torch.logsumexp(comp, dim=1) - 0.5 * (logdet + D * math.log(2 * math.pi))

    @torch.no_grad()
    def sample(self, prompt: str, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples x0 (n, 3, size, size) of a class (prompt "" samples the whole mixture)."""
        w = self.component_log_weights(self.embed_prompts([prompt])).exp()[0]
        real = int((self.owner < len(self.prompts)).sum())
        if not bool(w[real:].any()):  # no negative-class weight: draw over the real components only
            w = w[:real]
        k = torch.multinomial(w.cpu(), n, replacement=True, generator=generator).to(self.device)
        xi = torch.randn((n, *self.lam.shape), generator=generator, dtype=torch.float64).to(self.device)
        return self.from_dct(self.means_dct[k] + self.lam.sqrt() * xi)

    # ----- ground-truth metrics -------------------------------------------------------------------
    @torch.no_grad()
    def image_metrics(self, x0: Tensor, prompt: str) -> dict[str, float]:
        """Realism of one image x0 (1, 3, n, n, prior space) against the class of ``prompt``."""
        z = self.to_dct(x0.to(torch.float64))[0]
        ci = self.class_index(prompt)
        comps = torch.nonzero(self.owner == ci).flatten()
        d = z[None] - self.means_dct[comps]
        maha = (d**2 / self.lam).flatten(1).sum(-1)
        j = int(torch.argmin(maha))
        dk = d[j]
        band = lambda m: float((dk[m] ** 2).sum() / self.lam[m].sum())  # noqa: E731
        emb = self.embed_prompts([prompt])
        ll = self.log_prob(x0.to(torch.float64), torch.zeros(1, dtype=torch.long, device=self.device), emb)
        return {
            **self.blend_metrics(x0, ci),
            "realism_high_band": band(self.high_mask),
            "realism_low_band": band(self.low_mask),
            "mahalanobis_per_dim": float(maha[j]) / dk.numel(),
            "log_likelihood": float(ll) / dk.numel(),  # nats per dimension under p_0 (ab(0) ~ 1)
            "nearest_component": int(comps[j]),
        }

    @torch.no_grad()
    def blend_metrics(self, x0: Tensor, class_index: int) -> dict[str, float]:
        """Commitment and contrast of an image (1, 3, n, n, prior space) against its class's component means:
        least-squares weights w of x0 on the means (blend_w_max = max w / sum w: ~1 committed to one component,
        ~0.5 an even two-component blend; blend_sum = sum w: < 1 faded towards grey), psnr_nearest (peak-to-peak 2,
        to the nearest mean) and out_of_gamut (fraction of values with |x0| > scale)."""
        x = x0.to(torch.float64).reshape(-1)
        means = self.means[self.owner == class_index].reshape(-1, x.numel())  # (K, D)
        w = torch.linalg.lstsq(means.T, x[:, None]).solution[:, 0]
        mse = ((means - x[None]) ** 2).mean(-1).min()
        peak = 2.0 * self.cfg.scale
        return {
            "blend_w_max": float(w.max() / w.sum()),
            "blend_sum": float(w.sum()),
            "psnr_nearest": float(10 * torch.log10(peak**2 / mse.clamp_min(1e-20))),
            "out_of_gamut": float((x.abs() > self.cfg.scale).double().mean()),
        }

    def evaluate(self, scene, prompt: str, **_: Any) -> dict[str, float]:
        """Ground-truth metrics of a trained 2D scene (the trainer calls this at the end)."""
        with torch.no_grad():
            img = scene.render(None)["rgb"]
        return self.image_metrics(self.encode(img), prompt)
