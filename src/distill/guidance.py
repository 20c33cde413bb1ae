"""Score distillation: SDS and SDI share this one step; they differ only in the kappa strategy.

One step (paper section 3, eq. 3.4):
    t ~ schedule;  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) kappa            (kappa from kappa.py)
    eps_hat = eps_u + s_fwd (eps_c - eps_u)                               (classifier-free guidance)
    x0_hat  = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)
With kappa ~ N(0, I) re-sampled each step this is SDS; with kappa inferred by DDIM inversion
(CFG scale s_inv, official -7.5) it is SDI (paper section 4, eq. 4.4).

Two losses (``guidance.loss``), alpha = sqrt(ab_t), sigma = sqrt(1 - ab_t), B the batch, N = numel(x0) / B:
    x0           (the SDI code's):  loss = 0.5 * mse(x0, stopgrad(x0_hat)) / B
                 d loss / d x0 = (sigma / alpha) (eps_hat - kappa) / B     (/ (N B) with loss_reduction=mean)
    threestudio  (stable_diffusion_guidance.py, weighting_strategy sds):  grad = (1 - ab_t) (eps_hat - kappa),
                 loss = 0.5 * ||x0 - stopgrad(x0 - grad)||^2 / B   =>   d loss / d x0 = sigma^2 (eps_hat - kappa) / B
Their ratio (x0 over threestudio, both "sum") is 1 / (alpha sigma) = 1 / sqrt(ab (1 - ab)): 13.1 at t = 980, 2.2 at
500, 7.4 at 20, so Adam does not absorb it. conf/guidance/sds.yaml (the Table 6.1 SDS row, dreamfusion-sd.yaml)
uses threestudio; SDI and the Fig. 6.2 ladder (the SDI code with inversion off, conf/ablation/sds_*) use x0.
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
    # x0: the SDI code's 0.5 * mse(x0, x0_hat) / B, gradient (sigma / alpha)(eps_hat - kappa). threestudio: its SDS,
    # gradient (1 - ab_t)(eps_hat - kappa) (use with loss_reduction=sum). See the module docstring.
    loss: str = "x0"

    def validate(self) -> None:
        if self.name not in ("sds", "ddim_inversion"):
            raise ValueError(f"guidance.name={self.name!r} is unknown; allowed: sds, ddim_inversion")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"guidance.loss_reduction={self.loss_reduction!r}; allowed: mean, sum")
        if self.cfg_rule not in ("standard", "threestudio"):
            raise ValueError(f"guidance.cfg_rule={self.cfg_rule!r}; allowed: standard, threestudio")
        if self.loss not in SDS_LOSSES:
            raise ValueError(
                f"guidance.loss={self.loss!r} is unknown; allowed: {', '.join(SDS_LOSSES)} (x0: the SDI code's "
                "x0-space loss; threestudio: its SDS, grad = (1 - ab_t)(eps_hat - kappa))"
            )


SDS_LOSSES = ("x0", "threestudio")


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """x - (<x, y> / ||y||^2) y, per batch row."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-12)
    return x - coef * y


def eps_branches(
    prior: DiffusionPrior,
    x_t: Tensor,
    t: Tensor,
    cond: Conditioning,
    extra: dict[str, Tensor] | None = None,
    perp_neg: bool = True,
) -> dict[str, Tensor]:
    """Every eps branch a method needs, in ONE batched prior call.

    Rows are stacked [cond (B); uncond (B); Perp-Neg negatives (n_neg x B); extra_1 (B); ...] so row r belongs to
    view r % B. ``extra`` maps a branch name to embedding rows (B, ...) or one row (1, ...) broadcast to the batch:
    the negative prompt of NFSD / CSD, the empty-string ("null") row. Returns {"cond", "uncond", name...} and, with
    Perp-Neg negatives in ``cond`` (and ``perp_neg``), "perp_neg" of shape (n_neg, B, ...).
    """
    B = x_t.shape[0]
    extra = extra or {}
    negs = list(cond.negatives) if (perp_neg and cond.negatives is not None) else []
    rows = [cond.cond, cond.uncond, *negs]
    for emb in extra.values():
        rows.append(emb.expand(B, *emb.shape[1:]) if emb.shape[0] == 1 else emb)
    n = len(rows)
    out = prior.eps(x_t.repeat(n, *([1] * (x_t.dim() - 1))), t.repeat(n), torch.cat(rows), cameras=cond.cameras)
    branches = {"cond": out[:B], "uncond": out[B : 2 * B]}
    if negs:
        branches["perp_neg"] = out[2 * B : (2 + len(negs)) * B].reshape(len(negs), B, *out.shape[1:])
    for i, name in enumerate(extra):
        k = 2 + len(negs) + i
        branches[name] = out[k * B : (k + 1) * B]
    return branches


