"""DDIM step / inversion grid / round trip, checked against closed forms and the official grid."""

import math

import pytest
import torch

from distill.ddim import (
    InversionConfig,
    add_noise,
    ddim_invert,
    ddim_regenerate,
    ddim_step,
    inversion_timesteps,
    noise_from_x0,
    posterior_variance,
    predict_x0,
)
from distill.priors.base import scaled_linear_alphas_cumprod

AB = scaled_linear_alphas_cumprod()


def test_scaled_linear_schedule_matches_sd_formula():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.tensor(
        [math.prod(1 - b for b in betas[: k + 1].tolist()) for k in (0, 499, 999)], dtype=torch.float64
    )
    assert torch.allclose(AB[[0, 499, 999]], expected, rtol=1e-10)


@pytest.mark.parametrize("t,calls", [(980, 11), (250, 4), (101, 2), (102, 3), (901, 10), (902, 11)])
def test_official_inversion_grid_call_count(t, calls):
    levels = inversion_timesteps(t, InversionConfig(), 1000, delta=0)
    assert len(levels) - 1 == calls == 1 + math.ceil((t - 1) / 100)
    assert levels[0] == -99 and levels[1] == 1 and levels[-1] == t
    assert all(b > a for a, b in zip(levels, levels[1:]))


def test_final_jump_is_clamped_and_random_delta_in_range():
    assert inversion_timesteps(980, InversionConfig(), 1000, delta=99)[-1] == 999
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        _, level, _ = ddim_invert(
            torch.zeros(1, 1), 500, lambda x, t: torch.zeros_like(x), AB, InversionConfig(eta=0.0), g
        )
        seen.add(level - 500)
    assert min(seen) >= 0 and max(seen) <= 99 and len(seen) > 50


def test_forward_process_identities():
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    ab = AB[400]
    x_t = add_noise(x0, eps, ab)
    assert torch.allclose(predict_x0(x_t, eps, ab), x0)
    assert torch.allclose(noise_from_x0(x_t, x0, ab), eps)
    # a DDIM step with the true noise of a point moves it along its own forward-process line
    assert torch.allclose(ddim_step(x_t, eps, ab, AB[700]), add_noise(x0, eps, AB[700]))


def test_posterior_variance_is_ddpm_posterior():
    # one DDPM step s -> s+1: v = beta_tilde = (1 - ab_s)/(1 - ab_{s+1}) * beta_{s+1}
    s = 300
    beta = 1 - AB[s + 1] / AB[s]
    assert torch.allclose(posterior_variance(AB[s], AB[s + 1]), (1 - AB[s]) / (1 - AB[s + 1]) * beta)


def test_inversion_round_trip_on_gaussian_data_converges_with_steps():
    """Exact eps of a unit-variance Gaussian: eps(x, t) = sqrt(1 - ab) x (since x_t ~ N(0, I)).

    Round trip x0 -> x_t -> x0 with deterministic DDIM has only discretisation error; it must
    shrink as the grid is refined, first order (measured at t=600: 10 steps 0.20, 100 steps 0.024,
    500 steps 0.0049 relative error)."""
    eps_fn = lambda x, t: (1 - AB[t]).sqrt().view(-1, 1).to(x.dtype) * x  # noqa: E731
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = {}
    for n in (10, 100):
        cfg = InversionConfig(n_steps=n, eta=0.0, jump="none")
        x_t, level, _ = ddim_invert(x0, 600, eps_fn, AB, cfg)
        levels = inversion_timesteps(600, cfg, 1000)
        back = ddim_regenerate(x_t, levels, eps_fn, AB)
        errs[n] = float((back - x0).norm() / x0.norm())
    assert errs[10] < 0.25
    assert errs[100] < errs[10] / 5
