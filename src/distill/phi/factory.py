"""make_phi: the one place that knows every phi kind (base.py defines the interface, lora.py and residual.py the two
implementations, both importing base.py; building them here keeps base.py free of its subclasses)."""

from __future__ import annotations

from distill.phi.base import Phi, PhiConfig


def make_phi(cfg: PhiConfig, prior, device=None) -> Phi:
    """The SD LoRA phi for a Stable Diffusion prior, the residual stand-in otherwise (``cfg.kind``).

    The two implementations are imported on demand: each pulls in diffusers (seconds), which a trainer on an analytic
    prior without VSD / ESD never needs."""
    from distill.priors.stable_diffusion import StableDiffusionPrior

    kind = cfg.kind
    if kind == "auto":
        kind = "lora" if isinstance(prior, StableDiffusionPrior) else "residual"
    if kind == "lora":
        if not isinstance(prior, StableDiffusionPrior):
            raise ValueError(
                f"guidance.phi.kind=lora needs prior=sd21 (got {type(prior).__name__}); use phi.kind=residual"
            )
        from distill.phi.lora import LoRAPhi

        return LoRAPhi(cfg, prior)
    from distill.phi.residual import ResidualPhi

    return ResidualPhi(cfg, prior)
