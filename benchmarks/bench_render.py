#!/usr/bin/env python
"""Time the NeRF scene's training render: forward, backward (render + official regularisers),
and one Adam step, at 32 / 64 / 128 pixels, for two settings:

  cpu       encoding.log2_hashmap_size=15, renderer.samples_per_ray=16 (the CPU preset)
  official  the defaults of conf/scene/nerf.yaml (2^19 tables, 64 samples per ray)

Scene state: the initial blob after update_step(1000) (8 of 16 hash levels active, shading
random). Camera: distance 1.75, fovy 55, elevation 15 (the middle of the training ranges).
Reported per row: median wall time and CPU (process) time over --iters runs after --warmup,
field evaluations per render. The host load average is recorded: on a shared machine the wall
times move with it, the process times much less.

    python benchmarks/bench_render.py [--device cpu] [--threads 2] [--iters 5]
        [--out benchmarks/results/render_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.scene.cameras import orbit_cameras  # noqa: E402
from distill.scene.nerf import NeRFScene  # noqa: E402

SETTINGS = {
    "cpu": {"log2_hashmap_size": 15, "samples_per_ray": 16},
    "official": {"log2_hashmap_size": 19, "samples_per_ray": 64},
}


def build(setting: str, device: str) -> NeRFScene:
    cfg = NeRFScene.Config()
    cfg.encoding.log2_hashmap_size = SETTINGS[setting]["log2_hashmap_size"]
    cfg.renderer.samples_per_ray = SETTINGS[setting]["samples_per_ray"]
    scene = NeRFScene(cfg).to(device)
    scene.update_step(1000, 10000)
    return scene


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_row(scene: NeRFScene, res: int, device: str, iters: int, warmup: int) -> dict:
    cams = orbit_cameras(1, res, res, elevation_deg=15.0, distance=1.75, fovy_deg=55.0)
    opt = torch.optim.Adam(scene.param_groups())
    gen = torch.Generator().manual_seed(0)
    rec = {k: [] for k in ("fwd_wall", "fwd_cpu", "bwd_wall", "bwd_cpu", "adam_wall", "samples")}
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
                ("samples", int(out["n_samples"])),
            ):
                rec[k].append(v)
    return {k: statistics.median(v) for k, v in rec.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "render_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    header = (
        f"{'setting':9s} {'res':>4s} {'samples':>8s} {'fwd ms':>8s} {'(cpu)':>7s} {'bwd ms':>8s} {'(cpu)':>7s} "
        f"{'fwd+bwd':>8s} {'adam ms':>8s}"
    )
    print(header)
    for setting in args.settings:
        scene = build(setting, args.device)
        for res in args.resolutions:
            r = time_row(scene, res, args.device, args.iters, args.warmup)
            row = {"setting": setting, "resolution": res, **SETTINGS[setting], **r}
            rows.append(row)
            print(
                f"{setting:9s} {res:4d} {r['samples']:8.0f} {1e3 * r['fwd_wall']:8.1f} {1e3 * r['fwd_cpu']:7.1f} "
                f"{1e3 * r['bwd_wall']:8.1f} {1e3 * r['bwd_cpu']:7.1f} {1e3 * (r['fwd_wall'] + r['bwd_wall']):8.1f} "
                f"{1e3 * r['adam_wall']:8.1f}",
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
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
