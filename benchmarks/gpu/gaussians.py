#!/usr/bin/env python
"""The Gaussians stage of benchmarks/gpu/check.sh: torch rasterizer vs gsplat (parity), and the training-render step
time (forward + backward + Adam) with each backend.

  parity   the same scene (``--parity-n`` Gaussians, opacity 0.5) rendered by scene.rasterizer=torch with gsplat's
           constants (alpha_max of the installed gsplat, near 0.01, stop rule "le") and by scene.rasterizer=gsplat:
           max |rgb| / |alpha| difference and the relative error of d mean(rgb^2) / d means.
  step     ``--n`` Gaussians at ``--resolution`` px, batch ``--batch``: median wall ms and peak memory per backend;
           an out-of-memory is a row (``"status": "oom"``), not a crash.

    python benchmarks/gpu/gaussians.py --device cuda --n 100000 --resolution 512 --out gaussians.json
    python benchmarks/gpu/gaussians.py --device cpu --n 2000 --resolution 32 --iters 1     (check.sh --cpu --tiny)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from distill.scene.cameras import orbit_cameras  # noqa: E402
from distill.scene.gaussians import GaussianScene, gsplat_available  # noqa: E402


def gsplat_alpha_max() -> float:
    import gsplat

    version = tuple(int(x) for x in gsplat.__version__.split("+")[0].split(".")[:3])
    return 0.999 if version <= (1, 5, 3) else 0.99  # gsplat c5ff586 (after 1.5.3) moved to graphdeco's 0.99


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parity(n: int, res: int, device: str) -> dict:
    ok, why = gsplat_available()
    if not device.startswith("cuda") or not ok:
        return {"status": "skipped", "reason": why or "gsplat's rasterization needs CUDA"}
    raster = {"alpha_max": gsplat_alpha_max(), "near_plane": 0.01, "stop_rule": "le"}
    base = {"n_init": n, "background": "white", "raster": raster, "init_opacity": 0.5}
    ours = GaussianScene({**base, "rasterizer": "torch"}).to(device)
    ref = GaussianScene({**base, "rasterizer": "gsplat"}).to(device)
    ref.load_state_dict(ours.state_dict())
    cams = orbit_cameras(2, res, res, device=device)
    a, b = ours.render(cams, shading="albedo"), ref.render(cams, shading="albedo")
    gen = torch.Generator(device=device)
    ga = torch.autograd.grad(ours.render(cams, gen)["rgb"].square().mean(), ours.means)[0]
    gb = torch.autograd.grad(ref.render(cams, gen)["rgb"].square().mean(), ref.means)[0]
    return {
        "status": "ok",
        "n": n,
        "resolution": res,
        "alpha_max": raster["alpha_max"],
        "max_abs_rgb": float((a["rgb"] - b["rgb"]).abs().max()),
        "max_abs_alpha": float((a["opacity"] - b["opacity"]).abs().max()),
        "grad_means_rel_err": float((ga - gb).norm() / gb.norm().clamp_min(1e-30)),
    }


def step_time(backend: str, n: int, res: int, batch: int, device: str, iters: int, warmup: int) -> dict:
    row = {"backend": backend, "n": n, "resolution": res, "batch": batch}
    try:
        scene = GaussianScene({"n_init": n, "rasterizer": backend, "background": "random"}).to(device)
        opt = torch.optim.Adam(scene.param_groups())
        cams = orbit_cameras(batch, res, res, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for it in range(warmup + iters):
            sync(device)
            t0 = time.perf_counter()
            out = scene.render(cams, gen)
            out["rgb"].square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if it >= warmup:
                times.append(time.perf_counter() - t0)
        row.update(status="ok", step_ms=1e3 * statistics.median(times), iters=iters)
        if device.startswith("cuda"):
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        row.update(status="oom", error=str(e).splitlines()[0][:300])
    except RuntimeError as e:
        if "out of memory" not in str(e) and "can't allocate" not in str(e):
            raise
        row.update(status="oom", error=str(e).splitlines()[0][:300])
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--parity-n", type=int, default=3000)
    ap.add_argument("--parity-resolution", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res = {"device": a.device, "gsplat": gsplat_available()[1] or "importable"}
    if gsplat_available()[0]:
        import gsplat

        res["gsplat"] = gsplat.__version__
    res["parity"] = parity(a.parity_n, a.parity_resolution, a.device)
    backends = ["torch"] + (["gsplat"] if a.device.startswith("cuda") and gsplat_available()[0] else [])
    res["steps"] = [step_time(b, a.n, a.resolution, a.batch, a.device, a.iters, a.warmup) for b in backends]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
