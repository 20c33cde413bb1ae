#!/usr/bin/env python
"""Time one full SDS / SDI step with a Stable Diffusion 2.1-base-shaped UNet + VAE.

Random weights built from the architecture configs below (nothing is downloaded). One step is
what training pays per iteration, minus the renderer:

    render (1, 3, R, R), requires grad -> resize to --resolution -> VAE encode (with grad)
    -> t -> kappa (SDS: N(0, I); SDI: DDIM inversion at CFG -7.5, eta 0.3, jump to t + delta)
    -> guided UNet prediction at CFG 7.5 (Perp-Neg by default: 4 rows per call)
    -> x0_hat -> loss 0.5 * mse -> backward to the render.

Two implementations run in the same process on the same modules:
  ours      distill.priors.stable_diffusion.StableDiffusionPrior + distill.guidance.ScoreDistillation
  official  a plain re-implementation of the official SDI code (threestudio's
            stable_diffusion_sdi_guidance.py): per call it concatenates the CFG / Perp-Neg rows
            ([x] * 4 with Perp-Neg, [x] * 2 without), weights in --dtype (official: fp16), leading
            inversion grid 1, 101, ..., 901 below t after a leading step from alpha_bar(0) (queried
            with label -99 as the official code does), a final jump to t + delta, eta noise from
            randn_like, x0 through DDIMScheduler.step.

Reported per (implementation, variant, method, t): time per step (ms), UNet calls and rows per
step, peak memory (CUDA: max_memory_allocated during a step; CPU: process peak RSS). The official
loop and ours (plain) are timed interleaved, step by step, on the same modules; the optional
variants (--channels-last, --low-memory, --compile) change the modules in place and are timed
after, one at a time.

Also reported, per (implementation, variant): a projection of a whole SDI run (--project-steps,
default 10k) with t annealed linearly 0.98 -> 0.25: ms/step = a + b * calls fitted to the SDI cases,
averaged over the run's per-step call counts (8.625 on average), against --goal-minutes / --goal-gb.
Prior only; the renderer is not in these steps. --project-only FILE.json recomputes it, timing nothing.

    python benchmarks/bench_sd_step.py --device cuda --dtype fp16 --resolution 512 \
        --out benchmarks/results/sd_step_h100.json [--channels-last] [--compile] [--low-memory]
    python benchmarks/bench_sd_step.py --device cpu --dtype fp32 --resolution 128 --t 250 \
        --iters 2 --warmup 1 --out benchmarks/results/sd_step_cpu.json

Needs only torch and diffusers (the project's src/ is put on sys.path).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.priors.stable_diffusion import SD21_SCHEDULER  # noqa: E402
from distill.provenance import produced  # noqa: E402

# stabilityai/stable-diffusion-2-1-base unet/config.json (the fields that shape compute)
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=False,
)
# stabilityai/stable-diffusion-2-1-base vae/config.json
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# --arch tiny: same block layout, a few channels (smoke tests of this script only)
TINY_UNET = dict(
    UNET_CONFIG,
    block_out_channels=(32, 64, 64, 64),
    attention_head_dim=(2, 4, 4, 4),
    layers_per_block=1,
    norm_num_groups=8,
)
TINY_VAE = dict(VAE_CONFIG, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
SCHEDULER_CONFIG = SD21_SCHEDULER  # stabilityai/stable-diffusion-2-1-base's, as a DDIM scheduler
TEXT_LEN, TEXT_DIM = 77, 1024
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB -> MiB


def peak_reserved_mb(device: torch.device) -> float | None:
    # what the caching allocator held from the driver (closer to nvidia-smi, minus the CUDA context)
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build_models(device: torch.device, dtype: torch.dtype, seed: int, arch: str = "sd21-base"):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    ucfg, vcfg = (UNET_CONFIG, VAE_CONFIG) if arch == "sd21-base" else (TINY_UNET, TINY_VAE)
    torch.manual_seed(seed)
    try:
        with torch.device(device):  # initialise on the device (fast on GPU)
            unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
    except Exception:  # noqa: BLE001 - older torch / diffusers: build on the CPU
        unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
    for m in (unet, vae):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return unet, vae


def random_text(device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    e = lambda: torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g).to(device)  # noqa: E731
    # Perp-Neg rows of a front/side view at azimuth 30 deg: positive, uncond, two negatives
    return {
        "cond": e(),
        "uncond": e(),
        "neg1": e(),
        "neg2": e(),
        "weights": torch.tensor(
            [[-(4 * math.exp(-0.5 * (2 / 3)) - 2.426), -(4 * math.exp(-0.5 * (1 / 3)) - 2.426)]], device=device
        ),
    }


# ------------------------------------------------------------------------------------------------
# the official loop, re-implemented plainly


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # threestudio.utils.ops (torch.norm over 3 dims, written as vector_norm for newer torch)
    ny2 = torch.linalg.vector_norm(y, dim=(1, 2, 3)) ** 2
    return (
        x - (torch.mul(x, y).sum(dim=[1, 2, 3]) / torch.maximum(ny2, torch.ones_like(ny2) * 1e-6)).view(-1, 1, 1, 1) * y
    )


class OfficialSDI:
    def __init__(
        self, unet, vae, device, weights_dtype, resolution, perp_neg, text, eta=0.3, n_inv=10, cfg_fwd=7.5, cfg_inv=-7.5
    ):
        from diffusers import DDIMScheduler

        self.unet, self.vae, self.device, self.wd = unet, vae, device, weights_dtype
        self.resolution, self.perp_neg, self.eta, self.n_inv = resolution, perp_neg, eta, n_inv
        self.cfg_fwd, self.cfg_inv = cfg_fwd, cfg_inv
        self.scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.scheduler.set_timesteps(50, device=device)
        self.initial_alpha_cumprod = self.scheduler.alphas_cumprod[0]  # DDIMInverseScheduler, set_alpha_to_one=False
        if perp_neg:
            self.text = torch.cat([text["cond"], text["uncond"], text["neg1"], text["neg2"]])
            self.neg_w = text["weights"]
        else:
            self.text = torch.cat([text["cond"], text["uncond"]])
        self.calls = self.rows = 0

    def forward_unet(self, latents, t, encoder_hidden_states):
        self.calls += 1
        self.rows += latents.shape[0]
        return self.unet(
            latents.to(self.wd), t.to(self.wd), encoder_hidden_states=encoder_hidden_states.to(self.wd)
        ).sample.to(latents.dtype)

    def encode_images(self, imgs):
        input_dtype = imgs.dtype
        imgs = imgs * 2.0 - 1.0
        posterior = self.vae.encode(imgs.to(self.wd)).latent_dist
        return (posterior.sample() * self.vae.config.scaling_factor).to(input_dtype)

    @torch.no_grad()
    def predict_noise(self, latents_noisy, t, guidance_scale):
        B = latents_noisy.shape[0]
        if self.perp_neg:
            noise_pred = self.forward_unet(torch.cat([latents_noisy] * 4), torch.cat([t] * 4), self.text)
            text, uncond, neg = noise_pred[:B], noise_pred[B : 2 * B], noise_pred[2 * B :]
            e_pos = text - uncond
            accum = 0
            n_neg = self.neg_w.shape[-1]
            for i in range(n_neg):
                e_i = neg[i::n_neg] - uncond
                accum += self.neg_w[:, i].view(-1, 1, 1, 1) * perpendicular_component(e_i, e_pos)
            return uncond + guidance_scale * (e_pos + accum)
        noise_pred = self.forward_unet(torch.cat([latents_noisy] * 2), torch.cat([t] * 2), self.text)
        text, uncond = noise_pred.chunk(2)
        return text + guidance_scale * (text - uncond)

    def ddim_inversion_step(self, model_output, timestep, prev_timestep, sample):
        ac = self.scheduler.alphas_cumprod
        alpha_prod_t = ac[timestep] if timestep >= 0 else self.initial_alpha_cumprod
        alpha_prod_t_prev = ac[prev_timestep]
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + (1 - alpha_prod_t_prev) ** 0.5 * model_output
        variance = self.scheduler._get_variance(prev_timestep, timestep) ** 0.5
        return prev_sample + self.eta * torch.randn_like(prev_sample) * variance

    def get_inversion_timesteps(self, invert_to_t, B):
        T = self.scheduler.config.num_train_timesteps
        step_ratio = T // self.n_inv
        timesteps = (np.arange(0, self.n_inv) * step_ratio).round().copy().astype(np.int64)
        timesteps += self.scheduler.config.steps_offset
        timesteps = timesteps[timesteps < int(invert_to_t)]
        timesteps = np.concatenate([[int(timesteps[0] - step_ratio)], timesteps])
        timesteps = torch.from_numpy(timesteps).to(self.device)
        delta_t = int(random.random() * T // self.n_inv)
        with warnings.catch_warnings():  # the official code builds a tensor from a tensor here
            warnings.simplefilter("ignore", UserWarning)
            last_t = torch.tensor(min(invert_to_t + delta_t, T - 1), device=self.device)
        return torch.cat([timesteps, last_t.repeat([B])])

    @torch.no_grad()
    def invert_noise(self, start_latents, invert_to_t):
        latents = start_latents.clone()
        B = start_latents.shape[0]
        timesteps = self.get_inversion_timesteps(invert_to_t, B)
        for t, next_t in zip(timesteps[:-1], timesteps[1:]):
            noise_pred = self.predict_noise(latents, t.repeat([B]), self.cfg_inv)
            latents = self.ddim_inversion_step(noise_pred, t, next_t, latents)
        alpha = self.scheduler.alphas_cumprod[next_t]
        noise = (latents - start_latents * alpha**0.5) / (1 - alpha) ** 0.5
        return latents, noise

    def step(self, rgb_BCHW, t_int: int, sdi: bool):
        B = rgb_BCHW.shape[0]
        rgb = F.interpolate(rgb_BCHW, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        latents = self.encode_images(rgb)
        t = torch.full((B,), t_int, dtype=torch.long, device=self.device)
        with torch.no_grad():
            if sdi:
                latents_noisy, noise = self.invert_noise(latents, t)
            else:
                noise = torch.randn_like(latents)
                latents_noisy = self.scheduler.add_noise(latents, noise, t)
            noise_pred = self.predict_noise(latents_noisy, t, self.cfg_fwd)
            target = self.scheduler.step(noise_pred, t[0], latents_noisy, return_dict=True)["pred_original_sample"]
        loss = 0.5 * F.mse_loss(latents, target.detach(), reduction="mean") / B
        loss.backward()
        return loss


# ------------------------------------------------------------------------------------------------
# ours


class Ours:
    def __init__(self, unet, vae, device, args, text, variant: str):
        from distill.ddim import InversionConfig
        from distill.guidance import CFGConfig, GuidanceConfig, ScoreDistillation
        from distill.kappa import KappaConfig, make_kappa
        from distill.priors.stable_diffusion import StableDiffusionPrior
        from distill.prompts import Conditioning
        from distill.schedule import TimeSchedule, TimeScheduleConfig

        self.prior = StableDiffusionPrior.from_components(
            unet,
            vae,
            device=device,
            model="random-init/sd21-base-shaped",
            dtype=args.dtype,
            resolution=args.resolution,
            embedding_cache_dir=None,
            channels_last=variant == "channels_last",
            torch_compile=variant == "compile",
            compile_mode=args.compile_mode,
            low_memory=variant == "low_memory",
        )
        if args.perp_neg:
            self.cond = Conditioning(
                text["cond"], text["uncond"], torch.stack([text["neg1"], text["neg2"]]), text["weights"]
            )
        else:
            self.cond = Conditioning(text["cond"], text["uncond"])
        self.gen = torch.Generator().manual_seed(args.seed)
        self.sd = {}
        for name, kappa in (("sds", "random_resampled"), ("sdi", "ddim_inversion")):
            self.sd[name] = ScoreDistillation(
                self.prior,
                make_kappa(KappaConfig(name=kappa), InversionConfig()),
                TimeSchedule(TimeScheduleConfig(), 1000),
                GuidanceConfig(name="sds" if name == "sds" else "ddim_inversion"),
                CFGConfig(fwd=7.5, inv=-7.5),
            )

    def step(self, render, t_int: int, sdi: bool):
        sd = self.sd["sdi" if sdi else "sds"]
        sd.schedule = lambda step, max_steps, generator=None: t_int  # a fixed t for timing
        x0 = self.prior.encode(render)
        out = sd.step(x0, self.cond, 0, 1000, self.gen)
        out.loss.backward()
        return out.loss


def expected_calls(method: str, t: int) -> int:
    return 1 if method == "sds" else 1 + (1 + math.ceil((t - 1) / 100))


def anneal_calls(steps: int, t_min: float, t_max: float, T: int = 1000) -> list[int]:
    """UNet calls of each SDI step of a run: t = int(T (t_min + (t_max - t_min)(1 - step/steps)))
    (distill.schedule, name=anneal), calls = 1 forward + 1 + ceil((t - 1)/100) inversion calls."""
    ts = [int(T * (t_min + (t_max - t_min) * (1.0 - s / max(steps, 1)))) for s in range(steps)]
    return [expected_calls("sdi", t) for t in ts]


def anneal_projection(
    results: list[dict],
    steps: int = 10000,
    t_min: float = 0.25,
    t_max: float = 0.98,
    goal_min: float = 20.0,
    goal_gb: float = 24.0,
) -> list[dict]:
    """Per (impl, variant): fit ms/step = a + b * calls to the measured SDI steps (least squares; with a
    single SDI t the SDS step is added as a second point), average it over the anneal's per-step
    call counts and scale to `steps`. Prior only: renderer and optimizer are not in these steps."""
    calls = anneal_calls(steps, t_min, t_max)
    mean_calls = sum(calls) / len(calls)
    out = []
    for impl, variant in dict.fromkeys((r["impl"], r["variant"]) for r in results):
        rs = [r for r in results if r["impl"] == impl and r["variant"] == variant]
        pts = [(r["unet_calls_per_step"], r["ms_median"]) for r in rs if r["method"] == "sdi"]
        if len({c for c, _ in pts}) < 2:
            pts += [(r["unet_calls_per_step"], r["ms_median"]) for r in rs if r["method"] == "sds"]
        if not pts:
            continue
        if len({c for c, _ in pts}) >= 2:
            mc = statistics.fmean(c for c, _ in pts)
            mt = statistics.fmean(t for _, t in pts)
            b = sum((c - mc) * (t - mt) for c, t in pts) / sum((c - mc) ** 2 for c, _ in pts)
            a = mt - b * mc
        else:  # one point: all of its time scales with the calls
            a, b = 0.0, pts[0][1] / pts[0][0]
        ms_step = a + b * mean_calls
        peak = max(r["peak_mem_mb"] for r in rs)
        peak_res = max((r.get("peak_reserved_mb") or 0.0) for r in rs) or None
        total_min = ms_step * steps / 6e4
        out.append(
            dict(
                impl=impl,
                variant=variant,
                steps=steps,
                t_min=t_min,
                t_max=t_max,
                mean_unet_calls_per_step=mean_calls,
                fit_ms_fixed=a,
                fit_ms_per_call=b,
                ms_per_step=ms_step,
                total_min=total_min,
                peak_mem_mb=peak,
                peak_reserved_mb=peak_res,
                time_goal_met=total_min <= goal_min,
                mem_goal_met=max(peak, peak_res or 0.0) <= goal_gb * 1000**3 / 2**20,
            )
        )
    return out


def print_projection(proj: list[dict], goal_min: float, goal_gb: float) -> None:
    if not proj:
        return
    p0 = proj[0]
    print(
        f"\nprojection: {p0['steps']} SDI steps, t {p0['t_max']:.2f} -> {p0['t_min']:.2f} linear,"
        f" {p0['mean_unet_calls_per_step']:.3f} UNet calls per step on average (prior only, no render);"
        f" goal <= {goal_min:g} min, <= {goal_gb:g} GB"
    )
    for p in proj:
        print(
            f"  {p['impl']:9s} {p['variant']:14s} {p['fit_ms_fixed']:8.1f} ms + {p['fit_ms_per_call']:8.1f} ms/call"
            f" -> {p['ms_per_step']:9.1f} ms/step, {p['total_min']:8.1f} min  (time goal met: {p['time_goal_met']},"
            f" memory goal met: {p['mem_goal_met']})"
        )


def time_cases(entries, device, warmup: int, iters: int, render) -> dict[str, dict]:
    """Time several implementations of the same case, interleaved round by round (A B A B ...),
    so slow drifts of a shared machine hit all of them alike. entries: (key, step_fn, counter)."""
    for _ in range(warmup):
        for _, fn, _ in entries:
            render.grad = None
            fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    acc = {key: dict(times=[], peak=0.0, peak_res=0.0, c0=counter(), finite=True) for key, _, counter in entries}
    for _ in range(iters):
        for key, fn, _ in entries:
            a = acc[key]
            render.grad = None
            sync(device)
            reset_peak(device)
            t0 = time.perf_counter()
            loss = fn()
            sync(device)
            a["times"].append(time.perf_counter() - t0)
            a["peak"] = max(a["peak"], peak_mb(device))
            a["peak_res"] = max(a["peak_res"], peak_reserved_mb(device) or 0.0)
            a["finite"] &= bool(torch.isfinite(loss).item()) and bool(torch.isfinite(render.grad).all().item())
    out = {}
    for key, _, counter in entries:
        a, c1 = acc[key], counter()
        ts = a["times"]
        out[key] = dict(
            ms_mean=1e3 * statistics.fmean(ts),
            ms_median=1e3 * statistics.median(ts),
            ms_std=1e3 * (statistics.stdev(ts) if len(ts) > 1 else 0.0),
            ms_min=1e3 * min(ts),
            unet_calls_per_step=(c1[0] - a["c0"][0]) / iters,
            unet_rows_per_step=(c1[1] - a["c0"][1]) / iters,
            peak_mem_mb=a["peak"],
            peak_reserved_mb=a["peak_res"] if device.type == "cuda" else None,
            finite=a["finite"],
        )
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--arch",
        default="sd21-base",
        choices=["sd21-base", "tiny"],
        help="tiny: a few channels, to smoke-test this script",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    ap.add_argument("--resolution", type=int, default=None, help="VAE input size (default 512 cuda, 128 cpu)")
    ap.add_argument("--render", type=int, default=None, help="render size before the resize (default = resolution)")
    ap.add_argument("--t", type=int, nargs="+", default=None, help="SDI target t values (default 980 615 250; cpu 250)")
    ap.add_argument("--sds-t", type=int, default=500)
    ap.add_argument("--iters", type=int, default=None, help="timed steps per case (default 10 cuda, 2 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 3 cuda, 1 cpu)")
    ap.add_argument("--no-perp-neg", dest="perp_neg", action="store_false", help="plain CFG (2 rows per call)")
    ap.add_argument("--channels-last", action="store_true", help="also time ours with channels_last")
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile(unet)")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--low-memory", action="store_true", help="also time ours with prior.low_memory=true")
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--project-steps", type=int, default=10000, help="SDI run length for the projection")
    ap.add_argument("--goal-minutes", type=float, default=20.0)
    ap.add_argument("--goal-gb", type=float, default=24.0, help="peak memory goal, GB (10^9 bytes)")
    ap.add_argument(
        "--project-only",
        default=None,
        metavar="JSON",
        help="no timing: read a results JSON, (re)compute its projection, print it (and write --out)",
    )
    args = ap.parse_args(argv)
    if args.project_only:
        report = json.loads(Path(args.project_only).read_text())
        report["projection"] = anneal_projection(
            report["results"], args.project_steps, goal_min=args.goal_minutes, goal_gb=args.goal_gb
        )
        print_projection(report["projection"], args.goal_minutes, args.goal_gb)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        return report

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.resolution = args.resolution or (512 if cuda else 128)
    args.render = args.render or args.resolution
    args.t = args.t or ([980, 615, 250] if cuda else [250])
    args.iters = args.iters or (10 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # no "modules kept in float32" notes on .to(dtype)
    t0 = time.perf_counter()
    unet, vae = build_models(device, dtype, args.seed, args.arch)
    build_s = time.perf_counter() - t0
    sync(device)
    static_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    text = random_text(device, args.seed)
    render = torch.rand(1, 3, args.render, args.render, generator=torch.Generator().manual_seed(args.seed)).to(device)
    render.requires_grad_(True)

    cases = [("sds", args.sds_t)] + [("sdi", t) for t in args.t]
    results = []

    def record(impl, variant, method, t, r):
        r = dict(impl=impl, variant=variant, method=method, t=t, expected_unet_calls=expected_calls(method, t), **r)
        results.append(r)
        print(
            f"  {impl:8s} {variant:13s} {method} t={t:4d}: {r['ms_median']:9.1f} ms"
            f"  calls {r['unet_calls_per_step']:.1f}"
            f"  rows {r['unet_rows_per_step']:.0f}  peak {r['peak_mem_mb']:.0f} MiB  finite={r['finite']}",
            flush=True,
        )

    # plain: the official loop and ours interleaved on the same (untouched) modules
    off = None if args.skip_official else OfficialSDI(unet, vae, device, dtype, args.resolution, args.perp_neg, text)
    ours = Ours(unet, vae, device, args, text, "plain")
    for method, t in cases:
        entries = [
            (
                "ours",
                lambda ours=ours, t=t, method=method: ours.step(render, t, method == "sdi"),
                lambda ours=ours: (ours.prior.unet_calls, ours.prior.unet_rows),
            )
        ]
        if off is not None:
            run_official = lambda t=t, method=method: off.step(render, t, method == "sdi")  # noqa: E731
            entries.insert(0, ("official", run_official, lambda: (off.calls, off.rows)))
        res = time_cases(entries, device, args.warmup, args.iters, render)
        for impl, r in res.items():
            record(impl, "plain", method, t, r)
    del ours

    # variants change the shared modules in place: timed after, one at a time, then undone
    variants = [
        v
        for v, on in (("channels_last", args.channels_last), ("low_memory", args.low_memory), ("compile", args.compile))
        if on
    ]
    for variant in variants:
        procs = unet.attn_processors
        ours = Ours(unet, vae, device, args, text, variant)
        p = ours.prior
        for method, t in cases:
            warm = args.warmup + (2 if variant == "compile" else 0)
            res = time_cases(
                [
                    (
                        "ours",
                        lambda ours=ours, t=t, method=method: ours.step(render, t, method == "sdi"),
                        lambda p=p: (p.unet_calls, p.unet_rows),
                    )
                ],
                device,
                warm,
                args.iters,
                render,
            )
            record("ours", variant, method, t, res["ours"])
        unet.to(memory_format=torch.contiguous_format)
        vae.to(memory_format=torch.contiguous_format)
        unet.set_attn_processor(procs)
        if variant == "low_memory":
            vae.disable_gradient_checkpointing()
            vae.use_slicing = False
        del ours, p
        if variant == "compile":
            torch._dynamo.reset()

    speedups = {}
    for r in results:
        if r["impl"] != "ours":
            continue
        ref = next(
            (o for o in results if o["impl"] == "official" and o["method"] == r["method"] and o["t"] == r["t"]), None
        )
        if ref:
            speedups[f"{r['variant']}/{r['method']}@{r['t']}"] = ref["ms_median"] / r["ms_median"]

    report = dict(
        benchmark="sd_step",
        produced=produced(),  # commit, torch, CPU capability, date (distill.provenance)
        arch=args.arch,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        python=platform.python_version(),
        dtype=args.dtype,
        resolution=args.resolution,
        render=args.render,
        perp_neg=args.perp_neg,
        rows_per_unet_call=4 if args.perp_neg else 2,
        iters=args.iters,
        warmup=args.warmup,
        threads=torch.get_num_threads(),
        unet_params_m=sum(p.numel() for p in unet.parameters()) / 1e6,
        vae_params_m=sum(p.numel() for p in vae.parameters()) / 1e6,
        model_build_s=build_s,
        static_mem_mb=static_mb,
        memory_note=(
            "torch.cuda.max_memory_allocated during one step (max over the timed steps)"
            if cuda
            else "process peak RSS (ru_maxrss), cumulative over the run"
        ),
        results=results,
        speedup_official_over_ours=speedups,
        projection=anneal_projection(results, args.project_steps, goal_min=args.goal_minutes, goal_gb=args.goal_gb),
        command=" ".join(["python"] + sys.argv) if argv is None else None,
    )
    print("\nimpl      variant        method   t     median ms   mean ms   calls  rows  peak MiB")
    for r in results:
        print(
            f"{r['impl']:9s} {r['variant']:14s} {r['method']:6s} {r['t']:4d} {r['ms_median']:11.1f} {r['ms_mean']:9.1f}"
            f" {r['unet_calls_per_step']:6.1f} {r['unet_rows_per_step']:5.0f} {r['peak_mem_mb']:9.0f}"
        )
    print_projection(report["projection"], args.goal_minutes, args.goal_gb)
    if speedups:
        print("speed-up (official time / ours): " + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
