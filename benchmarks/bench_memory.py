#!/usr/bin/env python
"""Where the memory of one SDI training step goes, part by part, and what each memory lever saves (issue 20).

    python benchmarks/bench_memory.py render --resolutions 128 192 256 [--state dense|blob] [--levers all]
    python benchmarks/bench_memory.py vae --resolutions 128 256 [--dtype fp32]
    python benchmarks/bench_memory.py unet --latents 16 32 [--rows 4]
    python benchmarks/bench_memory.py steps --model DIR [--guidance ddim_inversion sds vsd] [--resolution 512]
    python benchmarks/bench_memory.py render vae steps --model DIR ...    # several parts, one JSON

render: the official NeRF scene (conf/scene/nerf.yaml; torch hash grid) rendered as in training (one 1-view batch,
    random shading and light, stratified jitter), forward + backward of the render's loss (rgb + the official
    regularisers), then one Adam step. Scene state ``dense``: a synthetic dense object (a snowman of two spheres,
    sigma 20 inside, fitted by 40 Adam steps of density regression: mean sigma 18 inside, 0.05 outside; then 4
    occupancy updates of a fresh grid) at step 6000 (all 16 hash levels active, the late-training state); ``blob``:
    bench_render.py's initial blob at step 1000 (8 levels).
    Per lever setting: field samples, saved-activation bytes (distill.memory.SavedBytes: exact, 1:1 the activation
    memory a GPU holds in fp32) split into encoding / mlp / field (normals, activations) / compositing (dense
    rays x samples tensors, shading) / background, the peak memory of forward + backward above the memory before
    it (CPU: peak RSS, reset per row; CUDA: max_memory_allocated), and the time (on a shared CPU: indicative).
    Levers: ``fd`` normal_type=finite_difference; ``no_normals`` an albedo step whose regularisers do not use normals
    (what normals=auto skips); ``chunk`` renderer.chunk_rays=16384 alone; ``ckpt`` chunk_rays=16384 + checkpoint;
    ``bf16`` / ``fp16`` field_autocast; ``ckpt_bf16`` both.
vae: the SD-2.1-base-shaped VAE (random weights, benchmarks/bench_sd_step.py's config) encoding one render with grad
    and its backward, with and without VAE gradient checkpointing (prior.vae_checkpointing).
unet: one no-grad UNet call (SD-2.1-base-shaped, random weights) of ``rows`` rows (4 = Perp-Neg CFG), as SDI's
    inversion and prediction calls are: weights (counted) and the forward's transient peak.
steps: the whole training step through compose_config + Trainer (benchmarks/bench_train_step.py's bench_method) per
    method, levers off and on: the memory column of the cost table (CUDA: peak allocated and reserved per method;
    CPU: the process's peak RSS, only meaningful for the first row of a process).

Every row is written to --out (JSON) with the command, torch version, device and host load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from distill.memory import SavedBytes, exact_rss_mode, peak_rss_bytes, peak_rss_reset, rss_bytes  # noqa: E402
from distill.provenance import produced  # noqa: E402

PLAIN = {"chunk_rays": 0, "checkpoint": False}  # the reference render (the defaults chunk and checkpoint)
LEVERS = {
    "off": {**PLAIN},
    "fd": {**PLAIN, "normal_type": "finite_difference"},
    "no_normals": {**PLAIN, "albedo_no_normal_regs": True},
    "chunk": {**PLAIN, "chunk_rays": 16384},
    "ckpt": {"chunk_rays": 16384, "checkpoint": True},
    "bf16": {**PLAIN, "field_autocast": "bf16"},
    "fp16": {**PLAIN, "field_autocast": "fp16"},
    "ckpt_bf16": {"chunk_rays": 16384, "checkpoint": True, "field_autocast": "bf16"},
    "ckpt_fp16": {"chunk_rays": 16384, "checkpoint": True, "field_autocast": "fp16"},
}
GB = 1e9


# ------------------------------------------------------------------------------------------------ memory probes
class Peak:
    """Peak memory of a block above the memory in use when it starts (CPU: RSS high-water mark; CUDA: allocated)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.reset_ok = peak_rss_reset()
            self.base = rss_bytes() or 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes() or 0
        self.delta = self.peak - self.base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ render
