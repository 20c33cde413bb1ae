"""Volume renderer (closed forms) and the NeRF scene contract (normals, reproducibility, state)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.scene.cameras import CameraSamplerConfig, orbit_cameras, sample_cameras
from distill.scene.nerf import NeRFScene
from distill.scene.renderer import OccupancyConfig, RendererConfig, VolumeRenderer

ROOT = Path(__file__).resolve().parents[1]
SIGMA, R0 = 3.0, 0.5  # homogeneous sphere: density SIGMA inside |x| < R0


def sphere_field(points: torch.Tensor, ray_idx: torch.Tensor) -> dict:
    inside = (points.norm(dim=-1) < R0).to(points.dtype)
    normal = points / points.norm(dim=-1, keepdim=True)
    return {"density": SIGMA * inside, "rgb": torch.ones_like(points) * 0.5, "normal": normal}


def _rays(impact: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.tensor(impact, dtype=torch.float64)
    o = torch.stack([torch.full_like(b, -3.0), b, torch.zeros_like(b)], dim=-1)
    d = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand_as(o).contiguous()
    return o, d


def test_compositing_matches_homogeneous_sphere_closed_form():
    """Bounding sphere = the medium: every sample is inside, so sum_i sigma delta = sigma * chord."""
    impact = [0.0, 0.2, 0.45, 0.7]
    o, d = _rays(impact)
    cfg = RendererConfig(samples_per_ray=512, occupancy=OccupancyConfig(enabled=False))
    out = VolumeRenderer(cfg, radius=R0)(sphere_field, o, d, jitter=None)
    for i, b in enumerate(impact):
        chord = 2 * math.sqrt(max(R0**2 - b**2, 0.0))
        want = 1 - math.exp(-SIGMA * chord)
        assert out["opacity"][i, 0].item() == pytest.approx(want, abs=1e-9)
        if chord > 0:  # E[t] of the exponential stopping distribution truncated to the chord
            t0 = 3.0 - chord / 2
            e = math.exp(-SIGMA * chord)
            depth = t0 * (1 - e) + (1 / SIGMA - e * (chord + 1 / SIGMA))
            assert out["depth"][i, 0].item() == pytest.approx(depth, rel=1e-4)
            assert out["rgb"][i].tolist() == pytest.approx([0.5 * want] * 3, abs=1e-9)
    assert out["opacity"][3, 0].item() == 0.0  # misses the sphere


def test_occupancy_grid_skips_empty_space_and_keeps_the_closed_form():
    o, d = _rays([0.0, 0.3])
    cfg = RendererConfig(samples_per_ray=256, occupancy=OccupancyConfig(resolution=32))
    ren = VolumeRenderer(cfg, radius=2.0).double()
    ren.grid.update(lambda x: sphere_field(x, None)["density"], torch.Generator().manual_seed(0))
    frac = ren.grid.binary.float().mean().item()
    assert 0.005 < frac < 0.05  # roughly the sphere's cells: (4/3 pi 0.5^3) / 4^3 = 0.8%, plus the border
    jitter = torch.rand(2, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ren(sphere_field, o, d, jitter=jitter)
    for i, b in enumerate([0.0, 0.3]):
        want = 1 - math.exp(-SIGMA * 2 * math.sqrt(R0**2 - b**2))
        assert out["opacity"][i, 0].item() == pytest.approx(want, abs=2e-2)
    dense = VolumeRenderer(RendererConfig(samples_per_ray=256, occupancy=OccupancyConfig(enabled=False)), 2.0)
    n_dense = int(dense(sphere_field, o, d)["n_samples"])
    assert int(out["n_samples"]) < n_dense  # the grid removed samples ...
    assert out["opacity"][0, 0] > 0.9  # ... but not the medium


def small_config(**overrides) -> NeRFScene.Config:
    cfg = NeRFScene.Config()
    cfg.encoding.log2_hashmap_size = 12
    cfg.encoding.n_levels = 10
    cfg.encoding.start_level = 6
    cfg.renderer.samples_per_ray = 16
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _scene_with_random_field(cfg: NeRFScene.Config, scale: float = 0.5) -> NeRFScene:
    scene = NeRFScene(cfg).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        scene.encoding.params.copy_(torch.randn(scene.encoding.params.shape, generator=g, dtype=torch.float64) * scale)
    return scene


def test_analytic_normals_match_finite_differences():
    scene = _scene_with_random_field(small_config())
    x = (torch.rand(200, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5) * 1.2
    analytic = scene.geometry(x)["normal"]
    h = 1e-6
    grad = torch.stack(
        [
            (scene.raw_density(x + h * e) - scene.raw_density(x - h * e)) / (2 * h)
            for e in torch.eye(3, dtype=torch.float64)
        ],
        dim=-1,
    )
    fd = -grad / grad.norm(dim=-1, keepdim=True)
    close = (analytic - fd).norm(dim=-1) < 1e-4
    assert close.float().mean() > 0.95  # misses only where a cell boundary or ReLU kink is crossed
    # the finite-difference normal type (eps 0.01, on sigma) agrees in direction on the smooth blob
    fd_scene = _scene_with_random_field(small_config(normal_type="finite_difference"), scale=0.0)
    blob = _scene_with_random_field(small_config(), scale=0.0)
    cos = (fd_scene.geometry(x)["normal"] * blob.geometry(x)["normal"]).sum(-1)
    assert cos.min() > 0.999
    # pure blob: raw = 10 (1 - |x| / 0.5) so the normal is x / |x|
    assert torch.allclose(blob.geometry(x)["normal"], x / x.norm(dim=-1, keepdim=True), atol=1e-9)


def test_normals_carry_gradients_to_the_hash_grid():
    scene = _scene_with_random_field(small_config(), scale=0.1)
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.5
    scene.geometry(x)["normal"][:, 2].sum().backward()
    assert scene.encoding.params.grad.abs().sum() > 0
    assert scene.density_net.layers[0].weight.grad.abs().sum() > 0


def test_render_is_reproducible_with_the_same_generator():
    scene = NeRFScene(small_config())
    scene.update_step(1500, 2000)  # past the albedo-only warm-up: random shading is in play
    cams = sample_cameras(CameraSamplerConfig(height=16, width=16, batch_size=2), torch.Generator().manual_seed(0))
    outs, modes = [], []
    for seed in (11, 11, 12):
        out = scene.render(cams, torch.Generator().manual_seed(seed))
        outs.append(out)
        modes.append(scene.last_shading)
    for k in ("rgb", "opacity", "depth", "normal", "z_variance"):
        assert torch.equal(outs[0][k], outs[1][k]), k
    assert modes[0] == modes[1]
    assert not torch.equal(outs[0]["rgb"], outs[2]["rgb"])  # jitter (and maybe light/shading) differ
    for k, c in (("rgb", 3), ("opacity", 1), ("depth", 1), ("normal", 3), ("z_variance", 1)):
        assert outs[0][k].shape == (2, c, 16, 16)
    assert 0.0 <= outs[0]["rgb"].min() and outs[0]["rgb"].max() <= 1.0
    assert outs[0]["opacity"].max() > 0.5  # the initial blob is visible


def test_eval_render_is_deterministic_and_validates_shading():
    scene = NeRFScene(small_config())
    cams = orbit_cameras(2, 12, 12)
    a = scene.render(cams, shading="lambertian")
    b = scene.render(cams, shading="lambertian")
    assert torch.equal(a["rgb"], b["rgb"])
    with pytest.raises(ValueError, match="albedo.*lambertian.*textureless"):
        scene.render(cams, shading="phong")


def test_state_dict_round_trip_includes_occupancy_and_levels():
    scene = NeRFScene(small_config())
    scene.update_step(3000, 4000)
    with torch.no_grad():
        scene.encoding.params.add_(0.01)
    scene.update_occupancy(3000)
    state = scene.state_dict()
    for key in ("renderer.grid.binary", "renderer.grid.occ", "encoding.active_levels", "step"):
        assert key in state
    fresh = NeRFScene(small_config())
    fresh.load_state_dict(state)
    assert int(fresh.encoding.active_levels) == 8 and int(fresh.step) == 3000
    cams = orbit_cameras(1, 12, 12)
    assert torch.equal(scene.render(cams, shading="albedo")["rgb"], fresh.render(cams, shading="albedo")["rgb"])


def test_param_groups_and_regularisers():
    scene = NeRFScene(small_config())
    groups = {g["name"]: g for g in scene.param_groups()}
    assert groups["geometry"]["lr"] == 0.01 and groups["background"]["lr"] == 0.001
    assert groups["geometry"]["betas"] == (0.9, 0.99)
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in scene.parameters())
    torch.optim.Adam(scene.param_groups())  # accepted as is
    out = scene.render(orbit_cameras(1, 16, 16), torch.Generator().manual_seed(0))
    regs = scene.regularisers(out, step=0)
    assert set(regs) == {"orientation", "sparsity", "opacity", "z_variance", "convexity"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in regs.values())
    assert "sparsity" not in scene.regularisers(out, step=3000)  # 0.15 -> 0 by step 3000
    sum(regs.values()).backward()


def test_config_yaml_matches_dataclass():
    node = OmegaConf.load(ROOT / "conf" / "scene" / "nerf.yaml")
    assert node.pop("_target_") == "distill.scene.nerf.NeRFScene"
    schema = OmegaConf.structured(NeRFScene.Config)
    assert OmegaConf.to_container(node) == OmegaConf.to_container(schema)  # every field, default values
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, node))
    assert isinstance(cfg, NeRFScene.Config)
    NeRFScene(OmegaConf.merge(node, {"encoding": {"log2_hashmap_size": 10}, "renderer": {"samples_per_ray": 4}}))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="normal_type"):
        NeRFScene(small_config(normal_type="sobel"))
    with pytest.raises(ValueError, match="dreamfusion"):
        NeRFScene(small_config(shading="phong"))
