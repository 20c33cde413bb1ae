#!/usr/bin/env python
"""Time the 3D scenes' training render: forward, backward (render + regularisers), and one Adam step, at
32 / 64 / 128 pixels (NeRF) and 48 / 64 pixels (Gaussians), for the settings:

  cpu       NeRF: encoding.log2_hashmap_size=15, renderer.samples_per_ray=16 (the CPU preset)
  official  NeRF: the defaults of conf/scene/nerf.yaml (2^19 tables, 64 samples per ray)
  gaussians 3D Gaussians (conf/scene/gaussians.yaml, torch rasterizer), --gaussians N each (1k / 5k / 20k): the
            threestudio-3dgs initialisation (uniform in a ball of radius 0.8, opacity 0.2, 3-NN scales)

With --isolate (default) every row runs in its own process, so that the peak resident memory of that row
(ru_maxrss after the row minus the resident size before its first render) is its own; on CUDA the peak is
torch.cuda.max_memory_allocated.

Scene state: the initial blob after update_step(1000) (8 of 16 hash levels active, shading
random). Camera: distance 1.75, fovy 55, elevation 15 (the middle of the training ranges).
Reported per row: median wall time and CPU (process) time over --iters runs after --warmup,
field evaluations per render. The host load average is recorded: on a shared machine the wall
times move with it, the process times much less.

    python benchmarks/bench_render.py [--device cpu] [--threads 2] [--iters 5]
        [--settings cpu gaussians] [--resolutions 48 64] [--gaussians 1000 5000 20000]
        [--out benchmarks/results/render_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.provenance import produced  # noqa: E402
from distill.scene.cameras import orbit_cameras  # noqa: E402
from distill.scene.nerf import NeRFScene  # noqa: E402

SETTINGS = {
    "cpu": {"log2_hashmap_size": 15, "samples_per_ray": 16},
    "official": {"log2_hashmap_size": 19, "samples_per_ray": 64},
}


def build(setting: str, device: str, n_gaussians: int = 5000):
    if setting == "gaussians":
        from distill.scene.gaussians import GaussianScene

        return GaussianScene({"n_init": n_gaussians, "rasterizer": "torch", "background": "white"}).to(device)
    cfg = NeRFScene.Config()
    cfg.encoding.log2_hashmap_size = SETTINGS[setting]["log2_hashmap_size"]
    cfg.renderer.samples_per_ray = SETTINGS[setting]["samples_per_ray"]
    scene = NeRFScene(cfg).to(device)
    scene.update_step(1000, 10000)
    return scene


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_row(scene, res: int, device: str, iters: int, warmup: int) -> dict:
    cams = orbit_cameras(1, res, res, elevation_deg=15.0, distance=1.75, fovy_deg=55.0)
    opt = torch.optim.Adam(scene.param_groups())
    gen = torch.Generator().manual_seed(0)
    rec = {k: [] for k in ("fwd_wall", "fwd_cpu", "bwd_wall", "bwd_cpu", "adam_wall", "samples")}
    base_mb = rss_mb() if device == "cpu" else 0.0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for it in range(warmup + iters):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = scene.render(cams, gen)
        loss = out["rgb"].mean() + sum(scene.regularisers(out, 1000).values())
        sync(device)
        w1, c1 = time.perf_counter(), time.process_time()
        loss.backward()
        sync(device)
        w2, c2 = time.perf_counter(), time.process_time()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        w3 = time.perf_counter()
        if it >= warmup:
            for k, v in (
                ("fwd_wall", w1 - w0),
                ("fwd_cpu", c1 - c0),
                ("bwd_wall", w2 - w1),
                ("bwd_cpu", c2 - c1),
                ("adam_wall", w3 - w2),
                ("samples", int(out["n_samples"] if "n_samples" in out else out["n_gaussians"])),
            ):
                rec[k].append(v)
    r = {k: statistics.median(v) for k, v in rec.items()}
    if device.startswith("cuda"):
        r["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # high-water resident size of this process above its size before the first render
        r["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base_mb
    return r


def run_row(args, setting: str, res: int, n: int) -> dict:
    """One row, in this process or (--isolate) in a fresh one, so that its peak memory is its own."""
    if not args.isolate:
        scene = build(setting, args.device, n)
        r = time_row(scene, res, args.device, args.iters, args.warmup)
        extra = {"n_gaussians": n} if setting == "gaussians" else SETTINGS[setting]
        return {"setting": setting, "resolution": res, **extra, **r}
    cmd = [sys.executable, __file__, "--row", f"{setting}:{res}:{n}", "--device", args.device]
    cmd += ["--threads", str(args.threads), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--settings", nargs="+", default=[*SETTINGS, "gaussians"], choices=[*SETTINGS, "gaussians"])
    ap.add_argument("--gaussians", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--gaussian-resolutions", type=int, nargs="+", default=[48, 64])
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: one isolated row "setting:res:n" -> JSON
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "render_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.row:
        setting, res, n = args.row.split(":")
        args.isolate = False
        print(json.dumps(run_row(args, setting, int(res), int(n))))
        return
    load_before = os.getloadavg()
    rows = []
    header = (
        f"{'setting':9s} {'res':>4s} {'N/samp':>8s} {'fwd ms':>8s} {'(cpu)':>7s} {'bwd ms':>8s} {'(cpu)':>7s} "
        f"{'fwd+bwd':>8s} {'adam ms':>8s} {'peak MB':>8s}"
    )
    print(header)
    plan = []
    for setting in args.settings:
        if setting == "gaussians":
            plan += [(setting, res, n) for n in args.gaussians for res in args.gaussian_resolutions]
        else:
            plan += [(setting, res, 0) for res in args.resolutions]
    for setting, res, n in plan:
        r = run_row(args, setting, res, n)
        rows.append(r)
        print(
            f"{setting:9s} {res:4d} {r['samples']:8.0f} {1e3 * r['fwd_wall']:8.1f} {1e3 * r['fwd_cpu']:7.1f} "
            f"{1e3 * r['bwd_wall']:8.1f} {1e3 * r['bwd_cpu']:7.1f} {1e3 * (r['fwd_wall'] + r['bwd_wall']):8.1f} "
            f"{1e3 * r['adam_wall']:8.1f} {r['peak_mb']:8.0f}",
            flush=True,
        )
    result = {
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "iters": args.iters,
        "rows": rows,
        "produced": produced(),  # commit, torch, CPU capability, date (distill.provenance)
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
