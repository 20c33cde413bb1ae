"""Frozen diffusion priors behind one interface (see :mod:`distill.priors.base`)."""

from distill.priors.base import DiffusionPrior, PriorError

__all__ = ["DiffusionPrior", "PriorError"]
