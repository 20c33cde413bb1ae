"""``python -m distill.reproduce kappa_study`` (paper Fig. 6.3 right): the residual of eq. 4.4 (x0 units) of each
kappa strategy over t on the exact 2D prior; kappa_study.csv + kappa_study.png."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import torch

from distill import provenance


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

    at = provenance.produced()  # the code and environment this study starts with
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
    command = f"python -m distill.reproduce kappa_study --samples {samples} --prompt '{prompt}'"
    print(provenance.record(out, "kappa_study", command, ["kappa_study.csv", "kappa_study.png"], at))
    print(open(out / "kappa_study.csv").read())
