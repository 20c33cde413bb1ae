"""ISM, Interval Score Matching (LucidDreamer, Liang et al., CVPR 2024), as the official code runs it
(``EnVision-Research/LucidDreamer`` ``guidance/sd_utils.py`` ``train_step``; reference note Part 4):

    warm = 1 - min(step / W, 1)                         (the schedule's warm-up, ``schedule=warmup``)
    delta = int(delta_t + warm (delta_t_start - delta_t))                               (100 -> 80)
    i_t ~ schedule;  i_s = max(i_t - delta, 0);  level(i) = i + steps_offset             (t = level(i_t), s = ...)
    eps0 = N(0, I) + offset_noise * N(0, 1) per channel (shared by the batch)           (offset noise, 0.1)
    x = sqrt(ab(i0)) x0 + sqrt(1 - ab(i0)) eps0,   i0 = max(i_s - xs_delta_t xs_inv_steps, 0)  (= 0)
    hop to i_s in steps of xs_delta_t (200): x <- DDIM(x, eps(x, level(i), y_inv), level(i) -> level(j))
    e_s = eps(x_s, s, y_inv);  x_t = DDIM(x_s, e_s, s -> t)                              (one hop s -> t)
    e_t = eps_neg + g (eps(x_t, t, y) - eps_neg)      (prediction CFG 7.5, uncond = the negative prompt;
                                                       Perp-Neg when the conditioning has negatives)
    grad = lambda sqrt((1 - ab_t) / ab_t) (e_t - e_s),   lambda = 0.1                  (x0 space)
and x0 receives ``grad`` itself (the official SpecifyGradient: no / B), ``loss_reduction=official``.

y_inv, the prompt of the inversion and of the target e_s, is ``""`` in the official code while the prediction's
unconditional branch is the negative prompt; the switches for the official code's quirks:
    target_prompt  empty (official) | negative: y_inv = the negative prompt, so e_t - e_s is a clean interval of
                   one model (the prediction's unconditional branch) plus the CFG term
    weighting      official  lambda sqrt((1 - ab_t) / ab_t)  (SDS in x0 form) | one_minus_ab  lambda (1 - ab_t)
    offset_noise   0.1 (official) | 0: the per-channel offset of eps0; eps0 enters only at level(i0) ~ 1
What LucidDreamer's training loop does around ``train_step``, each a setting (official value first):
    first_iteration    1 | 0: the official loop counts iterations from 1, so its warm-up (t's range, delta) runs
                       one step ahead of the trainer's step 0, 1, ...; ISM gives schedule and interval step + this
    interval_rounding  official: delta = int(delta_t + warm (delta_t_start - delta_t)) in ``train_step``,
                       int(delta_t + ceil(warm (delta_t_start - delta_t))) in ``train_step_perpneg`` (Perp-Neg
                       conditioning) | floor: int(...) always
    flip_p             0.5 | 0: ``T.RandomHorizontalFlip(p)`` of the render (with its depth) before encoding, one
                       coin per batch; the gradient reaches the render flipped back (:meth:`ISM.encoder_input`)
    as_latent_ratio    0.2 in every official config (guidance/ism.yaml: 0, a scene without depth cannot) | 0: on
                       that share of steps the encoded input is LucidDreamer's normalised disparity of the render's
                       depth, repeated to 3 channels (:func:`lucid_disparity`), instead of the render
The view prompts (azimuth blend, LucidDreamer's Perp-Neg weights) are prompt settings: distill.prompts.
Other deviations: eps is always the prior's eps (v-prediction UNets are converted by the prior; the official code
feeds raw v to the target and the CFG); a hop of zero length (i_s = 0, or delta = 0 for s -> t) is skipped instead of
spending a UNet call on an identity step; ``denoise_guidance_scale`` > 1 (inversion with "reverse CFG", used by no
official config) and ``xs_eta`` > 0 are not ported.
Cost after the warm-up: ceil(i_s / 200) <= 3 inversion calls + 1 (s -> t) of B rows each and one batched CFG call of
2B rows (2B + n_neg B with Perp-Neg): at most 5 calls, 6 rows per view (SDS 1 / 2, SDI up to 12 / 24).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.ddim import add_noise, ddim_step
from distill.guidance import Guidance, GuidanceOutput, gradient_loss, guided_eps
from distill.kappa import _randn
from distill.priors.base import DiffusionPrior
from distill.prompts import Conditioning

TARGET_PROMPTS = ("empty", "negative")
INTERVAL_ROUNDINGS = ("official", "floor")
ISM_WEIGHTINGS = ("official", "one_minus_ab")
ISM_REDUCTIONS = ("official", "sum", "mean")


@dataclass
class ISMConfig:
    name: str = "ism"
    lambda_guidance: float = 0.1  # every shipped config (the argument default is 1.0)
    delta_t: int = 80  # the interval s = t - delta after the warm-up (configs: 80, 50 or 25)
    delta_t_start: int = 100  # the interval at step 0, annealed linearly to delta_t over the schedule's warm-up
    xs_delta_t: int = 200  # the hop of the inversion x0 -> x_s
    xs_inv_steps: int = 5  # at most this many hops (start index max(i_s - xs_delta_t * xs_inv_steps, 0))
    steps_offset: int = 1  # level(i) = i + steps_offset: the DDIM scheduler's timesteps (SD 2.1: leading, 1)
    target_prompt: str = "empty"  # empty (official) | negative (module docstring)
    weighting: str = "official"  # official: sqrt((1 - ab) / ab) | one_minus_ab: 1 - ab
    offset_noise: float = 0.1  # per-channel offset added to the first hop's noise (0 = off)
    cfg_rule: str = "standard"  # eps_u + s (eps_c - eps_u), LucidDreamer's form; threestudio: eps_c + s (...)
    loss_reduction: str = "official"  # official: d loss / d x0 = grad | sum: grad / B | mean: grad / (B numel)
    first_iteration: int = 1  # official iterations count from 1: the warm-up sees step + 1 | 0: the trainer's step
    interval_rounding: str = "official"  # official: Perp-Neg ceils the annealed part of delta | floor: int() always
    flip_p: float = 0.5  # official T.RandomHorizontalFlip(p=0.5) of the render before encoding | 0: no flip
    as_latent_ratio: float = 0.0  # official configs 0.2: share of steps that encode the depth (disparity) instead

    def validate(self) -> None:
        if self.target_prompt not in TARGET_PROMPTS:
            raise ValueError(f"guidance.target_prompt={self.target_prompt!r}; allowed: {', '.join(TARGET_PROMPTS)}")
        if self.weighting not in ISM_WEIGHTINGS:
            raise ValueError(f"guidance.weighting={self.weighting!r}; allowed: {', '.join(ISM_WEIGHTINGS)}")
        if self.loss_reduction not in ISM_REDUCTIONS:
            raise ValueError(f"guidance.loss_reduction={self.loss_reduction!r}; allowed: {', '.join(ISM_REDUCTIONS)}")
        if self.cfg_rule not in ("standard", "threestudio"):
            raise ValueError(f"guidance.cfg_rule={self.cfg_rule!r}; allowed: standard, threestudio")
        if not (math.isfinite(self.lambda_guidance) and self.lambda_guidance > 0):
            raise ValueError(f"guidance.lambda_guidance={self.lambda_guidance} must be a finite number > 0")
        if not (math.isfinite(self.offset_noise) and self.offset_noise >= 0):
            raise ValueError(f"guidance.offset_noise={self.offset_noise} must be >= 0 (0 = off, official 0.1)")
        if self.delta_t < 0 or self.delta_t_start < 0:
            raise ValueError(
                f"guidance.delta_t={self.delta_t}, guidance.delta_t_start={self.delta_t_start}: both must be >= 0"
            )
        if self.xs_delta_t < 1 or self.xs_inv_steps < 1:
            raise ValueError(
                f"guidance.xs_delta_t={self.xs_delta_t}, guidance.xs_inv_steps={self.xs_inv_steps}: both must be >= 1"
            )
        if self.steps_offset < 0:
            raise ValueError(f"guidance.steps_offset={self.steps_offset} must be >= 0")
        if self.first_iteration not in (0, 1):
            raise ValueError(f"guidance.first_iteration={self.first_iteration}; allowed: 1 (official), 0")
        if self.interval_rounding not in INTERVAL_ROUNDINGS:
            raise ValueError(
                f"guidance.interval_rounding={self.interval_rounding!r}; allowed: {', '.join(INTERVAL_ROUNDINGS)}"
            )
        for key in ("flip_p", "as_latent_ratio"):
            v = getattr(self, key)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"guidance.{key}={v} must be a probability in [0, 1]")


def interval(step: int, max_steps: int, schedule, cfg: ISMConfig, perp_neg: bool = False) -> int:
    """delta = int(delta_t + warm (delta_t_start - delta_t)), warm = the schedule's warm-up still ahead at ``step``
    (the official iteration: the caller adds ``first_iteration``); with Perp-Neg and ``interval_rounding=official``
    the annealed part is ceiled first, as ``train_step_perpneg`` does."""
    warm = schedule.warm(step, max_steps) if hasattr(schedule, "warm") else 0.0
    extra = warm * (cfg.delta_t_start - cfg.delta_t)
    if perp_neg and cfg.interval_rounding == "official":
        extra = math.ceil(extra)
    return int(cfg.delta_t + extra)


def lucid_disparity(depth: Tensor, opacity: Tensor, fov_x: Tensor) -> Tensor:
    """LucidDreamer's depth map (``gaussian_renderer``), per view: disp = f / (depth + 10 opacity + 1e-5) with
    f = 1 / (2 tan(fov_x / 2)), then (disp - m) / (max disp - m) clamped to [0, 1], m = the least disparity where
    opacity <= 0.1 (all pixels when there is none). depth, opacity: (B, 1, H, W); fov_x: (B,) radians."""
    focal = 1.0 / (2.0 * torch.tan(fov_x / 2.0))
    disp = focal.view(-1, 1, 1, 1).to(depth.dtype) / (depth + opacity * 10.0 + 1e-5)
    out = []
    for d, a in zip(disp, opacity):
        bg = d[a <= 0.1]
        lo = bg.min() if bg.numel() else d.min()
        out.append(torch.clamp((d - lo) / (d.max() - lo), 0.0, 1.0))
    return torch.stack(out)


def hop_indices(i_s: int, xs_delta_t: int = 200, xs_inv_steps: int = 5) -> list[int]:
    """Indices the inversion x0 -> x_s visits: [i0, i0 + d, ..., i_s], i0 = max(i_s - d n, 0), at most n hops of d
    (the official ``add_noise_with_cfg``); len - 1 = the UNet calls (0 when i0 = i_s)."""
    i = max(i_s - xs_delta_t * xs_inv_steps, 0)
    out = [i]
    while i != i_s and len(out) <= xs_inv_steps:
        i = min(i + xs_delta_t, i_s)
        out.append(i)
    return out


class ISM(Guidance):
    Config = ISMConfig

    def __init__(self, cfg: ISMConfig, prior: DiffusionPrior, schedule, cfg_pair):
        cfg.validate()
        T = prior.num_train_timesteps
        if cfg.steps_offset >= T:
            raise ValueError(f"guidance.steps_offset={cfg.steps_offset} must be < {T}")
        self.cfg, self.prior, self.schedule, self.cfg_pair = cfg, prior, schedule, cfg_pair
        self.null_emb = prior.embed_prompts([""]) if cfg.target_prompt == "empty" else None
        self.last_input: dict = {}  # what encoder_input fed the prior last: {'depth': bool, 'flip': bool}

    def level(self, i: int) -> int:
        """The timestep of index i (the official ``self.timesteps[i]``), kept inside the schedule."""
        return min(i + self.cfg.steps_offset, self.prior.num_train_timesteps - 1)

    def encoder_input(self, render: dict, cameras, step: int, max_steps: int, generator=None) -> Tensor:
        """What the prior encodes this step (LucidDreamer's loop): on a share ``as_latent_ratio`` of steps the
        render's depth as :func:`lucid_disparity` repeated to 3 channels, else the render; then, with probability
        ``flip_p`` (one coin per batch), flipped left-right with the depth, as ``T.RandomHorizontalFlip`` flips the
        concatenated maps. Coins from ``generator``: depth first (the official loop draws it before ``train_step``),
        then the flip."""
        c = self.cfg
        rgb = render["rgb"]
        as_latent = False
        if c.as_latent_ratio > 0:
            if "depth" not in render or "opacity" not in render or cameras is None:
                raise ValueError(
                    f"guidance.as_latent_ratio={c.as_latent_ratio} needs a scene that renders depth (nerf, "
                    f"gaussians); this one does not: set guidance.as_latent_ratio=0"
                )
            as_latent = bool(torch.rand((), generator=generator) < c.as_latent_ratio)
        flip = c.flip_p > 0 and bool(torch.rand((), generator=generator) < c.flip_p)
        self.last_input = {"depth": as_latent, "flip": flip}
        if as_latent:
            fov_y = cameras.fovy.to(rgb.device)
            fov_x = 2 * torch.atan(torch.tan(fov_y / 2) * cameras.width / cameras.height)
            rgb = lucid_disparity(render["depth"], render["opacity"], fov_x).repeat(1, 3, 1, 1)
        return rgb.flip(-1) if flip else rgb

    def inversion_rows(self, cond: Conditioning) -> Tensor:
        if self.null_emb is None:
            return cond.uncond
        return self.null_emb.expand(cond.batch_size, *self.null_emb.shape[1:])

    def draw(self, step: int, max_steps: int, generator=None, perp_neg: bool = False) -> tuple[int, int]:
        """(i_t, delta) of the trainer's ``step``: the schedule and the interval see the official iteration
        ``step + first_iteration``; i_t is drawn from ``generator``."""
        it = step + self.cfg.first_iteration
        delta = interval(it, max_steps, self.schedule, self.cfg, perp_neg=perp_neg)
        return self.schedule(it, max_steps, generator), delta

    def step(
        self, x0: Tensor, cond: Conditioning, step: int, max_steps: int, generator: torch.Generator | None = None
    ) -> GuidanceOutput:
        c, prior = self.cfg, self.prior
        ab = prior.alphas_cumprod
        B = x0.shape[0]
        i_t, delta = self.draw(step, max_steps, generator, perp_neg=cond.negatives is not None)
        i_s = max(i_t - delta, 0)
        t, s = self.level(i_t), self.level(i_s)
        noise = _randn(x0.detach(), generator)
        if c.offset_noise > 0:
            offset_shape = (1, x0.shape[1], *([1] * (x0.dim() - 2)))
            offset = torch.randn(offset_shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
            noise = noise + c.offset_noise * offset
        emb = self.inversion_rows(cond)

        def eps_at(x: Tensor, level: int) -> Tensor:
            return prior.eps(x, torch.full((B,), level, dtype=torch.long, device=x.device), emb, cameras=cond.cameras)

        with torch.no_grad():
            hops = hop_indices(i_s, c.xs_delta_t, c.xs_inv_steps)
            x = add_noise(x0.detach(), noise, ab[self.level(hops[0])])
            for i, j in zip(hops[:-1], hops[1:]):
                x = ddim_step(x, eps_at(x, self.level(i)), ab[self.level(i)], ab[self.level(j)])
            e_s = eps_at(x, s)  # the target, and the eps of the hop s -> t
            x_t = ddim_step(x, e_s, ab[s], ab[t]) if t != s else x
            t_vec = torch.full((B,), t, dtype=torch.long, device=x0.device)
            e_t = guided_eps(prior, x_t, t_vec, cond, self.cfg_pair.fwd, c.cfg_rule)
            ab_t = ab[t]
            w = (1 - ab_t) if c.weighting == "one_minus_ab" else ((1 - ab_t) / ab_t).sqrt()
            w = c.lambda_guidance * w
            grad = torch.nan_to_num(w.to(e_t.dtype) * (e_t - e_s))
        if c.loss_reduction == "official":
            loss = gradient_loss(x0, grad * B, "sum")  # d loss / d x0 = grad (SpecifyGradient)
        else:
            loss = gradient_loss(x0, grad, c.loss_reduction)
        cfg_rows = self.cfg_rows(cond)
        calls = len(hops) - 1 + 1 + (1 if cfg_rows else 0)
        stats = {
            "t": t,
            "level": t,
            "s": s,
            "delta": t - s,
            "grad_norm": float(grad.norm()),
            "unet_rows_per_view": len(hops) - 1 + 1 + cfg_rows,
        }
        stats.update({f"input_{k}": float(v) for k, v in self.last_input.items()})  # input_flip, input_depth
        x0_hat = x0.detach() - grad
        return GuidanceOutput(loss, t, t, x_t, e_s, e_t, x0_hat, calls, stats)

    def held_loss(self, x0: Tensor, held: GuidanceOutput) -> Tensor:
        """loss_reduction=official: d loss / d x0 = x0 - x0_hat, no / B (SpecifyGradient, as in ``step``)."""
        if self.cfg.loss_reduction == "official":
            return 0.5 * F.mse_loss(x0, held.x0_hat.to(x0.dtype), reduction="sum")
        return super().held_loss(x0, held)

    def cfg_rows(self, cond: Conditioning) -> int:
        """Rows per view of the prediction's batched call (guided_eps: 1 at plain scale 0 or 1)."""
        n_neg = 0 if cond.negatives is None else int(cond.negatives.shape[0])
        if n_neg == 0 and self.cfg.cfg_rule == "standard" and self.cfg_pair.fwd in (0.0, 1.0):
            return 1
        return 2 + n_neg
