"""HiFA, CSD and NFSD: each gradient equals a hand computation from separate eps calls; schedules; the trainer runs
every guidance config end to end (2D and 3D analytic priors) and resumes each one bit-identically."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from numerics import amplification, close, fp32_tol

from distill import rundir
from distill.config import base_options
from distill.ddim import add_noise, predict_x0
from distill.guidance import CFGConfig
from distill.methods import build_guidance
from distill.methods.csd import CSD, CSDConfig
from distill.methods.hifa import HiFA, HiFAConfig
from distill.methods.nfsd import NFSD, NFSDConfig
from distill.priors.analytic import AnalyticPrior
from distill.priors.base import NFSD_NEGATIVE_PROMPT
from distill.prompts import PromptConfig, PromptProcessor
from distill.schedule import TimeSchedule, TimeScheduleConfig
from distill.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false"]
GUIDANCES = base_options("guidance")  # the methods; their per-method variants run in test_preset_matrix


@pytest.fixture(scope="module")
def prior2d():
    return AnalyticPrior()


def _cond(prior, prompt="a red circle"):
    return PromptProcessor(PromptConfig(prompt=prompt, view_dependent=False, perp_neg=False), prior)(None, 2)


def _draw(prior, x0, schedule, seed, step=0, max_steps=100):
    """The (t, noise, x_t) a method draws from a generator seeded with ``seed`` (same order: t, then noise)."""
    g = torch.Generator().manual_seed(seed)
    t = schedule(step, max_steps, g)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ab = prior.alphas_cumprod[t]
    return t, ab, noise, add_noise(x0.detach(), noise, ab)


def _eps(prior, x_t, t, prompt):
    emb = prior.embed_prompts([prompt] * x_t.shape[0])
    return prior.eps(x_t, torch.full((x_t.shape[0],), t), emb)


def _x0(prior, seed=0):
    return prior.sample("a red circle", 2, torch.Generator().manual_seed(seed)).clone().requires_grad_(True)


def test_csd_gradient_is_the_classifier_score(prior2d):
    sched = TimeSchedule(TimeScheduleConfig("uniform"))
    csd = CSD(CSDConfig(), prior2d, sched)
    x0 = _x0(prior2d)
    out = csd.step(x0, _cond(prior2d), 0, 100, torch.Generator().manual_seed(3))
    out.loss.backward()
    t, ab, noise, x_t = _draw(prior2d, x0, sched, 3)
    assert out.t == t
    expected = (
        (1 - ab) * (_eps(prior2d, x_t, t, "a red circle") - _eps(prior2d, x_t, t, "")) / 2
    )  # w (eps_y - eps_0) / B
    torch.testing.assert_close(x0.grad, expected, rtol=1e-10, atol=1e-12)
    # with the negative prompt (text vs negative prompt, the official IF config's end point)
    cfg = CSDConfig(c_neg=-1.0, c_null=0.0, negative_prompt="negative")
    x0.grad = None
    CSD(cfg, prior2d, sched).step(x0, _cond(prior2d), 0, 100, torch.Generator().manual_seed(3)).loss.backward()
    expected = (1 - ab) * (_eps(prior2d, x_t, t, "a red circle") - _eps(prior2d, x_t, t, "negative")) / 2
    torch.testing.assert_close(x0.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t_fixed", [120, 600])  # below and above t_switch = 200
def test_nfsd_gradient_switches_its_noise_term_at_200(prior2d, t_fixed):
    sched = TimeSchedule(TimeScheduleConfig("uniform", t_min=t_fixed / 1000, t_max=t_fixed / 1000 + 1e-4))
    nfsd = NFSD(NFSDConfig(), prior2d, sched)
    x0 = _x0(prior2d, 1)
    out = nfsd.step(x0, _cond(prior2d), 0, 100, torch.Generator().manual_seed(5))
    out.loss.backward()
    t, ab, noise, x_t = _draw(prior2d, x0, sched, 5)
    assert t == t_fixed == out.t
    e_y, e_0 = _eps(prior2d, x_t, t, "a red circle"), _eps(prior2d, x_t, t, "")
    delta_d = e_0 if t < 200 else e_0 - _eps(prior2d, x_t, t, NFSD_NEGATIVE_PROMPT)
    expected = (1 - ab) * (delta_d + 7.5 * (e_y - e_0)) / 2
    torch.testing.assert_close(x0.grad, expected, rtol=1e-10, atol=1e-12)
    if t >= 200:  # the negative class matters: without it the gradient would differ
        assert float((delta_d - e_0).abs().max()) > 1e-3


@pytest.mark.parametrize("rule", ["threestudio", "standard"])
def test_hifa_gradient_is_latent_sds_plus_the_image_term(prior2d, rule):
    sched = TimeSchedule(TimeScheduleConfig("sqrt_anneal", t_min=0.3, t_max=0.98))
    hifa = HiFA(HiFAConfig(cfg_rule=rule), prior2d, sched, CFGConfig(fwd=3.0, inv=1.0))
    g = torch.Generator().manual_seed(2)
    img = (torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)
    x0 = prior2d.encode(img)  # 2 img - 1
    out = hifa.step(x0, _cond(prior2d), 30, 100, torch.Generator().manual_seed(7), images=img)
    out.loss.backward()
    t, ab, noise, x_t = _draw(prior2d, x0, sched, 7, step=30)
    assert t == int(1000 * ((0.98 - 0.3) * (1 - (30 / 100) ** 0.5) + 0.3))
    e_c, e_u = _eps(prior2d, x_t, t, "a red circle"), _eps(prior2d, x_t, t, "")
    e_hat = e_c + 3.0 * (e_c - e_u) if rule == "threestudio" else e_u + 3.0 * (e_c - e_u)
    w = 1 - ab
    grad_z = w * (e_hat - noise)
    decoded = ((predict_x0(x_t, e_hat, ab) + 1) / 2).clamp(0, 1)
    grad_img = w * ab.sqrt() / (1 - ab).sqrt() * (img.detach() - decoded)
    expected = (2.0 * grad_z + 0.01 * grad_img) / 2  # d x0 / d img = 2; both terms / B
    torch.testing.assert_close(img.grad, expected, rtol=1e-10, atol=1e-12)
    assert out.stats["image_loss"] > 0


def test_sqrt_anneal_and_step_schedules_follow_their_formulas():
    s = TimeSchedule(TimeScheduleConfig("sqrt_anneal", t_min=0.3, t_max=0.98))
    for step in (0, 1, 250, 999, 1000, 1200):
        frac = min(step / 1000, 1.0)
        assert s(step, 1000) == int(1000 * ((0.98 - 0.3) * (1 - frac**0.5) + 0.3))  # threestudio's pct
    assert s(0, 1000) == 980 and s(1000, 1000) == 300
    # step function: U[20, 980] up to the milestone, U[20, 500] from milestone + 1 (reference [50, 0.98, 0.5, 51])
    st = TimeSchedule(TimeScheduleConfig("step", t_min=0.02, t_max=0.98, milestone=50, t_max_after=0.5))
    g = torch.Generator().manual_seed(0)
    before = [st(49, 100, g) for _ in range(400)]
    after = [st(51, 100, g) for _ in range(400)]
    assert min(before) >= 20 and max(before) > 900 and max(before) <= 980
    assert min(after) >= 20 and max(after) <= 500 and max(after) > 450


@pytest.mark.numerics
def test_sd_gradients_match_branches_on_the_tiny_pipeline(tiny_sd_dir):
    """CSD, NFSD and HiFA's latent term through the real UNet path (one batched call) equal separate calls."""
    from distill.priors.stable_diffusion import StableDiffusionPrior

    prior = StableDiffusionPrior(
        StableDiffusionPrior.Config(model=str(tiny_sd_dir), resolution=64, dtype="fp32"), device="cpu"
    )
    cond = PromptProcessor(PromptConfig(prompt="a red cube", view_dependent=False, perp_neg=False), prior)(None, 1)
    sched = TimeSchedule(TimeScheduleConfig("uniform", t_min=0.5, t_max=0.5001))
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    z = prior.encode(img).detach()

    def grad_of(method):
        x0 = z.clone().requires_grad_(True)
        method.step(x0, cond, 0, 10, torch.Generator().manual_seed(1)).loss.backward()
        return x0.grad

    t, ab, noise, x_t = _draw(prior, z, sched, 1, max_steps=10)
    tt = torch.tensor([t])

    def e(prompt):
        return prior.eps(x_t, tt, prior.embed_prompts([prompt]))

    w = float(1 - ab)
    e_c, e_u, e_neg = e("a red cube"), e(""), e(NFSD_NEGATIVE_PROMPT)
    big = max(float(v.abs().max()) for v in (e_c, e_u, e_neg))

    def tol(*coefficients):
        # the method's one batched UNet call vs the separate calls here differ by fp32 rounding (tests/numerics.py),
        # multiplied by w and by the sum of |coefficient| of the eps terms combined (HiFA's CFG 100: 201)
        return fp32_tol(big, w * amplification(*coefficients))

    # each check can fail: a CFG scale off by 1/4 (w |e_c - e_u| / 4) or NFSD's negative term dropped (w |e_u - e_neg|)
    # moves the result beyond the largest bound
    assert w * float((e_c - e_u).abs().max()) > 4 * tol(101, 100)
    assert w * float((e_u - e_neg).abs().max()) > 4 * tol(-6.5, -1, 7.5)
    close(grad_of(CSD(CSDConfig(), prior, sched)), (w * (e_c - e_u)).float(), tol(1, 1), "CSD: w (e_c - e_u)")
    nfsd_expected = w * ((e_u - e_neg) + 7.5 * (e_c - e_u))
    close(grad_of(NFSD(NFSDConfig(), prior, sched)), nfsd_expected.float(), tol(-6.5, -1, 7.5), "NFSD, CFG 7.5")
    hifa = HiFA(HiFAConfig(lambda_img=0.0), prior, sched, CFGConfig(fwd=100.0))
    hifa_expected = w * (e_c + 100.0 * (e_c - e_u) - noise)
    close(grad_of(hifa), hifa_expected.float(), tol(101, 100), "HiFA: e_c + 100 (e_c - e_u), CFG 100 amplifies")


