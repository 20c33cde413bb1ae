"""The interface every frozen diffusion prior implements.

A prior is an eps-prediction model on a DDPM schedule:
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,   eps_hat = eps_theta(x_t, t, y)
seen through four operations: ``encode`` (render -> x0, differentiable), ``decode``,
``embed_prompts`` (text -> conditioning rows; ``""`` is the unconditional row) and ``eps``
(one batched model call). Classifier-free guidance, Perp-Neg and the SDS/SDI logic live in
:mod:`distill.guidance`, not here, so every prior gets them for free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# NFSD's fixed negative prompt (Katzir et al. 2024; wording as recalled in the reference notes, unverified). The
# analytic priors model it as a "negative" class of dull, dark, low-contrast, blurred versions of their objects.
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)
NEGATIVE_PROMPTS = (NFSD_NEGATIVE_PROMPT, "negative")


class PriorError(ValueError):
    """Bad input for a prior (unknown prompt, missing weights, wrong shape)."""


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """alpha_bar(t) = prod_{s<=t} (1 - beta_s) with SD's "scaled_linear" betas (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class DiffusionPrior(nn.Module, ABC):
    """A frozen eps-prediction diffusion model.

    Attributes:
        alphas_cumprod: (T,) float64 buffer, alpha_bar(t) for t = 0..T-1.
        view_dependent: whether the prior understands view suffixes ("..., back view") and so
            whether view-dependent prompts and Perp-Neg make sense for it.
    """

    view_dependent: bool = True

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """alpha_bar(t) as float64 (t may be a tensor of integer timesteps)."""
        # a negative label (the official inversion's leading step queries the model at -99) means alpha_bar(0)
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long().clamp_min(0)
        return self.alphas_cumprod[t]

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> x0 in the prior's space. Differentiable."""

    @abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """x0 in the prior's space -> (B, 3, H, W) RGB in [0, 1]."""

    @abstractmethod
    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text -> conditioning rows (N, ...). ``""`` gives the unconditional row.

        Raises PriorError naming the prompt (and what is allowed) when the prior cannot
        condition on it.
        """

    @abstractmethod
    def eps(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Any | None = None) -> Tensor:
        """One batched eps-prediction: x_t (N, ...), t (N,) long, embeddings (N, ...).

        ``cameras`` is given for priors whose distribution depends on the view (the 3D
        analytic prior); image priors ignore it. Rows of x_t share the camera batch layout
        of the caller (see :func:`distill.guidance.guided_eps`).
        """

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of x0 (without batch) for a render of height x width."""
        return tuple(self.encode(torch.zeros(1, 3, height, width, device=self.device)).shape[1:])
