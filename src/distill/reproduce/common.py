"""What the studies of :mod:`distill.reproduce` share: the repository root (default output and run folders), the
padding of image tiles, and the median (min..max) cell of their tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]


def pad(img: np.ndarray) -> np.ndarray:
    """A 2-pixel white frame around an (H, W, C) uint8 tile."""
    return np.pad(img, ((2, 2), (2, 2), (0, 0)), constant_values=255)


def median_range(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``median (min..max)`` of ``values``, each formatted with ``fmt``."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"
