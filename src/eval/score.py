"""Score the rendered views of a run against its prompt -> <run>/eval/scores.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.metrics import ClipEvaluator
from eval.render import RenderOptions, load_views, render_run, views_mtime
from eval.runs import SCORES_JSON, EvalError, load_run, read_json, require_run_dir, view_paths, write_json

SCORES_VERSION = 1


@dataclass
class ScoreResult:
    run_dir: Path
    status: str  # scored | up-to-date | skipped
    message: str = ""
    scores: dict[str, Any] | None = None


def is_up_to_date(run_dir: Path, evaluator: ClipEvaluator) -> bool:
    old, _ = read_json(run_dir / SCORES_JSON)
    if not old or old.get("version") != SCORES_VERSION:
        return False
    if old.get("model", {}).get("spec") != evaluator.model_info["spec"]:
        return False
    if old.get("iqa_prompts") != {k: list(v) for k, v in evaluator.iqa_prompts.items()}:
        return False
    return old.get("views_mtime") == views_mtime(run_dir) and old.get("n_views") == len(view_paths(run_dir))


def score_run(
    run_dir: Path | str,
    evaluator: ClipEvaluator,
    batch_size: int = 16,
    overwrite: bool = False,
    render: bool = True,
    render_opts: RenderOptions | None = None,
    any_status: bool = False,
    device: str | None = "auto",
    progress: bool = True,
    load_scene=None,
) -> ScoreResult:
    """CLIP score + CLIP-IQA of every rendered view of ``run_dir``; renders first when views are missing."""
    run_dir = require_run_dir(run_dir)
    info = load_run(run_dir)
    prompt = info.prompt
    if not prompt:
        raise EvalError(f"{run_dir}: no prompt in config.yaml (key `prompt`) or metrics.json")
    if render:
        r = render_run(
            run_dir, render_opts, device=device, any_status=any_status, progress=progress, load_scene=load_scene
        )
        if r.status == "skipped" and not view_paths(run_dir):
            return ScoreResult(run_dir, "skipped", f"not rendered: {r.message}")
    if not view_paths(run_dir):
        return ScoreResult(run_dir, "skipped", "no rendered views (eval/views/); run `python -m eval render` first")
    if not overwrite and is_up_to_date(run_dir, evaluator):
        return ScoreResult(
            run_dir, "up-to-date", "scores exist for these views and this model", read_json(run_dir / SCORES_JSON)[0]
        )
    t0 = time.time()
    images = load_views(run_dir)
    res = evaluator.score(images, prompt, batch_size=batch_size)
    scores = {
        "version": SCORES_VERSION,
        "prompt": prompt,
        "method": info.method,
        "model": evaluator.model_info,
        "n_views": int(images.shape[0]),
        "height": int(images.shape[2]),
        "width": int(images.shape[3]),
        "clip_score": res["clip_score"],
        "iqa": res["iqa"],
        "iqa_prompts": {k: list(v) for k, v in evaluator.iqa_prompts.items()},
        "scales": {
            "clip_score": "max(100 * cos, 0), 0-100 (torchmetrics CLIPScore)",
            "iqa": "percent: 100 * softmax over (positive, negative) anchors of 100 * cos "
            "(torchmetrics CLIPImageQualityAssessment)",
            "std": "population std (ddof=0) over views",
        },
        "views_mtime": views_mtime(run_dir),
        "device": str(evaluator.device),
        "seconds": time.time() - t0,
    }
    write_json(run_dir / SCORES_JSON, scores)
    iqa = " ".join(f"{k} {v['mean']:.1f}" for k, v in res["iqa"].items())
    return ScoreResult(
        run_dir, "scored", f"CLIP {res['clip_score']['mean']:.2f}+-{res['clip_score']['std']:.2f} {iqa}", scores
    )
