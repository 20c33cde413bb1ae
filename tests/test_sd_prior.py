"""Stable Diffusion prior (prior=sd21) on a tiny random SD-architecture pipeline (tests/tiny_sd.py).

Nothing here downloads: HF_HUB_OFFLINE=1 and every load is from a local directory (or must fail).
The tiny pipeline is written once per session; renders are 64 px (8 x 8 latents) except where
the 512 -> 64 x 64 path itself is checked.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported (it reads it once)

import pytest
import torch
from numerics import amplification, close, fp32_tol

from distill.priors.base import PriorError, scaled_linear_alphas_cumprod
from distill.priors.stable_diffusion import StableDiffusionPrior

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a hamburger"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny ops on a shared CPU: one thread is ~20x faster than oversubscribed intra-op threads
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embed_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


def make_prior(tiny_sd_dir, embed_cache=None, **kw) -> StableDiffusionPrior:
    cfg = StableDiffusionPrior.Config(
        model=str(tiny_sd_dir),
        resolution=64,
        dtype="fp32",
        embedding_cache_dir=str(embed_cache) if embed_cache else None,
    )
    return StableDiffusionPrior(replace(cfg, **kw), device="cpu")


@pytest.fixture(scope="session")
def prior(tiny_sd_dir, embed_cache) -> StableDiffusionPrior:
    return make_prior(tiny_sd_dir, embed_cache)


@pytest.fixture(scope="session")
def prior_mean(tiny_sd_dir) -> StableDiffusionPrior:
    """Deterministic encode (posterior mean), for exact comparisons."""
    return make_prior(tiny_sd_dir, vae_posterior="mean")


def smooth_render(seed: int = 0, size: int = 64, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bilinear")
    return img.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# loading, config, errors


def test_tiny_tokenizer_matches_open_clip(prior):
    import open_clip

    prompts = ["a hamburger, front view", "a DSLR photo of a squirrel's café", ""]
    ids = prior.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-16")(prompts))
    assert prior.tokenizer.model_max_length == 77 and prior.max_length == 77


def test_loaded_frozen_eval_and_schedule(prior):
    assert prior.view_dependent is True
    assert prior.prediction_type == "epsilon"
    for m in (prior.unet, prior.vae, prior.text_encoder):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())
    prior.train()
    assert not prior.unet.training and not prior.vae.training and not prior.text_encoder.training
    prior.eval()
    ac = prior.alphas_cumprod
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    assert torch.equal(ac, scaled_linear_alphas_cumprod(1000, 0.00085, 0.012))
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(prior.cfg.model, subfolder="scheduler")
    assert (ac - sched.alphas_cumprod.double()).abs().max() < 1e-6  # diffusers keeps float32
    assert sched.config.steps_offset == 1 and sched.config.set_alpha_to_one is False


def test_yaml_matches_config_and_builds(tiny_sd_dir):
    from omegaconf import OmegaConf

    from distill.config import build

    node = OmegaConf.load(REPO / "conf/prior/sd21.yaml")
    assert node._target_ == "distill.priors.stable_diffusion.StableDiffusionPrior"
    values = {k: v for k, v in OmegaConf.to_container(node).items() if k != "_target_"}
    assert set(values) == {f.name for f in fields(StableDiffusionPrior.Config)}
    assert values == asdict(StableDiffusionPrior.Config())
    node.model, node.resolution, node.embedding_cache_dir = str(tiny_sd_dir), 64, None
    p = build(node, "prior", device="cpu")
    assert isinstance(p, StableDiffusionPrior) and p.cfg.resolution == 64 and p.dtype == torch.float32


@pytest.mark.parametrize(
    "bad", [dict(dtype="fp8"), dict(attention="flash"), dict(vae_posterior="mode"), dict(resolution=500)]
)
def test_bad_config_raises(tiny_sd_dir, bad):
    with pytest.raises(PriorError, match=next(iter(bad))):
        make_prior(tiny_sd_dir, **bad)
    with pytest.raises(PriorError, match="unknown prior option"):
        StableDiffusionPrior(model=str(tiny_sd_dir), no_such_field=1, device="cpu")


def test_missing_weights_nonexistent_dir(tmp_path):
    with pytest.raises(PriorError) as e:
        StableDiffusionPrior(StableDiffusionPrior.Config(model=str(tmp_path / "nope")), device="cpu")
    msg = str(e.value)
    assert "no such local directory" in msg
    assert "huggingface-cli download stabilityai/stable-diffusion-2-1-base" in msg and "prior.model=" in msg


def test_missing_weights_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local_files_only=None follows it
    cfg = StableDiffusionPrior.Config(model="stabilityai/stable-diffusion-2-1-base", hf_cache_dir=str(tmp_path / "hf"))
    with pytest.raises(PriorError) as e:
        StableDiffusionPrior(cfg, device="cpu")
    msg = str(e.value)
    assert "offline" in msg and "huggingface-cli download stabilityai/stable-diffusion-2-1-base" in msg
    assert e.value.__cause__ is not None  # the hub's own exception is chained


def test_missing_weights_incomplete_dir(tiny_sd_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    for f in (broken / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(PriorError, match="could not load Stable Diffusion weights"):
        StableDiffusionPrior(StableDiffusionPrior.Config(model=str(broken)), device="cpu")
    with pytest.raises(PriorError, match="not a diffusers pipeline directory"):
        StableDiffusionPrior(StableDiffusionPrior.Config(model=str(tiny_sd_dir / "unet")), device="cpu")


# ---------------------------------------------------------------------------------------------
# encode / decode / eps / text


def test_encode_grad_resize_and_posterior(prior, prior_mean, tiny_sd_dir):
    img = smooth_render(requires_grad=True)
    z = prior_mean.encode(img)
    assert z.shape == (1, 4, 8, 8) and z.dtype == torch.float32
    z.pow(2).sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(prior_mean.encode(img), prior_mean.encode(img))  # mean: deterministic
        assert not torch.equal(prior.encode(img), prior.encode(img))  # sample: posterior noise
        # a 96 px render is resized to the configured 64 first
        assert prior_mean.encode(smooth_render(size=96)).shape == (1, 4, 8, 8)
    with pytest.raises(PriorError, match="B, 3, H, W"):
        prior.encode(torch.rand(3, 64, 64))
    # the official path: any render -> 512 -> 4 x 64 x 64, differentiable
    p512 = make_prior(tiny_sd_dir, resolution=512)
    img = smooth_render(requires_grad=True)
    z = p512.encode(img)
    assert z.shape == (1, 4, 64, 64) and p512.latent_shape(64, 64) == (4, 64, 64)
    z.mean().backward()
    assert img.grad.abs().sum() > 0


def test_decode_range(prior_mean):
    with torch.no_grad():
        x = prior_mean.decode(prior_mean.encode(smooth_render()))
    assert x.shape == (1, 3, 64, 64) and x.min() >= 0 and x.max() <= 1


def test_embed_prompts_shape_and_disk_cache(prior, embed_cache, monkeypatch):
    prompts = [PROMPT, "", PROMPT + ", back view", PROMPT]
    emb = prior.embed_prompts(prompts)
    assert emb.shape == (4, 77, 32) and emb.dtype == torch.float32
    assert torch.equal(emb[0], emb[3]) and not torch.equal(emb[0], emb[1])
    files = list(embed_cache.glob("*.pt"))
    assert len(files) >= 3
    # a fresh process (empty memory cache) reads the disk cache and never runs the encoder
    monkeypatch.setattr(prior, "_memory_cache", {})

    def boom(*a, **k):
        raise AssertionError("text encoder called despite the cache")

    monkeypatch.setattr(prior.text_encoder, "forward", boom)
    assert torch.equal(prior.embed_prompts(prompts), emb)
    # the key depends on model id + revision + prompt
    k = prior.embedding_key(PROMPT)
    assert k != prior.embedding_key(PROMPT + " ")
    monkeypatch.setattr(prior, "cfg", replace(prior.cfg, revision="abc123"))
    assert prior.embedding_key(PROMPT) != k
    monkeypatch.setattr(prior, "model_id", "other/model")
    assert prior.embedding_key(PROMPT) != k


@pytest.mark.numerics
def test_embed_prompts_matches_text_encoder_and_warns_on_truncation(prior):
    emb = prior.embed_prompts(["a small red cube"])
    ids = prior.tokenizer(["a small red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = prior.text_encoder(ids)[0]
    close(emb, ref, fp32_tol(ref.abs().max()), "the same text encoder call, fp32 rounding")
    with pytest.warns(UserWarning, match="tokens"):
        assert prior.embed_prompts([" ".join(["word"] * 100)]).shape == (1, 77, 32)


@pytest.mark.numerics
def test_eps_batched_equals_rows_and_counts(prior):
    emb = prior.embed_prompts([PROMPT, ""])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 980])
    e = emb[[0, 1, 0]]
    prior.reset_counters()
    with torch.no_grad():
        out = prior.eps(x, t, e)
        rows = torch.cat([prior.eps(x[i : i + 1], t[i : i + 1], e[i : i + 1]) for i in range(3)])
        scalar_t = prior.eps(x[:2], 500, e[:2])
    assert prior.unet_calls == 5 and prior.unet_rows == 3 + 3 + 2
    tol = fp32_tol(rows.abs().max())  # one batched UNet call vs one call per row: fp32 rounding only
    close(out, rows, tol, "batched vs per-row UNet calls")
    close(scalar_t[1], out[1], tol, "scalar t vs a t per row")
    assert out.shape == x.shape and out.dtype == torch.float32
    with pytest.raises(PriorError, match="rows"):
        prior.eps(x, t, emb)


@pytest.mark.numerics
def test_eps_converts_v_prediction(prior, monkeypatch):
    emb = prior.embed_prompts([PROMPT])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([700])
    with torch.no_grad():
        raw = prior.eps(x, t, emb)
        monkeypatch.setattr(prior, "prediction_type", "v_prediction")
        eps = prior.eps(x, t, emb)
    ab = prior.alphas_cumprod[700].float()
    tol = fp32_tol(max(raw.abs().max(), x.abs().max()), amplification(ab.sqrt(), (1 - ab).sqrt()))
    close(eps, ab.sqrt() * raw + (1 - ab).sqrt() * x, tol, "v -> eps conversion in fp32")


@pytest.mark.numerics
def test_memory_and_speed_options_agree(tiny_sd_dir, prior_mean):
    """slicing / eager / channels_last / low_memory compute the same eps and encode gradient."""
    emb = prior_mean.embed_prompts([PROMPT, ""])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([300, 300])
    img = smooth_render(requires_grad=True)
    prior_mean.encode(img).pow(2).sum().backward()
    ref_grad = img.grad.clone()
    with torch.no_grad():
        ref = prior_mean.eps(x, t, emb)
    # other attention kernels / memory layouts sum in another order: fp32 rounding of one UNet call; the encode
    # gradient goes back through the whole VAE encoder (4 blocks, twice as deep as the UNet here, and a backward):
    # measured <= 30 EPS32 * max|grad| (avx2 and default kernels), allowed 8x that
    eps_tol, grad_tol = fp32_tol(ref.abs().max()), fp32_tol(ref_grad.abs().max(), ulps=256)
    options = (dict(attention="slicing"), dict(attention="eager"), dict(channels_last=True), dict(low_memory=True))
    for kw in (*options, dict(vae_checkpointing=True)):
        p = make_prior(tiny_sd_dir, vae_posterior="mean", **kw)
        with torch.no_grad():
            close(p.eps(x, t, emb), ref, eps_tol, f"eps with {kw}")
        img = smooth_render(requires_grad=True)
        p.encode(img).pow(2).sum().backward()
        close(img.grad, ref_grad, grad_tol, f"d encode / d image with {kw}")
        if kw.get("low_memory") or kw.get("vae_checkpointing"):
            assert p.vae.encoder.gradient_checkpointing
        if kw.get("low_memory"):
            assert next(p.text_encoder.parameters()).dtype == torch.float32
            p.to("cpu")  # moving the prior leaves the text encoder on the CPU
            assert next(p.text_encoder.parameters()).device.type == "cpu"
        if kw.get("attention") == "slicing":
            assert any("Sliced" in type(v).__name__ for v in p.unet.attn_processors.values())


def test_bf16_weights(tiny_sd_dir):
    p = make_prior(tiny_sd_dir, dtype="bf16", vae_posterior="mean")
    assert p.dtype == torch.bfloat16 and p.unet.dtype == torch.bfloat16
    emb = p.embed_prompts([PROMPT])
    img = smooth_render(requires_grad=True)
    z = p.encode(img)
    assert z.dtype == torch.float32
    z.sum().backward()
    with torch.no_grad():
        e = p.eps(z.detach(), torch.tensor([500]), emb)
    assert e.dtype == torch.float32 and torch.isfinite(e).all() and torch.isfinite(img.grad).all()


@pytest.mark.numerics
def test_from_components_without_text_encoder(prior_mean):
    """The benchmark's path: wrap already-built modules (random SD-shaped weights there)."""
    import copy

    p = StableDiffusionPrior.from_components(
        copy.deepcopy(prior_mean.unet),
        copy.deepcopy(prior_mean.vae),
        device="cpu",
        dtype="fp32",
        resolution=64,
        embedding_cache_dir=None,
        vae_posterior="mean",
    )
    assert torch.equal(p.alphas_cumprod, prior_mean.alphas_cumprod) and p.prediction_type == "epsilon"
    emb = prior_mean.embed_prompts([PROMPT])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():  # copies of the same modules, possibly another attention processor: fp32 rounding
        ref_eps, ref_z = prior_mean.eps(x, t, emb), prior_mean.encode(smooth_render())
        close(p.eps(x, t, emb), ref_eps, fp32_tol(ref_eps.abs().max()), "UNet copy")
        close(p.encode(smooth_render()), ref_z, fp32_tol(ref_z.abs().max()), "VAE copy")
    with pytest.raises(PriorError, match="without a text encoder"):
        p.embed_prompts([PROMPT])