def combine_cfg(branches: dict[str, Tensor], scale: float, rule: str, cond: Conditioning) -> Tensor:
    """Classifier-free guidance from the branches (paper eq. 3.4):
    standard:    eps_u + s (eps_c - eps_u)
    threestudio: eps_c + s (eps_c - eps_u)   (the official plain path; effective scale s + 1)
    Perp-Neg:    eps_u + s (e_c + sum_i w_i perp(e_i, e_c)),  e = eps_. - eps_u  (standard in both rules)
    """
    eps_c, eps_u = branches["cond"], branches["uncond"]
    if "perp_neg" not in branches:
        if rule == "threestudio":
            return eps_c + scale * (eps_c - eps_u)
        return eps_u + scale * (eps_c - eps_u)
    e_pos = eps_c - eps_u
    acc = torch.zeros_like(e_pos)
    for i, eps_neg in enumerate(branches["perp_neg"]):
        w = cond.neg_weights[:, i].to(e_pos.dtype).view(-1, *([1] * (e_pos.dim() - 1)))
        acc = acc + w * perpendicular_component(eps_neg - eps_u, e_pos)
    return eps_u + scale * (e_pos + acc)


def guided_eps(
    prior: DiffusionPrior, x_t: Tensor, t: Tensor, cond: Conditioning, scale: float, rule: str = "standard"
) -> Tensor:
    """Classifier-free guidance (and Perp-Neg when ``cond`` has negatives) in one batched call.

    Rows are stacked [cond (B); uncond (B); neg_1 (B); ...], so row r belongs to view r % B.
        plain:    eps = eps_u + s (eps_c - eps_u)
        Perp-Neg: eps = eps_u + s (e_c + sum_i w_i perp(e_i, e_c)),  e = eps_. - eps_u
    Scale 1 (plain) needs only the conditional row, scale 0 only the unconditional one.
    """
    perp = cond.negatives is not None
    if not perp and rule == "standard" and scale in (0.0, 1.0):
        emb = cond.cond if scale == 1.0 else cond.uncond
        return prior.eps(x_t, t, emb, cameras=cond.cameras)
    return combine_cfg(eps_branches(prior, x_t, t, cond), scale, rule, cond)


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


def weight(ab_t: Tensor, strategy: str) -> Tensor:
    """w(t) of the score-distillation gradient: "sds" 1 - ab_t (DreamFusion / threestudio), "uniform" 1,
    "fantasia3d" sqrt(ab_t) (1 - ab_t)."""
    if strategy == "sds":
        return 1 - ab_t
    if strategy == "uniform":
        return torch.ones_like(ab_t)
    if strategy == "fantasia3d":
        return ab_t.sqrt() * (1 - ab_t)
    raise ValueError(f"weighting={strategy!r} is unknown; allowed: {', '.join(WEIGHTINGS)}")


WEIGHTINGS = ("sds", "uniform", "fantasia3d")


def gradient_loss(x0: Tensor, grad: Tensor, reduction: str = "sum") -> Tensor:
    """The reparametrised loss whose gradient w.r.t. x0 is ``grad`` (threestudio's form):
        loss = 0.5 * || x0 - stopgrad(x0 - grad) ||^2 / B          d loss / d x0 = grad / B   ("sum")
    "mean" divides by the number of elements as well (the official SDI code's 0.5 * mse / B)."""
    B = x0.shape[0]
    target = (x0.detach() - grad.to(x0.dtype)).detach()
    return 0.5 * F.mse_loss(x0, target, reduction=reduction) / B