def snowman_density(x: torch.Tensor) -> torch.Tensor:
    """sigma 20 inside two spheres (body r 0.5 at z -0.25, head r 0.32 at z 0.45), smooth 0.03 edge, 0 outside."""
    centres = torch.tensor([[0.0, 0.0, -0.25], [0.0, 0.0, 0.45]], device=x.device, dtype=x.dtype)
    radii = torch.tensor([0.5, 0.32], device=x.device, dtype=x.dtype)
    sd = ((x[:, None, :] - centres).norm(dim=-1) - radii).min(dim=1).values
    return 20.0 * torch.sigmoid(-sd / 0.03)


def build_scene(state: str, device: torch.device, lever: dict, seed: int = 0):
    from distill.scene.nerf import NeRFScene

    cfg = NeRFScene.Config()  # conf/scene/nerf.yaml's values (tests/test_renderer.py checks they agree)
    cfg.encoding.backend = "torch"
    for k in ("normal_type", "field_autocast"):
        if k in lever:
            setattr(cfg, k, lever[k])
    for k in ("chunk_rays", "checkpoint"):
        if k in lever:
            setattr(cfg.renderer, k, lever[k])
    if lever.get("albedo_no_normal_regs"):  # an albedo step whose regularisers do not use normals
        cfg.material.diffuse_prob = 0.0
        r = cfg.regularisers
        r.orientation.start = r.orientation.end = r.convexity.start = r.convexity.end = 0.0
    scene = NeRFScene(cfg).to(device)
    return scene, cfg


_FITTED: dict = {}


