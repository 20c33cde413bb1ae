"""Time per training step of the main job, split into render / prior / backward / optimiser.

    python benchmarks/bench_step_3d.py [--steps 30] [--threads 0] [overrides ...]

Builds the default run (SDI on the 3D analytic prior, NeRF CPU preset) through the real config and
Trainer, then times the pieces of the loop in ``distill.train.Trainer.train_step`` one by one.
"prior" is the whole guidance step (kappa / DDIM inversion + guided prediction), i.e. all prior
calls. Prints a table and writes JSON (default benchmarks/results/step_3d_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_3d_cpu.json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from distill.cli import compose_config
    from distill.provenance import produced
    from distill.train import Trainer

    cfg = compose_config(["logger=none", "trainer.progress=false", *a.overrides])
    tr = Trainer(cfg, Path(tempfile.mkdtemp()))
    tr.t_start = time.time()
    max_steps = cfg.trainer.max_steps
    parts = {k: [] for k in ("render", "prior", "backward", "optimiser", "total")}
    calls = []
    for i in range(a.warmup + a.steps):
        step = int(i * max_steps / (a.warmup + a.steps))  # visit the whole t anneal
        t0 = time.perf_counter()
        tr.scene.update_step(step, max_steps)
        cams = tr.cameras()
        out = tr.scene.render(cams, generator=tr.generator)
        x0 = tr.prior.encode(out["rgb"])
        t1 = time.perf_counter()
        g = tr.guidance.step(x0, tr.prompts(cams, batch_size=x0.shape[0]), step, max_steps, tr.generator)
        t2 = time.perf_counter()
        regs = tr.scene.regularisers(out, step)
        loss = g.loss + sum(regs.values())
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        tr.optimizer.step()
        t4 = time.perf_counter()
        if i >= a.warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[k].append(v)
            calls.append(g.model_calls)
    total = statistics.mean(parts["total"])
    rows = {
        k: {"mean_s": statistics.mean(v), "median_s": statistics.median(v), "share": statistics.mean(v) / total}
        for k, v in parts.items()
    }
    res = {
        "config": {
            "camera": f"{cfg.camera.height}x{cfg.camera.width}",
            "prior": cfg.prior._target_,
            "scene": cfg.scene._target_,
            "guidance": cfg.guidance.name,
            "overrides": a.overrides,
        },
        "steps_timed": a.steps,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "prior_calls_per_step_mean": statistics.mean(calls),
        "parts": rows,
        "share_outside_prior": 1.0 - rows["prior"]["share"],
        "projected_minutes_for_max_steps": total * max_steps / 60,
        "max_steps": max_steps,
    }
    print(f"{'part':<10} {'mean ms':>9} {'median ms':>10} {'share':>7}")
    for k, r in rows.items():
        print(f"{k:<10} {1e3 * r['mean_s']:9.1f} {1e3 * r['median_s']:10.1f} {100 * r['share']:6.1f}%")
    print(
        f"prior calls / step {res['prior_calls_per_step_mean']:.1f}; share outside prior calls "
        f"{100 * res['share_outside_prior']:.1f}%; {max_steps} steps ~ {res['projected_minutes_for_max_steps']:.1f} min"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res["produced"] = produced()  # commit, torch, CPU capability, date
    a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