def test_z_variance_term_is_finite_on_an_empty_scene():
    """HiFA's z-variance over an empty opacity mask: 0 with a finite (zero) gradient, not NaN (reference bug)."""
    from distill.config import typed
    from distill.scene.cameras import orbit_cameras
    from distill.scene.nerf import NeRFScene

    scene_cfg = typed(
        {"regularisers": {"z_variance": {"start": 100.0, "end": 100.0, "until": 0}}}, NeRFScene.Config, "s"
    )
    scene = NeRFScene(scene_cfg)
    with torch.no_grad():
        for p in scene.parameters():
            p.zero_()
    # an empty volume: pre-activation density -30 everywhere (softplus(-30) ~ 1e-13)
    scene.density_bias = lambda x: (torch.full(x.shape[:1], -30.0, dtype=x.dtype), torch.zeros_like(x))
    out = scene.render(orbit_cameras(1, 16, 16))
    assert float(out["opacity"].detach().max()) < 0.5  # nothing is opaque: the mask is empty
    regs = scene.regularisers(out, 0)
    assert "z_variance" in regs and torch.isfinite(regs["z_variance"]) and float(regs["z_variance"].detach()) == 0.0
    regs["z_variance"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in scene.parameters())


@pytest.mark.parametrize("guidance", GUIDANCES)
@pytest.mark.parametrize("preset", ["experiment=sdi_2d", "prior=analytic3d"])
def test_every_guidance_runs_end_to_end_on_the_analytic_priors(compose_cfg, tmp_path, guidance, preset):
    extra = ["camera.height=16", "camera.width=16", "trainer.eval_views=1"] if "3d" in preset else []
    cfg = compose_cfg([preset, f"guidance={guidance}", "trainer.max_steps=2", "trainer.log_every=1", *extra, *FAST])
    m = train(cfg, tmp_path)
    assert m["status"] == "finished" and m["steps"] == 2 and m["method"] == cfg.guidance.name
    assert (tmp_path / rundir.CHECKPOINT).exists()