def fit_dense(scene, device: torch.device, steps: int = 40, seed: int = 0) -> dict:
    """Regress sigma to the snowman at random points (all 16 levels active), then settle the occupancy grid."""
    scene.encoding.active_levels.fill_(scene.cfg.encoding.n_levels)
    opt = torch.optim.Adam(scene.param_groups())
    g = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = ((torch.rand(8192, 3, generator=g) * 2 - 1) * 1.0).to(device)
        loss = ((scene.density(x) - snowman_density(x)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    scene.renderer.grid.occ.zero_()  # forget the initial blob: the grid of the fitted field alone
    for s in range(4):
        scene.update_occupancy(16 * s)
    return {
        "fit_steps": steps,
        "fit_loss": float(loss.detach()),
        "fit_s": time.perf_counter() - t0,
        "occupied": float(scene.renderer.grid.binary.float().mean()),
    }


def prepare(state: str, device: torch.device, lever: dict):
    scene, cfg = build_scene(state, device, lever)
    info = {}
    if state == "dense":
        key = str(device)
        if key not in _FITTED:  # fit once, then load the fitted state into every lever's scene
            base, _ = build_scene(state, device, {})
            info = fit_dense(base, device)
            _FITTED[key] = ({k: v.clone() for k, v in base.state_dict().items()}, info)
        sd, info = _FITTED[key]
        scene.load_state_dict(sd)
        step = 6000
    else:
        step = 1000
    if state == "dense":  # the fitted grid and levels as they are (no occupancy update at this step)
        scene.encoding.update_step(step)
        scene.step.fill_(step)
    else:
        scene.update_step(step, 10000)
    return scene, step, info


def render_row(state: str, res: int, lever_name: str, device: torch.device, seed: int) -> dict:
    from distill.scene.cameras import orbit_cameras

    lever = LEVERS[lever_name]
    scene, step, info = prepare(state, device, lever)
    cams = orbit_cameras(1, res, res, elevation_deg=15.0, distance=1.75, fovy_deg=55.0)
    opt = torch.optim.Adam(scene.param_groups())
    gen = torch.Generator().manual_seed(seed)
    sb = SavedBytes(exclude=[scene])
    sb.wrap(scene.encoding, "forward", "encoding")
    for net in (scene.density_net, scene.feature_net):
        sb.wrap(net, "forward", "mlp")
        sb.wrap(net, "forward_with_input_grad", "mlp")
    sb.wrap(scene, "geometry", "field")
    sb.wrap(scene.renderer, "_march", "compositing")
    sb.wrap(scene.background, "forward", "background")
    # encoding/mlp are called through __call__ -> forward; the instance attribute shadows the class method
    gc_collect()
    sync(device)
    t0 = time.perf_counter()
    with Peak(device) as pk:
        with sb:
            out = scene.render(cams, gen)
            loss = out["rgb"].mean() + sum(scene.regularisers(out, step).values())
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
    shading = scene.last_shading
    n = int(out["n_samples"])
    del out, loss
    with Peak(device) as pk_opt:
        opt.step()
    n_params = sum(p.numel() for p in scene.parameters())
    row = dict(
        part="render",
        state=state,
        resolution=res,
        lever=lever_name,
        lever_settings=lever,
        step=step,
        shading=shading,
        active_levels=int(scene.encoding.active_levels),
        samples=n,
        samples_per_ray=n / (res * res),
        saved_bytes=sb.total,
        saved_by_part=dict(sb.by_tag),
        saved_bytes_per_sample=sb.total / max(n, 1),
        peak_delta_bytes=pk.delta,
        peak_bytes=pk.peak,
        peak_kind="cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM, reset per row)",
        fwd_s=t1 - t0,
        bwd_s=t2 - t1,
        adam_peak_delta_bytes=pk_opt.delta,
        scene_params=n_params,
        params_grads_adam_bytes=4 * n_params * 4,  # fp32 parameters, gradients, Adam m and v
        **info,
    )
    del scene, opt
    return row


def gc_collect() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ VAE / UNet
def vae_row(res: int, ckpt: bool, device: torch.device, dtype: torch.dtype) -> dict:
    from bench_sd_step import VAE_CONFIG
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**VAE_CONFIG).to(dtype).eval().requires_grad_(False)
    if ckpt:
        vae.enable_gradient_checkpointing()
    img = torch.rand(1, 3, res, res, device=device, generator=None).requires_grad_(True)
    gc_collect()
    sb = SavedBytes(exclude=[vae])
    t0 = time.perf_counter()
    with Peak(device) as pk:
        with sb:
            z = vae.encode((img * 2 - 1).to(dtype)).latent_dist.sample() * 0.18215
        (z.float() ** 2).sum().backward()
        sync(device)
    row = dict(
        part="vae_encode_backward",
        resolution=res,
        dtype=str(dtype).replace("torch.", ""),
        lever="vae_checkpointing" if ckpt else "off",
        saved_bytes=sb.total,
        peak_delta_bytes=pk.delta,
        peak_bytes=pk.peak,
        seconds=time.perf_counter() - t0,
        weights_bytes=sum(p.numel() * p.element_size() for p in vae.parameters()),
        finite=bool(torch.isfinite(img.grad).all()),
    )
    del vae, img, z
    return row


def unet_row(latent: int, rows: int, device: torch.device, dtype: torch.dtype) -> dict:
    from bench_sd_step import TEXT_DIM, TEXT_LEN, UNET_CONFIG
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG).to(dtype).eval().requires_grad_(False)
    x = torch.randn(rows, 4, latent, latent, device=device, dtype=dtype)
    emb = torch.randn(rows, TEXT_LEN, TEXT_DIM, device=device, dtype=dtype)
    t = torch.full((rows,), 500, device=device)
    gc_collect()
    t0 = time.perf_counter()
    with Peak(device) as pk, torch.no_grad():
        e = unet(x, t, encoder_hidden_states=emb).sample
        sync(device)
    row = dict(
        part="unet_call_no_grad",
        latent=latent,
        resolution=8 * latent,
        rows=rows,
        dtype=str(dtype).replace("torch.", ""),
        peak_delta_bytes=pk.delta,
        peak_bytes=pk.peak,
        seconds=time.perf_counter() - t0,
        weights_bytes=sum(p.numel() * p.element_size() for p in unet.parameters()),
        finite=bool(torch.isfinite(e).all()),
    )
    del unet, x, e
    return row


