"""DDIM in eps-parametrisation: x0 prediction, the deterministic step, inversion, sampling.

Notation (paper section 3): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, sigma(t) = sqrt(1-ab_t)/sqrt(ab_t).

    x0_hat(x_t)            = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)                    (DDIM eq. 12)
    DDIM step s -> s'      : x_s' = sqrt(ab_s') x0_hat(x_s) + sqrt(1 - ab_s') eps_hat(x_s)
DDIM inversion runs the same step towards *more* noise (s' > s). The official SDI code
(threestudio ``stable_diffusion_sdi_guidance.py``) inverts on the "leading" grid of
``n_steps`` points {offset + k * T/n} (1, 101, ..., 901 for n=10), keeps the points below the
target t, prepends one leading step that starts from alpha_bar(0), and ends with one jump to
t + delta, delta ~ U{0, ..., T/n - 1}. After every step it adds the paper's entropy term
    eta * N(0, I) * sqrt(v(s, s')),   v(s, s') = (1 - ab_s)/(1 - ab_s') * (1 - ab_s'/ab_s),
i.e. the DDPM posterior variance between the two grid points.

Two places where the thesis and the official code differ are switches (``InversionConfig``):
    jump = official   invert to t + delta and let the caller denoise that latent with label t and alpha_bar(t)
                      (the reference code; on an exact prior each target is the image contracted by about
                      sqrt(ab(t + delta) / ab(t)), see docs/reproduction.md)
           paper      the thesis' Algorithm 2: invert to t + delta, then re-apply the inverted noise at level t,
                      x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) kappa^{t + delta}
           none       invert to t (no jump)
    leading_label = official   the leading step queries the model with label grid[0] - T/n (-99), as the
                                reference code does (priors read alpha_bar(-99) as alpha_bar(0))
                    0          label 0 on the leading step
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x, t (B,) long) -> guided eps


def _bcast(a: Tensor, like: Tensor) -> Tensor:
    return a.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def predict_x0(x_t: Tensor, eps: Tensor, ab_t: Tensor) -> Tensor:
    """x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
    ab = _bcast(torch.as_tensor(ab_t, device=x_t.device), x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def noise_from_x0(x_t: Tensor, x0: Tensor, ab_t: Tensor) -> Tensor:
    """kappa = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t): the noise that explains x_t from x0."""
    ab = _bcast(torch.as_tensor(ab_t, device=x_t.device), x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def add_noise(x0: Tensor, noise: Tensor, ab_t: Tensor) -> Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (the forward process, paper eq. 3.1)."""
    ab = _bcast(torch.as_tensor(ab_t, device=x0.device), x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def ddim_step(x_s: Tensor, eps: Tensor, ab_s: Tensor, ab_next: Tensor) -> Tensor:
    """Deterministic DDIM move from level s to level s' (either direction)."""
    x0 = predict_x0(x_s, eps, ab_s)
    ab = _bcast(torch.as_tensor(ab_next, device=x_s.device), x_s)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def posterior_variance(ab_s: Tensor, ab_next: Tensor) -> Tensor:
    """v(s, s') = (1 - ab_s)/(1 - ab_s') * (1 - ab_s'/ab_s) (DDIM's sigma^2 with eta = 1)."""
    return ((1 - ab_s) / (1 - ab_next) * (1 - ab_next / ab_s)).clamp_min(0.0)


JUMPS = ("official", "paper", "none")
LEADING_LABELS = ("official", "0")


@dataclass
class InversionConfig:
    """DDIM inversion as in the official SDI code."""

    n_steps: int = 10  # points of the inversion grid over [0, T)
    eta: float = 0.3  # entropy term: eta * sqrt(posterior variance) noise after each step
    grid: str = "leading"  # "leading" (official: 1, 101, ..., 901) or "trailing" (99, 199, ..., 999)
    steps_offset: int = 1  # SD 2.1 scheduler's steps_offset, used by the leading grid
    jump: str = "official"  # official | paper | none (module docstring)
    leading_label: str = "official"  # official (-99 on the leading step, as the reference) | 0

    def validate(self, T: int = 1000) -> None:
        if not 1 <= self.n_steps <= T:
            raise ValueError(f"inversion.n_steps={self.n_steps} must be in [1, {T}]")
        if self.eta < 0:
            raise ValueError(f"inversion.eta={self.eta} must be >= 0")
        if self.grid not in ("leading", "trailing"):
            raise ValueError(f"inversion.grid={self.grid!r} is unknown; allowed: leading, trailing")
        if self.jump not in JUMPS:
            raise ValueError(f"inversion.jump={self.jump!r} is unknown; allowed: {', '.join(JUMPS)}")
        if str(self.leading_label) not in LEADING_LABELS:
            raise ValueError(
                f"inversion.leading_label={self.leading_label!r} is unknown; allowed: {', '.join(LEADING_LABELS)}"
            )

    @property
    def random_delta(self) -> bool:
        """Whether the inversion ends with the random jump to t + delta (official and paper)."""
        return self.jump != "none"


def inversion_timesteps(t: int, cfg: InversionConfig, T: int = 1000, delta: int = 0) -> list[int]:
    """Levels visited by the inversion to target t: [leading start, grid points < t, t + delta].

    The first entry is ``grid[0] - T/n`` (negative on the leading grid), meaning "start from
    alpha_bar(0)" as the official code does; the UNet is queried there with label max(level, 0).
    The number of model calls is len(result) - 1 = 1 + #{grid points < t}: with the official
    grid that is 1 + ceil((t - 1)/100), i.e. 11 at t = 980 and 4 at t = 250.
    """
    ratio = T // cfg.n_steps
    if cfg.grid == "leading":
        grid = [k * ratio + cfg.steps_offset for k in range(cfg.n_steps)]
    else:
        grid = [round(T - k * (T / cfg.n_steps)) - 1 for k in range(cfg.n_steps)][::-1]
    below = [g for g in grid if g < t]
    if not below:
        below = [grid[0]]
    levels = [below[0] - ratio] + below
    levels.append(min(t + delta, T - 1))
    return levels


def alpha_bar_at(alphas_cumprod: Tensor, level: int) -> Tensor:
    """alpha_bar at a level of the inversion grid; negative levels mean alpha_bar(0)."""
    return alphas_cumprod[max(level, 0)]


@torch.no_grad()
def ddim_invert(
    x0: Tensor,
    t: int,
    eps_fn: EpsFn,
    alphas_cumprod: Tensor,
    cfg: InversionConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int, int]:
    """Invert x0 to noise level t (+ delta) with DDIM; returns (x_inverted, level, model_calls)."""
    T = alphas_cumprod.shape[0]
    delta = 0
    if cfg.random_delta:
        delta = int(torch.randint(0, T // cfg.n_steps, (1,), generator=generator).item())
    levels = inversion_timesteps(t, cfg, T, delta)
    x = x0
    B = x0.shape[0]
    for s, s_next in zip(levels[:-1], levels[1:]):
        ab_s, ab_n = alpha_bar_at(alphas_cumprod, s), alpha_bar_at(alphas_cumprod, s_next)
        label = torch.full((B,), s if str(cfg.leading_label) == "official" else max(s, 0), device=x0.device)
        eps = eps_fn(x, label.long())
        x = ddim_step(x, eps, ab_s, ab_n)
        if cfg.eta > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x = x + cfg.eta * posterior_variance(ab_s, ab_n).sqrt().to(x.dtype) * noise
    return x, levels[-1], len(levels) - 1


@torch.no_grad()
def ddim_sample(
    x_T: Tensor,
    eps_fn: EpsFn,
    alphas_cumprod: Tensor,
    n_steps: int = 50,
    t_start: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM sampling from x at level t_start (default T-1) down to x0 on a uniform grid."""
    T = alphas_cumprod.shape[0]
    t_start = T - 1 if t_start is None else t_start
    ts = torch.linspace(t_start, 0, n_steps + 1).round().long().tolist()
    x = x_T
    B = x.shape[0]
    for s, s_next in zip(ts[:-1], ts[1:]):
        ab_s = alphas_cumprod[s]
        eps = eps_fn(x, torch.full((B,), s, dtype=torch.long, device=x.device))
        x0 = predict_x0(x, eps, ab_s)
        if s_next == 0:  # last step: return the prediction itself
            x = x0
            break
        ab_n = alphas_cumprod[s_next]
        var = eta**2 * posterior_variance(ab_n, ab_s)  # DDIM sigma^2 (0 for deterministic DDIM)
        x = ab_n.sqrt().to(x.dtype) * x0 + (1 - ab_n - var).clamp_min(0).sqrt().to(x.dtype) * eps
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x = x + var.sqrt().to(x.dtype) * noise
    return x


@torch.no_grad()
def ddim_regenerate(x_t: Tensor, levels: list[int], eps_fn: EpsFn, alphas_cumprod: Tensor) -> Tensor:
    """Deterministic DDIM back down the levels an inversion visited (levels[-1] -> levels[0]).

    With eta = 0 and no random jump this undoes ``ddim_invert`` up to the discretisation error
    of the two Euler schemes (they evaluate eps at opposite ends of each interval).
    """
    x = x_t
    B = x.shape[0]
    for s, s_prev in zip(levels[::-1][:-1], levels[::-1][1:]):
        label = torch.full((B,), max(s, 0), dtype=torch.long, device=x.device)
        x = ddim_step(x, eps_fn(x, label), alpha_bar_at(alphas_cumprod, s), alpha_bar_at(alphas_cumprod, s_prev))
    return x
