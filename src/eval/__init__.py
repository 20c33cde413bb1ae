"""Evaluation of sdi-lab runs: render orbit views, score them with CLIP, aggregate into Table 6.1.

    python -m eval render RUN_OR_SWEEP     # <run>/eval/views/*.png, contact_sheet.png, render.json
    python -m eval score  RUN_OR_SWEEP     # <run>/eval/scores.json (CLIP score, CLIP-IQA per view)
    python -m eval table  RUN_OR_SWEEP     # table.md / table.csv / table.tex / runs.csv (+ --wandb)
    python -m eval figure RUN_OR_SWEEP     # figure.png / .pdf / .json: swept values x prompts (+ --wandb)
    python -m eval report RUN_OR_SWEEP     # report.html: one offline page (table, figure, runs, curves)

Modules: ``runs`` (finding / reading run directories), ``divergence`` (what counts as diverged),
``clip_models`` (offline CLIP loading, HF or open_clip), ``metrics`` (torchmetrics CLIPScore and
CLIP-IQA with a pinned input range), ``render``, ``score``, ``table`` (a package: paper rows,
aggregation, one module per output format), ``sweep`` (the sweep's grid from multirun.yaml),
``labels`` (the paper's labels), ``views`` (front / side / back and turntables, cached), ``figure``,
``curves`` (scalars.csv plots), ``report``. See docs/evaluation.md.

Importing this package is cheap (no torch); submodules import what they need.
"""

from eval.runs import EvalError, NotARunError, find_runs, is_run_dir, load_run

__all__ = ["EvalError", "NotARunError", "find_runs", "is_run_dir", "load_run"]
