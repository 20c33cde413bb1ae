"""phi's stand-in on the analytic priors: the exact eps plus a zero-initialised residual network, trained online.

    eps_phi(x_t, t, y, c) = eps_prior(x_t, t, y) + r_theta(x_t, t, y, c)
    r_theta = conv3x3 -> SiLU -> FiLM(e) -> conv3x3 -> SiLU -> conv3x3 (output layer zero at init)
    e = TimestepEmbedding(sinusoid(t)) + TimestepEmbedding_cam(flatten(c2w) or 0) + Linear(y)
It plays the part of the LoRA: phi starts as the (text-conditional, unguided) prior itself, it has a camera
embedding added to its time embedding with a learned null camera, and it is trained by the same denoising loss,
t' ~ U[0, T), 10 % null-camera dropout, AdamW (:class:`distill.phi.base.Phi`). The exact prior needs the views'
geometry (analytic3d), so eps_prior always gets the real cameras; the null camera reaches only the residual, as the
LoRA phi's UNet still sees x_t. Why not a Gaussian fit (ESD's own toy): a fit has no null-camera embedding to train
and no LoRA-like start, so it would not exercise what VSD / ESD do on Stable Diffusion. Cost per VSD step: one exact
eps call of 1 (VSD) or 2 (ESD) rows for phi's branch and one with a backward through the small net for its train step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

from distill.phi.base import CAMERA_DIM, Phi, PhiConfig, camera_features


class ResidualNet(nn.Module):
    def __init__(self, channels: int, text_dim: int, hidden: int):
        super().__init__()
        width = 4 * hidden
        self.time_proj = Timesteps(hidden, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden, width)
        self.camera_embedding = TimestepEmbedding(CAMERA_DIM, width)
        self.text = nn.Linear(text_dim, width)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.film = nn.Linear(width, 2 * hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, camera: Tensor) -> Tensor:
        e = self.time_embedding(self.time_proj(t)) + self.camera_embedding(camera) + self.text(text)
        scale, shift = self.film(F.silu(e)).chunk(2, dim=1)
        h = F.silu(self.conv_in(x))
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.conv_out(F.silu(self.conv_mid(h)))


class ResidualPhi(Phi):
    prediction_type = "epsilon"

    def __init__(self, cfg: PhiConfig, prior):
        cfg.validate()
        self.cfg, self.prior, self.device = cfg, prior, prior.device
        self.alphas_cumprod = prior.alphas_cumprod.detach().cpu().to(torch.float64)
        size = getattr(getattr(prior, "cfg", None), "image_size", 16)
        channels = int(prior.latent_shape(size, size)[0])
        text_dim = int(prior.embed_prompts([""])[0].numel())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.net = ResidualNet(channels, text_dim, cfg.hidden)
        self.net.to(self.device)
        if cfg.zero_init_camera:
            with torch.no_grad():
                self.net.camera_embedding.linear_2.weight.zero_()
                self.net.camera_embedding.linear_2.bias.zero_()
        self.model_calls = 0
        self._make_optimizer()

    def named_trainables(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.net.named_parameters())

    def model_output(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras, null: Tensor | None) -> Tensor:
        N = x_t.shape[0]
        with torch.no_grad():
            base = self.prior.eps(x_t, t, embeddings, cameras=cameras)
        dtype = self.net.conv_in.weight.dtype
        feat = camera_features(cameras, N, null, self.device, dtype)
        r = self.net(x_t.to(dtype), t.to(self.device), embeddings.reshape(N, -1).to(dtype), feat)
        self.model_calls += 1
        return base + r.to(base.dtype)
