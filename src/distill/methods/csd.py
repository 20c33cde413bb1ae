"""CSD, Classifier Score Distillation (Yu et al., ICLR 2024): the noise terms of SDS are dropped and only the
classifier score is distilled,

    grad = w(t) [ c_cond eps(x_t; y) + c_neg eps(x_t; y_neg) + c_null eps(x_t; "") ]

with the official code's defaults c_cond = 1, c_neg = 0, c_null = -1, i.e. pure CSD  w(t) (eps_y - eps_null)
= -w(t) sigma_t grad_x log p_t(y | x_t). c_neg != 0 adds the negative-prompt branch (text vs negative prompt, the
official IF config anneals c_neg 0 -> -1 and c_null -1 -> 0). No guidance scale: the magnitude is left to the
optimiser; ``grad_normalize`` divides by ||grad|| as the official DeepFloyd guidance does. "null" is the
conditioning's unconditional row (``prompt_processor.negative_prompt``, "" by default).
Cost: one batched prior call on 2 rows (3 with the negative prompt). No Perp-Neg (the official SD guidance
offers it; not ported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.guidance import Guidance, GuidanceOutput, eps_branches, weight
from distill.methods.common import check_common, noised_render, output
from distill.priors.base import DiffusionPrior
from distill.prompts import Conditioning


@dataclass
class CSDConfig:
    name: str = "csd"
    c_cond: float = 1.0
    c_neg: float = 0.0  # coefficient of the negative-prompt branch ("uncond" in the official code)
    c_null: float = -1.0  # coefficient of the unconditional row ("null" in the official code)
    negative_prompt: str = "oversaturated color, ugly, tiling, low quality, noisy"  # used only if c_neg != 0
    weighting: str = "sds"  # w(t) = 1 - ab_t (the official SD guidance)
    grad_normalize: bool = False  # grad / ||grad|| (the official DeepFloyd guidance)
    loss_reduction: str = "sum"

    def validate(self) -> None:
        check_common(self.name, self.weighting, self.loss_reduction)


class CSD(Guidance):
    Config = CSDConfig

    def __init__(self, cfg: CSDConfig, prior: DiffusionPrior, schedule):
        cfg.validate()
        self.cfg, self.prior, self.schedule = cfg, prior, schedule
        self.neg_emb = prior.embed_prompts([cfg.negative_prompt]) if cfg.c_neg != 0 else None

    def step(
        self, x0: Tensor, cond: Conditioning, step: int, max_steps: int, generator: torch.Generator | None = None
    ) -> GuidanceOutput:
        c = self.cfg
        n = noised_render(x0, self.schedule, self.prior.alphas_cumprod, step, max_steps, generator)
        extra = {"neg": self.neg_emb} if self.neg_emb is not None else {}
        with torch.no_grad():
            br = eps_branches(self.prior, n.x_t, n.t_vec, cond, extra=extra, perp_neg=False)
            delta = c.c_cond * br["cond"] + c.c_null * br["uncond"]
            if "neg" in br:
                delta = delta + c.c_neg * br["neg"]
            w = weight(n.ab, c.weighting)
            grad = w.to(delta.dtype) * delta
            if c.grad_normalize:
                grad = grad / grad.norm().clamp_min(1e-12)
        return output(x0, grad, n, w, c.loss_reduction, 1, {"classifier_score_norm": float(delta.norm())})
