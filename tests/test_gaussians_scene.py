"""The 3D Gaussian scene: initialisation, densify / prune (counts, split sampling, new scales, optimiser state),
checkpoints with a changed number of Gaussians, faults, and config validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.config import ConfigError, component_config
from distill.scene.cameras import orbit_cameras
from distill.scene.gaussians import GaussianScene, knn_scale

ROOT = Path(__file__).resolve().parents[1]


def small(**kw) -> GaussianScene:
    return GaussianScene({"n_init": kw.pop("n_init", 64), "rasterizer": "torch", **kw})


def adam(scene: GaussianScene) -> torch.optim.Adam:
    return torch.optim.Adam(scene.param_groups())


def test_yaml_keys_mirror_the_config_and_validate():
    node = OmegaConf.load(ROOT / "conf" / "scene" / "gaussians.yaml")
    _, cfg = component_config(node, "scene")  # unknown keys / wrong types would raise ConfigError
    default = GaussianScene.Config()
    assert OmegaConf.to_container(OmegaConf.structured(cfg)) == OmegaConf.to_container(OmegaConf.structured(default))


@pytest.mark.parametrize(
    "override, words",
    [
        ({"rasterizer": "cuda"}, ["scene.rasterizer='cuda'", "torch", "gsplat"]),
        ({"background": "green"}, ["scene.background='green'"]),
        ({"densify": {"split_measure": "mean"}}, ["split_measure"]),
        ({"regularisers": {"convexity": {"start": 1.0, "end": 0.1, "until": 10}}}, ["convexity", "normals"]),
        ({"raster": {"stop_rule": "lte"}}, ["stop_rule"]),
    ],
)
def test_bad_config_is_a_config_error_naming_the_key(override, words):
    node = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "scene" / "gaussians.yaml"), override)
    with pytest.raises(ConfigError) as e:
        component_config(node, "scene")
    for w in words:
        assert w in str(e.value)


def test_gsplat_missing_is_a_config_error_naming_the_fix(monkeypatch):
    import distill.scene.gaussians as G

    monkeypatch.setattr(G, "gsplat_available", lambda: (False, "ModuleNotFoundError: No module named 'gsplat'"))
    node = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "scene" / "gaussians.yaml"), {"rasterizer": "gsplat"})
    with pytest.raises(ConfigError, match="pip install gsplat.*rasterizer=torch"):
        component_config(node, "scene")


def test_initialisation_follows_threestudio_3dgs():
    scene = GaussianScene(GaussianScene.Config(n_init=300, init_radius=0.8, init_opacity=0.2, rasterizer="torch"))
    assert scene.num_gaussians == 300
    r = scene.means.norm(dim=-1)
    assert float(r.detach().max()) <= 0.8 + 1e-6
    # uniform in the ball: P(|x| < 0.8 / 2) = 1/8; 300 draws, binomial std sqrt(300 * 1/8 * 7/8) = 5.7
    assert abs(int((r < 0.4).sum()) - 300 / 8) < 4 * 5.7
    torch.testing.assert_close(scene.colors, torch.full((300, 3), 0.5))
    torch.testing.assert_close(scene.opacities, torch.full((300,), 0.2))
    torch.testing.assert_close(scene.quats, torch.tensor([[1.0, 0, 0, 0]]).expand(300, 4))
    # isotropic scale: sqrt(mean of the squared distances to the 3 nearest neighbours), brute force in float64
    x = scene.means.detach().double()
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1) + torch.eye(300, dtype=torch.float64) * 1e9
    expect = d2.sort(dim=1).values[:, :3].mean(1).sqrt()
    torch.testing.assert_close(scene.scales[:, 0].double(), expect, rtol=1e-5, atol=1e-7)
    assert torch.equal(scene.scales[:, 0], scene.scales[:, 1])
    torch.testing.assert_close(knn_scale(x, block=7), expect)  # blocked computation


def _set_stats(scene, grads):
    scene.grad_accum.copy_(grads)
    scene.grad_count.fill_(1.0)


def test_densify_counts_clone_split_prune():
    scene = small(n_init=10, densify={"grad_threshold": 0.5, "split_threshold": 0.1, "min_opacity": 0.05})
    with torch.no_grad():
        scene.log_scales.fill_(math.log(0.01))  # |s|_2 = 0.017 <= 0.1: clone
        scene.log_scales[[0, 1, 2]] = math.log(0.2)  # |s|_2 = 0.35 > 0.1: split
        scene.opacity_logits[[8, 9]] = -10.0  # o = 4.5e-5 < 0.05: pruned
    grads = torch.zeros(10)
    grads[[0, 1, 3, 4, 5, 9]] = 1.0  # split 0, 1; clone 3, 4, 5 and 9 (low opacity: cloned, then both pruned)
    _set_stats(scene, grads)
    stats = scene.densify_and_prune(adam(scene), torch.Generator().manual_seed(0))
    # 10 - 2 split originals - 2 pruned + 4 clones - 1 pruned clone + 2 x 2 split samples
    assert stats == {"cloned": 4, "split": 2, "pruned": 3, "n_gaussians": 13}
    assert scene.num_gaussians == 13
    for name in ("log_scales", "quats", "opacity_logits", "f_dc", "grad_accum", "grad_count", "max_radii"):
        assert getattr(scene, name).shape[0] == 13
    assert float(scene.grad_accum.abs().sum()) == 0.0  # statistics restart


def test_split_samples_follow_the_gaussian_and_shrink_the_scale():
    n = 20000
    scene = small(n_init=4, densify={"grad_threshold": 0.5, "split_threshold": 0.01, "split_n": n, "max_num": 10**6})
    s = torch.tensor([0.3, 0.1, 0.05])
    q = torch.nn.functional.normalize(torch.tensor([0.8, 0.3, -0.4, 0.2]), dim=0)
    with torch.no_grad():
        scene.log_scales[0] = s.log()
        scene.quats[0] = q * 3.0  # not unit: normalised by the rotation
        scene.means[0] = torch.tensor([0.1, -0.2, 0.3])
    _set_stats(scene, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    scene.densify_and_prune(None, torch.Generator().manual_seed(1))
    assert scene.num_gaussians == 3 + n
    new = scene.means[3:].detach().double()
    from distill.scene.rasterizer import quat_to_rotmat

    R = quat_to_rotmat(q[None].double())[0]
    cov = R @ torch.diag(s.double() ** 2) @ R.T
    # sample mean: std error sqrt(diag(cov) / n) <= 0.3 / 141 = 2.1e-3 -> 5 sigma
    torch.testing.assert_close(new.mean(0), torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64), atol=0.011, rtol=0)
    # sample covariance entries: std error <= sqrt(2 / n) * 0.09 = 9e-4 -> 5 sigma
    torch.testing.assert_close(torch.cov(new.T), cov, atol=4.5e-3, rtol=0)
    torch.testing.assert_close(scene.scales[3:], (s / (0.8 * n)).expand(n, 3))
    torch.testing.assert_close(scene.quats[3:], (q * 3.0).expand(n, 4))


def test_optimiser_state_follows_the_rows_and_keeps_untouched_moments():
    scene = small(n_init=12, densify={"grad_threshold": 0.5, "split_threshold": 0.1, "min_opacity": 0.05})
    opt = adam(scene)
    cams = orbit_cameras(2, 12, 12)
    for _ in range(2):  # real moments from real gradients
        opt.zero_grad()
        scene.render(cams, torch.Generator().manual_seed(0))["rgb"].pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        scene.log_scales.clamp_(max=math.log(0.01))  # |s|_2 <= 0.017: clone
        scene.log_scales[[0, 1]] = math.log(0.2)  # split
        scene.opacity_logits[5] = -10.0
    grads = torch.zeros(12)
    grads[[0, 1, 2]] = 1.0  # split 0, 1; clone 2; prune 5
    _set_stats(scene, grads)
    before = {name: {k: v.clone() for k, v in opt.state[getattr(scene, name)].items()} for name in ("means", "f_dc")}
    scene.densify_and_prune(opt, torch.Generator().manual_seed(0))
    kept = [i for i in range(12) if i not in (0, 1, 5)]
    for name in ("means", "log_scales", "quats", "opacity_logits", "f_dc"):
        p = getattr(scene, name)
        st = opt.state[p]
        assert any(p is q for g in opt.param_groups for q in g["params"])  # the same Parameter objects
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].shape == p.shape
            assert float(st[k][len(kept) :].abs().sum()) == 0.0  # new rows start at zero
            if name in before:
                assert torch.equal(st[k][: len(kept)], before[name][k][kept])  # untouched rows keep their moments
    # the optimiser keeps working on the resized tensors
    opt.zero_grad()
    scene.render(cams, torch.Generator().manual_seed(0))["rgb"].pow(2).mean().backward()
    opt.step()


def test_max_num_caps_growth_highest_gradient_first():
    scene = small(n_init=10, densify={"grad_threshold": 0.5, "split_threshold": 1.0, "max_num": 13})
    with torch.no_grad():
        scene.log_scales.fill_(math.log(0.01))  # all clones
    grads = torch.tensor([0.6, 0.9, 0.7, 0.8, 1.0, 0.55, 0.0, 0.0, 0.0, 0.0])
    _set_stats(scene, grads)
    stats = scene.densify_and_prune(None, torch.Generator())
    assert stats["cloned"] == 3 and scene.num_gaussians == 13
    # the clones are the three largest gradients (rows 4, 1, 3), appended in row order
    torch.testing.assert_close(scene.means[10:], scene.means[[1, 3, 4]])


def test_load_state_dict_resizes_to_the_checkpoint():
    a = small(n_init=20, densify={"grad_threshold": 0.0, "split_threshold": 1.0})
    _set_stats(a, torch.ones(20))
    a.densify_and_prune(None, torch.Generator())
    assert a.num_gaussians == 40
    b = small(n_init=20)
    opt = adam(b)
    b.load_state_dict(a.state_dict())
    assert b.num_gaussians == 40 and torch.equal(b.means, a.means)
    assert opt.param_groups[0]["params"][0] is b.means  # the optimiser still holds the resized parameter


def test_faults_nan_and_empty():
    scene = small(n_init=8)
    opt = adam(scene)
    scene.update_step(0, 10)
    with torch.no_grad():
        scene.log_scales[3, 0] = float("inf")
    assert scene.after_optimizer_step(0, opt) == "nan"
    scene = small(n_init=8, densify={"start": 1, "interval": 1, "min_opacity": 0.99})
    opt = adam(scene)
    scene.update_step(1, 10)
    assert scene.after_optimizer_step(1, opt) == "empty" and scene.num_gaussians == 0


def test_xyz_learning_rate_decays_exponentially():
    scene = small(optim={"xyz_lr_init": 1e-3, "xyz_lr_final": 1e-5, "xyz_lr_steps": 100})
    opt = adam(scene)
    assert opt.param_groups[0]["name"] == "means" and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    scene.update_step(49, 200)
    scene.after_optimizer_step(49, opt)  # sets the lr of step 50: the geometric mean
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(g["eps"] == 1e-15 for g in opt.param_groups)


def test_backgrounds():
    cams = orbit_cameras(4, 6, 6)
    far = small(n_init=8)
    with torch.no_grad():
        far.means.add_(100.0)  # nothing on screen: the render is the background
    for kind in ("white", "black", "random", "invert", "learned"):
        far.cfg.background = kind
        rgb = far.render(cams, torch.Generator().manual_seed(3))["rgb"]
        per_view = rgb.flatten(2)
        assert torch.equal(per_view.min(-1).values, per_view.max(-1).values)  # one colour per view
        if kind == "white":
            assert float(rgb.detach().min()) == 1.0
        if kind == "black":
            assert float(rgb.detach().max()) == 0.0
        if kind == "invert":
            assert set(rgb[:, 0, 0, 0].tolist()) <= {0.0, 1.0}
        if kind == "learned":
            torch.testing.assert_close(rgb[:, :, 0, 0], torch.full((4, 3), 0.5))
    far.cfg.background = "random"
    assert torch.equal(far.render(cams, shading="albedo")["rgb"], torch.ones(4, 3, 6, 6))  # evaluation: white


def test_densification_statistic_is_the_ndc_scaled_screen_gradient():
    """grad_accum = sum over visible views of |dL/d mu_2D * (W/2, H/2)| (graphdeco's NDC convention), with
    dL/d mu_2D checked by central finite differences of the rasterizer in the screen coordinates."""
    from distill.scene.rasterizer import Projection, camera_matrices, covariances, project, rasterize

    scene = small(n_init=30, init_opacity=0.5, background="white")
    scene.double()
    cam = orbit_cameras(1, 10, 14)
    cam.c2w, cam.fovy = cam.c2w.double(), cam.fovy.double()
    cams = cam[torch.tensor([0, 0])]  # the same view twice: counted twice
    scene.update_step(0, 10)
    w = torch.rand(1, 3, 10, 14, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (scene.render(cams, torch.Generator())["rgb"] * w).sum().backward()
    g = scene._screen[0].grad[0].clone()
    scene.accumulate_screen_gradients()
    i = int(g.norm(dim=-1).argmax())
    torch.testing.assert_close(scene.grad_accum[i], 2 * (g[i] * torch.tensor([7.0, 5.0], dtype=torch.float64)).norm())
    assert float(scene.grad_count[i]) == 2.0

    with torch.no_grad():
        vm, K = camera_matrices(cam)
        o = scene.opacities
        proj = project(scene.means, covariances(scene.quats, scene.scales), vm, K, 14, 10, scene.cfg.raster, o)
        bg = torch.ones(1, 3, dtype=torch.float64)

        def loss(m2d):
            p = Projection(m2d, proj.conics, proj.depths, proj.radii)
            return float(
                (rasterize(p, o, scene.colors, 14, 10, scene.cfg.raster, bg)["rgb"].permute(0, 3, 1, 2) * w).sum()
            )

        for axis in (0, 1):
            e = torch.zeros_like(proj.means2d)
            e[0, i, axis] = 1e-6
            fd = (loss(proj.means2d + e) - loss(proj.means2d - e)) / 2e-6
            # float64, O(e^2) truncation: agreement to ~1e-8 of |g| ~ 0.1
            assert abs(fd - float(g[i, axis])) < 1e-6 * max(1.0, abs(fd))  # g: the gradient of view 0
