"""Rendering orbit views from run checkpoints, empty-volume / NaN detection, and render -> score -> table.

Three kinds of scenes:
* an analytic sphere (defined here, rendered through the real orbit cameras and their rays),
  injected with ``load_scene=``: fast, and it can be made empty or NaN on purpose;
* the real 2D ``ImageScene`` and 3D ``NeRFScene`` of distill, saved as checkpoints the way
  ``distill.rundir`` expects and read back by ``distill.rundir.load_scene`` (skipped with a reason
  when those modules are absent).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("distill.scene.cameras", reason="distill.scene.cameras (orbit_cameras) is needed to render")


class SphereScene(nn.Module):
    """A sphere of ``radius`` at the origin, coloured by its normal, on a white background."""

    def __init__(self, radius: float = 0.6, nan: bool = False):
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(float(radius)))
        self.nan = nan
        self.calls: list[int] = []

    def render(self, cameras, generator=None, shading=None):
        self.calls.append(len(cameras))
        o, d = cameras.rays()  # (B, H, W, 3)
        r = self.radius
        b = (o * d).sum(-1)
        c = (o * o).sum(-1) - r * r
        disc = b * b - c
        hit = (disc > 0) & (r > 0)
        t = -b - disc.clamp_min(0).sqrt()
        p = o + t[..., None] * d
        n = p / r.clamp_min(1e-6)
        rgb = torch.where(hit[..., None], (n + 1) / 2, torch.ones_like(n))
        if self.nan:
            rgb = rgb * float("nan")
        return {
            "rgb": rgb.permute(0, 3, 1, 2).clamp(0, 1) if not self.nan else rgb.permute(0, 3, 1, 2),
            "opacity": hit.float()[:, None],
        }


def make_run(
    root: Path,
    name: str = "run",
    status: str = "finished",
    prompt: str = "a colourful ball",
    scene_cfg: dict | None = None,
    checkpoint: dict | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "prompt": prompt,
        "seed": 0,
        "guidance": {"name": "sds"},
        "trainer": {"max_steps": 10},
        "prior": {"_target_": "distill.priors.analytic.AnalyticPrior"},
        "scene": scene_cfg or {"_target_": "tests.SphereScene"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "status": status,
                "steps": 10,
                "max_steps": 10,
                "seconds": 1.0,
                "peak_memory_mb": 10.0,
                "diverged": False,
                "diverged_reason": None,
            }
        )
    )
    if checkpoint is None:
        (run / "checkpoints").mkdir()
        torch.save({"scene": {}, "step": 10}, run / "checkpoints" / "last.pt")
    else:
        from distill import rundir

        rundir.save_checkpoint(run, checkpoint)
    return run


def loader(scene):
    return lambda run_dir, device: ({}, scene.to(device))


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_render_orbit_views_in_batches(tmp_path):
    from distill.scene.cameras import orbit_cameras
    from eval.render import RenderOptions, render_run

    run = make_run(tmp_path)
    scene = SphereScene()
    opts = RenderOptions(n_views=6, resolution=24, batch_size=4)
    res = render_run(run, opts, device="cpu", progress=False, load_scene=loader(scene))
    assert res.status == "rendered"
    assert scene.calls == [4, 2]  # batched
    views = sorted((run / "eval" / "views").glob("view_*.png"))
    assert [v.name for v in views] == [f"view_{i:03d}.png" for i in range(6)]
    sheet = _png(run / "eval" / "contact_sheet.png")
    assert sheet.shape[1] > 6 * 24 and sheet.shape[0] >= 24
    info = json.loads((run / "eval" / "render.json").read_text())
    assert info["n_views"] == 6 and info["height"] == info["width"] == 24 and info["empty"] is False
    assert len(info["mean_opacity"]) == 6 and min(info["mean_opacity"]) > 0.05 and info["nan_views"] == 0
    assert info["cameras"]["azimuth_deg"] == pytest.approx([-180, -120, -60, 0, 60, 120])
    # each file is the render of its own camera (order kept across batches)
    cams = orbit_cameras(6, 24, 24)
    for k in (0, 3, 5):
        one = scene.render(cams[torch.tensor([k])])["rgb"][0].detach().permute(1, 2, 0).numpy()
        np.testing.assert_allclose(_png(views[k]) / 255.0, one, atol=1 / 255 + 1e-6)
    assert not np.array_equal(_png(views[0]), _png(views[3]))  # the orbit actually moves

    n_calls = len(scene.calls)
    again = render_run(run, opts, device="cpu", progress=False, load_scene=loader(scene))
    assert again.status == "up-to-date" and len(scene.calls) == n_calls  # nothing re-rendered
    fewer = render_run(
        run, RenderOptions(n_views=3, resolution=24), device="cpu", progress=False, load_scene=loader(scene)
    )
    assert fewer.status == "rendered" and len(list((run / "eval" / "views").glob("*.png"))) == 3


def test_empty_volume_and_nan_mark_the_run_diverged(tmp_path):
    from eval.render import RenderOptions, render_run
    from eval.table import aggregate

    opts = RenderOptions(n_views=4, resolution=16)
    empty = make_run(tmp_path / "sweep", "empty")
    r = render_run(empty, opts, device="cpu", progress=False, load_scene=loader(SphereScene(radius=0.0)))
    info = json.loads((empty / "eval" / "render.json").read_text())
    assert info["empty"] is True and info["empty_views"] == 4 and "EMPTY" in r.message
    nan = make_run(tmp_path / "sweep", "nan")
    render_run(nan, opts, device="cpu", progress=False, load_scene=loader(SphereScene(nan=True)))
    assert json.loads((nan / "eval" / "render.json").read_text())["nan_views"] == 4
    ok = make_run(tmp_path / "sweep", "ok")
    render_run(ok, opts, device="cpu", progress=False, load_scene=loader(SphereScene()))
    # a tiny object: visible, but below a strict threshold in every view
    small = make_run(tmp_path / "sweep", "small")
    render_run(
        small,
        RenderOptions(n_views=4, resolution=16, empty_opacity=0.5),
        device="cpu",
        progress=False,
        load_scene=loader(SphereScene(radius=0.3)),
    )
    states = {r.path.name: (r.state.state, r.state.reason) for r in aggregate(tmp_path / "sweep").records}
    assert states == {
        "empty": ("diverged", "empty"),
        "nan": ("diverged", "nan"),
        "ok": ("finished", None),
        "small": ("diverged", "empty"),
    }


def test_unfinished_runs_are_not_rendered_unless_asked(tmp_path):
    from eval.render import RenderOptions, render_run

    run = make_run(tmp_path, status="running")
    opts = RenderOptions(n_views=2, resolution=8)
    r = render_run(run, opts, device="cpu", progress=False, load_scene=loader(SphereScene()))
    assert r.status == "skipped" and "running" in r.message and not (run / "eval" / "views").exists()
    r = render_run(run, opts, device="cpu", progress=False, any_status=True, load_scene=loader(SphereScene()))
    assert r.status == "rendered"


def test_render_score_table_end_to_end(tmp_path):
    import tiny_clip

    from eval.metrics import ClipEvaluator
    from eval.render import RenderOptions, load_views
    from eval.score import score_run
    from eval.table import aggregate, to_markdown

    run = make_run(tmp_path / "sweep", "sds_ball")
    ev = ClipEvaluator(str(tiny_clip.tiny_clip_dir()))
    res = score_run(
        run,
        ev,
        render_opts=RenderOptions(n_views=5, resolution=32),
        device="cpu",
        progress=False,
        load_scene=loader(SphereScene()),
    )
    assert res.status == "scored"
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores["model"]["spec"] == str(tiny_clip.tiny_clip_dir()) and scores["prompt"] == "a colourful ball"
    assert scores["n_views"] == 5 and len(scores["clip_score"]["per_view"]) == 5
    assert set(scores["iqa"]) == {"quality", "sharpness", "real"}
    # the stored numbers are the evaluator's on the saved PNGs
    views = load_views(run)
    np.testing.assert_allclose(
        scores["clip_score"]["per_view"], ev.clip_scores(views, "a colourful ball").numpy(), atol=1e-4
    )
    np.testing.assert_allclose(scores["iqa"]["real"]["per_view"], ev.iqa_scores(views)["real"].numpy(), atol=1e-4)
    assert scores["clip_score"]["std"] == pytest.approx(float(np.std(scores["clip_score"]["per_view"])), abs=1e-9)
    assert (
        score_run(
            run,
            ev,
            render_opts=RenderOptions(n_views=5, resolution=32),
            device="cpu",
            progress=False,
            load_scene=loader(SphereScene()),
        ).status
        == "up-to-date"
    )
    g = aggregate(tmp_path / "sweep").groups[0]
    assert g.stat("clip")[0] == pytest.approx(scores["clip_score"]["mean"], abs=1e-9)
    assert "tiny-openai-clip" in to_markdown(aggregate(tmp_path / "sweep"))


def test_image_scene_checkpoint_through_rundir(tmp_path):
    pytest.importorskip("distill.rundir")
    image_mod = pytest.importorskip("distill.scene.image")
    from eval.render import RenderOptions, render_run

    cfg = image_mod.ImageSceneConfig(height=8, width=8)
    scene = image_mod.ImageScene(cfg)
    with torch.no_grad():
        scene.image.copy_(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    run = make_run(
        tmp_path,
        scene_cfg={"_target_": "distill.scene.image.ImageScene", "height": 8, "width": 8},
        checkpoint={"scene": scene.state_dict(), "step": 10},
    )
    res = render_run(run, RenderOptions(n_views=3, resolution=8), device="cpu", progress=False)
    assert res.status == "rendered", res.message
    expected = (scene.image[0].detach().permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    for v in sorted((run / "eval" / "views").glob("view_*.png")):
        np.testing.assert_array_equal(_png(v), expected)
    info = json.loads((run / "eval" / "render.json").read_text())
    assert info["mean_opacity"] is None and info["empty"] is False and info["scene"] == "ImageScene"


def test_nerf_checkpoint_renders_orbit_views_via_cli(tmp_path):
    """A 3D checkpoint saved as the trainer does, rebuilt by distill.rundir.load_scene."""
    pytest.importorskip("distill.rundir")
    nerf = pytest.importorskip("distill.scene.nerf", reason="distill.scene.nerf (the 3D scene) is not written yet")
    from eval.__main__ import main

    scene_cfg = {
        "_target_": "distill.scene.nerf.NeRFScene",
        "encoding": {
            "n_levels": 2,
            "log2_hashmap_size": 10,
            "base_resolution": 4,
            "start_level": 2,
            "backend": "torch",
        },
        "background": {"kind": "solid"},
        "renderer": {"samples_per_ray": 16, "occupancy": {"enabled": False}},
    }
    scene = nerf.NeRFScene(scene_cfg)
    run = make_run(tmp_path, "nerf_run", scene_cfg=scene_cfg, checkpoint={"scene": scene.state_dict(), "step": 10})
    code = main(
        ["render", str(run), "--views", "4", "--resolution", "16", "--render-batch", "3", "--device", "cpu", "--quiet"]
    )
    assert code == 0
    views = sorted((run / "eval" / "views").glob("view_*.png"))
    assert len(views) == 4 and _png(views[0]).shape == (16, 16, 3)
    info = json.loads((run / "eval" / "render.json").read_text())
    assert info["scene"] == "NeRFScene" and info["shading"] == "albedo"  # step 10 < ambient-only steps
    assert len(info["mean_opacity"]) == 4 and all(0.0 <= o <= 1.0 for o in info["mean_opacity"])
    assert info["empty"] is False  # the density blob at the origin is visible from every view
    # evaluation renders are deterministic: rendering again gives the same pixels
    first = _png(views[1])
    assert (
        main(["render", str(run), "--views", "4", "--resolution", "16", "--device", "cpu", "--quiet", "--overwrite"])
        == 0
    )
    np.testing.assert_array_equal(first, _png(views[1]))
