"""Paper reproductions on the analytic prior: ``python -m distill.reproduce fig2_1|kappa_study|main_job``.

fig2_1       one prompt, >= 4 seeds: DDIM sampling (CFG 7.5), cached kappa, SDS (CFG 7.5 and 100), SDI (official and
             paper jump) under the official 2D notebook protocol and the small-step protocol; PNG + table of
             ground-truth metrics (commitment, contrast, gamut, realism) (paper Fig. 2.1).
kappa_study  residual of eq. 4.4 (x0 units) of each kappa strategy over t (paper Fig. 6.3 right);
             CSV + plot.
main_job     the main job (``python train.py``) for seeds 0..N-1: a table of the prior's ground-truth metrics per
             seed with median and range (main_job_seeds.md / .csv) and all final frames (main_job_seeds.png).
             Runs resume from outputs/reproduce/main_job/seed_<k>; ``--set key=value`` adds config overrides.
ism_study    SDS vs SDI vs ISM (LucidDreamer) on the exact 2D and 3D priors, same seeds: ground-truth metrics
             (PSNR to the nearest true object, mode commitment, texture realism per band, gamut) + PNG.
Outputs go to --out (default docs/); runs to outputs/reproduce/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _png(x01: torch.Tensor, zoom: int = 4) -> np.ndarray:
    img = (x01[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return np.kron(img, np.ones((zoom, zoom, 1), dtype=np.uint8))


FIG_METRICS = ("blend_w_max", "blend_sum", "psnr_nearest", "out_of_gamut", "realism_high_band")
# rows of fig2_1.png: (label, overrides); DDIM sampling is computed directly
FIG_ROWS = {
    "notebook: cached kappa (= DDIM)": ["experiment=cached_notebook_2d"],
    "notebook: SDS 7.5": ["experiment=sds_notebook_2d"],
    "notebook: SDS 100": ["experiment=sds_notebook_2d", "cfg=sds_high"],
    "notebook: SDI, official jump": ["experiment=sdi_notebook_2d", "inversion.jump=official"],
    "notebook: SDI, paper jump": ["experiment=sdi_notebook_2d", "inversion.jump=paper"],
    "small-step: SDS 7.5": ["experiment=sds_2d"],
    "small-step: SDS 100": ["experiment=sds_2d", "cfg=sds_high"],
    "small-step: SDI, official jump": ["experiment=sdi_2d", "inversion.jump=official"],
    "small-step: SDI, paper jump": ["experiment=sdi_2d", "inversion.jump=paper"],
}


def fig2_1(out: Path, seeds: int, steps: int, prompt: str) -> None:
    """DDIM, cached kappa, SDS 7.5 / 100 and SDI (official and paper jump) under the official 2D notebook protocol
    (a target every 25 Adam steps, lr 0.1) and the small-step protocol (a target every step, lr 0.02)."""
    import imageio.v3 as iio

    from distill.cli import compose_config as _compose
    from distill.config import build
    from distill.ddim import ddim_sample
    from distill.guidance import guided_eps
    from distill.prompts import PromptConfig, PromptProcessor
    from distill.train import train

    base = [f"prompt={prompt}", "logger=none", "trainer.progress=false", "trainer.image_every=0"]
    base += ["trainer.checkpoint_every=0", "trainer.export=false"]
    rows, images = [], {}
    prior = build(_compose(["experiment=sdi_2d"]).prior, "prior")
    cond = PromptProcessor(PromptConfig(prompt=prompt, view_dependent=False, perp_neg=False), prior)(None, 1)
    ddim = "DDIM sampling, CFG 7.5 (50 steps)"
    images[ddim] = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(s)
        n = prior.cfg.image_size
        x = ddim_sample(
            torch.randn(1, 3, n, n, generator=g, dtype=torch.float64),
            lambda x, t: guided_eps(prior, x, t, cond, 7.5),
            prior.alphas_cumprod,
            50,
        )
        rows.append({"method": ddim, "seed": s, **prior.image_metrics(x, prompt)})
        images[ddim].append(_png(prior.decode(x)))
    for label, ov in FIG_ROWS.items():
        images[label] = []
        for s in range(seeds):
            extra = [f"trainer.max_steps={steps}"] if label.startswith("small-step") else []
            name = "_".join(o.split("=")[-1] for o in ov)
            run = ROOT / "outputs" / "reproduce" / "fig2_1" / f"{name}_seed={s}"
            m = train(_compose([*ov, *base, *extra, f"seed={s}", "trainer.resume=false"]), run)
            rows.append({"method": label, "seed": s, **{k: m[k] for k in (*FIG_METRICS, "nearest_component")}})
            images[label].append(iio.imread(run / "final.png").repeat(4, 0).repeat(4, 1))
        print(f"{label}: done", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    pad = lambda a: np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255)  # noqa: E731
    grid = np.concatenate([np.concatenate([pad(i) for i in imgs], 1) for imgs in images.values()], 0)
    iio.imwrite(out / "fig2_1.png", grid)
    keys = ["method", "seed", *FIG_METRICS]
    with open(out / "fig2_1.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"`python -m distill.reproduce fig2_1`: prompt `{prompt}`, {seeds} seeds (columns of fig2_1.png), rows top "
        "to bottom as below; median (min..max). blend_w_max ~1: committed to one component, ~0.5: an even blend; "
        "blend_sum < 1: faded towards grey; out_of_gamut: fraction of values outside [-1, 1]; realism_high_band: "
        "1 = a true sample's texture, 0 = the component mean.",
        "",
        "| Row | " + " | ".join(FIG_METRICS) + " |",
        "|---" * (len(FIG_METRICS) + 1) + "|",
    ]
    for label in images:
        vals = [[r[k] for r in rows if r["method"] == label] for k in FIG_METRICS]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{statistics.median(v):.3f} ({min(v):.3f}..{max(v):.3f})" for v in vals)
            + " |"
        )
    (out / "fig2_1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def kappa_study(out: Path, samples: int, prompt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.cli import compose_config as _compose
    from distill.config import build
    from distill.ddim import InversionConfig
    from distill.guidance import guided_eps
    from distill.kappa import STRATEGIES, KappaConfig, eq44_residual, make_kappa
    from distill.prompts import PromptConfig, PromptProcessor

    prior = build(_compose(["experiment=sdi_2d"]).prior, "prior")
    cond = PromptProcessor(PromptConfig(prompt=prompt, view_dependent=False, perp_neg=False), prior)(None, 1)
    eps_inv = lambda x, t: guided_eps(prior, x, t, cond, -7.5)  # noqa: E731
    ts = list(range(50, 1000, 50))
    g = torch.Generator().manual_seed(0)
    x0s = prior.sample(prompt, samples, g).float()
    res = {name: [] for name in STRATEGIES}
    for t in ts:
        for name in STRATEGIES:
            k = make_kappa(KappaConfig(name), InversionConfig(eta=0.0, jump="none"))
            vals = [
                float(
                    eq44_residual(
                        x0s[i : i + 1],
                        k(x0s[i : i + 1], t, eps_inv, prior.alphas_cumprod, g).kappa,
                        t,
                        eps_inv,
                        prior.alphas_cumprod,
                    )
                )
                for i in range(samples)
            ]
            res[name].append(statistics.mean(vals))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kappa_study.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", *res])
        for i, t in enumerate(ts):
            w.writerow([t, *[f"{res[n][i]:.5f}" for n in res]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in res.items():
        ax.plot(ts, v, marker="o", ms=3, label=name)
    ax.set_xlabel("t")
    ax.set_ylabel("eq. 4.4 residual, RMS in x0 units")
    ax.set_title(f"kappa strategies (analytic prior, '{prompt}', CFG inv -7.5)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "kappa_study.png", dpi=120)
    print(open(out / "kappa_study.csv").read())


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


def main_job(out: Path, seeds: int, overrides: list[str], runs: Path, train_missing: bool = True) -> list[dict]:
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
    write_main_job(out, rows, frames, overrides, seeds)
    return rows


def write_main_job(out: Path, rows: list[dict], frames: list, overrides: list[str], seeds: int) -> None:
    """main_job_seeds.csv (one row per seed), .md (the same with median (min..max)) and .png (the final frames, one
    seed per row, each the run's four orbit views)."""
    import imageio.v3 as iio

    out.mkdir(parents=True, exist_ok=True)
    keys = ["seed", "status", *[k for _, k, _ in MAIN_JOB_COLUMNS], "load"]
    with open(out / "main_job_seeds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if frames:
        pad = lambda a: np.pad(a[..., :3], ((2, 2), (2, 2), (0, 0)), constant_values=255)  # noqa: E731
        iio.imwrite(out / "main_job_seeds.png", np.concatenate([pad(f) for f in frames], 0))
    done = [r for r in rows if r["status"] == "finished"]
    cmd = "python -m distill.reproduce main_job --seeds " + str(seeds) + "".join(f" --set {o}" for o in overrides)
    lines = [
        f"`{cmd}`: the main job (`python train.py`{''.join(' ' + o for o in overrides)}) for seeds 0..{seeds - 1}. "
        + " ".join(
            [
                "Rows of main_job_seeds.png top to bottom (four orbit views each). Ground truth from the exact prior",
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
            cells.append(
                f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})" if v else "-"
            )
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
    (out / "main_job_seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# SDS with the SDI code's x0 loss (the SDI code with inversion off, as the 2D experiments): the loss SDS had when
# docs/ism_study_* were measured; guidance=sds alone is threestudio's (1 - ab) loss now
_SDS_X0 = ["guidance=sds", "guidance.loss=x0", "guidance.loss_reduction=mean"]
_NEG = ["experiment=sdi_2d", "guidance=ism", "prompt_processor.negative_prompt=negative"]
# ism_study: (label, overrides) per prior; every row shares the seeds, the prompt, the scene and the optimiser, and
# uses its own method's schedule (SDS uniform, SDI anneal, ISM warm-up) and the prior's CFG scale (2D 7.5, 3D 3)
ISM_STUDY = {
    "2d": {
        "SDS": ["experiment=sdi_2d", *_SDS_X0],
        "SDI": ["experiment=sdi_2d", "guidance=ddim_inversion"],
        "ISM (uncond '')": ["experiment=sdi_2d", "guidance=ism"],
        "ISM (uncond = negative class)": [
            "experiment=sdi_2d",
            "guidance=ism",
            "prompt_processor.negative_prompt=negative",
        ],
        # the quirk switches, each against its base row above (target_prompt only matters with a negative prompt)
        "ISM (uncond = negative class), target_prompt=negative": [*_NEG, "guidance.target_prompt=negative"],
        "ISM (uncond = negative class), CFG 3": [*_NEG, "cfg.fwd=3"],
        "ISM (uncond = negative class), CFG 3, target_prompt=negative": [
            *_NEG,
            "cfg.fwd=3",
            "guidance.target_prompt=negative",
        ],
        "ISM (uncond ''), weighting=one_minus_ab": [
            "experiment=sdi_2d",
            "guidance=ism",
            "guidance.weighting=one_minus_ab",
        ],
        "ISM (uncond ''), offset_noise=0": ["experiment=sdi_2d", "guidance=ism", "guidance.offset_noise=0"],
        # LucidDreamer's CFG convention with SDS: is the blow-up the interval's or the negative class's?
        "SDS (uncond = negative class)": [
            "experiment=sdi_2d",
            *_SDS_X0,
            "prompt_processor.negative_prompt=negative",
        ],
    },
    "3d": {
        "SDS": ["prior=analytic3d", *_SDS_X0],
        "SDI": ["prior=analytic3d", "guidance=ddim_inversion"],
        "ISM (uncond '')": ["prior=analytic3d", "guidance=ism"],
        "ISM (uncond = negative class)": [
            "prior=analytic3d",
            "guidance=ism",
            "prompt_processor.negative_prompt=negative",
        ],
    },
}
ISM_METRICS = {
    "2d": ("psnr_nearest", "blend_w_max", "realism_low_band", "realism_high_band", "out_of_gamut"),
    "3d": (
        "psnr",
        "psnr_fit",
        "mode_commitment",
        "texture_realism_low",
        "texture_realism_mid",
        "texture_realism_high",
        "saturated",
    ),
}


def _saturated(trainer, views: int = 8) -> float:
    """Gamut proxy of a 3D scene (its colours are squashed into [0, 1]): the fraction of albedo channel values of
    ``views`` orbit renders at the ends of the range (< 0.02 or > 0.98)."""
    from distill.scene.cameras import orbit_cameras

    c = trainer.spec.camera
    with torch.no_grad():
        rgb = trainer.scene.render(orbit_cameras(views, c.height, c.width, device=trainer.device), shading="albedo")
    rgb = rgb["rgb"].double()
    return float(((rgb < 0.02) | (rgb > 0.98)).double().mean())


def ism_study(
    out: Path, seeds: int, steps_2d: int, steps_3d: int, size_3d: int, only: str = "", first_seed: int = 0
) -> None:
    """SDS, SDI and ISM (with the prediction's unconditional branch "" or the prior's negative class, LucidDreamer's
    convention; on 2D also each quirk switch) on the 2D prior (``experiment=sdi_2d``, "a red circle") and the 3D prior
    (the main job's set-up, "a snowman", ``size_3d`` px), ``seeds`` seeds each (seed-major, so a stopped study has
    every method on its first seeds); writes ism_study_<prior>.{md,csv,png} to ``out`` after every run. A run already
    done with the same config (``study.json`` in its directory) is read back, not retrained: several processes can
    share the seeds (``first_seed``) and a last call over all seeds collects them."""
    import json

    import imageio.v3 as iio
    from omegaconf import OmegaConf, open_dict

    from distill.cli import compose_config as _compose
    from distill.config import build
    from distill.train import Trainer, check_run_config

    base = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.checkpoint_every=0"]
    base += ["trainer.export=false", "trainer.resume=false", "trainer.threads=1"]
    extra = {
        "2d": [f"trainer.max_steps={steps_2d}"],
        "3d": [f"trainer.max_steps={steps_3d}", f"camera.height={size_3d}", f"camera.width={size_3d}"],
    }
    command = (
        f"`python -m distill.reproduce ism_study --seeds {seeds} --steps {steps_2d} --steps-3d {steps_3d} "
        f"--size-3d {size_3d}{f' --only {only}' if only else ''}`"
        + (f" (seeds {first_seed}..{seeds - 1} in this call)" if first_seed else "")
    )
    for prior_name, table in ISM_STUDY.items():
        if only and prior_name != only:
            continue
        rows, images = [], {label: [] for label in table}
        for s in range(first_seed, seeds):
            for i, (label, ov) in enumerate(table.items()):
                run = ROOT / "outputs" / "reproduce" / "ism_study" / f"{prior_name}_row{i}_seed={s}"
                cfg = _compose([*ov, *base, *extra[prior_name], f"seed={s}"])
                done = run / "study.json"  # a run of this study already done with the same config: reuse it
                key = OmegaConf.to_container(cfg, resolve=False)
                cached = json.loads(done.read_text()) if done.exists() else {}
                if cached.get("config") == key:
                    m = cached["metrics"]
                else:
                    with open_dict(cfg):
                        cfg.paths.run_dir = str(run)
                    run.mkdir(parents=True, exist_ok=True)
                    check_run_config(cfg)
                    trainer = Trainer(cfg, run)
                    m = trainer.fit(build(cfg.logger, "logger", run_dir=run, run_config={}, run_name=run.name))
                    if prior_name == "3d":
                        m["saturated"] = _saturated(trainer)
                    done.write_text(json.dumps({"config": key, "metrics": m}, default=str))
                rows.append({**m, "prior": prior_name, "method": label, "seed": s, "status": m["status"]})
                png = run / "final.png"  # a diverged run may have none: a white tile
                images[label].append(iio.imread(png)[..., :3] if png.exists() else np.full((32, 32, 3), 255, np.uint8))
                print(f"{prior_name} seed {s}: {label}: {m['status']}", flush=True)
                _ism_write(out, prior_name, rows, images, command)


def _ism_write(out: Path, prior_name: str, rows: list[dict], images: dict, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = ISM_METRICS[prior_name]
    _ism_png(
        {k: v for k, v in images.items() if v}, out / f"ism_study_{prior_name}.png", zoom=4 if prior_name == "2d" else 1
    )
    with open(out / f"ism_study_{prior_name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prior", "method", "seed", "status", *metrics], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    n_seeds = len({r["seed"] for r in rows})
    lines = [
        f"{command} ({prior_name}): {n_seeds} seeds (the columns of ism_study_{prior_name}.png, rows top to bottom as "
        "below), median (min..max).",
        "",
        "| method | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for label in ISM_STUDY[prior_name]:
        sel = [r for r in rows if r["method"] == label]
        if not sel:
            continue
        cells = []
        for k in metrics:
            v = [float(r[k]) for r in sel if r.get(k) is not None]
            cells.append(f"{statistics.median(v):.3f} ({min(v):.3f}..{max(v):.3f})" if v else "-")
        n_div = sum(1 for r in sel if r["status"] != "finished")
        lines.append(f"| {label}{f' ({n_div} diverged)' if n_div else ''} | " + " | ".join(cells) + " |")
    (out / f"ism_study_{prior_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _ism_png(images: dict[str, list[np.ndarray]], path: Path, zoom: int = 1) -> None:
    """One row per method, one column per seed; rows padded to a common width."""
    import imageio.v3 as iio

    pad = lambda a: np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255)  # noqa: E731
    strips = []
    for imgs in images.values():
        imgs = [i.repeat(zoom, 0).repeat(zoom, 1) for i in imgs]
        strips.append(np.concatenate([pad(i) for i in imgs], 1))
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    iio.imwrite(path, np.concatenate(strips, 0))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m distill.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["fig2_1", "kappa_study", "main_job", "ism_study"])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="main_job: a config override")
    p.add_argument("--runs", type=Path, default=ROOT / "outputs" / "reproduce" / "main_job", help="main_job's runs")
    p.add_argument("--table-only", action="store_true", help="main_job: tabulate the finished seeds, train none")
    p.add_argument("--steps-3d", type=int, default=400, help="ism_study: steps of the 3D runs")
    p.add_argument("--size-3d", type=int, default=48, help="ism_study: render size of the 3D runs")
    p.add_argument("--only", choices=["", "2d", "3d"], default="", help="ism_study: one prior only")
    p.add_argument("--first-seed", type=int, default=0, help="ism_study: start at this seed (share seeds)")
    a = p.parse_args()
    if a.what == "main_job":
        main_job(a.out, a.seeds, a.set, a.runs, train_missing=not a.table_only)
    elif a.what == "ism_study":
        ism_study(a.out, a.seeds, a.steps, a.steps_3d, a.size_3d, a.only, a.first_seed)
    elif a.what == "fig2_1":
        fig2_1(a.out, a.seeds, a.steps, a.prompt)
    else:
        kappa_study(a.out, a.samples, a.prompt)


if __name__ == "__main__":
    main()
