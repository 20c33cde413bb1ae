"""Score-distillation methods beyond SDS / SDI (Table 6.1 baselines and two other SDS fixes).

One module per method family, each a :class:`distill.guidance.Guidance` with a typed ``Config``, named in
``conf/guidance/<name>.yaml`` by ``_target_``:

    sds, ddim_inversion   distill.guidance.ScoreDistillation   (kappa strategy decides SDS vs SDI)
    hifa                  distill.methods.hifa.HiFA            sqrt-annealed t, image-space term, z-variance
    csd                   distill.methods.csd.CSD              classifier score only
    nfsd                  distill.methods.nfsd.NFSD            noise-free: eps_null / eps_null - eps_neg
    vsd, esd              distill.methods.vsd.VSD / ESD        trainable phi of the render distribution

Shared parts live in one place each: CFG, Perp-Neg and the batched branch call, w(t) and the gradient loss in
:mod:`distill.guidance`; time schedules in :mod:`distill.schedule`; regularisers in :mod:`distill.losses`.
"""

from __future__ import annotations

import inspect
from typing import Any

from distill.config import component_config
from distill.held import HeldTarget


def build_guidance(node: Any, target_every: int = 1, **parts: Any):
    """Instantiate ``node._target_`` with its typed Config and the parts its constructor asks for by name
    (prior, kappa, schedule, cfg_pair, device, ...); with ``target_every`` > 1 (``trainer.target_every``) its target
    is held for that many steps (:class:`distill.held.HeldTarget`)."""
    cls, cfg = component_config(node, "guidance")
    params = inspect.signature(cls.__init__).parameters
    method = cls(cfg=cfg, **{k: v for k, v in parts.items() if k in params})
    return method if target_every == 1 else HeldTarget(method, target_every)
