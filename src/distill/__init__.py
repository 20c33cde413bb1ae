"""sdi-lab: score distillation (SDS / SDI) for text-to-3D, as an experiment framework."""

__version__ = "0.1.0"