class Guidance:
    """What the trainer needs of a score-distillation method (SDS/SDI here; HiFA, CSD, NFSD, VSD, ESD in
    :mod:`distill.methods`). ``step`` returns a :class:`GuidanceOutput`; every numeric entry of its ``stats`` is
    logged as a scalar. Methods with trainable state (VSD's phi) return it from ``state_dict``; the trainer keeps it
    in the checkpoint, so a resumed run continues it exactly. ``held_loss`` is the loss of a step that reuses an
    earlier step's target (``trainer.target_every``, :mod:`distill.held`)."""

    needs_images: bool = False  # True: step() also takes images=the render (B, 3, H, W) with grad (HiFA)

    def step(
        self, x0: Tensor, cond: Conditioning, step: int, max_steps: int, generator: torch.Generator | None = None
    ) -> GuidanceOutput:
        raise NotImplementedError

    def encoder_input(self, render: dict, cameras, step: int, max_steps: int, generator=None) -> Tensor:
        """The maps the prior encodes into x0 this step: the render's rgb (ISM: LucidDreamer's flip / depth steps)."""
        return render["rgb"]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def held_loss(self, x0: Tensor, held: GuidanceOutput) -> Tensor:
        """The loss of a step that reuses the target ``held`` (``trainer.target_every`` > 1, :mod:`distill.held`):
        0.5 ||x0 - x0_hat||^2 towards the held x0_hat, reduced as the method reduces its own loss
        (``guidance.loss_reduction``): 0.5 mse(x0, x0_hat) / B, the form of :func:`gradient_loss`. A method's x0_hat
        is x0 - grad at the step that formed it, so on that step this loss has the method's own gradient."""
        return 0.5 * F.mse_loss(x0, held.x0_hat.to(x0.dtype), reduction=self.cfg.loss_reduction) / x0.shape[0]

    def extra_prompts(self) -> dict[str, str]:
        """Prompt texts beyond cond/uncond that the method needs embedded (branch name -> text)."""
        return {}


class ScoreDistillation(Guidance):
    """The SDS / SDI step on a batch of encoded renders x0 (requires grad)."""

    Config = GuidanceConfig

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
            self.kappa.observe(eps_hat)  # kappa=cached: the next step's noise (eq. 4.5)
        loss = self._loss(x0, x0_hat, eps_hat, k.kappa, t)
        stats = {"t": t, "level": k.level, "grad_norm": float((x0.detach() - x0_hat).norm())}
        if self.cfg.residual_every and step % self.cfg.residual_every == 0:
            from distill.kappa import eq44_residual

            stats["kappa_residual"] = float(
                eq44_residual(x0.detach(), k.kappa, t, self.eps_fn(cond, self.cfg_pair.inv), ab)
            )
        return GuidanceOutput(loss, t, k.level, k.x_t, k.kappa, eps_hat, x0_hat, k.model_calls + 1, stats)

    def _loss(self, x0: Tensor, x0_hat: Tensor, eps_hat: Tensor, kappa: Tensor, t: int) -> Tensor:
        """guidance.loss=x0: 0.5 * mse(x0, x0_hat) / B; threestudio: gradient_loss of (1 - ab_t)(eps_hat - kappa)."""
        if self.cfg.loss == "threestudio":
            w = weight(self.prior.alphas_cumprod[t], "sds").to(eps_hat.dtype)
            return gradient_loss(x0, torch.nan_to_num(w * (eps_hat - kappa)), self.cfg.loss_reduction)
        return 0.5 * F.mse_loss(x0, x0_hat.to(x0.dtype), reduction=self.cfg.loss_reduction) / x0.shape[0]

    def held_loss(self, x0: Tensor, held: GuidanceOutput) -> Tensor:
        """A held step's loss is this method's own loss against the held target (x0: the pull towards x0_hat;
        threestudio: the held gradient (1 - ab_t)(eps_hat - kappa) itself)."""
        return self._loss(x0, held.x0_hat, held.eps_hat, held.kappa, held.t)

    def state_dict(self) -> dict:
        return {"kappa": self.kappa.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kappa.load_state_dict(state.get("kappa", {}))
