"""Prompt processing: view-dependent prompts and Perp-Neg weights.

View-dependent prompting appends a direction to the prompt ("..., front view") chosen from the
camera: front if |azimuth| < front_threshold, back if |azimuth| > 180 - back_threshold,
overhead if elevation > overhead_threshold, side otherwise (threestudio's convention).

Perp-Neg (Armandpour et al. 2023) interpolates the positive embedding between neighbouring
directions and pushes away from the other directions with weights w_i < 0:
    eps = eps_u + s * (e_pos + sum_i w_i * perp(e_neg_i, e_pos)),   e = eps_c - eps_u,
where perp(x, y) = x - (<x, y> / ||y||^2) y. The weight schedule is threestudio's
(shifted exponential decay in the interpolation ratio r).

LucidDreamer (``train.py``) does both its own way; ``view_prompts`` / ``perp_neg_weights`` = ``lucid``:
    r = 1 - |azimuth| / 90 (-90 <= azimuth < 90, front -> side), 2 - |azimuth| / 90 (side -> back); no overhead;
    without Perp-Neg the prompt row is blended: r E(start) + (1 - r) E(end) (e.g. 30 deg: 2/3 front + 1/3 side);
    (with Perp-Neg both codes blend the positive by this same r; threestudio's adds the overhead view)
    with Perp-Neg (:func:`lucid_perp_neg_rows`), n = negative_w (-2), front decay 2, side decay 10:
      front half: negatives (front, side), w = (0 if r > 0.8 else n exp(-2 r), 0 if r < 0.2 else n exp(-10 (1 - r)))
      back half:  negatives (side, front), w = (0 if r > 0.8 else n exp(-10 r) / 2, n)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.priors.base import DiffusionPrior
from distill.scene.cameras import Cameras

DIRECTIONS = ("side", "front", "back", "overhead")
VIEW_PROMPTS = ("threestudio", "lucid")
PERP_NEG_WEIGHTS = ("threestudio", "lucid")


@dataclass
class PromptConfig:
    prompt: str = "a hamburger"
    negative_prompt: str = ""
    view_dependent: bool = True
    perp_neg: bool = True
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    # (a, b, c) of w(r) = a * exp(-b r) + c, threestudio's defaults
    perp_neg_f_sb: tuple[float, float, float] = (1.0, 0.5, -0.606)
    perp_neg_f_fsb: tuple[float, float, float] = (1.0, 0.5, 0.967)
    perp_neg_f_fs: tuple[float, float, float] = (4.0, 0.5, -2.426)
    perp_neg_f_sf: tuple[float, float, float] = (4.0, 0.5, -2.426)
    view_prompts: str = "threestudio"  # threestudio: one suffix per view | lucid: LucidDreamer's azimuth blend
    perp_neg_weights: str = "threestudio"  # threestudio: the (a, b, c) decays above | lucid: LucidDreamer's weights
    lucid_negative_w: float = -2.0  # LucidDreamer's negative_w
    lucid_front_decay: float = 2.0  # LucidDreamer's front_decay_factor
    lucid_side_decay: float = 10.0  # LucidDreamer's side_decay_factor

    def validate(self) -> None:
        if self.view_prompts not in VIEW_PROMPTS:
            raise ValueError(f"prompt_processor.view_prompts={self.view_prompts!r}; allowed: {', '.join(VIEW_PROMPTS)}")
        if self.perp_neg_weights not in PERP_NEG_WEIGHTS:
            raise ValueError(
                f"prompt_processor.perp_neg_weights={self.perp_neg_weights!r}; allowed: {', '.join(PERP_NEG_WEIGHTS)}"
            )


@dataclass
class Conditioning:
    """Conditioning rows for one batch of B views.

    cond, uncond: (B, ...) embeddings; negatives: (n_neg, B, ...) with weights (B, n_neg)
    for Perp-Neg (None for plain CFG); cameras: the views (used by view-aware priors).
    """

    cond: Tensor
    uncond: Tensor
    negatives: Tensor | None = None
    neg_weights: Tensor | None = None
    cameras: Cameras | None = None
    text: Tensor | None = None  # (B, ...) the plain prompt without view suffix (VSD's phi is fed this); None = cond

    @property
    def plain(self) -> Tensor:
        """The view-independent prompt rows (``text``, or ``cond`` when the prompt has no view suffix)."""
        return self.cond if self.text is None else self.text

    @property
    def batch_size(self) -> int:
        return int(self.cond.shape[0])


def view_suffix(direction: str) -> str:
    return f", {direction} view"


def shift_azimuth_deg(azimuth: Tensor) -> Tensor:
    """Azimuth in degrees -> [-180, 180)."""
    return (azimuth + 180.0) % 360.0 - 180.0


def direction_index(cfg: PromptConfig, elevation: Tensor, azimuth: Tensor) -> Tensor:
    """Index into DIRECTIONS for each view (later rules win, as in threestudio)."""
    azi = shift_azimuth_deg(azimuth)
    idx = torch.zeros_like(azi, dtype=torch.long)  # side
    idx[(azi > -cfg.front_threshold) & (azi < cfg.front_threshold)] = 1
    idx[(azi > 180 - cfg.back_threshold) | (azi < -180 + cfg.back_threshold)] = 2
    idx[elevation > cfg.overhead_threshold] = 3
    return idx


def _decay(abc: tuple[float, float, float], r: float) -> float:
    a, b, c = abc
    return a * math.exp(-b * r) + c


def perp_neg_rows(
    cfg: PromptConfig, direction: int, azimuth: float
) -> tuple[list[tuple[int, float]], list[int], list[float]]:
    """For one view: positive embedding as [(direction, coefficient)], negative directions, weights."""
    if direction == 3:  # overhead: plain positive, two dummy negatives with weight 0
        return [(3, 1.0)], [-1, -1], [0.0, 0.0]
    azi = (azimuth + 180.0) % 360.0 - 180.0
    if abs(azi) < 90:  # front-side interpolation: r = 1 is fully front
        r = 1.0 - abs(azi) / 90.0
        return ([(1, r), (0, 1.0 - r)], [1, 0], [-_decay(cfg.perp_neg_f_fs, r), -_decay(cfg.perp_neg_f_sf, 1.0 - r)])
    r = 2.0 - abs(azi) / 90.0  # side-back interpolation: r = 1 is fully side
    return ([(0, r), (2, 1.0 - r)], [0, 1], [-_decay(cfg.perp_neg_f_sb, r), -_decay(cfg.perp_neg_f_fsb, r)])


def lucid_blend(azimuth: float) -> tuple[int, int, float]:
    """LucidDreamer's view interpolation for one azimuth (degrees): (start, end, r), the prompt row being
    r E(start) + (1 - r) E(end); front -> side for |azimuth| < 90, side -> back beyond (indices into DIRECTIONS)."""
    a = float(shift_azimuth_deg(torch.tensor(float(azimuth), dtype=torch.float64)))
    if -90.0 <= a < 90.0:  # the official branch test (at -90 deg: front -> side with r = 0)
        return 1, 0, 1.0 - abs(a) / 90.0
    return 0, 2, 2.0 - abs(a) / 90.0


def lucid_perp_neg_rows(cfg: PromptConfig, azimuth: float) -> tuple[list[tuple[int, float]], list[int], list[float]]:
    """LucidDreamer's Perp-Neg for one view (``get_pos_neg_text_embeddings``): the blended positive, the two
    negative directions and their weights (module docstring)."""
    start, end, r = lucid_blend(azimuth)
    n = cfg.lucid_negative_w
    pos = [(start, r), (end, 1.0 - r)]
    if start == 1:  # front half: negatives front, side
        w_front = 0.0 if r > 0.8 else math.exp(-r * cfg.lucid_front_decay) * n
        w_side = 0.0 if r < 0.2 else math.exp(-(1.0 - r) * cfg.lucid_side_decay) * n
        return pos, [1, 0], [w_front, w_side]
    w_side = 0.0 if r > 0.8 else math.exp(-r * cfg.lucid_side_decay) * n / 2  # back half: negatives side, front
    return pos, [0, 1], [w_side, n]


class PromptProcessor:
    """Embeds the prompt once (all directions) and builds the Conditioning of each batch."""

    def __init__(self, cfg: PromptConfig, prior: DiffusionPrior):
        if (cfg.view_dependent or cfg.perp_neg) and not prior.view_dependent:
            raise ValueError(
                f"prompt.view_dependent={cfg.view_dependent} / prompt.perp_neg={cfg.perp_neg}: the prior "
                f"{type(prior).__name__} has no view-dependent text; set prompt.view_dependent=false "
                f"prompt.perp_neg=false"
            )
        if cfg.perp_neg and not cfg.view_dependent:
            raise ValueError("prompt.perp_neg=true needs prompt.view_dependent=true")
        cfg.validate()
        self.cfg = cfg
        self.prior = prior
        prompts = [cfg.prompt, cfg.negative_prompt]
        if cfg.view_dependent:
            prompts += [cfg.prompt + view_suffix(d) for d in DIRECTIONS]
        emb = prior.embed_prompts(prompts)
        self.text, self.uncond, self.text_vd = emb[0:1], emb[1:2], emb[2:6]

    def __call__(self, cameras: Cameras | None, batch_size: int = 1) -> Conditioning:
        if cameras is None or not self.cfg.view_dependent:
            B = batch_size if cameras is None else len(cameras)
            return Conditioning(
                self.text.expand(B, *self.text.shape[1:]),
                self.uncond.expand(B, *self.uncond.shape[1:]),
                cameras=cameras,
            )
        dirs = direction_index(self.cfg, cameras.elevation.cpu(), cameras.azimuth.cpu())
        B = len(cameras)
        uncond = self.uncond.expand(B, *self.uncond.shape[1:])
        text = self.text.expand(B, *self.text.shape[1:])
        lucid = self.cfg.view_prompts == "lucid"
        if not self.cfg.perp_neg:
            if lucid:
                rows = []
                for b in range(B):
                    start, end, r = lucid_blend(float(cameras.azimuth[b]))
                    rows.append(r * self.text_vd[start] + (1.0 - r) * self.text_vd[end])
                return Conditioning(torch.stack(rows), uncond, cameras=cameras, text=text)
            return Conditioning(self.text_vd[dirs.to(self.text_vd.device)], uncond, cameras=cameras, text=text)
        pos, negs, weights = [], [], []
        for b in range(B):
            azimuth = float(cameras.azimuth[b])
            if self.cfg.perp_neg_weights == "lucid":
                p, n, w = lucid_perp_neg_rows(self.cfg, azimuth)
            else:
                p, n, w = perp_neg_rows(self.cfg, int(dirs[b]), azimuth)
            pos.append(sum(c * self.text_vd[d] for d, c in p))
            negs.append(torch.stack([self.uncond[0] if d < 0 else self.text_vd[d] for d in n]))
            weights.append(w)
        negatives = torch.stack(negs, dim=1)  # (n_neg, B, ...)
        w = torch.tensor(weights, dtype=torch.float32, device=self.text.device)
        return Conditioning(torch.stack(pos), uncond, negatives, w, cameras, text)
