"""The CLI of :mod:`distill.reproduce`: ``python -m distill.reproduce <study> [options]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill import reproduce
from distill.reproduce.common import ROOT
from distill.reproduce.fig2_1 import fig2_1
from distill.reproduce.ism_study import ism_study
from distill.reproduce.kappa_study import kappa_study
from distill.reproduce.main_job import main_job


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m distill.reproduce", description=reproduce.__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["fig2_1", "kappa_study", "main_job", "ism_study"])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="main_job: a config override")
    p.add_argument("--runs", type=Path, default=ROOT / "outputs" / "reproduce" / "main_job", help="main_job's runs")
    p.add_argument("--table-only", action="store_true", help="main_job: tabulate the finished seeds, train none")
    p.add_argument("--name", default="main_job_seeds", help="main_job: stem of the .md / .csv / .png it writes")
    p.add_argument("--steps-3d", type=int, default=400, help="ism_study: steps of the 3D runs")
    p.add_argument("--size-3d", type=int, default=48, help="ism_study: render size of the 3D runs")
    p.add_argument("--only", choices=["", "2d", "3d"], default="", help="ism_study: one prior only")
    p.add_argument("--first-seed", type=int, default=0, help="ism_study: start at this seed (share seeds)")
    a = p.parse_args()
    if a.what == "main_job":
        main_job(a.out, a.seeds, a.set, a.runs, train_missing=not a.table_only, name=a.name)
    elif a.what == "ism_study":
        ism_study(a.out, a.seeds, a.steps, a.steps_3d, a.size_3d, a.only, a.first_seed)
    elif a.what == "fig2_1":
        fig2_1(a.out, a.seeds, a.steps, a.prompt)
    else:
        kappa_study(a.out, a.samples, a.prompt)


if __name__ == "__main__":
    main()
