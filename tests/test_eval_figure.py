"""The sweep's figure on the CPU smoke sweeps (real trainer, written by the sweep-end callback): one column per
swept value in sweep order, one row per prompt, each cell the pixels of the run the sidecar JSON names, diverged
runs framed and labelled; the fixed views of a 3D scene are its front, side and back (an analytic sphere)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# kappa_smoke with a second axis whose second value diverges (an SGD learning rate that overflows in 3 steps)
DIVERGING = ("optimizer.name=sgd", "guidance.loss_reduction=sum", "scene.lr=0.01,1e30", "trainer.log_every=1")
SWEEPS = {
    "table61_smoke": ("trainer.log_every=1",),
    "cfg_smoke": ("trainer.log_every=1",),
    "kappa_smoke": DIVERGING,
}


def _value(s: str):
    """'a cat' / "a cat" / a cat -> a cat; numbers compare as floats (1e30 == 1e+30)."""
    s = str(s).strip().strip("'\"")
    try:
        return float(s)
    except ValueError:
        return s


def expected_axes(name: str, overrides: tuple[str, ...]) -> dict[str, list]:
    """The swept keys and values, read from sweeps/<name>.yaml and the command line without Hydra's parser."""
    params = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    axes = {k.lstrip("+"): [_value(v) for v in str(vals).split(",")] for k, vals in params.items()}
    for o in overrides:
        k, v = o.split("=", 1)
        if "," in v:
            axes[k.lstrip("+")] = [_value(x) for x in v.split(",")]
    return axes


def run_overrides(run: Path) -> dict:
    return {
        o.split("=", 1)[0].lstrip("+"): _value(o.split("=", 1)[1])
        for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    }


def load(sweep: Path) -> tuple[dict, np.ndarray]:
    data = json.loads((sweep / "eval" / "figure.json").read_text())
    return data, np.asarray(Image.open(sweep / "eval" / "figure.png").convert("RGB")).astype(np.int16)


def crop(img: np.ndarray, box: list[int]) -> np.ndarray:
    x, y, w, h = box
    return img[y : y + h, x : x + w]


