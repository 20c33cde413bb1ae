"""Hash-grid encoding: against an independent loop-based float64 reference of tcnn's HashGrid."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from distill.scene.hashgrid import HashGrid, HashGridConfig


def reference_encoding(x: np.ndarray, table: np.ndarray, cfg: HashGridConfig, active: int) -> np.ndarray:
    """tcnn HashGrid (grid.h) written out point by point. table: (T, F) rows, float64."""
    f32 = np.float32
    log2_scale = f32(np.log2(f32(cfg.per_level_scale)))
    out, offset = [], 0
    for level in range(cfg.n_levels):
        scale = float(f32(f32(np.exp2(f32(level) * log2_scale)) * f32(cfg.base_resolution) - f32(1.0)))
        res = math.ceil(scale) + 1
        size = min((res**3 + 7) // 8 * 8, 2**cfg.log2_hashmap_size)
        acc = np.zeros(cfg.n_features_per_level)
        if level < active:
            pos = [float(xk) * scale + 0.5 for xk in x]
            grid = [math.floor(p) for p in pos]
            frac = [p - g for p, g in zip(pos, grid)]
            for corner in itertools.product((0, 1), repeat=3):
                c = [g + o for g, o in zip(grid, corner)]
                if res**3 <= size:
                    index = (c[0] + c[1] * res + c[2] * res * res) % size
                else:
                    index = ((c[0] * 1) ^ (c[1] * 2654435761) ^ (c[2] * 805459861)) % 2**32 % size
                w = 1.0
                for k in range(3):
                    w *= frac[k] if corner[k] else 1.0 - frac[k]
                acc += w * table[offset + index]
        out.append(acc)
        offset += size
    return np.concatenate(out)


def _random_grid(cfg: HashGridConfig, seed: int = 0) -> HashGrid:
    hg = HashGrid(cfg, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():  # large random values so that every corner matters
        hg.params.copy_(torch.randn(hg.params.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return hg


@pytest.mark.parametrize("active", [16, 5])
def test_matches_loop_reference_official_config(active):
    cfg = HashGridConfig(backend="torch")  # official: 16 levels x 2, 2^19, base 16, scale 1.4473
    hg = _random_grid(cfg)
    hg.active_levels.fill_(active)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    x[0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # faces of the unit cube
    got = hg(x).detach().numpy()
    table = hg.params.detach().t().numpy()  # (T, F) rows, tcnn's layout
    for i in range(x.shape[0]):
        want = reference_encoding(x[i].numpy(), table, cfg, active)
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)
    assert np.all(got[:, active * 2 :] == 0)


def test_layout_is_tcnns():
    hg = HashGrid(HashGridConfig(backend="torch"))
    res = [lv["resolution"] for lv in hg.layout]
    assert res[:6] == [16, 24, 34, 49, 71, 102] and res[-1] == 4096
    assert [lv["dense"] for lv in hg.layout][:6] == [True] * 5 + [False]
    assert hg.layout[3]["size"] == 117656  # 49^3 = 117649 rounded up to a multiple of 8
    assert all(lv["size"] == 2**19 for lv in hg.layout[5:])
    assert hg.params.shape == (2, sum(lv["size"] for lv in hg.layout))


def test_jacobian_matches_autograd_and_finite_differences():
    cfg = HashGridConfig(
        n_levels=6, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0, start_level=6, backend="torch"
    )
    hg = _random_grid(cfg, seed=5)
    x = torch.rand(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.9 + 0.05
    enc, jac = hg(x, with_jacobian=True)
    assert torch.allclose(enc, hg(x))
    # autograd through the Function's d/dx path
    xg = x.clone().requires_grad_(True)
    rows = [torch.autograd.grad(hg(xg)[:, j].sum(), xg)[0] for j in range(enc.shape[1])]
    auto = torch.stack(rows, dim=-1).permute(1, 0, 2)  # (3, N, D)
    assert torch.allclose(jac, auto, atol=1e-10)
    # central differences (trilinear: exact unless a cell boundary is crossed)
    h = 1e-7
    fd = torch.stack([(hg(x + h * e) - hg(x - h * e)) / (2 * h) for e in torch.eye(3, dtype=torch.float64)])
    ok = (fd - jac).abs() < 1e-5 * (1 + jac.abs())
    assert ok.float().mean() > 0.97


def test_parameter_gradients_gradcheck():
    """The hand-written backward (one index_add) against numerical derivatives, value and Jacobian."""
    cfg = HashGridConfig(
        n_levels=3,
        n_features_per_level=2,
        log2_hashmap_size=6,
        base_resolution=2,
        per_level_scale=2.0,
        start_level=3,
        backend="torch",
    )
    hg = _random_grid(cfg, seed=2)
    assert [lv["dense"] for lv in hg.layout] == [True, True, False]
    x = torch.rand(7, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = hg.params.detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda p: _call_with_params(hg, x, p), (params,), eps=1e-6, atol=1e-8)


def _call_with_params(hg: HashGrid, x: torch.Tensor, p: torch.Tensor):
    saved = hg._parameters["params"]
    try:
        hg._parameters["params"] = p  # type: ignore[assignment]
        return hg(x, with_jacobian=True)
    finally:
        hg._parameters["params"] = saved


def test_progressive_levels_schedule():
    hg = HashGrid(HashGridConfig(backend="torch", log2_hashmap_size=10))
    assert [hg.levels_at(s) for s in (0, 1999, 2000, 2499, 2500, 3000, 5999, 6000, 10000)] == [
        8,
        8,
        8,
        8,
        9,
        10,
        15,
        16,
        16,
    ]
    hg.update_step(2600)
    assert int(hg.active_levels) == 9
    assert "active_levels" in hg.state_dict()


def test_bad_backend_names_allowed_values():
    with pytest.raises(ValueError, match="auto"):
        HashGrid(HashGridConfig(backend="cuda"))
