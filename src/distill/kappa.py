"""Noise strategies ("kappa") for score distillation (paper section 6.2).

Every strategy returns the noisy latent x_t that the forward prediction sees and the noise
kappa that explains it: x_t = sqrt(ab) x0 + sqrt(1 - ab) kappa. The strategies try, with
different effort, to solve the paper's eq. 4.4, the condition under which the SDS update equals
a DDIM step:
    kappa = eps_inv(sqrt(ab_t) x0 + sqrt(1 - ab_t) kappa, t)                        (eq. 4.4)
whose residual in x0 units is
    r(kappa) = x0 - x0_hat(x_t(kappa)) = sigma(t) (eps_inv(x_t(kappa), t) - kappa).

    random_resampled  kappa ~ N(0, I) every step (SDS)
    random_fixed      one kappa ~ N(0, I) drawn once per run
    fixed_point       kappa <- eps_inv(x_t(kappa), t), n_iters times, from kappa ~ N(0, I)
    sgd               gradient descent on 0.5 ||kappa - eps_inv(x_t(kappa), t)||^2, n_iters steps
    ddim_inversion    kappa from DDIM inversion of x0 to t (+ delta) (SDI, ddim.py)
    cached            kappa = the previous step's guided eps (eq. 4.5; the official 2D notebook's
                      ``call_with_defined_noise``): with x0 <- x0_hat at every guidance step, the update
                      x0 <- x0 - sigma_t (eps_hat(x_t) - kappa) (eq. 4.6) is exactly DDIM on the same time grid.
                      2D only: in 3D the previous eps belongs to another (random) view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.ddim import EpsFn, InversionConfig, add_noise, ddim_invert, noise_from_x0, predict_x0


@dataclass
class KappaConfig:
    name: str = "ddim_inversion"
    n_iters: int = 10  # fixed_point / sgd iterations
    lr: float = 0.5  # sgd step size on 0.5 ||kappa - eps(x_t(kappa))||^2 (sum over elements)

    def validate(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"kappa.name={self.name!r} is unknown; allowed: {', '.join(STRATEGIES)}")
        if self.n_iters < 1:
            raise ValueError(f"kappa.n_iters={self.n_iters} must be >= 1")


@dataclass
class KappaResult:
    x_t: Tensor
    kappa: Tensor
    level: int  # noise level of x_t
    model_calls: int


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    # drawn on the CPU so a seed gives the same noise on every device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)


def eq44_residual(x0: Tensor, kappa: Tensor, t: int, eps_inv: EpsFn, alphas_cumprod: Tensor) -> Tensor:
    """RMS of r(kappa) = x0 - x0_hat(sqrt(ab_t) x0 + sqrt(1-ab_t) kappa) at label t (x0 units)."""
    ab = alphas_cumprod[t]
    x_t = add_noise(x0, kappa, ab)
    t_vec = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    with torch.no_grad():
        r = x0 - predict_x0(x_t, eps_inv(x_t, t_vec), ab)
    return r.pow(2).mean().sqrt()


class KappaStrategy:
    """Base: ``__call__(x0, t, eps_inv, alphas_cumprod, generator) -> KappaResult``."""

    def __init__(self, cfg: KappaConfig, inversion: InversionConfig | None = None):
        cfg.validate()
        self.cfg = cfg
        self.inversion = inversion or InversionConfig()

    def __call__(
        self, x0: Tensor, t: int, eps_inv: EpsFn, alphas_cumprod: Tensor, generator: torch.Generator | None = None
    ) -> KappaResult:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def observe(self, eps_hat: Tensor) -> None:
        """The guided eps the forward pass computed from this strategy's x_t (used by ``cached``)."""