def test_method_configs_are_typed_and_validated(compose_cfg, prior2d):
    from distill.config import ConfigError
    from distill.train import check_run_config

    with pytest.raises(ConfigError, match="guidance.weighting='cubic'"):
        check_run_config(compose_cfg(["guidance=csd", "guidance.weighting=cubic"]))
    with pytest.raises(ConfigError, match="guidance.lambda_imgg: unknown key"):
        check_run_config(compose_cfg(["guidance=hifa", "+guidance.lambda_imgg=1"]))
    with pytest.raises(ConfigError, match="guidance.scale=nan"):
        check_run_config(compose_cfg(["guidance=nfsd", "guidance.scale=nan"]))
    node = compose_cfg(["guidance=nfsd"]).guidance
    sched = TimeSchedule(TimeScheduleConfig())
    method = build_guidance(node, prior=prior2d, schedule=sched, cfg_pair=CFGConfig(), kappa=None)
    assert isinstance(method, NFSD) and method.cfg == replace(NFSDConfig())


def test_table61_smoke_sweep_fills_a_row_for_every_method(smoke_sweep):
    """python train.py -m +sweep=table61_smoke: all five Table 6.1 methods plus CSD and NFSD on the 2D analytic
    prior, then the sweep-end evaluation writes the table with one row of ours per method. The same session run as
    tests/test_eval_figure.py's table61 figure (the smoke_sweep fixture runs each sweep once)."""
    table = (smoke_sweep("table61_smoke", "trainer.log_every=1") / "eval" / "table.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("|")]
    for label in ("SDS", "VSD", "ESD", "HiFA", "SDI", "CSD", "NFSD"):
        assert any(ln.split("|")[1].strip().startswith(label) for ln in rows), (label, table)
