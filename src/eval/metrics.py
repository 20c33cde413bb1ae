"""CLIP score and CLIP-IQA per view, through torchmetrics, with a pinned input range.

* CLIP score: torchmetrics ``CLIPScore``, i.e. ``max(100 * cos(E_image, E_prompt), 0)``, 0-100
  scale, one value per view (the metric is reset between views so the clamp applies per view).
* CLIP-IQA: torchmetrics ``CLIPImageQualityAssessment`` with the paper's anchor pairs
  quality ("Good photo." vs "Bad photo."), sharpness ("Sharp photo." vs "Blurry photo."),
  real ("Real photo." vs "Abstract photo."): softmax over each pair of ``100 * cos`` logits,
  probability of the first prompt, reported in percent.

Images: ``(N, 3, H, W)`` float in [0, 1] (or uint8 in [0, 255], divided by 255 here once).
``CLIPScore`` passes them to our processor unchanged; ``CLIPImageQualityAssessment`` divides
by ``data_range=1.0`` first; our processor then normalises with the model's mean/std without
rescaling again (see ``clip_models``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from eval.clip_models import DEFAULT_CLIP_MODEL, LoadedClip, check_image_range, load_clip

IQA_PROMPTS: dict[str, tuple[str, str]] = {
    "quality": ("Good photo.", "Bad photo."),
    "sharpness": ("Sharp photo.", "Blurry photo."),
    "real": ("Real photo.", "Abstract photo."),
}


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [0, 1] (once); float images must already be in [0, 1]."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    images = images.float()
    check_image_range(images, where="ClipEvaluator")
    return images


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Per-view values with their mean and (population, ddof=0) standard deviation."""
    vals = [float(v) for v in values]
    n = len(vals)
    mean = sum(vals) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n) if n else math.nan
    return {"per_view": vals, "mean": mean, "std": std, "n": n}


class ClipEvaluator:
    """CLIP score + CLIP-IQA with one CLIP model (loaded once, shared by both metrics)."""

    def __init__(
        self,
        clip: LoadedClip | str = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        iqa_prompts: dict[str, tuple[str, str]] | None = None,
        allow_download: bool = False,
    ):
        from torchmetrics.multimodal import CLIPImageQualityAssessment, CLIPScore

        self.device = torch.device(device)
        self.clip = clip if isinstance(clip, LoadedClip) else load_clip(clip, self.device, allow_download)
        self.iqa_prompts = dict(iqa_prompts or IQA_PROMPTS)
        loader = self.clip.loader()
        self.clip_score_metric = CLIPScore(model_name_or_path=loader).to(self.device)
        self.iqa_metric = CLIPImageQualityAssessment(
            model_name_or_path=loader, data_range=1.0, prompts=tuple(self.iqa_prompts.values())
        ).to(self.device)

    @property
    def model_info(self) -> dict[str, Any]:
        return self.clip.as_dict()

    def describe(self) -> str:
        return self.clip.describe()

    @torch.no_grad()
    def clip_scores(self, images: Tensor, prompt: str) -> Tensor:
        """(N,) CLIP scores on the 0-100 scale, each clamped at 0 (torchmetrics CLIPScore per view)."""
        images = to_unit_range(images).to(self.device)
        m = self.clip_score_metric
        out = []
        for img in images:
            m.reset()
            m.update(img[None], [prompt])
            out.append(m.compute().detach().float().cpu())
        m.reset()
        return torch.stack(out)

    @torch.no_grad()
    def iqa_scores(self, images: Tensor) -> dict[str, Tensor]:
        """{name: (N,)} CLIP-IQA probabilities of the positive anchor, in percent."""
        images = to_unit_range(images).to(self.device)
        m = self.iqa_metric
        m.reset()
        m.update(images)
        res = m.compute()
        m.reset()
        names = list(self.iqa_prompts)
        if isinstance(res, Tensor):  # a single anchor pair
            res = {names[0]: res}
        vals = list(res.values())  # order of the prompts given, named user_defined_i
        return {name: 100.0 * v.detach().float().cpu().reshape(-1) for name, v in zip(names, vals)}

    def score(self, images: Tensor, prompt: str, batch_size: int = 16) -> dict[str, Any]:
        """Per-view CLIP score and CLIP-IQA of ``images`` against ``prompt``, with summaries."""
        images = to_unit_range(images)
        clip_vals: list[float] = []
        iqa_vals: dict[str, list[float]] = {k: [] for k in self.iqa_prompts}
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i : i + batch_size]
            clip_vals += self.clip_scores(chunk, prompt).tolist()
            for k, v in self.iqa_scores(chunk).items():
                iqa_vals[k] += v.tolist()
        return {"clip_score": summary(clip_vals), "iqa": {k: summary(v) for k, v in iqa_vals.items()}}
