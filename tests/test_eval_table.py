"""Table aggregation on synthetic run directories: finished, diverged (nan / oom / empty volume),
half-finished, missing, failed and unreadable runs; the numbers are checked by hand."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import pytest  # noqa: E402
import yaml  # noqa: E402

SD = "distill.priors.stable_diffusion.StableDiffusionPrior"
ANALYTIC = "distill.priors.analytic.AnalyticPrior"
NERF = "distill.scene.nerf.NeRFScene"
IMAGE = "distill.scene.image.ImageScene"


def make_run(
    root: Path,
    name: str,
    *,
    method: str | None = None,
    guidance: str = "sds",
    prompt: str = "a cat",
    max_steps: int = 10000,
    prior: str = SD,
    scene: str = NERF,
    metrics: dict | None = None,
    clip: list[float] | None = None,
    iqa: dict[str, list[float]] | None = None,
    render: dict | None = None,
    model: str = "tiny-openai-clip",
    checkpoint: bool = True,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "prompt": prompt,
        "seed": 0,
        "guidance": {"name": guidance},
        "trainer": {"max_steps": max_steps},
        "prior": {"_target_": prior},
        "scene": {"_target_": scene},
    }
    if method:
        cfg["method"] = method
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.pt").write_bytes(b"not a real checkpoint")
    if clip is not None:
        iqa = iqa or {k: [50.0] * len(clip) for k in ("quality", "sharpness", "real")}
        summ = lambda v: {"per_view": v, "mean": sum(v) / len(v), "std": 0.0, "n": len(v)}  # noqa: E731
        scores = {
            "version": 1,
            "prompt": prompt,
            "model": {"spec": model},
            "n_views": len(clip),
            "clip_score": summ(clip),
            "iqa": {k: summ(v) for k, v in iqa.items()},
        }
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / "scores.json").write_text(json.dumps(scores))
    if render is not None:
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / "render.json").write_text(json.dumps(render))
    return run


def fin(seconds: float, mem_mb: float, **extra) -> dict:
    return {
        "status": "finished",
        "steps": 10000,
        "max_steps": 10000,
        "seconds": seconds,
        "peak_memory_mb": mem_mb,
        "diverged": False,
        "diverged_reason": None,
        "device": "cuda:0",
        **extra,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    # --- SDS on SD + NeRF (nested a level deeper, as a multirun would) ---
    make_run(
        root,
        "sds/p0",
        prompt="p0",
        metrics=fin(600, 1024),
        clip=[30.0, 32.0],
        iqa={"quality": [70.0, 80.0], "sharpness": [99.0, 97.0], "real": [90.0, 100.0]},
        render={"empty": False, "nan_views": 0, "mean_opacity": [0.3, 0.2]},
    )
    make_run(
        root,
        "sds/p1",
        prompt="p1",
        metrics=fin(1200, 2048),
        clip=[28.0, 34.0],
        iqa={"quality": [60.0, 90.0], "sharpness": [95.0, 93.0], "real": [80.0, 90.0]},
    )
    make_run(
        root,
        "sds/p2_nan",
        prompt="p2",
        metrics={**fin(100, 512), "status": "diverged", "diverged": True, "diverged_reason": "nan"},
    )
    make_run(
        root,
        "sds/p3_empty",
        prompt="p3",
        metrics=fin(1800, 3072),
        clip=[5.0, 5.0],
        render={"empty": True, "nan_views": 0, "mean_opacity": [0.0, 0.001]},
    )
    make_run(
        root,
        "sds/p4_oom",
        prompt="p4",
        metrics={"status": "failed", "diverged": True, "diverged_reason": "oom", "steps": 3},
    )
    make_run(
        root,
        "sds/p5_running",
        prompt="p5",
        metrics={"status": "running", "steps": 500, "max_steps": 10000, "seconds": 50, "peak_memory_mb": 999},
    )
    make_run(root, "sds/p6_missing", prompt="p6", metrics=None)
    make_run(
        root,
        "sds/p7_crash",
        prompt="p7",
        metrics={"status": "failed", "diverged": False, "error": "Traceback ...\nRuntimeError: disk full"},
    )
    # --- SDI (guidance ddim_inversion, no explicit method) ---
    make_run(root, "sdi/p0", guidance="ddim_inversion", prompt="p0", metrics=fin(3000, 4096), clip=[33.0, 35.0])
    # --- analytic prior, 2D image scene, explicit method label ---
    make_run(
        root,
        "analytic/a",
        method="sdi",
        guidance="ddim_inversion",
        prior=ANALYTIC,
        scene=IMAGE,
        max_steps=500,
        metrics=fin(6, 100, psnr=20.0, ssim=0.5, realism_high_band=0.8, resumed_from_step=0, mesh_vertices=123),
    )
    make_run(
        root,
        "analytic/b",
        method="sdi",
        guidance="ddim_inversion",
        prior=ANALYTIC,
        scene=IMAGE,
        max_steps=500,
        metrics=fin(12, 300, psnr=24.0, ssim=0.7, realism_high_band=0.6),
    )
    # --- unreadable: metrics.json without config.yaml; corrupt metrics.json ---
    (root / "orphan").mkdir()
    (root / "orphan" / "metrics.json").write_text(json.dumps(fin(1, 1)))
    bad = make_run(root, "sds/p8_corrupt", prompt="p8", metrics=None)
    (bad / "metrics.json").write_text("{not json")
    # --- things that must not be mistaken for runs ---
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text("a: 1\n")
    return root


def _group(agg, label, prior=None):
    gs = [g for g in agg.groups if g.label == label and (prior is None or g.prior == prior)]
    assert len(gs) == 1, [(g.label, g.prior) for g in agg.groups]
    return gs[0]


def test_aggregate_numbers(sweep):
    from eval.table import aggregate

    agg = aggregate(sweep)
    assert [g.label for g in agg.groups] == ["SDS 10k", "SDI 10k", "SDI 500"]

    sds = _group(agg, "SDS 10k")
    assert sds.counts == {"finished": 2, "diverged": 3, "running": 1, "interrupted": 0, "missing": 1, "failed": 2}
    reasons = sorted(r.state.reason for r in sds.runs if r.state.diverged)
    assert reasons == ["empty", "nan", "oom"]
    assert sds.div_pct == pytest.approx(100 * 3 / 5)
    # CLIP pooled over the views of the two finished runs (the empty-volume run is excluded)
    clip = [30.0, 32.0, 28.0, 34.0]
    m = sum(clip) / 4
    assert sds.stat("clip") == pytest.approx((m, math.sqrt(sum((v - m) ** 2 for v in clip) / 4)))
    assert sds.stat("quality") == pytest.approx((75.0, math.sqrt(125.0)))
    assert sds.stat("sharpness")[0] == pytest.approx(96.0)
    assert sds.n_views == 4
    # time / memory: runs the trainer finished (including the empty-volume one), not running / diverged ones
    assert sds.time_min == pytest.approx((600 + 1200 + 1800) / 3 / 60)
    assert sds.vram_gb == pytest.approx((1024 + 2048 + 3072) / 3 / 1024)

    sdi = _group(agg, "SDI 10k")
    assert sdi.method == "ddim_inversion" and sdi.paper_key == "sdi"
    assert sdi.stat("clip") == pytest.approx((34.0, 1.0)) and sdi.div_pct == 0.0

    an = _group(agg, "SDI 500")
    assert an.analytic and an.prior == "AnalyticPrior" and an.scene == "ImageScene"
    assert an.gt_names() == ["psnr", "ssim", "realism_high_band"]  # bookkeeping and export entries left out
    assert an.gt_stat("psnr") == pytest.approx((22.0, 2.0, 2))
    assert an.gt_stat("ssim") == pytest.approx((0.6, 0.1, 2))
    assert an.stat("clip") is None and an.time_min == pytest.approx(0.15)

    assert [p.name for p in agg.broken] == ["orphan"]
    corrupt = [r for r in sds.runs if r.path.name == "p8_corrupt"][0]
    assert corrupt.state.state == "failed" and "unreadable metrics.json" in corrupt.state.reason


def test_markdown_csv_latex_outputs(sweep, tmp_path):
    from eval.table import aggregate, to_markdown, write_tables

    agg = aggregate(sweep, prompts=["p0", "p1", "p9"])
    md = to_markdown(agg)
    # our row, then the paper's row of the same method, then the paper's remaining rows
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    labels = [(ln.split("|")[1].strip(), ln.split("|")[2].strip()) for ln in lines[1:]]
    assert labels[:3] == [("SDS 10k", "ours"), ("SDS 10k", "paper"), ("SDI 10k", "ours")]
    assert ("SDI (ours) 10k", "paper") == labels[3]
    assert {"VSD 25k", "ESD 25k", "HiFA 25k"} <= {lab for lab, src in labels if src == "paper"}
    sds_line = lines[1]
    assert "31.00\u00b12.24" in sds_line and "75\u00b111.2" in sds_line and "60.0" in sds_line
    assert "20min" in sds_line and "2.0GB" in sds_line and "1 running, 1 missing, 2 failed" in sds_line
    assert "29.81\u00b12.49" in md and "33.47\u00b12.49" in md and "18.6" in md
    assert "CLIP model: tiny-openai-clip" in md
    # explicit lists of runs left out of the averages
    for needle in (
        "Diverged: 3",
        "p2_nan",
        "nan",
        "p3_empty",
        "empty",
        "p4_oom",
        "oom",
        "Half-finished (status running): 1",
        "sds/p5_running",
        "step 500/10000",
        "Missing (no metrics.json): 1",
        "sds/p6_missing",
        "disk full",
        "orphan",
        "p9",
        "Ground truth",
        "22.000\u00b12.000",
    ):
        assert needle in md, needle

    files = write_tables(agg, tmp_path / "out")
    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    ours = {r["label"]: r for r in rows if r["source"] == "ours"}
    assert float(ours["SDS 10k"]["clip_mean"]) == pytest.approx(31.0)
    assert float(ours["SDS 10k"]["div_pct"]) == pytest.approx(60.0)
    assert int(ours["SDS 10k"]["n_running"]) == 1 and int(ours["SDS 10k"]["n_missing"]) == 1
    assert float(ours["SDI 500"]["gt_psnr_mean"]) == pytest.approx(22.0)
    assert ours["SDS 10k"]["gt_psnr_mean"] == ""
    paper = {r["label"]: r for r in rows if r["source"] == "paper"}
    assert float(paper["SDI (ours) 10k"]["clip_mean"]) == pytest.approx(33.47)
    tex = files["latex"].read_text()
    assert r"\begin{tabular}" in tex and r"31.00$\pm$2.24" in tex and r"Div.\%" in tex
    runs = list(csv.DictReader(io.StringIO(files["runs"].read_text())))
    assert len(runs) == 12 and {r["state"] for r in runs} == {"finished", "diverged", "running", "missing", "failed"}


def test_single_run_directory_and_cli(sweep, tmp_path):
    from eval.__main__ import main

    assert main(["table", str(sweep / "sds" / "p0"), "--out", str(tmp_path / "one")]) == 0
    md = (tmp_path / "one" / "table.md").read_text()
    assert "| SDS 10k | ours |" in md and "31.00\u00b11.00" in md and "1 finished" in md
    assert main(["table", str(sweep), "--no-paper"]) == 0  # default output: <sweep>/eval/
    md = (sweep / "eval" / "table.md").read_text()
    assert "| paper |" not in md and "SDS 10k" in md


def test_not_a_run_gives_a_clear_error(tmp_path, capsys):
    from eval.__main__ import main
    from eval.runs import NotARunError, find_runs, require_run_dir

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(NotARunError, match=r"empty is not a run directory .*config\.yaml"):
        find_runs(tmp_path / "empty")
    with pytest.raises(NotARunError, match=r"not a run directory: it has no config\.yaml.*notes\.txt"):
        require_run_dir(tmp_path / "empty")
    with pytest.raises(NotARunError, match="does not exist"):
        find_runs(tmp_path / "nope")
    assert main(["table", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "config.yaml" in err and "Traceback" not in err
    assert main(["render", str(tmp_path / "empty" / "notes.txt")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_cli_module_entry_point(sweep, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(_SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "eval", "table", str(sweep), "--out", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "SDS 10k" in out.stdout and (tmp_path / "t" / "table.csv").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "eval", "score", str(tmp_path / "missing-dir")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_divergence_rules():
    from eval.divergence import classify, is_empty_volume

    assert is_empty_volume([0.0, 0.0, 0.5]) and not is_empty_volume([0.0, 0.5, 0.5])
    assert not is_empty_volume([0.0, 0.5])  # exactly half is not "most"
    assert is_empty_volume([float("nan")] * 3)
    assert not is_empty_volume(None) and not is_empty_volume([])
    assert is_empty_volume([0.02, 0.02, 0.5], opacity_threshold=0.05)
    assert classify(None).state == "missing"
    assert classify({"status": "finished"}, {"empty": True}).reason == "empty"
    assert classify({"status": "finished"}, {"nan_views": 2}).reason == "nan"
    assert classify({"status": "diverged"}).reason == "unspecified"
    assert classify({"status": "failed", "diverged_reason": "oom"}).reason == "oom"
    assert classify({"status": "weird"}).state == "failed"
    assert classify({"status": "running", "steps": 3, "max_steps": 9}).reason == "step 3/9"


def test_wandb_table_offline(sweep, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from eval.table import aggregate, log_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    info = log_wandb(aggregate(sweep), project="sdi-lab-test", out_dir=tmp_path)
    assert info["mode"] == "offline"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
