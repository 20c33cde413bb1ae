"""phi: the trainable eps-model of the current scene's render distribution (VSD / ESD, ProlificDreamer eq. 9-10).

A phi is called like a prior, ``eps(x_t, t, embeddings, cameras=None, null=None)``, and trains itself online:

    camera feature  c = flatten(c2w) (16 numbers; threestudio's ``camera_condition_type: extrinsics``), or 0 for
                    the "null camera" (rows where ``null`` is true, or every row when ``cameras`` is None)
    train_step      t' ~ U{0, ..., T-1} per row,  eps' ~ N(0, I),  x_t' = sqrt(ab) x0 + sqrt(1 - ab) eps'
                    with probability ``camera_dropout`` (one draw for the whole batch, as the reference) c = 0
                    loss = mean || f_phi(x_t', t', y, c) - target ||^2,  target = eps' (eps model) or
                    v = sqrt(ab) eps' - sqrt(1 - ab) x0 (v-prediction model);  one AdamW step on phi's parameters
    eps             eps = f (eps model) or sqrt(ab) f + sqrt(1 - ab) x_t (v model), with phi's OWN alpha_bar table
Draw order of ``train_step`` on the generator: t' (B,), then eps' (like x0), then the dropout uniform.
``state_dict()`` holds phi's trainable tensors (by name), the optimiser state and the step count, nothing of the
frozen base weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.kappa import _randn


@dataclass
class PhiConfig:
    # auto: the SD LoRA phi for a Stable Diffusion prior, the residual stand-in for the analytic priors
    kind: str = "auto"  # auto | lora | residual
    # lora: phi's UNet, a hub id or a local diffusers directory (reference: SD 2.1 768-v, a v-prediction model)
    model: str = "stabilityai/stable-diffusion-2-1"
    # lora: phi = the prior's own UNet + LoRA (one model; the pretrained branch runs with the LoRA disabled and no
    # camera embedding). Implied when phi.model equals the prior's model id (as in the reference).
    single_model: bool = False
    rank: int = 4
    lora_alpha: float = 4.0  # LoRA scale = lora_alpha / rank (1, as the reference's network_alpha=None)
    zero_init_camera: bool = False  # zero the camera MLP's output layer (the reference keeps torch's default init)
    hidden: int = 32  # residual: channels of the stand-in's conv net
    # the phi optimiser: AdamW as threestudio's prolificdreamer.yaml (torch's default weight decay 0.01)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.01
    camera_dropout: float = 0.1  # probability that a train step uses the null camera (trains its embedding)
    seed: int = 0  # initialisation of phi's new weights (LoRA down matrices, camera MLP, residual net)

    def validate(self, where: str = "guidance.phi") -> None:
        if self.kind not in ("auto", "lora", "residual"):
            raise ValueError(f"{where}.kind={self.kind!r} is unknown; allowed: auto, lora, residual")
        if self.rank < 1:
            raise ValueError(f"{where}.rank={self.rank} must be >= 1")
        if self.hidden < 1:
            raise ValueError(f"{where}.hidden={self.hidden} must be >= 1")
        if not 0.0 <= self.camera_dropout <= 1.0:
            raise ValueError(f"{where}.camera_dropout={self.camera_dropout} must be in [0, 1]")
        if self.weight_decay < 0 or self.eps < 0:
            raise ValueError(f"{where}.weight_decay={self.weight_decay}, {where}.eps={self.eps} must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{where}.betas={list(self.betas)} must be two numbers in [0, 1)")


CAMERA_DIM = 16  # flattened 4 x 4 camera-to-world matrix


def camera_features(cameras, n_rows: int, null: Tensor | None, device, dtype=torch.float32) -> Tensor:
    """(n_rows, 16): row r gets flatten(c2w[r % B]), or zeros (the null camera) where ``null[r]`` or without
    cameras."""
    if cameras is None:
        return torch.zeros(n_rows, CAMERA_DIM, device=device, dtype=dtype)
    c2w = cameras.c2w.reshape(-1, CAMERA_DIM).to(device, dtype)
    feat = c2w[torch.arange(n_rows, device=device) % c2w.shape[0]]
    if null is not None:
        feat = torch.where(null.to(device).view(-1, 1), torch.zeros_like(feat), feat)
    return feat


def _rows(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


class Phi:
    """Base class: eps conversion, the online denoising step, the optimiser and the checkpoint state.

    Subclasses set ``alphas_cumprod`` (float64, phi's own schedule), ``prediction_type`` (epsilon | v_prediction)
    and implement ``named_trainables()`` and ``model_output(x_t, t, embeddings, cameras, null)`` (the raw
    prediction, differentiable w.r.t. phi's parameters); then call ``_make_optimizer()``.
    """

    cfg: PhiConfig
    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"

    def named_trainables(self) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def model_output(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras, null: Tensor | None) -> Tensor:
        raise NotImplementedError

    @contextmanager
    def active(self):
        """phi's own weights switched on (re-entrant); a no-op unless phi shares a network with the prior."""
        yield

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_trainables()]

    def _make_optimizer(self) -> None:
        c = self.cfg
        self.optimizer = torch.optim.AdamW(
            self.parameters(), lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay
        )
        self.steps = 0

    def _ab(self, t: Tensor, like: Tensor) -> Tensor:
        ab = self.alphas_cumprod.to(like.device)[t.to(like.device).long().clamp_min(0)]
        return _rows(ab, like).to(like.dtype)

    @torch.no_grad()
    def eps(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras=None, null: Tensor | None = None) -> Tensor:
        """phi's eps at (x_t, t, y, camera), no grad; v-prediction converted with phi's own alpha_bar:
        eps = sqrt(ab) v + sqrt(1 - ab) x_t."""
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        out = self.model_output(x_t, t, embeddings, cameras, null).to(x_t.dtype)
        if self.prediction_type == "epsilon":
            return out
        ab = self._ab(t, x_t)
        return ab.sqrt() * out + (1 - ab).sqrt() * x_t

    def train_step(self, x0: Tensor, embeddings: Tensor, cameras, generator: torch.Generator | None) -> dict:
        """One online denoising step on the detached renders x0 (module docstring); returns stats."""
        x0 = x0.detach()
        B, T = x0.shape[0], int(self.alphas_cumprod.shape[0])
        t = torch.randint(0, T, (B,), generator=generator).to(x0.device)
        noise = _randn(x0, generator)
        drop = bool(torch.rand((), generator=generator) < self.cfg.camera_dropout)
        ab = self._ab(t, x0)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        null = torch.full((B,), drop, dtype=torch.bool, device=x0.device)
        with torch.enable_grad(), self.active():  # active through the backward (a shared UNet's LoRA)
            pred = self.model_output(x_t, t, embeddings, cameras, null)
            loss = F.mse_loss(pred.float(), target.float())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.steps += 1
        return {"phi_loss": float(loss.detach()), "phi_t": float(t.float().mean()), "phi_null_camera": int(drop)}

    @torch.no_grad()
    def denoising_loss(self, x0: Tensor, embeddings: Tensor, cameras, t: Tensor, noise: Tensor, null=None) -> float:
        """The train_step loss at given (t', eps') without a step (for tests and diagnostics)."""
        ab = self._ab(t, x0)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return float(F.mse_loss(self.model_output(x_t, t, embeddings, cameras, null).float(), target.float()))

    def state_dict(self) -> dict:
        return {
            "params": {n: p.detach().clone() for n, p in self.named_trainables()},
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.named_trainables())
        missing = sorted(set(params) ^ set(state["params"]))
        if missing:
            raise KeyError(f"phi state does not match this phi (differing tensors: {missing[:5]})")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state.get("steps", 0))
