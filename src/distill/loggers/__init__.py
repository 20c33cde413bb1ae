"""Experiment loggers: none, csv (always-on local files) and wandb."""

from distill.loggers.base import Logger

__all__ = ["Logger"]
