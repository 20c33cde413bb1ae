"""VSD (ProlificDreamer, Wang et al. 2023, eq. 9; stage 1 only) and ESD (Wang et al. 2024, "Taming mode collapse").

Both replace SDS's noise by a trainable model phi of the current scene's render distribution (:mod:`distill.phi`):

    t ~ schedule (preset: U[0.02, 0.98], U[0.02, 0.5] from step 5000);  x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    eps_pre = eps_u + s (eps_c - eps_u)               frozen prior, CFG on the text (diffusers convention, s=cfg.fwd)
    VSD: eps_est = eps_phi(x_t, t, y, c)              phi at the view's camera c, no text CFG
    ESD: eps_est = eps_phi(x_t, t, y, 0) + s_c (eps_phi(x_t, t, y, c) - eps_phi(x_t, t, y, 0)),   lambda = 1 - s_c
         = (1 - lambda) eps_phi(c) + lambda eps_phi(null camera)     (ESD eq. 9; reference lambda 0.5)
    grad = w(t) (eps_pre - eps_est),  w = 1 - ab;  loss = 0.5 ||x0 - sg(x0 - grad)||^2 / B   (d loss / d x0 = grad / B)
then phi takes one denoising step on the detached render with its own t' ~ U[0, T) (``Phi.train_step``), after the
gradient above is formed (threestudio sums both losses into one optimiser step; the graphs are disjoint).
phi's text input is the view-independent prompt (``cond.plain``), as in the reference; the frozen model gets the
view-dependent one. Without cameras (2D) the null and camera branches coincide and ESD
equals VSD. Cost per step: pretrained 1 call of 2 rows (no grad), phi 1 call of 1 (VSD) or 2 (ESD) rows (no grad),
phi's train step 1 call of 1 row with a backward to the LoRA / camera embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill.guidance import CFGConfig, Guidance, GuidanceOutput, gradient_loss, guided_eps, weight
from distill.methods.common import check_common, noised_render
from distill.phi import Phi, PhiConfig, make_phi
from distill.priors.base import DiffusionPrior
from distill.prompts import Conditioning


@dataclass
class VSDConfig:
    name: str = "vsd"
    # ESD's lambda = 1 - s_c, the weight of phi's null-camera branch (``lambda`` is a Python keyword); 0 = VSD
    esd_lambda: float = 0.0
    weighting: str = "sds"  # w(t) = 1 - ab
    cfg_rule: str = "standard"  # the reference VSD guidance: eps_u + s (eps_c - eps_u)
    loss_reduction: str = "sum"  # grad / B, threestudio's form
    phi: PhiConfig = field(default_factory=PhiConfig)

    def validate(self) -> None:
        check_common(self.name, self.weighting, self.loss_reduction)
        if self.name not in ("vsd", "esd"):
            raise ValueError(f"guidance.name={self.name!r}; allowed for this class: vsd, esd")
        if not 0.0 <= self.esd_lambda <= 1.0:
            raise ValueError(f"guidance.esd_lambda={self.esd_lambda} must be in [0, 1] (0 = VSD, ESD reference 0.5)")
        if self.cfg_rule not in ("standard", "threestudio"):
            raise ValueError(f"guidance.cfg_rule={self.cfg_rule!r}; allowed: standard, threestudio")
        self.phi.validate()


@dataclass
class ESDConfig(VSDConfig):
    name: str = "esd"
    esd_lambda: float = 0.5


class VSD(Guidance):
    Config = VSDConfig

    def __init__(self, cfg: VSDConfig, prior: DiffusionPrior, schedule, cfg_pair: CFGConfig):
        cfg.validate()
        self.cfg, self.prior, self.schedule, self.cfg_pair = cfg, prior, schedule, cfg_pair
        self.phi: Phi = make_phi(cfg.phi, prior)

    def phi_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras) -> Tensor:
        """eps_est = (1 - lambda) eps_phi(c) + lambda eps_phi(null): one phi call of B or 2B rows."""
        lam = self.cfg.esd_lambda
        if lam == 0.0 or cameras is None:  # VSD, or no cameras: the two branches are the same
            return self.phi.eps(x_t, t, text, cameras)
        B = x_t.shape[0]
        if lam == 1.0:
            return self.phi.eps(x_t, t, text, cameras, null=torch.ones(B, dtype=torch.bool, device=x_t.device))
        null = torch.arange(2 * B, device=x_t.device) >= B
        out = self.phi.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text, text]), cameras, null=null)
        e_cam, e_null = out[:B], out[B:]
        return e_null + (1.0 - lam) * (e_cam - e_null)

    def step(
        self, x0: Tensor, cond: Conditioning, step: int, max_steps: int, generator: torch.Generator | None = None
    ) -> GuidanceOutput:
        c = self.cfg
        n = noised_render(x0, self.schedule, self.prior.alphas_cumprod, step, max_steps, generator)
        with torch.no_grad():
            eps_pre = guided_eps(self.prior, n.x_t, n.t_vec, cond, self.cfg_pair.fwd, c.cfg_rule)
            eps_est = self.phi_eps(n.x_t, n.t_vec, cond.plain, cond.cameras)
            w = weight(n.ab, c.weighting)
            grad = torch.nan_to_num(w.to(eps_pre.dtype) * (eps_pre - eps_est))
        loss = gradient_loss(x0, grad, c.loss_reduction)
        stats = {"t": n.t, "grad_norm": float(grad.norm())}
        stats.update(self.phi.train_step(x0.detach(), cond.plain, cond.cameras, generator))
        return GuidanceOutput(loss, n.t, n.t, n.x_t, eps_est, eps_pre, x0.detach() - grad, 3, stats)

    def state_dict(self) -> dict:
        return {"phi": self.phi.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "phi" in state:
            self.phi.load_state_dict(state["phi"])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.phi.parameters()


class ESD(VSD):
    """VSD with classifier-free guidance on phi's camera (module docstring); ``esd_lambda`` 0.5 by default."""

    Config = ESDConfig
