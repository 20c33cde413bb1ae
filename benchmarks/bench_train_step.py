#!/usr/bin/env python
"""Time whole training steps (render -> VAE encode -> guidance with its UNet calls -> backward -> optimiser) of a
Stable Diffusion run, built through the project's own compose_config + Trainer and stepped by Trainer.train_step.

    python benchmarks/bench_train_step.py --model DIR [--guidance ddim_inversion sds ... | all] [--steps 50]
        [--resolution 512] [--scene nerf] [--device cuda] [--method-seconds 60] [--out FILE.json] [overrides ...]
    python benchmarks/bench_train_step.py --model DIR --tiny ...     # CPU dry run: nerf_cpu, 32 px

DIR is a diffusers pipeline directory (benchmarks/gpu/make_pipeline.py writes a random-weight SD-2.1-base-shaped
one). Per method (conf/guidance/<name>.yaml; ``all`` = every file there) one Trainer is built with
``scene=<scene> prior=sd21 prior.model=DIR camera.height=camera.width=<resolution> trainer.max_steps=10000``
and --steps steps are run at steps drawn over the whole run (so over the t anneal, the progressive hash-grid
levels and the regulariser ramps), each one ``Trainer.train_step`` exactly as training runs it. Its pieces are
timed by wrapping, on that Trainer only, scene.render, prior.encode (VAE), prior.eps (UNet), guidance.step,
torch.autograd.backward and optimizer.step, each synchronised (CUDA) and exclusive (a UNet call inside
guidance.step counts as unet, not guidance; a backward inside a method, e.g. VSD's LoRA, counts as backward);
"other" is the rest of the step (cameras, prompts, regularisers, the finiteness checks, logging).

Reported per method: it/s, ms per step (mean, median), each part's share, UNet calls per step, peak allocated and
reserved CUDA memory over the timed steps (CPU: process peak RSS), steps whose loss was not finite, and the
projection of a --project-steps run (mean step time x steps; the steps are drawn uniformly over the run) against
the goal (--goal-minutes, --goal-gb) and the thesis' A6000 numbers (SDI 119 min / 39.2 GB). A method that fails
is a row with status "failed" and its error; the others still run. The JSON is rewritten after every method.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

PARTS = ("render", "vae_encode", "unet", "guidance_other", "backward", "optimiser", "other")
PAPER = {"ddim_inversion": (119.0, 39.2), "sds": (66.0, 6.2)}  # thesis, A6000: minutes, GB for 10k steps


def guidance_options() -> list[str]:
    """The methods of conf/guidance, without the per-method variants (sds_x0, ...: they time the same step)."""
    from distill.config import base_options

    return base_options("guidance")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimers:
    """Exclusive wall time per part: a timed call nested in another is subtracted from its parent."""

    def __init__(self, device: torch.device):
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                elapsed = time.perf_counter() - t0
                children = self._stack.pop()
                self.acc[key] += elapsed - children
                self.count[key] += 1
                if self._stack:
                    self._stack[-1] += elapsed

        return timed

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        acc, count = dict(self.acc), dict(self.count)
        self.acc.clear()
        self.count.clear()
        return acc, count


class _Null:
    def log_scalars(self, *a, **k):
        pass

    def log_image(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass


def step_schedule(n: int, max_steps: int, seed: int) -> list[int]:
    """n steps of a max_steps run, one drawn uniformly in each of n equal slices (so the mean over them estimates
    the run's mean), visited in bit-reversed order so that a run cut short by its time cap still spans the run."""
    rng = random.Random(seed)
    width = max_steps / n
    steps = [min(max_steps - 1, int(i * width + rng.random() * width)) for i in range(n)]
    bits = max(1, math.ceil(math.log2(max(n, 2))))
    order = sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [steps[i] for i in order]


def peak_memory(device: torch.device) -> dict[str, float | None]:
    if device.type == "cuda":
        return {
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
            "peak_rss_gb": None,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    return {"peak_allocated_gb": None, "peak_reserved_gb": None, "peak_rss_gb": rss}


def bench_method(name: str, a: argparse.Namespace) -> dict:
    from distill.cli import compose_config
    from distill.train import Trainer

    overrides = [
        "logger=none",
        "trainer.progress=false",
        "trainer.export=false",
        f"guidance={name}",
        f"scene={a.scene}",
        "prior=sd21",
        f"prior.model={a.model}",
        "prior.local_files_only=true",
        "prior.embedding_cache_dir=null",
        f"prior.resolution={a.prior_resolution}",
        f"camera.height={a.resolution}",
        f"camera.width={a.resolution}",
        f"trainer.device={a.device}",
        f"trainer.max_steps={a.project_steps}",
        f"seed={a.seed}",
    ]
    if "phi" in compose_config([f"guidance={name}"]).guidance:
        # VSD / ESD: phi is a second UNet (the reference's SD 2.1 768-v is not on the machine): a second copy of
        # the same random-weight pipeline stands in, so memory and time count two UNets as the reference does
        overrides.append(f"guidance.phi.model={a.model}")
    overrides += a.overrides  # the caller's overrides win
    row: dict = {"guidance": name, "status": "failed", "overrides": overrides}
    device = torch.device(a.device)
    t_build = time.perf_counter()
    cfg = compose_config(overrides)
    tr = Trainer(cfg, Path(tempfile.mkdtemp(prefix=f"bench_train_{name}_")))
    tr.t_start = time.time()
    row["build_s"] = time.perf_counter() - t_build
    row["prior_dtype"] = str(getattr(tr.prior, "dtype", None)).replace("torch.", "")
    row["scene_params_m"] = sum(p.numel() for p in tr.scene.parameters()) / 1e6

    timers = PartTimers(device)
    tr.scene.render = timers.wrap("render", tr.scene.render)
    tr.prior.encode = timers.wrap("vae_encode", tr.prior.encode)
    tr.prior.eps = timers.wrap("unet", tr.prior.eps)
    tr.guidance.step = timers.wrap("guidance_other", tr.guidance.step)
    tr.optimizer.step = timers.wrap("optimiser", tr.optimizer.step)
    real_backward = torch.autograd.backward
    torch.autograd.backward = timers.wrap("backward", real_backward)
    null = _Null()
    totals, parts, calls, rows, nan_steps, done_steps = [], defaultdict(list), [], [], 0, []
    try:
        warm = step_schedule(a.warmup, a.project_steps, a.seed + 1) if a.warmup else []
        for s in warm:  # compile kernels, fill caches, allocate (not timed)
            tr.step = s
            tr.train_step(null, null)
        sync(device)
        timers.take()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_loop = time.perf_counter()
        for s in step_schedule(a.steps, a.project_steps, a.seed):
            if done_steps and time.perf_counter() - t_loop > a.method_seconds:
                break
            tr.step = s
            c0, r0 = tr.prior.unet_calls, tr.prior.unet_rows
            sync(device)
            t0 = time.perf_counter()
            reason = tr.train_step(null, null)
            sync(device)
            total = time.perf_counter() - t0
            acc, _ = timers.take()
            totals.append(total)
            for k in PARTS[:-1]:
                parts[k].append(acc.get(k, 0.0))
            parts["other"].append(total - sum(acc.values()))
            calls.append(tr.prior.unet_calls - c0)
            rows.append(tr.prior.unet_rows - r0)
            nan_steps += reason is not None
            done_steps.append(s)
    finally:
        torch.autograd.backward = real_backward
    mean = statistics.fmean(totals)
    proj_min = mean * a.project_steps / 60.0
    mem = peak_memory(device)
    mem_gb = mem["peak_reserved_gb"] if mem["peak_reserved_gb"] is not None else mem["peak_rss_gb"]
    paper = PAPER.get(name)
    row.update(
        status="ok",
        steps_timed=len(totals),
        steps_requested=a.steps,
        steps_visited=sorted(done_steps),
        it_per_s=1.0 / mean,
        ms_mean=1e3 * mean,
        ms_median=1e3 * statistics.median(totals),
        ms_min=1e3 * min(totals),
        parts_ms={k: 1e3 * statistics.fmean(v) for k, v in parts.items()},
        parts_share={k: statistics.fmean(v) / mean for k, v in parts.items()},
        unet_calls_per_step=statistics.fmean(calls),
        unet_rows_per_step=statistics.fmean(rows),
        extra_trainable_params=sum(p.numel() for p in tr.guidance.trainable_parameters()),
        nonfinite_steps=nan_steps,
        **mem,
        projected_minutes=proj_min,
        projected_steps=a.project_steps,
        time_ratio_to_goal=proj_min / a.goal_minutes,
        memory_ratio_to_goal=mem_gb / a.goal_gb,
        paper_minutes=paper[0] if paper else None,
        paper_gb=paper[1] if paper else None,
        speedup_over_paper=(paper[0] / proj_min) if paper else None,
    )
    del tr
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="diffusers pipeline directory (prior.model)")
    ap.add_argument(
        "--guidance", nargs="+", default=["ddim_inversion"], help=f"conf/guidance options or 'all' {guidance_options()}"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 50; --tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    ap.add_argument("--resolution", type=int, default=None, help="render size (default 512; --tiny 32)")
    ap.add_argument("--prior-resolution", type=int, default=None, help="VAE input size (default 512; --tiny 32)")
    ap.add_argument(
        "--scene", default=None, help="conf/scene option (default nerf, the official sizes; --tiny nerf_cpu)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run sizes (a tiny pipeline directory as --model)")
    ap.add_argument("--method-seconds", type=float, default=1e9, help="stop timing a method after this many seconds")
    ap.add_argument("--project-steps", type=int, default=10000)
    ap.add_argument("--goal-minutes", type=float, default=20.0)
    ap.add_argument("--goal-gb", type=float, default=24.0, help="GB = 10^9 bytes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every method")
    a = ap.parse_args(argv)
    a.steps = a.steps or (3 if a.tiny else 50)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.resolution = a.resolution or (32 if a.tiny else 512)
    a.prior_resolution = a.prior_resolution or a.resolution
    a.scene = a.scene or ("nerf_cpu" if a.tiny else "nerf")
    a.model = str(Path(a.model).resolve())
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = guidance_options() if a.guidance == ["all"] else a.guidance
    # SDI first: the main measurement gets the time even if a later method is slow
    methods = sorted(methods, key=lambda m: (m != "ddim_inversion", m != "sds", m))
    device = torch.device(a.device)
    from distill.provenance import produced

    report = {
        "benchmark": "train_step",
        "produced": produced(),  # commit, torch, CPU capability, date (distill.provenance)
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda" and torch.cuda.is_available()
            else platform.machine()
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": a.model,
        "resolution": a.resolution,
        "prior_resolution": a.prior_resolution,
        "scene": a.scene,
        "tiny": a.tiny,
        "goal": {"minutes": a.goal_minutes, "gb": a.goal_gb, "steps": a.project_steps},
        "memory_note": "CUDA: max_memory_allocated / max_memory_reserved over the timed steps; CPU: process peak RSS",
        "command": " ".join(["python", *sys.argv]) if argv is None else None,
        "methods": [],
    }
    for name in methods:
        t0 = time.perf_counter()
        # written first, so that a method stopped from outside (a stage's timeout) is still a row
        report["methods"].append(
            {"guidance": name, "status": "failed", "error": "did not finish: stopped from outside (time limit?)"}
        )
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=2))
        try:
            row = bench_method(name, a)
        except Exception as e:  # noqa: BLE001 - a failed method is a row, the others still run
            row = {
                "guidance": name,
                "status": "failed",
                "error": f"{type(e).__name__}: {str(e)[:600]}",
                "traceback": traceback.format_exc()[-2000:],
            }
        row["wall_s"] = time.perf_counter() - t0
        report["methods"][-1] = row
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(format_row(row), flush=True)
        if a.out:
            a.out.write_text(json.dumps(report, indent=2))
    return report


def format_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['guidance']:16s} FAILED  {r.get('error', '')[:200]}"
    mem = r["peak_reserved_gb"] if r["peak_reserved_gb"] is not None else r["peak_rss_gb"]
    shares = " ".join(f"{k} {100 * v:.0f}%" for k, v in r["parts_share"].items())
    return (
        f"{r['guidance']:16s} {r['it_per_s']:7.2f} it/s  {r['ms_mean']:9.1f} ms/step  {r['steps_timed']} steps"
        f"  {r['unet_calls_per_step']:.1f} UNet calls  peak {mem:.2f} GB  {r['projected_steps']} steps ->"
        f" {r['projected_minutes']:.1f} min ({r['time_ratio_to_goal']:.2f}x goal)  [{shares}]"
    )


if __name__ == "__main__":
    main()
