"""Table 6.1 and the per-run listing as ``wandb.Table``s (offline unless a key is configured)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eval.table.aggregate import Aggregate
from eval.table.cells import gt_rows
from eval.table.csv_files import RUN_COLUMNS, csv_rows, run_rows


def log_eval_run(
    payload, *, project: str, name: str, entity: str | None, out_dir: Path | str | None, config: dict[str, Any]
) -> dict[str, Any]:
    """One W&B run of job type ``eval`` (offline unless WANDB_MODE or a key says otherwise): ``run.log(payload(wandb))``
    then ``finish()``, always; returns the run's mode, dir, id and url. The table and the sweep figure both log so."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project=project,
        entity=entity,
        name=name,
        job_type="eval",
        dir=str(out_dir) if out_dir else None,
        mode=mode,
        config=config,
    )
    try:
        run.log(payload(wandb))
        info = {"mode": mode, "dir": str(getattr(run, "dir", "")), "id": run.id, "url": getattr(run, "url", None)}
    finally:
        run.finish()
    return info


def log_wandb(
    agg: Aggregate,
    project: str = "sdi-lab",
    name: str | None = None,
    out_dir: Path | str | None = None,
    entity: str | None = None,
    paper: bool = True,
) -> dict[str, Any]:
    """Log the table (and the per-run listing) as ``wandb.Table``s; offline unless a key is configured."""
    cols, rows = csv_rows(agg, paper)
    data = [[r.get(c) for c in cols] for r in rows]

    def payload(wandb) -> dict[str, Any]:
        out = {
            "table_6_1": wandb.Table(columns=cols, data=data),
            "runs": wandb.Table(columns=RUN_COLUMNS, data=[[r.get(c) for c in RUN_COLUMNS] for r in run_rows(agg)]),
        }
        gcols, grows = gt_rows(agg)
        if grows:
            out["ground_truth"] = wandb.Table(columns=gcols, data=grows)
        return out

    config = {"root": str(agg.root), "clip_models": agg.models, "n_runs": len(agg.records)}
    return log_eval_run(
        payload, project=project, name=name or f"table-{agg.root.name}", entity=entity, out_dir=out_dir, config=config
    )