# ------------------------------------------------------------------------------------------------ whole steps
LEVER_OVERRIDES = {
    "off": ["scene.renderer.chunk_rays=0", "scene.renderer.checkpoint=false", "prior.vae_checkpointing=false"],
    "on": ["scene.renderer.chunk_rays=16384", "scene.renderer.checkpoint=true", "prior.vae_checkpointing=true"],
}


def steps_rows(a, device: torch.device) -> list[dict]:
    import bench_train_step as bts

    rows = []
    for setting in a.step_levers:
        for g in a.guidance:
            ns = argparse.Namespace(
                model=str(Path(a.model).resolve()),
                resolution=a.resolution,
                prior_resolution=a.prior_resolution or a.resolution,
                scene=a.scene,
                device=str(device),
                project_steps=10000,
                seed=0,
                warmup=a.warmup,
                steps=a.steps,
                method_seconds=a.method_seconds,
                goal_minutes=20.0,
                goal_gb=24.0,
                overrides=[*LEVER_OVERRIDES[setting], *a.overrides],
            )
            t0 = time.perf_counter()
            try:
                r = bts.bench_method(g, ns)
                row = {k: r.get(k) for k in ("guidance", "status", "ms_mean", "unet_calls_per_step", "steps_timed")}
                row.update({k: r.get(k) for k in ("peak_allocated_gb", "peak_reserved_gb", "peak_rss_gb")})
            except Exception as e:  # noqa: BLE001 - a failed method is a row
                row = {"guidance": g, "status": "failed", "error": f"{type(e).__name__}: {str(e)[:400]}"}
            row.update(
                part="train_step",
                levers=setting,
                lever_overrides=LEVER_OVERRIDES[setting],
                seconds=time.perf_counter() - t0,
            )
            rows.append(row)
            print(fmt(row), flush=True)
            gc_collect()
    return rows


