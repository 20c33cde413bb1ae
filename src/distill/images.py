"""What a person looks at: images of a run (uint8 conversion, PNG writing) and the contrast that measures a fade."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def image_contrast(img: np.ndarray) -> float:
    """Luminance range (99th - 1st percentile) of a uint8 (H, W, 3) image in [0, 1] units: an object fading towards
    the background loses its darkest and brightest parts first (the pixel std would also count early fog)."""
    lum = img.astype(np.float64).mean(-1) / 255.0
    return float(np.percentile(lum, 99) - np.percentile(lum, 1))


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    img = img.detach().float().cpu()
    if img.dim() == 4:
        img = img[0]
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: Path, img: np.ndarray) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, img)
