"""VSD / ESD (src/distill/methods/vsd.py) and phi (src/distill/phi/): gradients equal hand computations from separate
prior / phi eps calls (2D analytic prior in float64, tiny SD pipeline), phi starts as the frozen model, trains,
round-trips its state, trains its null-camera embedding, converts v-prediction, and names the peft install."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from numerics import amplification, close, fp32_tol

from distill.ddim import add_noise
from distill.guidance import CFGConfig
from distill.methods.vsd import ESD, VSD, ESDConfig, VSDConfig
from distill.phi import PhiConfig, camera_features
from distill.priors.analytic import AnalyticPrior
from distill.prompts import Conditioning
from distill.scene.cameras import orbit_cameras
from distill.schedule import TimeSchedule, TimeScheduleConfig

SCHED = TimeSchedule(TimeScheduleConfig("uniform"))
# several phis share one tiny UNet here (one adapter each); peft warns about that, which is intended
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared CPU: intra-op threads only cost
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prior2d():
    return AnalyticPrior()


def _sd_prior(path):
    from distill.priors.stable_diffusion import StableDiffusionPrior

    cfg = StableDiffusionPrior.Config(model=str(path), resolution=64, dtype="fp32", embedding_cache_dir=None)
    return StableDiffusionPrior(cfg, device="cpu")


@pytest.fixture(scope="module")
def sd_prior(tiny_sd_dir):
    return _sd_prior(tiny_sd_dir)


def _cond(prior, B, size, prompt):
    emb = prior.embed_prompts([prompt, ""])
    cams = orbit_cameras(B, size, size)
    return Conditioning(emb[:1].expand(B, *emb.shape[1:]), emb[1:].expand(B, *emb.shape[1:]), cameras=cams)


def _draw(prior, x0, seed):
    """The (t, ab, noise, x_t) the method draws from a generator seeded with ``seed`` (t, then the noise)."""
    g = torch.Generator().manual_seed(seed)
    t = SCHED(0, 100, g)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ab = prior.alphas_cumprod[t]
    return t, ab, noise, add_noise(x0.detach(), noise, ab)


def _expected_grad(prior, phi, cond, x0, seed, lam, scale):
    """(1 - ab)(eps_u + s (eps_c - eps_u) - [(1 - lam) eps_phi(c) + lam eps_phi(null)]) / B from separate calls."""
    t, ab, noise, x_t = _draw(prior, x0, seed)
    B = x0.shape[0]
    tt = torch.full((B,), t)
    e_c, e_u = prior.eps(x_t, tt, cond.cond), prior.eps(x_t, tt, cond.uncond)
    e_cam = phi.eps(x_t, tt, cond.cond, cond.cameras)
    e_null = phi.eps(x_t, tt, cond.cond, cond.cameras, null=torch.ones(B, dtype=torch.bool))
    expected = (1 - ab) * (e_u + scale * (e_c - e_u) - ((1 - lam) * e_cam + lam * e_null)) / B
    return expected, e_cam, e_null, e_c


def _perturb(params, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("cls,lam", [(VSD, 0.0), (ESD, 0.5)])
@pytest.mark.numerics
def test_gradient_equals_hand_computation_on_the_2d_analytic_prior(prior2d, cls, lam):
    cfg = cls.Config()
    assert cfg.esd_lambda == lam
    method = cls(cfg, prior2d, SCHED, CFGConfig(fwd=7.5))
    _perturb(method.phi.parameters(), 0, 0.05)  # a phi that differs from the prior and between cameras
    cond = _cond(prior2d, 2, 32, "a red circle")
    x0 = prior2d.sample("a red circle", 2, torch.Generator().manual_seed(1)).clone().requires_grad_(True)
    expected, e_cam, e_null, e_c = _expected_grad(prior2d, method.phi, cond, x0, 4, lam, 7.5)
    assert float((e_cam - e_null).abs().max()) > 1e-3 and float((e_cam - e_c).abs().max()) > 1e-3
    out = method.step(x0, cond, 0, 100, torch.Generator().manual_seed(4))
    out.loss.backward()
    # the prior is float64; phi's residual r = e_phi - e_c comes from an fp32 net, batched in the method and per
    # call here: its rounding, times w / B (tests/numerics.py)
    t, ab, _, _ = _draw(prior2d, x0, 4)
    r = max((e_cam - e_c).abs().max(), (e_null - e_c).abs().max())
    close(x0.grad, expected, fp32_tol(r, float(1 - ab) / x0.shape[0]), "fp32 residual net")
    assert out.stats["phi_loss"] > 0 and out.model_calls == 3


@pytest.mark.parametrize("cls,lam", [(VSD, 0.0), (ESD, 0.5)])
@pytest.mark.numerics
def test_gradient_equals_hand_computation_on_the_tiny_sd_pipeline(tiny_sd_dir, cls, lam):
    prior = _sd_prior(tiny_sd_dir)  # its own: phi attaches a LoRA to this UNet
    cond = _cond(prior, 1, 64, "a red cube")
    z = prior.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).detach()
    tt = torch.tensor([500])
    before = prior.eps(z, tt, cond.cond)
    method = cls(cls.Config(phi=PhiConfig(single_model=True)), prior, SCHED, CFGConfig(fwd=7.5))
    _perturb([p for n, p in method.phi.named_trainables() if "lora_B" in n], 0, 0.05)
    # the pretrained branch runs the plain UNet: no LoRA, no camera embedding
    torch.testing.assert_close(prior.eps(z, tt, cond.cond), before, rtol=0, atol=0)
    assert float((method.phi.eps(z, tt, cond.cond, None) - before).abs().max()) > 1e-4  # the LoRA does act
    x0 = z.clone().requires_grad_(True)
    expected, e_cam, e_null, _ = _expected_grad(prior, method.phi, cond, x0, 2, lam, 7.5)
    assert float((e_cam - e_null).abs().max()) > 1e-4
    method.step(x0, cond, 0, 100, torch.Generator().manual_seed(2)).loss.backward()
    t, ab, _, x_t = _draw(prior, x0, 2)
    e_c, e_u = prior.eps(x_t, torch.tensor([t]), cond.cond), prior.eps(x_t, torch.tensor([t]), cond.uncond)
    # fp32 UNet: one batched call vs separate calls (tests/numerics.py), amplified by w / B times
    # |1 - s| + s (CFG 7.5) + (1 - lam) + lam (phi's rows) = 15
    big = max(v.abs().max() for v in (e_c, e_u, e_cam, e_null))
    tol = fp32_tol(big, float(1 - ab) * amplification(1 - 7.5, 7.5, 1 - lam, lam))
    close(x0.grad, expected.float(), tol, "CFG 7.5 and phi, fp32 UNet")
    assert float(((1 - ab) * (e_c - e_u)).abs().max()) > 10 * tol  # the other CFG convention would fail the check


@pytest.mark.numerics
def test_phi_starts_as_the_frozen_model(sd_prior, prior2d):
    cond = _cond(sd_prior, 2, 64, "a red cube")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tt = torch.tensor([300, 700])
    ref = sd_prior.eps(x, tt, cond.cond)
    method = VSD(VSDConfig(phi=PhiConfig(single_model=True)), sd_prior, SCHED, CFGConfig())
    lora_b = [p for n, p in method.phi.named_trainables() if ".lora_B." in n]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)  # the LoRA is a no-op at init
    # the reference's camera MLP (torch's default init) perturbs phi; without it phi is the frozen model
    assert float((method.phi.eps(x, tt, cond.cond, cond.cameras) - ref).abs().max()) > 1e-5
    with torch.no_grad():
        method.phi.camera_embedding.linear_2.weight.zero_()
        method.phi.camera_embedding.linear_2.bias.zero_()
    # the LoRA path (peft's extra fp32 matmuls, here adding 0) vs the plain UNet: fp32 rounding of one call
    tol = fp32_tol(ref.abs().max())
    close(method.phi.eps(x, tt, cond.cond, cond.cameras), ref, tol, "zero camera MLP output: the frozen model")
    zero = VSD(VSDConfig(phi=PhiConfig(single_model=True, zero_init_camera=True)), sd_prior, SCHED, CFGConfig())
    close(zero.phi.eps(x, tt, cond.cond, cond.cameras), ref, tol, "zero_init_camera: the frozen model")
    # the analytic stand-in: exact eps + a residual whose output layer is zero
    c2 = _cond(prior2d, 2, 32, "a red circle")
    x2 = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    phi2 = VSD(VSDConfig(), prior2d, SCHED, CFGConfig()).phi
    torch.testing.assert_close(phi2.eps(x2, tt, c2.cond, c2.cameras), prior2d.eps(x2, tt, c2.cond), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["lora", "residual"])
def test_phi_train_steps_lower_its_denoising_loss(sd_prior, prior2d, which):
    # the tiny random UNet's LoRA (rank 4 on two attention blocks) can absorb only ~2 % of its denoising loss (it
    # plateaus there, /tmp/phi_train.py in the report), the residual net much more: hence the two margins
    if which == "lora":
        prior, lr, factor = sd_prior, 1e-2, 0.99
        x0 = sd_prior.encode(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))).detach()
    else:
        prior, lr, factor = prior2d, 3e-3, 0.9
        # a render the prior does not model (flat grey): on its own samples the exact eps is already near-optimal
        x0 = torch.full((2, 3, 32, 32), 0.3, dtype=torch.float64)
    cond = _cond(prior, 2, x0.shape[-1], "a red cube" if which == "lora" else "a red circle")
    phi = VSD(VSDConfig(phi=PhiConfig(single_model=True, lr=lr)), prior, SCHED, CFGConfig()).phi
    g = torch.Generator().manual_seed(0)
    evals = [
        (torch.randint(0, 1000, (2,), generator=g), torch.randn(x0.shape, generator=g, dtype=x0.dtype))
        for _ in range(4)
    ]

    def loss():
        return sum(phi.denoising_loss(x0, cond.cond, cond.cameras, t, n) for t, n in evals)

    start = loss()
    before = {n: p.detach().clone() for n, p in phi.named_trainables()}
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        phi.train_step(x0, cond.cond, cond.cameras, g)
    assert loss() < factor * start
    # every trainable tensor moved (with a shared UNet the LoRA must stay on through the backward)
    assert all(not torch.equal(p, before[n]) for n, p in phi.named_trainables())


def test_phi_state_round_trips_bit_identically(sd_prior):
    cond = _cond(sd_prior, 1, 64, "a red cube")
    x0 = sd_prior.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))).detach()
    cfg = ESDConfig(phi=PhiConfig(single_model=True, seed=1))
    a = ESD(cfg, sd_prior, SCHED, CFGConfig())
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        a.phi.train_step(x0, cond.cond, cond.cameras, g)
    state = copy.deepcopy(a.state_dict())
    assert state["phi"]["optimizer"]["state"] and state["phi"]["steps"] == 2
    b = ESD(ESDConfig(phi=PhiConfig(single_model=True, seed=2)), sd_prior, SCHED, CFGConfig())
    b.load_state_dict(state)
    for (na, pa), (nb, pb) in zip(a.phi.named_trainables(), b.phi.named_trainables()):
        assert na == nb and torch.equal(pa, pb), na
    # the optimiser state travelled too: the next step is the same on both
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a.phi.train_step(x0, cond.cond, cond.cameras, ga)
    b.phi.train_step(x0, cond.cond, cond.cameras, gb)
    for (na, pa), (_, pb) in zip(a.phi.named_trainables(), b.phi.named_trainables()):
        assert torch.equal(pa, pb), na
    assert any(not torch.equal(pa, state["phi"]["params"][n]) for n, pa in a.phi.named_trainables())


def test_esd_trains_the_null_camera_embedding(sd_prior):
    cond = _cond(sd_prior, 1, 64, "a red cube")
    x0 = sd_prior.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))).detach()
    esd = ESD(ESDConfig(phi=PhiConfig(single_model=True, camera_dropout=1.0)), sd_prior, SCHED, CFGConfig())
    cam = esd.phi.camera_embedding
    null_before = cam(torch.zeros(1, 16)).detach().clone()
    stats = esd.step(x0.clone().requires_grad_(True), cond, 0, 10, torch.Generator().manual_seed(0)).stats
    assert stats["phi_null_camera"] == 1
    # a null-camera step: the zero input gives W1 no gradient, the rest of the MLP (the null embedding) is trained
    assert float(cam.linear_1.weight.grad.abs().max()) == 0.0
    assert float(cam.linear_2.bias.grad.abs().max()) > 0 and float(cam.linear_1.bias.grad.abs().max()) > 0
    with torch.no_grad():
        assert float((cam(torch.zeros(1, 16)) - null_before).abs().max()) > 0
    # the preset's 10 % dropout: null steps happen, at about that rate (one draw per batch)
    esd10 = ESD(ESDConfig(phi=PhiConfig(single_model=True)), sd_prior, SCHED, CFGConfig())
    g = torch.Generator().manual_seed(0)
    nulls = sum(esd10.phi.train_step(x0, cond.cond, cond.cameras, g)["phi_null_camera"] for _ in range(60))
    assert 1 <= nulls <= 15


def test_camera_features_are_flattened_c2w_or_zero():
    cams = orbit_cameras(2, 8, 8)
    f = camera_features(cams, 4, torch.tensor([False, False, True, True]), "cpu")
    torch.testing.assert_close(f[:2], cams.c2w.reshape(2, 16).float())
    assert bool((f[2:] == 0).all())
    assert bool((camera_features(None, 3, None, "cpu") == 0).all())


def test_v_prediction_phi_converts_to_eps_and_trains_on_v(tiny_sd_dir, tmp_path, sd_prior):
    vdir = tmp_path / "tiny-v"
    shutil.copytree(tiny_sd_dir, vdir)
    sched_file = vdir / "scheduler" / "scheduler_config.json"
    sc = json.loads(sched_file.read_text())
    sched_file.write_text(json.dumps({**sc, "prediction_type": "v_prediction"}))
    phi = VSD(VSDConfig(phi=PhiConfig(model=str(vdir))), sd_prior, SCHED, CFGConfig()).phi
    assert phi.prediction_type == "v_prediction" and not phi.shared and phi.unet is not sd_prior.unet
    cond = _cond(sd_prior, 2, 64, "a red cube")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tt = torch.tensor([100, 800])
    feat = cond.cameras.c2w.reshape(2, 16).float()
    with torch.no_grad():
        v = phi.unet(x, tt, encoder_hidden_states=cond.cond, class_labels=feat).sample
    ab = sd_prior.alphas_cumprod[tt].float().view(2, 1, 1, 1)
    tol = fp32_tol(max(v.abs().max(), x.abs().max()), 2)  # sqrt(ab) + sqrt(1 - ab) <= 1.42; fp32 arithmetic
    close(phi.eps(x, tt, cond.cond, cond.cameras), ab.sqrt() * v + (1 - ab).sqrt() * x, tol, "v -> eps")
    # the train step's loss is the v-target loss of its own draws (t', eps', dropout), not the eps-target one
    x0 = sd_prior.encode(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))).detach()
    g = torch.Generator().manual_seed(3)
    t1 = torch.randint(0, 1000, (2,), generator=g)
    n1 = torch.randn(x0.shape, generator=g)
    drop = bool(torch.rand((), generator=g) < 0.1)
    a1 = sd_prior.alphas_cumprod[t1].float().view(2, 1, 1, 1)
    x_t = a1.sqrt() * x0 + (1 - a1).sqrt() * n1
    with torch.no_grad():
        pred = phi.unet(x_t, t1, encoder_hidden_states=cond.cond, class_labels=feat * (not drop)).sample
    v_loss = float(((pred - (a1.sqrt() * n1 - (1 - a1).sqrt() * x0)) ** 2).mean())
    eps_loss = float(((pred - n1) ** 2).mean())
    stats = phi.train_step(x0, cond.cond, cond.cameras, torch.Generator().manual_seed(3))
    assert stats["phi_loss"] == pytest.approx(v_loss, rel=1e-5) and abs(v_loss - eps_loss) > 1e-2 * v_loss


def test_missing_peft_names_the_install_command(sd_prior, monkeypatch):
    from distill.config import ConfigError

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install peft \(or pip install -e "\.\[vsd\]"\)'):
        VSD(VSDConfig(phi=PhiConfig(single_model=True)), sd_prior, SCHED, CFGConfig())


def test_configs_are_typed_and_build_from_the_presets(compose_cfg, prior2d):
    from distill.config import ConfigError
    from distill.methods import build_guidance
    from distill.train import check_run_config

    with pytest.raises(ConfigError, match="guidance.phi.rnak"):
        check_run_config(compose_cfg(["guidance=vsd", "+guidance.phi.rnak=4"]))
    with pytest.raises(ConfigError, match="esd_lambda=1.5"):
        check_run_config(compose_cfg(["guidance=esd", "guidance.esd_lambda=1.5"]))
    with pytest.raises(ConfigError, match="guidance.phi.lr=0"):
        check_run_config(compose_cfg(["guidance=vsd", "guidance.phi.lr=0"]))
    for name, cls, lam in (("vsd", VSD, 0.0), ("esd", ESD, 0.5)):
        cfg = compose_cfg([f"guidance={name}"])
        assert cfg.schedule.name == "step" and cfg.schedule.milestone == 5000 and cfg.schedule.t_max_after == 0.5
        m = build_guidance(cfg.guidance, prior=prior2d, schedule=SCHED, cfg_pair=CFGConfig(), kappa=None)
        assert type(m) is cls and m.cfg.esd_lambda == lam and m.cfg.phi.lr == 1e-4
        assert tuple(m.phi.optimizer.defaults["betas"]) == (0.9, 0.99) and m.phi.optimizer.defaults["eps"] == 1e-15


def test_phi_model_path_errors_come_from_the_prior_loader(sd_prior, tmp_path):
    from distill.priors.base import PriorError

    with pytest.raises(PriorError, match=r"guidance.phi.model=.*no such local directory"):
        VSD(VSDConfig(phi=PhiConfig(model=str(tmp_path / "nope" / "sd21"))), sd_prior, SCHED, CFGConfig())


def test_esd_on_the_3d_analytic_prior_resumes_bit_identically(compose_cfg, tmp_path, interrupt_at):
    """The camera path (phi's camera embedding, the null-camera branch) through the trainer's checkpoint."""
    from distill import rundir
    from distill.train import train

    fast = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false"]
    small = ["camera.height=16", "camera.width=16", "camera.pool=3", "trainer.eval_views=1"]
    cfg = compose_cfg(["guidance=esd", "trainer.checkpoint_every=2", "trainer.max_steps=4", *small, *fast])
    train(cfg, tmp_path / "full")
    interrupt_at(cfg, tmp_path / "resumed", 3)
    assert train(cfg, tmp_path / "resumed")["resumed_from_step"] == 3
    a, b = rundir.load_checkpoint(tmp_path / "full"), rundir.load_checkpoint(tmp_path / "resumed")
    for k in a["scene"]:
        assert torch.equal(a["scene"][k], b["scene"][k]), k
    pa, pb = a["guidance"]["phi"], b["guidance"]["phi"]
    assert pa["steps"] == pb["steps"] == 4
    for k in pa["params"]:
        assert torch.equal(pa["params"][k], pb["params"][k]), k
    for i, s in pa["optimizer"]["state"].items():
        assert all(torch.equal(s[k], pb["optimizer"]["state"][i][k]) for k in s)
