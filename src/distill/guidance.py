"""Score distillation: SDS and SDI share this one step; they differ only in the kappa strategy.

One step (paper section 3, eq. 3.4):
    t ~ schedule;  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) kappa            (kappa from kappa.py)
    eps_hat = eps_u + s_fwd (eps_c - eps_u)                               (classifier-free guidance)
    x0_hat  = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)
    loss    = 0.5 * ||x0 - stopgrad(x0_hat)||^2  => d loss / d x0 = sigma(t) (eps_hat - kappa)
With kappa ~ N(0, I) re-sampled each step this is SDS; with kappa inferred by DDIM inversion
(CFG scale s_inv, official -7.5) it is SDI (paper section 4, eq. 4.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.ddim import predict_x0
from distill.kappa import KappaStrategy
from distill.priors.base import DiffusionPrior
from distill.prompts import Conditioning
from distill.schedule import TimeSchedule


@dataclass
class CFGConfig:
    """A classifier-free-guidance pair: forward prediction and inversion scales."""

    fwd: float = 7.5
    inv: float = -7.5


@dataclass
class GuidanceConfig:
    name: str = "ddim_inversion"  # sds | ddim_inversion (a label; the kappa strategy does the work)
    loss_reduction: str = "mean"  # official: 0.5 * mse(mean) / batch; "sum" gives grad = sigma (eps_hat - kappa)
    # "standard": eps_u + s (eps_c - eps_u). "threestudio": eps_c + s (eps_c - eps_u), the official
    # plain-CFG path (effective scale s + 1); the Perp-Neg path is standard in both.
    cfg_rule: str = "standard"
    residual_every: int = 0  # log the eq. 4.4 residual every N steps (extra model calls; 0 = never)

    def validate(self) -> None:
        if self.name not in ("sds", "ddim_inversion"):
            raise ValueError(f"guidance.name={self.name!r} is unknown; allowed: sds, ddim_inversion")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"guidance.loss_reduction={self.loss_reduction!r}; allowed: mean, sum")
        if self.cfg_rule not in ("standard", "threestudio"):
            raise ValueError(f"guidance.cfg_rule={self.cfg_rule!r}; allowed: standard, threestudio")


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """x - (<x, y> / ||y||^2) y, per batch row."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-12)
    return x - coef * y


def guided_eps(
    prior: DiffusionPrior, x_t: Tensor, t: Tensor, cond: Conditioning, scale: float, rule: str = "standard"
) -> Tensor:
    """Classifier-free guidance (and Perp-Neg when ``cond`` has negatives) in one batched call.

    Rows are stacked [cond (B); uncond (B); neg_1 (B); ...], so row r belongs to view r % B.
        plain:    eps = eps_u + s (eps_c - eps_u)
        Perp-Neg: eps = eps_u + s (e_c + sum_i w_i perp(e_i, e_c)),  e = eps_. - eps_u
    Scale 1 (plain) needs only the conditional row, scale 0 only the unconditional one.
    """
    B = x_t.shape[0]
    perp = cond.negatives is not None
    if not perp and rule == "standard" and scale in (0.0, 1.0):
        emb = cond.cond if scale == 1.0 else cond.uncond
        return prior.eps(x_t, t, emb, cameras=cond.cameras)
    blocks = [cond.cond, cond.uncond] + (list(cond.negatives) if perp else [])
    n = len(blocks)
    out = prior.eps(x_t.repeat(n, *([1] * (x_t.dim() - 1))), t.repeat(n), torch.cat(blocks), cameras=cond.cameras)
    eps_c, eps_u = out[:B], out[B : 2 * B]
    if not perp:
        if rule == "threestudio":
            return eps_c + scale * (eps_c - eps_u)
        return eps_u + scale * (eps_c - eps_u)
    e_pos = eps_c - eps_u
    acc = torch.zeros_like(e_pos)
    for i in range(n - 2):
        e_neg = out[(2 + i) * B : (3 + i) * B] - eps_u
        w = cond.neg_weights[:, i].to(e_pos.dtype).view(-1, *([1] * (e_pos.dim() - 1)))
        acc = acc + w * perpendicular_component(e_neg, e_pos)
    return eps_u + scale * (e_pos + acc)


@dataclass
class GuidanceOutput:
    loss: Tensor
    t: int
    level: int  # noise level of x_t (t + delta after inversion)
    x_t: Tensor
    kappa: Tensor
    eps_hat: Tensor
    x0_hat: Tensor
    model_calls: int
    stats: dict = field(default_factory=dict)


class ScoreDistillation:
    """The SDS / SDI step on a batch of encoded renders x0 (requires grad)."""

    def __init__(
        self,
        prior: DiffusionPrior,
        kappa: KappaStrategy,
        schedule: TimeSchedule,
        cfg: GuidanceConfig,
        cfg_pair: CFGConfig,
    ):
        cfg.validate()
        self.prior, self.kappa, self.schedule, self.cfg, self.cfg_pair = prior, kappa, schedule, cfg, cfg_pair

    def eps_fn(self, cond: Conditioning, scale: float):
        """x, t -> guided eps at a fixed conditioning and scale (for inversion and samplers)."""
        return lambda x, t: guided_eps(self.prior, x, t, cond, scale, self.cfg.cfg_rule)

    def step(
        self, x0: Tensor, cond: Conditioning, step: int, max_steps: int, generator: torch.Generator | None = None
    ) -> GuidanceOutput:
        B = x0.shape[0]
        t = self.schedule(step, max_steps, generator)
        ab = self.prior.alphas_cumprod
        with torch.no_grad():
            k = self.kappa(x0.detach(), t, self.eps_fn(cond, self.cfg_pair.inv), ab, generator)
            t_vec = torch.full((B,), t, dtype=torch.long, device=x0.device)
            eps_hat = guided_eps(self.prior, k.x_t, t_vec, cond, self.cfg_pair.fwd, self.cfg.cfg_rule)
            x0_hat = predict_x0(k.x_t, eps_hat, ab[t])
        loss = 0.5 * F.mse_loss(x0, x0_hat.to(x0.dtype), reduction=self.cfg.loss_reduction) / B
        stats = {"t": t, "level": k.level, "grad_norm": float((x0.detach() - x0_hat).norm())}
        if self.cfg.residual_every and step % self.cfg.residual_every == 0:
            from distill.kappa import eq44_residual

            stats["kappa_residual"] = float(
                eq44_residual(x0.detach(), k.kappa, t, self.eps_fn(cond, self.cfg_pair.inv), ab)
            )
        return GuidanceOutput(loss, t, k.level, k.x_t, k.kappa, eps_hat, x0_hat, k.model_calls + 1, stats)