class Cached(KappaStrategy):
    """kappa = the previous guided eps (paper eq. 4.5); the first step draws kappa ~ N(0, I) unless ``prime``d."""

    def __init__(self, cfg, inversion=None):
        super().__init__(cfg, inversion)
        self.kappa: Tensor | None = None

    def prime(self, eps: Tensor) -> None:
        self.kappa = eps.detach().clone()

    def __call__(self, x0, t, eps_inv, alphas_cumprod, generator=None):
        if self.kappa is None or self.kappa.shape != x0.shape:
            self.kappa = _randn(x0, generator)
        kappa = self.kappa.to(x0.device, x0.dtype)
        return KappaResult(add_noise(x0, kappa, alphas_cumprod[t]), kappa, t, 0)

    def observe(self, eps_hat):
        self.kappa = eps_hat.detach().clone()

    def state_dict(self):
        return {"kappa": self.kappa}

    def load_state_dict(self, state):
        self.kappa = state.get("kappa")


class RandomResampled(KappaStrategy):
    def __call__(self, x0, t, eps_inv, alphas_cumprod, generator=None):
        kappa = _randn(x0, generator)
        return KappaResult(add_noise(x0, kappa, alphas_cumprod[t]), kappa, t, 0)


class RandomFixed(KappaStrategy):
    """One draw per run (kept in the checkpoint so a resumed run uses the same kappa)."""

    def __init__(self, cfg, inversion=None):
        super().__init__(cfg, inversion)
        self.kappa: Tensor | None = None

    def __call__(self, x0, t, eps_inv, alphas_cumprod, generator=None):
        if self.kappa is None or self.kappa.shape != x0.shape:
            self.kappa = _randn(x0, generator)
        kappa = self.kappa.to(x0.device, x0.dtype)
        return KappaResult(add_noise(x0, kappa, alphas_cumprod[t]), kappa, t, 0)

    def state_dict(self):
        return {"kappa": self.kappa}

    def load_state_dict(self, state):
        self.kappa = state.get("kappa")


class FixedPoint(KappaStrategy):
    def __call__(self, x0, t, eps_inv, alphas_cumprod, generator=None):
        ab = alphas_cumprod[t]
        t_vec = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        kappa = _randn(x0, generator)
        for _ in range(self.cfg.n_iters):
            kappa = eps_inv(add_noise(x0, kappa, ab), t_vec)
        return KappaResult(add_noise(x0, kappa, ab), kappa, t, self.cfg.n_iters)


class SGD(KappaStrategy):
    def __call__(self, x0, t, eps_inv, alphas_cumprod, generator=None):
        ab = alphas_cumprod[t]
        t_vec = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        kappa = _randn(x0, generator)
        for _ in range(self.cfg.n_iters):
            with torch.enable_grad():
                k = kappa.detach().requires_grad_(True)
                r = k - eps_inv(add_noise(x0, k, ab), t_vec)
                (grad,) = torch.autograd.grad(0.5 * r.pow(2).sum(), k)
            kappa = (kappa - self.cfg.lr * grad).detach()
        return KappaResult(add_noise(x0, kappa, ab), kappa, t, self.cfg.n_iters)


class DDIMInversion(KappaStrategy):
    """SDI: kappa from DDIM inversion of x0 (ddim.py).

    jump=official: x_t is the inverted latent at level t + delta (denoised by the caller with label t), kappa is
    reported at that level. jump=paper (Algorithm 2): kappa^{t+delta} is re-applied at t,
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) kappa. jump=none: inverted to t.
    """

    def __call__(self, x0, t, eps_inv, alphas_cumprod, generator=None):
        x_inv, level, calls = ddim_invert(x0, t, eps_inv, alphas_cumprod, self.inversion, generator)
        kappa = noise_from_x0(x_inv, x0, alphas_cumprod[level])
        if self.inversion.jump == "paper":
            return KappaResult(add_noise(x0, kappa, alphas_cumprod[t]), kappa, t, calls)
        return KappaResult(x_inv, kappa, level, calls)


STRATEGIES: dict[str, type[KappaStrategy]] = {
    "random_resampled": RandomResampled,
    "random_fixed": RandomFixed,
    "fixed_point": FixedPoint,
    "sgd": SGD,
    "ddim_inversion": DDIMInversion,
    "cached": Cached,
}


def make_kappa(cfg: KappaConfig, inversion: InversionConfig | None = None) -> KappaStrategy:
    cfg.validate()
    return STRATEGIES[cfg.name](cfg, inversion)