@pytest.mark.parametrize("name", list(SWEEPS))
def test_figure_columns_are_the_swept_values_and_rows_the_prompts(smoke_sweep, name):
    sweep = smoke_sweep(name, *SWEEPS[name])
    data, img = load(sweep)  # written by the sweep-end callback
    assert (sweep / "eval" / "figure.pdf").stat().st_size > 0
    axes = expected_axes(name, SWEEPS[name])
    prompt_axis = axes.pop("prompt", None)
    col_keys = list(axes)
    n_cols = math.prod(len(v) for v in axes.values())
    cfg = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
    prompts = prompt_axis or [cfg["prompt"]]

    assert [c["label"] for c in data["columns"]] and len(data["columns"]) == n_cols
    assert [r["prompt"] for r in data["rows"]] == prompts
    assert len(data["cells"]) == n_cols * len(prompts)
    # geometry: the image is the size the sidecar says; cell boxes tile it in a rows x columns grid
    assert img.shape[:2] == (data["height"], data["width"])
    xs = sorted({c["box"][0] for c in data["cells"]})
    ys = sorted({c["box"][1] for c in data["cells"]})
    assert len(xs) == n_cols and len(ys) == len(prompts)
    for c in data["cells"]:
        x, y, w, h = c["box"]
        assert (x, y) == (xs[c["col"]], ys[c["row"]])
        assert 0 <= x and x + w <= data["width"] and 0 <= y and y + h <= data["height"]
        run = sweep / c["run"]
        # the run in the cell has the cell's column values, in the sweep's order (first axis outermost) ...
        ov = run_overrides(run)
        idx, stride = c["col"], n_cols
        for k in col_keys:
            stride //= len(axes[k])
            assert ov[k] == axes[k][idx // stride], (c, k, ov)
            idx %= stride
        # ... and the cell's prompt
        assert yaml.safe_load((run / "config.yaml").read_text())["prompt"] == prompts[c["row"]]
        # the cell's pixels are the run's final image (2D smoke sweeps): PNG is lossless and each axes is
        # pixel-aligned at dpi 100 with interpolation "none", so only Agg rounding (<= 2 levels) may differ
        status = json.loads((run / "metrics.json").read_text())["status"]
        if status == "finished":
            final = Image.open(run / "final.png").convert("RGB").resize((w, h), Image.NEAREST)
            diff = np.abs(crop(img, c["box"]) - np.asarray(final).astype(np.int16))
            assert diff.max() <= 2, (c["run"], diff.max())


def test_diverged_run_appears_as_diverged(smoke_sweep):
    from eval.figure import DIVERGED_RGB, FigureLayout

    sweep = smoke_sweep("kappa_smoke", *DIVERGING)
    data, img = load(sweep)
    frame = FigureLayout().frame
    n_div = 0
    for c in data["cells"]:
        metrics = json.loads((sweep / c["run"] / "metrics.json").read_text())
        diverged = metrics["status"] == "diverged"
        n_div += diverged
        assert (c["state"] == "diverged") == diverged, c
        if diverged:
            assert c["reason"] == metrics["diverged_reason"] == "nan"
        cell = crop(img, c["box"])
        border = np.concatenate([cell[:frame].reshape(-1, 3), cell[-frame:].reshape(-1, 3)])
        red = np.all(np.abs(border - np.array(DIVERGED_RGB)) <= 2, axis=-1)
        assert red.all() if diverged else not red.any(), c
    assert n_div == 5  # every run with scene.lr=1e30 (one per kappa strategy)


class TinySphere:
    """A sphere of radius 0.6 at the origin coloured by its normal, (n + 1) / 2, on white (rays of the real
    cameras); a camera at elevation e, azimuth a sees the normal n = (cos e cos a, cos e sin a, sin e) at its
    image centre."""

    def __init__(self, radius: float = 0.6):
        self.radius = radius

    def to(self, device):
        return self

    def render(self, cameras, generator=None, shading=None):
        import torch

        o, d = cameras.rays()
        b = (o * d).sum(-1)
        disc = b * b - ((o * o).sum(-1) - self.radius**2)
        hit = disc > 0
        p = o + (-b - disc.clamp_min(0).sqrt())[..., None] * d
        rgb = torch.where(hit[..., None], (p / self.radius + 1) / 2, torch.ones_like(p))
        return {"rgb": rgb.permute(0, 3, 1, 2).clamp(0, 1), "opacity": hit.float()[:, None]}


def _sphere_run(root: Path, name: str, status: str = "finished") -> Path:
    import torch

    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"scene": {}, "step": 1}, run / "checkpoints" / "last.pt")
    cfg = {"prompt": "a ball", "seed": 0, "method": name, "trainer": {"max_steps": 1}, "scene": {"_target_": "x"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    reason = "nan" if status == "diverged" else None
    (run / "metrics.json").write_text(json.dumps({"status": status, "steps": 1, "diverged_reason": reason}))
    return run


def test_fixed_views_are_front_side_back_and_the_turntable_the_orbit(tmp_path):
    from distill.scene.cameras import orbit_cameras
    from eval.figure import make_figure
    from eval.views import VIEW_AZIMUTHS, RunRenderer, ViewOptions

    _sphere_run(tmp_path / "sw", "sds")
    _sphere_run(tmp_path / "sw", "vsd", status="diverged")
    load = lambda run_dir, device: ({}, TinySphere())  # noqa: E731
    opts = ViewOptions(size=33, turntable_frames=8, turntable_size=33)  # odd: a pixel sits on the optical axis
    fig = make_figure(tmp_path / "sw", opts=opts, device="cpu", load_scene=load)
    img = np.asarray(Image.open(fig.png).convert("RGB")).astype(float)
    elev = float(orbit_cameras(1, 8, 8).elevation[0])
    assert fig.data["views"] == ["front", "side", "back"] and [c["label"] for c in fig.data["columns"]] == [
        "SDS",
        "VSD",
    ]

    def centre_colour(azimuth: float) -> np.ndarray:
        e, a = math.radians(elev), math.radians(azimuth)
        n = np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
        return (n + 1) / 2 * 255

    for c in fig.data["cells"]:
        assert c["views"] == ["front", "side", "back"] and len(c["view_boxes"]) == 3
        if c["state"] == "diverged":  # framed and labelled across its middle (see the smoke sweep test)
            continue
        for name, (x, y, w, h) in zip(c["views"], c["view_boxes"], strict=True):
            got = img[y + h // 2, x + w // 2]
            # the centre ray hits the sphere where its normal points at the camera: exact up to uint8 rounding
            np.testing.assert_allclose(got, centre_colour(VIEW_AZIMUTHS[name]), atol=1.0, err_msg=f"{c['run']} {name}")
    assert [c["state"] for c in fig.data["cells"]] == ["finished", "diverged"]

    gif = RunRenderer(tmp_path / "sw" / "sds", opts, "cpu", load_scene=load).turntable()
    frames = Image.open(gif)
    assert frames.n_frames == 8
    for k in (0, 2, 5):
        frames.seek(k)
        got = np.asarray(frames.convert("RGB")).astype(float)[16, 16]
        # GIF stores a palette: up to 256 colours, so allow the palette's quantisation step
        np.testing.assert_allclose(got, centre_colour(-180 + k * 45.0), atol=8.0, err_msg=f"frame {k}")


def test_figure_cli_logs_to_wandb_offline(smoke_sweep, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from eval.__main__ import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = smoke_sweep("cfg_smoke", *SWEEPS["cfg_smoke"])
    assert main(["figure", str(sweep), "--out", str(tmp_path), "--device", "cpu", "--wandb"]) == 0
    data = json.loads((tmp_path / "figure.json").read_text())
    assert [c["label"] for c in data["columns"]] == ["CFG 7.5 / 7.5", "CFG 1 / 1", "CFG 7.5 / 1", "CFG 7.5 / -7.5"]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert main(["figure", str(sweep), "--view-size", "0"]) == 2


def test_sweep_callback_adds_figure_report_and_wandb():
    from omegaconf import OmegaConf

    from distill.callbacks import SweepEvalCallback

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": "/s"}}, "logger": {"_target_": "distill.loggers.csv.CSVLogger"}})
    cb = SweepEvalCallback("table", ["--no-paper"])
    assert cb.commands(cfg) == [["table", "/s", "--no-paper"], ["report", "/s"]]
    cfg.logger = {"_target_": "distill.loggers.wandb.WandbLogger", "project": "p", "entity": None}
    assert cb.commands(cfg)[-1] == ["figure", "/s", "--wandb", "--wandb-project", "p"]
    assert SweepEvalCallback(report=False).commands(cfg)[1][0] == "figure"
    assert SweepEvalCallback(figure=False, report=False).commands(cfg) == [["table", "/s"]]
