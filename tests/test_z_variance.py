"""The renderer's z-variance against the closed form of a constant-density slab (HiFA's regulariser)."""

import math

import pytest
import torch

from distill.config import ConfigError, typed
from distill.scene.renderer import OccupancyConfig, RendererConfig, VolumeRenderer

S, N_SLAB = 64, 16  # samples per ray over [2, 4]; the slab |z| < 0.25 holds midpoint samples 24..39
DELTA = 2.0 / S


def _render(opacity: float, formula: str):
    """One ray from (0, 0, -3) along +z through the unit sphere; density sigma inside |z| < 0.25 chosen so that
    the slab's opacity 1 - q^16 (q = exp(-sigma delta)) equals ``opacity``. Midpoint samples, float64."""
    q = (1.0 - opacity) ** (1.0 / N_SLAB)
    sigma = -math.log(q) / DELTA
    cfg = RendererConfig(samples_per_ray=S, occupancy=OccupancyConfig(enabled=False), z_variance=formula)
    r = VolumeRenderer(cfg, radius=1.0)

    def field_fn(points, ray_idx):
        inside = points[:, 2].abs() < 0.25
        n = points.shape[0]
        return {"density": inside.double() * sigma, "rgb": points.new_zeros(n, 3), "normal": points.new_zeros(n, 3)}

    o = torch.tensor([[0.0, 0.0, -3.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    return r(field_fn, o, d), q


def _closed_form(q: float):
    """Weights on the slab's samples k = 0..n-1 are (1 - q) q^k at depth t_k = t_0 + k delta: a truncated
    geometric law with O = 1 - q^n,  E[k] = q/(1-q) - n q^n/(1-q^n),  Var[k] = q/(1-q)^2 - n^2 q^n/(1-q^n)^2."""
    n = N_SLAB
    t0 = 2.0 + (24 + 0.5) * DELTA
    mean_k = q / (1 - q) - n * q**n / (1 - q**n)
    var_k = q / (1 - q) ** 2 - n**2 * q**n / (1 - q**n) ** 2
    return 1 - q**n, t0 + DELTA * mean_k, DELTA**2 * var_k


@pytest.mark.parametrize("opacity", [0.6, 0.95, 1.0 - 1e-9])
def test_threestudio_z_variance_is_the_normalised_depth_variance(opacity):
    """w^ = w / O: Var = sum w^ (t - z_mean)^2 = delta^2 Var[k] (float64, closed form to 1e-9 relative)."""
    out, q = _render(opacity, "threestudio")
    opa, z_mean, var = _closed_form(q)
    assert math.isclose(float(out["opacity"]), opa, rel_tol=1e-12)
    assert math.isclose(float(out["depth"]), opa * z_mean, rel_tol=1e-12)  # depth is not divided by O (threestudio)
    assert math.isclose(float(out["z_variance"]), var, rel_tol=1e-9)


@pytest.mark.parametrize("opacity", [0.6, 0.95, 1.0 - 1e-9])
def test_unnormalised_option_is_o_var_plus_o_mean_shift_squared(opacity):
    """sum w (t - sum w t)^2 = O Var + O (z_mean (1 - O))^2: larger on a semi-transparent slab, equal when opaque."""
    out, q = _render(opacity, "unnormalised")
    opa, z_mean, var = _closed_form(q)
    expected = opa * var + opa * (z_mean * (1 - opa)) ** 2
    assert math.isclose(float(out["z_variance"]), expected, rel_tol=1e-9)
    ts, _ = _render(opacity, "threestudio")
    if opacity > 0.999:  # opaque: the two agree up to (1 - O) terms
        assert math.isclose(float(out["z_variance"]), float(ts["z_variance"]), rel_tol=1e-6)
    else:
        assert float(out["z_variance"]) > 1.1 * float(ts["z_variance"])


def test_threestudio_z_variance_is_zero_where_opacity_is_at_most_half():
    out, _ = _render(0.4, "threestudio")
    assert float(out["z_variance"]) == 0.0 and float(_render(0.4, "unnormalised")[0]["z_variance"]) > 0.0


def test_z_variance_formula_is_validated():
    with pytest.raises(ConfigError, match="renderer.z_variance='hifa'.*threestudio, unnormalised"):
        typed({"z_variance": "hifa"}, RendererConfig, "renderer")
