"""Render evaluation views of a trained run: N cameras on an orbit -> PNGs, contact sheet, render.json.

    <run>/eval/views/view_000.png ... view_{N-1}.png
    <run>/eval/contact_sheet.png
    <run>/eval/render.json     cameras, per-view mean opacity, empty-volume / NaN verdict, timings

The scene is rebuilt with ``distill.rundir.load_scene(run_dir, device)`` and rendered in batches
(``scene.render(cameras, generator, shading) -> {"rgb": (B,3,H,W) in [0,1], "opacity": (B,1,H,W)}``)
on ``distill.scene.cameras.orbit_cameras``. A scene whose render ignores cameras (the 2D image
scene: batch 1, no opacity) gives N copies of its image and no empty-volume verdict.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval import divergence
from eval.runs import (
    CHECKPOINT,
    CONTACT_SHEET,
    RENDER_JSON,
    VIEWS_DIR,
    EvalError,
    read_json,
    require_run_dir,
    view_paths,
    write_json,
)

RENDER_VERSION = 1


@dataclass
class RenderOptions:
    n_views: int = 50
    resolution: int = 512  # height = width of each view
    elevation_deg: float | None = None  # None: orbit_cameras' default
    distance: float | None = None
    fovy_deg: float | None = None
    batch_size: int = 4
    shading: str = "auto"  # auto (see eval_shading) | none (scene's default) | a mode the scene knows
    seed: int = 0  # generator passed to scene.render (stochastic backgrounds / sampling)
    empty_opacity: float = divergence.EMPTY_OPACITY_THRESHOLD
    empty_fraction: float = divergence.EMPTY_VIEW_FRACTION

    def validate(self) -> None:
        if self.n_views <= 0:
            raise EvalError(f"--views must be positive, got {self.n_views}")
        if self.resolution <= 0:
            raise EvalError(f"--resolution must be positive, got {self.resolution}")
        if self.batch_size <= 0:
            raise EvalError(f"--batch-size must be positive, got {self.batch_size}")
        if not 0.0 <= self.empty_fraction <= 1.0:
            raise EvalError(f"--empty-fraction must lie in [0, 1], got {self.empty_fraction}")

    def camera_kwargs(self) -> dict[str, float]:
        kw = {"elevation_deg": self.elevation_deg, "distance": self.distance, "fovy_deg": self.fovy_deg}
        return {k: float(v) for k, v in kw.items() if v is not None}

    def key(self) -> dict[str, Any]:
        """What makes two renders the same (compared to decide whether re-rendering is needed)."""
        d = asdict(self)
        d.pop("batch_size")
        return d


@dataclass
class RenderResult:
    run_dir: Path
    status: str  # rendered | up-to-date | skipped
    message: str = ""
    info: dict[str, Any] | None = None


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def eval_shading(scene: Any, requested: str | None = "auto") -> str | None:
    """Shading passed to ``scene.render`` for evaluation views.

    ``auto`` mirrors threestudio's test renders (the paper's evaluation images): lambertian
    ("diffuse") shading with the light at the camera, or albedo while the run was still in its
    ambient-only phase or was trained albedo-only. Scenes without a material (the 2D image scene)
    get None. ``none`` passes None (for NeRFScene that is a *training* render: random shading).
    """
    if requested is None or str(requested).lower() == "none":
        return None
    if requested != "auto":
        return requested
    cfg = getattr(scene, "cfg", None)
    material = getattr(cfg, "material", None)
    if material is None:
        # scenes without a material: their own evaluation shading (3D Gaussians: "albedo", an evaluation render on
        # the evaluation background) or None (the 2D image scene)
        return getattr(cfg, "shading", None) if hasattr(scene, "opacity_logits") else None
    step = getattr(scene, "step", None)
    try:
        step = int(step) if step is not None else None
    except (TypeError, ValueError):
        step = None
    if getattr(cfg, "shading", None) == "albedo":
        return "albedo"
    if step is not None and step < int(getattr(material, "ambient_only_steps", 0)):
        return "albedo"
    return "lambertian"


def default_load_scene(run_dir: Path, device: str):
    try:
        from distill.rundir import CheckpointError, load_scene
    except ImportError as e:
        raise EvalError(
            f"cannot import distill.rundir.load_scene ({e}); install the project (pip install -e .)"
        ) from None
    try:
        return load_scene(run_dir, device)
    except CheckpointError as e:  # unreadable or unsafe last.pt: one line naming the file, no traceback
        raise EvalError(str(e)) from None


def to_uint8(chw: np.ndarray) -> np.ndarray:
    """(3,H,W) float in [0,1] -> (H,W,3) uint8; NaN -> 0, values clipped to [0, 1]."""
    a = np.nan_to_num(np.asarray(chw, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def contact_sheet(images: list[np.ndarray], columns: int = 10, thumb: int = 128, pad: int = 2) -> np.ndarray:
    """Grid of (H,W,3) uint8 images, each downscaled to at most ``thumb`` pixels."""
    from PIL import Image

    if not images:
        raise ValueError("no images for the contact sheet")
    thumbs = []
    for img in images:
        im = Image.fromarray(img)
        s = min(1.0, thumb / max(im.size))
        if s < 1.0:
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
        thumbs.append(np.asarray(im))
    h = max(t.shape[0] for t in thumbs)
    w = max(t.shape[1] for t in thumbs)
    cols = max(1, min(columns, len(thumbs)))
    rows = math.ceil(len(thumbs) / cols)
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, t in enumerate(thumbs):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y : y + t.shape[0], x : x + t.shape[1]] = t
    return sheet


@dataclass
class RenderedViews:
    """Views of one scene: (H,W,3) uint8 images, per-view mean opacity (None for scenes without
    opacity), the number of views with NaN/Inf pixels, and whether the scene ignored the cameras."""

    images: list[np.ndarray]
    mean_opacity: list[float] | None
    nan_views: int
    camera_independent: bool


def render_cameras(
    scene: Any,
    cams: Any,
    batch_size: int = 4,
    shading: str | None = None,
    generator: Any = None,
    progress: bool = False,
    desc: str = "render",
) -> RenderedViews:
    """``scene.render(cams[batch], generator, shading)`` in batches, without gradients.

    A scene whose render ignores the cameras (batch 1 for a larger batch: the 2D image scene) is
    expanded to one copy per camera and flagged ``camera_independent``; NaN pixels are counted per
    view and written as 0.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(cams)
    images: list[np.ndarray] = []
    mean_opacity: list[float] | None = []
    nan_views, independent = 0, False
    kwargs: dict[str, Any] = {"generator": generator, "shading": shading}
    bar = tqdm(total=n, desc=desc, unit="view", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n), device=cams.c2w.device)
            out = scene.render(cams[idx], **kwargs)
            rgb = out["rgb"].detach().float()
            if rgb.ndim == 3:
                rgb = rgb[None]
            if rgb.shape[-1] == 3 and rgb.shape[1] != 3:  # (B,H,W,3) -> (B,3,H,W)
                rgb = rgb.permute(0, 3, 1, 2)
            if rgb.shape[0] == 1 and len(idx) > 1:  # camera-independent scene (2D image)
                rgb = rgb.expand(len(idx), *rgb.shape[1:])
                independent = True
            if rgb.shape[0] != len(idx):
                raise EvalError(f"scene.render returned {rgb.shape[0]} images for {len(idx)} cameras")
            finite = torch.isfinite(rgb).flatten(1).all(dim=1)
            nan_views += int((~finite).sum())
            op = out.get("opacity")
            if op is None or mean_opacity is None:
                mean_opacity = None
            else:
                op = op.detach().float()
                if op.shape[0] == 1 and len(idx) > 1:
                    op = op.expand(len(idx), *op.shape[1:])
                mean_opacity += op.flatten(1).mean(dim=1).cpu().tolist()
            images += [to_uint8(a) for a in rgb.cpu().numpy()]
            bar.update(len(idx))
    bar.close()
    return RenderedViews(images, mean_opacity, nan_views, independent)


