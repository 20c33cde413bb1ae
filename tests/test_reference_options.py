"""The scene / optimiser options the Table 6.1 presets need: normal_type=none, a regulariser weight's begin step,
per-group learning rates (mlp_lr) and AdamW's weight decay."""

from types import SimpleNamespace

import pytest
import torch

from distill import losses
from distill.config import ConfigError, OptimizerConfig, typed
from distill.scene.nerf import LossWeight, NeRFScene
from distill.train import make_optimizer


def small(**kw) -> NeRFScene.Config:
    cfg = NeRFScene.Config()
    cfg.encoding.log2_hashmap_size, cfg.encoding.n_levels, cfg.encoding.start_level = 10, 6, 6
    cfg.renderer.samples_per_ray = 8
    cfg.renderer.occupancy.enabled = False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_linear_schedule_begin_matches_threestudio_C():
    """[10000, 0, 1000, 10001] (prolificdreamer.yaml lambda_opaque): 0 up to 10000, 1000 from 10001; [0, 10, 1000,
    5000] is linear from step 0."""
    w = LossWeight(start=0.0, end=1000.0, until=10001, begin=10000)
    assert [w.at(s) for s in (0, 9999, 10000, 10001, 20000)] == [0.0, 0.0, 0.0, 1000.0, 1000.0]
    assert losses.linear_schedule(2500, 10.0, 1000.0, 5000) == pytest.approx(10.0 + 990.0 * 0.5)
    assert losses.linear_schedule(7, 3.0, 5.0, 0) == 5.0  # constant: until <= begin


def test_normal_type_none_keeps_density_and_albedo_and_returns_no_normals():
    a = NeRFScene(small()).double()
    n = NeRFScene(small(normal_type="none", shading="albedo", regularisers=_no_normal_regs())).double()
    n.load_state_dict(a.state_dict())
    x = torch.rand(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    ga, gn = a.geometry(x), n.geometry(x)
    assert torch.allclose(ga["density"], gn["density"], rtol=1e-12) and torch.equal(ga["albedo"], gn["albedo"])
    assert torch.count_nonzero(gn["normal"]) == 0


def _no_normal_regs():
    from distill.scene.nerf import RegularisersConfig

    r = RegularisersConfig()
    r.orientation, r.convexity = LossWeight(0.0, 0.0, 0), LossWeight(0.0, 0.0, 0)
    return r


def test_normal_type_none_rejects_terms_that_need_normals():
    with pytest.raises(ValueError, match="normal_type=none but scene.regularisers.orientation"):
        NeRFScene(small(normal_type="none", shading="albedo"))
    with pytest.raises(ValueError, match="normal_type=none needs scene.shading=albedo"):
        NeRFScene(small(normal_type="none", regularisers=_no_normal_regs()))


def test_mlp_lr_splits_the_geometry_group():
    cfg = small()
    one = {g["name"]: g for g in NeRFScene(cfg).param_groups()}
    assert set(one) == {"geometry", "background"} and one["geometry"]["lr"] == 0.01
    cfg.optim.mlp_lr = 0.001
    scene = NeRFScene(cfg)
    groups = {g["name"]: g for g in scene.param_groups()}
    assert (groups["geometry"]["lr"], groups["geometry_mlp"]["lr"], groups["background"]["lr"]) == (0.01, 0.001, 0.001)
    assert {id(p) for p in groups["geometry"]["params"]} == {id(p) for p in scene.encoding.parameters()}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in scene.parameters()) and len(ids) == len(set(ids))


def test_adamw_weight_decay_reaches_every_group_and_is_validated():
    scene = NeRFScene(small())
    opt = make_optimizer(SimpleNamespace(optimizer=OptimizerConfig(name="adamw", weight_decay=0.01)), scene)
    assert isinstance(opt, torch.optim.AdamW) and all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-15 for g in opt.param_groups)
    with pytest.raises(ConfigError, match="weight_decay=0.01 with optimizer.name='adam'.*adamw"):
        typed({"name": "adam", "weight_decay": 0.01}, OptimizerConfig, "optimizer")
    with pytest.raises(ConfigError, match="optimizer.name='lion'.*adam, adamw, sgd"):
        typed({"name": "lion"}, OptimizerConfig, "optimizer")
