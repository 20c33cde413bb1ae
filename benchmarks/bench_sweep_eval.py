#!/usr/bin/env python
"""How the sweep-end evaluation's time grows with the number of runs: ``python -m eval table``, ``figure`` and
``report`` over one launch of 10, 50 and 200 runs (2D analytic prior, 2 steps each).

The sweep: three launches into one sweep directory, ``scene.lr`` (5 values, the figure's columns) x
``seed=range(0, N/5)`` (its rows), N = 10, 50, 200, through Hydra's basic launcher; a later launch finds the
earlier launches' runs finished ("nothing to do") and trains only the new ones, so 200 runs are trained in all.
``--sweep DIR`` reuses a directory made by an earlier call (its three launches, oldest first).

Each evaluation runs as its own ``python -m eval ... --launch <id>`` process (wall time, imports included, as a
user or the sweep-end callback's table step sees it):

    table          table.md / .csv / .tex / runs.csv
    figure cold    figure.png / .pdf / .json, every run's views rendered again (--overwrite)
    figure warm    the same with the views cached in each run's eval/figure_views
    report warm    report.html (figure, runs, final images, curves) from the cached views
    report cold    the same with every view rendered again (--overwrite)

The host's load average (1 min) before and after each timing and its CPU count are stored with the times;
on a shared machine the wall times move with it.

    python benchmarks/bench_sweep_eval.py [--sizes 10 50 200] [--repeats 1] [--sweep DIR]
        [--out benchmarks/results/sweep_eval_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LRS = "0.01,0.02,0.03,0.04,0.05"
TRAIN = [
    "prior=analytic",
    "scene=image",
    "guidance=sds",
    "prompt=a red circle",
    "trainer.max_steps=2",
    "trainer.checkpoint_every=0",
    "trainer.image_every=0",
    "trainer.export=false",
    "trainer.progress=false",
    "trainer.threads=1",
    "experiment_name=sweep_eval_bench",
    f"scene.lr={LRS}",
]
CASES = [
    ("table", ["table", "--no-paper"]),
    ("figure cold", ["figure", "--overwrite"]),
    ("figure warm", ["figure"]),
    ("report warm", ["report", "--no-paper"]),
    ("report cold", ["report", "--no-paper", "--overwrite"]),
]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SDI_LAUNCH")}
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def launch(out_root: Path, n: int) -> tuple[str, float]:
    """Train the N-run launch; (its launch id, wall seconds)."""
    cmd = [sys.executable, "train.py", "-m", *TRAIN, f"seed=range(0,{n // 5})", f"paths.output_root={out_root}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env())
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"training the {n}-run launch failed:\n{r.stderr[-3000:]}")
    from eval.launches import list_launches

    return list_launches(out_root / "sweeps" / "sweep_eval_bench")[-1].id, seconds


def time_eval(sweep: Path, launch_id: str, argv: list[str], out: Path) -> dict:
    load0 = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "eval", argv[0], str(sweep), "--launch", launch_id, "--out", str(out), *argv[1:]]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env())
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200], help="runs per launch (multiples of 5)")
    p.add_argument("--repeats", type=int, default=1, help="timings per case (the median is reported)")
    p.add_argument("--sweep", type=Path, default=None, help="reuse this sweep directory (its launches, oldest first)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep_eval_cpu.json")
    args = p.parse_args(argv)
    if any(n % 5 or n <= 0 for n in args.sizes):
        p.error(f"--sizes must be positive multiples of 5 (5 learning rates x N/5 seeds), got {args.sizes}")

    from distill.env import environment, stamp
    from distill.provenance import produced
    from eval.launches import list_launches

    work = Path(tempfile.mkdtemp(prefix="bench_sweep_eval_"))
    trained: dict[int, float] = {}
    if args.sweep:
        sweep = args.sweep
        ids = [la.id for la in list_launches(sweep)]
        if len(ids) < len(args.sizes):
            p.error(f"--sweep {sweep} has {len(ids)} launches, fewer than --sizes {args.sizes}")
        sizes = dict(zip(sorted(args.sizes), ids[-len(args.sizes) :]))
    else:
        sizes = {}
        for n in sorted(args.sizes):
            sizes[n], trained[n] = launch(work, n)
            print(f"launch of {n} runs: {sizes[n]} ({trained[n]:.0f} s to train the new ones)", flush=True)
        sweep = work / "sweeps" / "sweep_eval_bench"

    rows = []
    for n, lid in sizes.items():
        for name, case in CASES:
            times = [time_eval(sweep, lid, case, work / f"eval_{n}") for _ in range(args.repeats)]
            best = sorted(times, key=lambda t: t["seconds"])[len(times) // 2]
            rows.append({"runs": n, "case": name, "launch": lid, **best, "all_seconds": [t["seconds"] for t in times]})
            print(f"{n:4d} runs  {name:12s} {best['seconds']:7.2f} s  (load {best['load_before']})", flush=True)
    result = {
        "benchmark": "sweep_eval",
        "produced": produced(),
        "stamp": stamp(),
        "environment": environment(),
        "cpus": os.cpu_count(),
        "command": "python benchmarks/bench_sweep_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_seconds": trained,
        "sweep": str(sweep),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