def checkpoint_stamp(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / CHECKPOINT
    if not p.is_file():
        return None
    st = p.stat()
    return {"path": CHECKPOINT, "mtime": st.st_mtime, "size": st.st_size}


def is_up_to_date(run_dir: Path, opts: RenderOptions) -> bool:
    info, _ = read_json(run_dir / RENDER_JSON)
    if not info or info.get("version") != RENDER_VERSION:
        return False
    if info.get("options") != opts.key() or info.get("checkpoint") != checkpoint_stamp(run_dir):
        return False
    return len(view_paths(run_dir)) == opts.n_views


def render_run(
    run_dir: Path | str,
    opts: RenderOptions | None = None,
    device: str | None = "auto",
    overwrite: bool = False,
    any_status: bool = False,
    progress: bool = True,
    load_scene: Callable[[Path, str], tuple[Any, Any]] | None = None,
) -> RenderResult:
    """Render ``opts.n_views`` orbit views of one run (see module docstring)."""
    import torch
    from PIL import Image

    run_dir = require_run_dir(run_dir)
    opts = opts or RenderOptions()
    opts.validate()
    metrics, err = read_json(run_dir / "metrics.json")
    status = (metrics or {}).get("status")
    if not any_status:
        if metrics is None:
            return RenderResult(run_dir, "skipped", err or "no metrics.json (run missing); --any-status renders anyway")
        if status != "finished":
            return RenderResult(
                run_dir, "skipped", f"status {status!r}: only finished runs are rendered (--any-status to force)"
            )
    if not (run_dir / CHECKPOINT).is_file():
        return RenderResult(run_dir, "skipped", f"no {CHECKPOINT}")
    if not overwrite and is_up_to_date(run_dir, opts):
        return RenderResult(
            run_dir,
            "up-to-date",
            "views exist for these options and this checkpoint",
            read_json(run_dir / RENDER_JSON)[0],
        )

    from distill.scene.cameras import orbit_cameras

    device = resolve_device(device)
    t0 = time.time()
    cfg, scene = (load_scene or default_load_scene)(run_dir, device)
    if hasattr(scene, "eval"):
        scene.eval()
    H = W = int(opts.resolution)
    cams = orbit_cameras(opts.n_views, H, W, device=device, **opts.camera_kwargs())
    gen = torch.Generator(device=device).manual_seed(int(opts.seed))

    views_dir = run_dir / VIEWS_DIR
    views_dir.mkdir(parents=True, exist_ok=True)
    for old in view_paths(run_dir):
        old.unlink()
    shading = eval_shading(scene, opts.shading)
    try:
        views = render_cameras(
            scene, cams, opts.batch_size, shading, gen, progress=progress, desc=f"render {run_dir.name}"
        )
    except EvalError as e:
        raise EvalError(f"{run_dir}: {e}") from None
    for k, img in enumerate(views.images):
        Image.fromarray(img).save(views_dir / f"view_{k:03d}.png")
    thumbs, mean_opacity, nan_views, n = views.images, views.mean_opacity, views.nan_views, opts.n_views
    size = (int(thumbs[0].shape[0]), int(thumbs[0].shape[1])) if thumbs else None
    Image.fromarray(contact_sheet(thumbs, columns=min(10, n))).save(run_dir / CONTACT_SHEET)

    empty_flags = divergence.empty_views(mean_opacity, opts.empty_opacity) if mean_opacity is not None else None
    info = {
        "version": RENDER_VERSION,
        "options": opts.key(),
        "checkpoint": checkpoint_stamp(run_dir),
        "trainer_status": status,
        "steps": (metrics or {}).get("steps"),
        "n_views": n,
        "shading": shading,
        "scene": type(scene).__name__,
        "height": size[0] if size else H,
        "width": size[1] if size else W,
        "cameras": {
            "elevation_deg": cams.elevation.cpu().tolist(),
            "azimuth_deg": cams.azimuth.cpu().tolist(),
            "distance": cams.distance.cpu().tolist(),
            "fovy_deg": torch.rad2deg(cams.fovy).cpu().tolist(),
        },
        "mean_opacity": mean_opacity,
        "empty_views": int(sum(empty_flags)) if empty_flags is not None else None,
        "empty_opacity_threshold": opts.empty_opacity,
        "empty_fraction_threshold": opts.empty_fraction,
        "empty": divergence.is_empty_volume(mean_opacity, opts.empty_opacity, opts.empty_fraction),
        "nan_views": nan_views,
        "device": device,
        "seconds": time.time() - t0,
    }
    write_json(run_dir / RENDER_JSON, info)
    verdict = " EMPTY VOLUME (diverged)" if info["empty"] else (" NaN renders (diverged)" if nan_views else "")
    return RenderResult(run_dir, "rendered", f"{n} views at {info['height']}x{info['width']}{verdict}", info)


def load_views(run_dir: Path | str):
    """The rendered views of a run as a float tensor (N, 3, H, W) in [0, 1]."""
    import torch
    from PIL import Image

    paths = view_paths(Path(run_dir))
    if not paths:
        raise EvalError(f"{run_dir}: no rendered views in {VIEWS_DIR}/ (run `python -m eval render {run_dir}`)")
    arrs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise EvalError(f"{run_dir}: views of different sizes {sorted(shapes)}; re-render with --overwrite")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def views_mtime(run_dir: Path) -> float:
    paths = view_paths(run_dir)
    return max((os.path.getmtime(p) for p in paths), default=0.0)