@pytest.mark.slow
def test_torch_compile_flag(tiny_sd_dir, prior_mean):
    p = make_prior(tiny_sd_dir, torch_compile=True)
    emb = p.embed_prompts([PROMPT])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        torch.testing.assert_close(p.eps(x, t, emb), prior_mean.eps(x, t, emb), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# end to end with distill.guidance / distill.ddim


def _cameras(azimuths, elevation=10.0):
    from distill.scene.cameras import cameras_from_spherical

    n = len(azimuths)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return cameras_from_spherical(
        full(elevation), torch.tensor(azimuths, dtype=torch.float32), full(1.75), full(55.0), 64, 64
    )


def _processor(prior, perp_neg: bool, view_dependent: bool = True):
    from distill.prompts import PromptConfig, PromptProcessor

    return PromptProcessor(PromptConfig(prompt=PROMPT, view_dependent=view_dependent, perp_neg=perp_neg), prior)


@pytest.mark.numerics
def test_cfg_and_perp_neg_against_hand_computation(prior):
    from distill.guidance import guided_eps

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([600, 600])
    s = 7.5

    def one(xb, tb, e):  # one unbatched UNet row
        with torch.no_grad():
            return prior.eps(xb, tb, e)

    # plain CFG (view-dependent text) -- standard and the official "threestudio" rule
    cond = _processor(prior, perp_neg=False)(_cameras([0.0, 120.0]))
    prior.reset_counters()
    with torch.no_grad():
        got = guided_eps(prior, x, t, cond, s)
        got_ts = guided_eps(prior, x, t, cond, s, rule="threestudio")
    assert prior.unet_calls == 2 and prior.unet_rows == 8  # one batched call each: [cond; uncond]
    front, side = prior.embed_prompts([PROMPT + ", front view", PROMPT + ", side view"])
    for b, e_text in enumerate((front, side)):
        ec = one(x[b : b + 1], t[b : b + 1], e_text[None])
        eu = one(x[b : b + 1], t[b : b + 1], prior.embed_prompts([""]))
        # batched [cond; uncond] call vs separate calls, times the CFG amplification (tests/numerics.py)
        big = max(ec.abs().max(), eu.abs().max())
        close(got[b : b + 1], eu + s * (ec - eu), fp32_tol(big, amplification(1 - s, s)), "CFG 7.5: |1-s| + s = 14")
        close(got_ts[b : b + 1], ec + s * (ec - eu), fp32_tol(big, amplification(1 + s, s)), "threestudio: 1 + 2s = 16")
        assert float((ec - eu).abs().max()) > 10 * fp32_tol(big, amplification(1 + s, s))  # a scale off by 1 fails

    # Perp-Neg: azimuth 30 (front/side interpolation) and 150 (side/back interpolation)
    cond = _processor(prior, perp_neg=True)(_cameras([30.0, 150.0]))
    prior.reset_counters()
    with torch.no_grad():
        got = guided_eps(prior, x, t, cond, s)
    assert prior.unet_calls == 1 and prior.unet_rows == 2 * 4  # [cond; uncond; neg1; neg2] x 2 views
    E = dict(
        zip(("front", "side", "back"), prior.embed_prompts([PROMPT + f", {d} view" for d in ("front", "side", "back")]))
    )
    uncond = prior.embed_prompts([""])[0]
    dec = lambda a, b, c, r: a * math.exp(-b * r) + c  # noqa: E731 - threestudio's weight schedule
    r0 = 1 - 30 / 90  # front-side: r = 1 is fully front
    r1 = 2 - 150 / 90  # side-back: r = 1 is fully side
    hand_views = [
        (
            r0 * E["front"] + (1 - r0) * E["side"],
            [E["front"], E["side"]],
            [-dec(4, 0.5, -2.426, r0), -dec(4, 0.5, -2.426, 1 - r0)],
        ),
        (
            r1 * E["side"] + (1 - r1) * E["back"],
            [E["side"], E["front"]],
            [-dec(1, 0.5, -0.606, r1), -dec(1, 0.5, 0.967, r1)],
        ),
    ]
    for b, (pos, negs, ws) in enumerate(hand_views):
        xb, tb = x[b : b + 1], t[b : b + 1]
        ec, eu = one(xb, tb, pos[None]), one(xb, tb, uncond[None])
        e_pos = ec - eu
        acc = torch.zeros_like(e_pos)
        # rounding budget, in units of one UNet row's error d (tests/numerics.py): eu + s (e_pos + acc) with e_pos and
        # e_neg differences of two rows (2d each); coef = <e_neg, e_pos> / <e_pos, e_pos> moves by at most
        # 2d (|e_pos|_1 + |e_neg|_1 + 2 |coef| |e_pos|_1) / |e_pos|_2^2, and enters times |w| max|e_pos|
        amp = 1 + 2 * s
        big = max(ec.abs().max(), eu.abs().max())
        for neg, w in zip(negs, ws):
            e_neg = one(xb, tb, neg[None]) - eu
            big = max(big, (e_neg + eu).abs().max())
            coef = (e_neg * e_pos).sum() / (e_pos * e_pos).sum()
            acc = acc + w * (e_neg - coef * e_pos)
            d_coef = 2 * (e_pos.abs().sum() * (1 + 2 * coef.abs()) + e_neg.abs().sum()) / (e_pos * e_pos).sum()
            amp += s * abs(w) * (2 + 2 * float(coef.abs()) + float(d_coef * e_pos.abs().max()))
        close(got[b : b + 1], eu + s * (e_pos + acc), fp32_tol(big, amp), f"Perp-Neg, amplification {amp:.0f}")
        close(cond.cond[b], pos, fp32_tol(pos.abs().max(), 2), "r E_a + (1 - r) E_b in fp32")
        ws_ = torch.tensor(ws, dtype=torch.float32)
        close(cond.neg_weights[b], ws_, fp32_tol(6.5), "a exp(-b r) + c in fp32, |a| + |c| <= 6.5")


def _distiller(
    prior, kappa_name: str, schedule: str, fwd: float = 7.5, inv: float = -7.5, reduction="mean", inversion=None
):
    from distill.ddim import InversionConfig
    from distill.guidance import CFGConfig, GuidanceConfig, ScoreDistillation
    from distill.kappa import KappaConfig, make_kappa
    from distill.schedule import TimeSchedule, TimeScheduleConfig

    sched = TimeScheduleConfig(name=schedule, t_min=0.25 if schedule == "anneal" else 0.02, t_max=0.98)
    name = "ddim_inversion" if kappa_name == "ddim_inversion" else "sds"
    return ScoreDistillation(
        prior,
        make_kappa(KappaConfig(name=kappa_name), inversion or InversionConfig()),
        TimeSchedule(sched, prior.num_train_timesteps),
        GuidanceConfig(name=name, loss_reduction=reduction),
        CFGConfig(fwd=fwd, inv=inv),
    )


@pytest.mark.numerics
def test_sds_step_end_to_end(prior):
    cond = _processor(prior, perp_neg=False)(_cameras([10.0]))
    sds = _distiller(prior, "random_resampled", "uniform", reduction="sum")
    img = smooth_render(seed=4, requires_grad=True)
    x0 = prior.encode(img)
    x0.retain_grad()
    prior.reset_counters()
    out = sds.step(x0, cond, step=0, max_steps=100, generator=torch.Generator().manual_seed(0))
    assert 20 <= out.t <= 980 and out.level == out.t
    assert out.model_calls == 1 and prior.unet_calls == 1 and prior.unet_rows == 2  # batched CFG
    out.loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    # paper eq. 3.4: d loss / d x0 = sigma(t) (eps_hat - kappa)   (sum reduction, batch 1)
    ab = prior.alphas_cumprod[out.t].float()
    sigma = ((1 - ab) / ab).sqrt()
    big = max(x0.detach().abs().max(), out.kappa.abs().max())
    amp = amplification(ab.sqrt(), (1 - ab).sqrt())
    close(out.x_t, ab.sqrt() * x0.detach() + (1 - ab).sqrt() * out.kappa, fp32_tol(big, amp), "x_t in fp32")
    # the same eps_hat and kappa tensors, so only the fp32 arithmetic of the loss's backward, times sigma(t)
    big = max(out.eps_hat.abs().max(), out.kappa.abs().max())
    close(x0.grad, sigma * (out.eps_hat - out.kappa), fp32_tol(big, 2 * sigma), "sigma(t) (eps_hat - kappa)")


@pytest.mark.parametrize("step,t_expected,calls", [(0, 980, 11), (100, 250, 4)])
@pytest.mark.numerics
def test_sdi_step_end_to_end(prior, step, t_expected, calls):
    """Official SDI: Perp-Neg, inversion at CFG -7.5 on the leading grid, eta 0.3, jump to t + delta."""
    cond = _processor(prior, perp_neg=True)(_cameras([-60.0]))
    sdi = _distiller(prior, "ddim_inversion", "anneal")
    img = smooth_render(seed=5, requires_grad=True)
    x0 = prior.encode(img)
    prior.reset_counters()
    out = sdi.step(x0, cond, step=step, max_steps=100, generator=torch.Generator().manual_seed(0))
    assert out.t == t_expected and t_expected <= out.level < t_expected + 100
    # 1 + ceil((t - 1) / 100) inversion calls + 1 forward, each one batched UNet call of 4 rows
    assert calls == 1 + math.ceil((t_expected - 1) / 100)
    assert out.model_calls == calls + 1 == prior.unet_calls
    assert prior.unet_rows == 4 * (calls + 1)
    ab = prior.alphas_cumprod[out.level].float()
    # kappa = (x_t - sqrt(ab) x0) / sqrt(1 - ab) from the inverted x_t: re-noising gives x_t back up to fp32 rounding
    big = max(x0.detach().abs().max(), out.kappa.abs().max(), out.x_t.abs().max())
    amp = 1 + amplification(ab.sqrt(), (1 - ab).sqrt())
    close(out.x_t, ab.sqrt() * x0.detach() + (1 - ab).sqrt() * out.kappa, fp32_tol(big, amp), "x_t = noised x0")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def _roundtrip(prior, x0, cond, t, n_steps):
    """DDIM-invert x0 to t at CFG 1 (eta 0, no delta), then DDIM-generate back on the same grid."""
    from distill.ddim import InversionConfig, alpha_bar_at, ddim_invert, ddim_step, inversion_timesteps
    from distill.guidance import guided_eps

    cfg = InversionConfig(n_steps=n_steps, eta=0.0, jump="none")
    ab = prior.alphas_cumprod
    eps_fn = lambda x, tt: guided_eps(prior, x, tt, cond, 1.0)  # noqa: E731
    x_t, level, _ = ddim_invert(x0, t, eps_fn, ab, cfg)
    assert level == t
    levels = inversion_timesteps(t, cfg, 1000, 0)
    x = x_t
    with torch.no_grad():
        for s_prev, s in reversed(list(zip(levels[:-1], levels[1:]))):
            label = torch.full((x.shape[0],), max(s, 0), dtype=torch.long)
            x = ddim_step(x, eps_fn(x, label), alpha_bar_at(ab, s), alpha_bar_at(ab, s_prev))
    return x_t, x


def test_ddim_inversion_regeneration_roundtrip(prior_mean):
    """Measured on the tiny pipeline (unit-std latents), relative L2 error ||x0' - x0|| / ||x0||:
    10-point grid: 0.018 at t=250, 0.065 at t=500; 50-point grid at t=500: 0.013 (first order
    in the step). At t=980 the random UNet makes inversion diverge (rel. error ~1.5), as DDIM
    inversion near pure noise is known to; not asserted."""
    cond = _processor(prior_mean, perp_neg=False, view_dependent=False)(None, 1)
    with torch.no_grad():
        x0 = prior_mean.encode(smooth_render(seed=0))
    rel = lambda a: float((a - x0).norm() / x0.norm())  # noqa: E731
    x_t, back = _roundtrip(prior_mean, x0, cond, 250, 10)
    x_t2, back2 = _roundtrip(prior_mean, x0, cond, 250, 10)
    assert torch.equal(x_t, x_t2) and torch.equal(back, back2)  # deterministic (eta 0, no delta)
    assert rel(x_t) > 0.1  # it did move away from x0
    assert rel(back) < 0.03
    e10 = rel(_roundtrip(prior_mean, x0, cond, 500, 10)[1])
    e50 = rel(_roundtrip(prior_mean, x0, cond, 500, 50)[1])
    assert e10 < 0.1 and e50 < e10 / 3
