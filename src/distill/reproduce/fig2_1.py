"""``python -m distill.reproduce fig2_1`` (paper Fig. 2.1): one prompt on the exact 2D prior, >= 4 seeds: DDIM
sampling (CFG 7.5), cached kappa, SDS (CFG 7.5 and 100), SDI (official and paper jump) under the official 2D notebook
protocol and the small-step protocol; fig2_1.png + a table (fig2_1.md / .csv) of ground-truth metrics (commitment,
contrast, gamut, realism)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from distill import provenance
from distill.reproduce.common import ROOT, median_range, pad


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

    at = provenance.produced()  # the code and environment this study starts with
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
        lines.append(f"| {label} | " + " | ".join(median_range(v) for v in vals) + " |")
    command = f"python -m distill.reproduce fig2_1 --seeds {seeds} --steps {steps} --prompt '{prompt}'"
    stamp = provenance.record(out, "fig2_1", command, ["fig2_1.md", "fig2_1.csv", "fig2_1.png"], at)
    (out / "fig2_1.md").write_text(provenance.with_stamp("\n".join(lines) + "\n", stamp))
    print("\n".join([stamp, "", *lines]))
