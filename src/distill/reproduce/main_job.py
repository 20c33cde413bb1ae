"""``python -m distill.reproduce main_job``: the main job (``python train.py``) for seeds 0..N-1: a table of the
prior's ground-truth metrics per seed with median and range (main_job_seeds.md / .csv) and all final frames
(main_job_seeds.png; ``--name`` another stem, e.g. main_job_gaussians_seeds). Runs resume from
outputs/reproduce/main_job/seed_<k> (``--runs``); ``--set key=value`` adds config overrides; ``--table-only``
tabulates the finished seeds and trains none."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import numpy as np

from distill import provenance
from distill.reproduce.common import ROOT, median_range, pad

# (column, metrics.json key, format) of main_job_seeds.md / .csv
MAIN_JOB_COLUMNS = (
    ("nearest object", "nearest_object", "{:.0f}"),
    ("PSNR dB", "psnr", "{:.1f}"),
    ("SSIM", "ssim", "{:.3f}"),
    ("mode commitment", "mode_commitment", "{:.2f}"),
    ("contrast vs object", "contrast_vs_object", "{:.3f}"),
    ("nearest share", "blend_share_nearest", "{:.2f}"),
    ("final / best frame contrast", "contrast_final_over_best", "{:.2f}"),
    ("seconds", "seconds", "{:.0f}"),
)


def _result_config(cfg) -> dict:
    """The resolved config without the settings that do not change a run's result (where it lives, logging,
    threads, device)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("paths", None)
    c.pop("logger", None)
    for k in ("progress", "threads", "device", "resume"):
        c.get("trainer", {}).pop(k, None)
    return c


def _same_run(saved: dict, now: dict) -> bool:
    """Every value of the saved run's config equals the current one; keys the config gained since the run was made
    (new options, whose defaults keep the old behaviour) are not held against it."""
    for k, v in saved.items():
        if k not in now:
            return False
        if isinstance(v, dict) and isinstance(now[k], dict):
            if not _same_run(v, now[k]):
                return False
        elif v != now[k]:
            return False
    return True


def main_job(
    out: Path, seeds: int, overrides: list[str], runs: Path, train_missing: bool = True, name: str = "main_job_seeds"
) -> list[dict]:
    """The main job for seeds 0..seeds-1 (resumable runs in ``runs``/seed_<k>), then the table and the frames.

    A run directory that holds a run of another configuration is an error (delete it or pass another --runs), so a
    table never mixes settings. ``train_missing=False`` (``--table-only``) writes the table of the finished seeds
    and lists the others as not finished.
    """
    import imageio.v3 as iio
    from omegaconf import OmegaConf, open_dict

    from distill import rundir
    from distill.cli import compose_config as _compose
    from distill.config import ConfigError
    from distill.train import train

    at = provenance.produced()  # the code and environment this study starts with
    rows, frames = [], []
    for s in range(seeds):
        run = runs / f"seed_{s}"
        cfg = _compose([*overrides, f"seed={s}", "trainer.progress=false"])
        with open_dict(cfg):
            cfg.paths.run_dir = str(run)
        saved = run / rundir.CONFIG
        if saved.exists() and not _same_run(_result_config(OmegaConf.load(saved)), _result_config(cfg)):
            raise ConfigError(
                f"{run} holds a run of another configuration than `main_job{''.join(' --set ' + o for o in overrides)}`"
                f" (seed {s}); delete it or pass another --runs"
            )
        sidecar = run / "reproduce_load.json"
        load = os.getloadavg()[0]
        previous = rundir.read_metrics(run)
        finished_before = previous.get("status") in ("finished", "diverged")
        if not finished_before and not train_missing:
            rows.append({"seed": s, "status": "not finished", "load": None})
            continue
        m = previous if finished_before else train(cfg, run)  # a finished run is read back, not rebuilt
        if not finished_before or not sidecar.exists():  # trained now: record the load it ran under
            sidecar.write_text(json.dumps({"load_at_start": load, "load_at_end": os.getloadavg()[0]}))
        row = {"seed": s, "status": m.get("status"), "load": json.loads(sidecar.read_text())["load_at_start"]}
        if m.get("status") != "finished":
            rows.append(row)
            print(f"seed {s}: {m.get('status')} ({m.get('diverged_reason')})", flush=True)
            continue
        row.update({k: m.get(k) for _, k, _ in MAIN_JOB_COLUMNS})
        rows.append(row)
        frames.append(iio.imread(run / "final.png"))
        print(f"seed {s}: " + ", ".join(f"{k} {row[k]}" for _, k, _ in MAIN_JOB_COLUMNS), flush=True)
    write_main_job(out, rows, frames, overrides, seeds, name, runs, at)
    return rows