# ------------------------------------------------------------------------------------------------ main
def fmt(r: dict) -> str:
    if r["part"] == "render":
        parts = " ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(r["saved_by_part"].items()))
        return (
            f"render {r['state']:5s} {r['resolution']:4d}px {r['lever']:10s} samples {r['samples']:>9,d} "
            f"saved {r['saved_bytes'] / GB:6.3f} GB ({r['saved_bytes_per_sample']:.0f} B/sample; MB: {parts}) "
            f"peak +{r['peak_delta_bytes'] / GB:6.3f} GB  fwd {r['fwd_s']:.2f}s bwd {r['bwd_s']:.2f}s"
        )
    if r["part"] == "vae_encode_backward":
        return (
            f"vae    {r['resolution']:4d}px {r['dtype']} {r['lever']:17s} saved {r['saved_bytes'] / GB:6.3f} GB "
            f"peak +{r['peak_delta_bytes'] / GB:6.3f} GB  weights {r['weights_bytes'] / GB:.3f} GB  {r['seconds']:.1f}s"
        )
    if r["part"] == "unet_call_no_grad":
        return (
            f"unet   latent {r['latent']}x{r['latent']} rows {r['rows']} {r['dtype']} "
            f"peak +{r['peak_delta_bytes'] / GB:6.3f} GB  weights {r['weights_bytes'] / GB:.3f} GB  {r['seconds']:.1f}s"
        )
    if r.get("status") != "ok":
        return f"step   {r['guidance']:16s} levers {r['levers']:3s} FAILED {r.get('error', '')[:200]}"
    mem = r["peak_allocated_gb"] if r["peak_allocated_gb"] is not None else r["peak_rss_gb"]
    return f"step   {r['guidance']:16s} levers {r['levers']:3s} peak {mem:.3f} GB  {r['ms_mean']:.0f} ms/step"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+", choices=["render", "vae", "unet", "steps"], help="run in this order")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128])
    ap.add_argument("--state", default="dense", choices=["dense", "blob"])
    ap.add_argument("--chunk-rays", type=int, default=16384, help="rays per chunk of the chunk/ckpt levers")
    ap.add_argument("--levers", nargs="+", default=["off"], help=f"render levers or 'all' {list(LEVERS)}")
    ap.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="VAE/UNet dtype (fp32 CPU, fp16 CUDA)"
    )
    ap.add_argument("--vae-checkpointing", default="both", choices=["both", "off", "on"], help="vae rows to run")
    ap.add_argument("--latents", type=int, nargs="+", default=[16])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--model", default=None, help="steps: diffusers pipeline directory (make_pipeline.py)")
    ap.add_argument("--guidance", nargs="+", default=["ddim_inversion", "sds", "vsd"])
    ap.add_argument("--step-levers", nargs="+", default=["off", "on"], choices=list(LEVER_OVERRIDES))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--prior-resolution", type=int, default=None)
    ap.add_argument("--scene", default="nerf")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--method-seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--overrides", nargs="*", default=[], help="steps: more Hydra overrides for every method")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    exact_rss = exact_rss_mode() if a.device == "cpu" else None
    for lv in LEVERS.values():
        if lv["chunk_rays"]:
            lv["chunk_rays"] = a.chunk_rays
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        a.dtype or ("fp16" if device.type == "cuda" else "fp32")
    ]
    report = dict(
        benchmark="memory",
        parts=a.parts,
        command=" ".join(["python", *sys.argv]) if argv is None else "bench_memory.main(" + " ".join(argv) + ")",
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        torch=torch.__version__,
        threads=a.threads,
        loadavg_before=os.getloadavg(),
        exact_rss_mode=exact_rss,
        note=(
            "saved_bytes: tensors autograd keeps for the backward (exact; fp32 = GPU activation memory 1:1). "
            "peak_delta_bytes: CPU peak RSS (an upper bound: allocator slack, freed-but-kept pages) or CUDA "
            "max_memory_allocated above the memory in use before the block."
        ),
        rows=[],
    )

    report["produced"] = produced()  # commit, torch, CPU capability, date (distill.provenance)

    def save():
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            report["loadavg_after"] = os.getloadavg()
            a.out.write_text(json.dumps(report, indent=2))

    for part in a.parts:
        if part == "steps" and not a.model:
            ap.error("steps needs --model DIR (benchmarks/gpu/make_pipeline.py writes one)")
        if part == "render":
            levers = list(LEVERS) if a.levers == ["all"] else a.levers
            jobs = [
                functools.partial(render_row, a.state, res, lv, device, a.seed)
                for res in a.resolutions
                for lv in levers
                if device.type == "cuda" or lv not in ("fp16", "ckpt_fp16")  # fp16 autocast: the CUDA lever
            ]
        elif part == "vae":
            cks = {"both": (False, True), "off": (False,), "on": (True,)}[a.vae_checkpointing]
            jobs = [functools.partial(vae_row, res, ck, device, dtype) for res in a.resolutions for ck in cks]
        elif part == "unet":
            jobs = [functools.partial(unet_row, lat, a.rows, device, dtype) for lat in a.latents]
        else:
            jobs = [functools.partial(steps_rows, a, device)]
        for job in jobs:
            try:
                rows = job()
            except Exception as e:  # noqa: BLE001 - a failed part is a row, the others still run
                rows = {"part": part, "status": "failed", "error": f"{type(e).__name__}: {str(e)[:400]}"}
                print(f"{part} FAILED: {rows['error']}", flush=True)
            for row in rows if isinstance(rows, list) else [rows]:
                report["rows"].append(row)
                if part != "steps" and row.get("status") != "failed":
                    print(fmt(row), flush=True)
            save()
            gc_collect()
    save()
    return report


if __name__ == "__main__":
    main()
