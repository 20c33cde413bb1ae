"""`python -m distill.reproduce main_job`: the main job over seeds, its table and its picture (tiny budget)."""

import csv
import json

import imageio.v3 as iio
import pytest
import torch

from distill.config import ConfigError
from distill.provenance import stamp_line
from distill.reproduce.main_job import MAIN_JOB_COLUMNS, main_job

# the main job's config at a tiny budget: 2 steps at 16x16 with a progress frame each step, small texture basis
TINY = [
    "trainer.max_steps=2",
    "trainer.image_every=1",
    "trainer.checkpoint_every=0",
    "trainer.export=false",
    "trainer.eval_views=2",
    "trainer.threads=1",
    "logger=none",
    "camera.height=16",
    "camera.width=16",
    "prior.n_basis=12",
    "prior.supersample=1",
    "prior.trace_steps=24",
    "prior.objects_per_prompt=2",
]


def test_main_job_table_and_picture(tmp_path):
    out, runs = tmp_path / "docs", tmp_path / "runs"
    rows = main_job(out, 2, TINY, runs)
    assert [r["seed"] for r in rows] == [0, 1] and all(r["status"] == "finished" for r in rows)
    with open(out / "main_job_seeds.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["seed"] for t in table] == ["0", "1"]
    for t, r in zip(table, rows):
        for _, key, _ in MAIN_JOB_COLUMNS:  # every column is the run's own metrics.json value
            assert float(t[key]) == pytest.approx(r[key])
            assert key in (runs / f"seed_{t['seed']}" / "metrics.json").read_text()
    md = (out / "main_job_seeds.md").read_text()
    assert "python -m distill.reproduce main_job --seeds 2" in md and "| median (min..max) |" in md
    # provenance: the .md starts with the stamp of the record written beside it (commit, torch, CPU capability, date)
    rec = json.loads((out / "main_job_seeds.provenance.json").read_text())
    assert md.splitlines()[0] == stamp_line(rec) and rec["produced"]["torch"] == torch.__version__
    assert (
        rec["command"]
        == f"python -m distill.reproduce main_job --seeds 2{''.join(' --set ' + o for o in TINY)} --runs {runs}"
    )
    assert rec["files"] == ["main_job_seeds.md", "main_job_seeds.csv", "main_job_seeds.png"]
    assert md.count("\n| 0 |") == 1 and md.count("\n| 1 |") == 1
    # one row of four 16x16 orbit views per seed, each padded by 2 pixels
    grid = iio.imread(out / "main_job_seeds.png")
    assert grid.shape == (2 * (16 + 4), 4 * 16 + 4, 3)
    frame = iio.imread(runs / "seed_1" / "final.png")
    assert (grid[20 + 2 : 20 + 2 + 16, 2 : 2 + 64] == frame[..., :3]).all()
    # a second call resumes: the finished runs are read back, not retrained
    stamp = (runs / "seed_0" / "final.png").stat().st_mtime_ns
    assert main_job(out, 2, TINY, runs) == rows
    assert (runs / "seed_0" / "final.png").stat().st_mtime_ns == stamp
    # --table-only: the finished seeds' table, the others listed as not finished
    rows3 = main_job(out, 3, TINY, runs, train_missing=False)
    assert rows3[:2] == rows and rows3[2]["status"] == "not finished" and not (runs / "seed_2").exists()
    assert "\n| 2 | not finished |" in (out / "main_job_seeds.md").read_text()
    # --name: another scene's table beside this one (docs/main_job_gaussians_seeds.*), the default files untouched
    before = (out / "main_job_seeds.md").read_text()
    assert main_job(out, 2, TINY, runs, train_missing=False, name="other_seeds") == rows
    assert "--name other_seeds" in (out / "other_seeds.md").read_text() and (out / "other_seeds.png").exists()
    with open(out / "other_seeds.csv") as f:
        assert [t["seed"] for t in csv.DictReader(f)] == ["0", "1"]
    assert (out / "main_job_seeds.md").read_text() == before
    # a run directory of another configuration is not mixed into the table
    with pytest.raises(ConfigError, match="another configuration"):
        main_job(out, 1, [*TINY, "trainer.max_steps=4"], runs)


def test_a_run_made_before_the_config_gained_a_key_still_resumes():
    from distill.reproduce.main_job import _same_run

    assert _same_run({"a": {"b": 1}}, {"a": {"b": 1, "new": 0}})  # a key added to the config later
    assert not _same_run({"a": {"b": 1}}, {"a": {"b": 2}})  # a changed value
    assert not _same_run({"a": {"b": 1, "old": 0}}, {"a": {"b": 1}})  # a key the config no longer has