def write_main_job(
    out: Path,
    rows: list[dict],
    frames: list,
    overrides: list[str],
    seeds: int,
    name: str = "main_job_seeds",
    runs: Path | None = None,
    at: dict | None = None,
) -> None:
    """``name``.csv (one row per seed; default main_job_seeds), .md (the same with median (min..max), headed by the
    provenance stamp) and .png (the final frames, one seed per row, each the run's four orbit views); the record
    ``name``.provenance.json beside them (:mod:`distill.provenance`). ``runs``: the runs' folder, named in the
    recorded command unless it is the default; ``at``: :func:`distill.provenance.produced` when the study started."""
    import imageio.v3 as iio

    out.mkdir(parents=True, exist_ok=True)
    keys = ["seed", "status", *[k for _, k, _ in MAIN_JOB_COLUMNS], "load"]
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if frames:
        iio.imwrite(out / f"{name}.png", np.concatenate([pad(f[..., :3]) for f in frames], 0))
    done = [r for r in rows if r["status"] == "finished"]
    cmd = "python -m distill.reproduce main_job --seeds " + str(seeds) + "".join(f" --set {o}" for o in overrides)
    if runs is not None and Path(runs).resolve() != (ROOT / "outputs" / "reproduce" / "main_job").resolve():
        rel = Path(runs).resolve()
        cmd += f" --runs {rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel}"
    cmd += "" if name == "main_job_seeds" else f" --name {name}"
    lines = [
        f"`{cmd}`: the main job (`python train.py`{''.join(' ' + o for o in overrides)}) for seeds 0..{seeds - 1}. "
        + " ".join(
            [
                f"Rows of {name}.png top to bottom (four orbit views each). Ground truth from the exact prior",
                "(`Analytic3DPrior.evaluate`, trainer.eval_views orbit views at 64x64): PSNR / SSIM against the",
                "nearest object's mean texture; mode commitment: 1 - best / second-best fit residual (~0: an even",
                "blend of two objects); contrast vs object: the contrast the render keeps relative to the objects'",
                "own renders (1: not faded, f: faded by f toward a constant colour; a blend of objects is still 1);",
                "nearest share: the nearest object's share of that contrast (1: that object alone, 0.5: an even",
                "blend); final / best frame contrast: luminance range of the final frame over the best progress",
                "frame (a frame that drops a half hat also lowers it). seconds: metrics.json's run time (training,",
                "export, metrics); load: the 1-minute load average when the seed started.",
            ]
        ),
        "",
        "| seed | " + " | ".join(c for c, _, _ in MAIN_JOB_COLUMNS) + " | load |",
        "|---" * (len(MAIN_JOB_COLUMNS) + 2) + "|",
    ]
    for r in rows:
        if r["status"] != "finished":
            lines.append(f"| {r['seed']} | {r['status']} |" + " |" * len(MAIN_JOB_COLUMNS))
            continue
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in MAIN_JOB_COLUMNS]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['load']:.1f} |")
    if done:
        cells = []
        for _, k, fmt in MAIN_JOB_COLUMNS:
            v = [r[k] for r in done if r.get(k) is not None]
            cells.append(median_range(v, fmt) if v else "-")
        lines.append("| median (min..max) | " + " | ".join(cells) + " | |")
        commit = statistics.median(r["mode_commitment"] for r in done)
        within = sum(abs(r["contrast_vs_object"] - 1.0) <= 0.1 for r in done)
        lines += [
            "",
            f"Targets (issue 17): median mode commitment >= 0.5: **{'met' if commit >= 0.5 else 'not met'}** "
            f"({commit:.2f}); every seed's contrast within 10 % of its object's: "
            f"**{'met' if within == len(done) else 'not met'}** ({within} of {len(done)} seeds); "
            f"{len(done)} of {len(rows)} seeds finished"
            + "".join(
                f", {n} {st}"
                for st in sorted({r["status"] for r in rows} - {"finished"})
                for n in [sum(r["status"] == st for r in rows)]
            )
            + ".",
        ]
    files = [f"{name}.md", f"{name}.csv", *([f"{name}.png"] if frames else [])]
    stamp = provenance.record(out, name, cmd, files, at)
    (out / f"{name}.md").write_text(provenance.with_stamp("\n".join(lines) + "\n", stamp))
    print("\n".join([stamp, "", *lines]))
