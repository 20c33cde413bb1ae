"""phi, the trainable model of the scene's render distribution that VSD / ESD subtract (see :mod:`distill.phi.base`).

base.py      PhiConfig, the Phi interface (eps, train_step, state), camera features
lora.py      LoRAPhi: a Stable Diffusion UNet + peft LoRA (rank 4) + camera embedding (prior=sd21)
residual.py  ResidualPhi: exact eps + a zero-initialised residual net (the analytic priors' stand-in)
factory.py   make_phi: builds the phi of ``PhiConfig.kind`` (the only module that knows both implementations)
"""

from distill.phi.base import Phi, PhiConfig, camera_features
from distill.phi.factory import make_phi

__all__ = ["Phi", "PhiConfig", "camera_features", "make_phi"]
