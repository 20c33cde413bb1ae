"""The few pictures a figure or a report shows of one run, rendered from its last checkpoint and cached.

    fixed views   front, side, back: azimuth 0, 90, 180 degrees (0 is the object's front, as the
                  view-dependent prompts), on the evaluation orbit of ``eval.render`` (orbit_cameras'
                  elevation, distance and field of view)  -> <run>/eval/figure_views/<name>.png
    turntable     ``n_frames`` views evenly spaced in azimuth on the same orbit, as a looping GIF
                                                       -> <run>/eval/turntable.gif

Both go through ``eval.render.render_cameras`` with the evaluation shading (``eval_shading``). A scene
that ignores the cameras (the 2D image scene) has one picture, its final image, and no turntable.
A cache is reused while its options and the checkpoint (mtime, size) are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.runs import CHECKPOINT, read_json, write_json

VIEW_AZIMUTHS = {"front": 0.0, "side": 90.0, "back": 180.0}
FIXED_DIR = "eval/figure_views"
FIXED_JSON = "eval/figure_views/views.json"
TURNTABLE_GIF = "eval/turntable.gif"
TURNTABLE_JSON = "eval/turntable.json"
IMAGE_VIEW = "image"  # the one view of a camera-independent (2D) scene


@dataclass
class ViewOptions:
    size: int = 160  # height = width of each view, pixels
    views: tuple[str, ...] = ("front", "side", "back")
    shading: str = "auto"
    seed: int = 0
    turntable_frames: int = 24
    turntable_size: int = 128
    turntable_ms: int = 120  # GIF frame duration

    def key(self, kind: str) -> dict[str, Any]:
        d = asdict(self)
        if kind == "fixed":
            return {k: d[k] for k in ("size", "views", "shading", "seed")} | {"views": list(self.views)}
        return {k: d[k] for k in ("turntable_frames", "turntable_size", "turntable_ms", "shading", "seed")}


@dataclass
class RunViews:
    names: list[str]  # front, side, back, or [image] for a 2D scene
    images: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8
    nan: bool = False  # some view had NaN / Inf pixels
    error: str | None = None  # why there are no views (no checkpoint, load failure)


def _stamp(run_dir: Path) -> dict[str, Any] | None:
    from eval.render import checkpoint_stamp

    return checkpoint_stamp(run_dir)


class RunRenderer:
    """Loads a run's scene once (lazily) and renders its fixed views and turntable, with the caches above."""

    def __init__(
        self,
        run_dir: Path | str,
        opts: ViewOptions | None = None,
        device: str = "auto",
        overwrite: bool = False,
        load_scene: Callable[[Path, str], tuple[Any, Any]] | None = None,
    ):
        self.run_dir, self.opts, self.overwrite = Path(run_dir), opts or ViewOptions(), overwrite
        self.device, self._load, self._scene = device, load_scene, None

    def _get_scene(self):
        if self._scene is None:
            from eval.render import default_load_scene, resolve_device

            self.device = resolve_device(self.device)
            _, scene = (self._load or default_load_scene)(self.run_dir, self.device)
            if hasattr(scene, "eval"):
                scene.eval()
            self._scene = scene
        return self._scene

    def _render(self, azimuths: list[float] | None, size: int, n_orbit: int = 360):
        """Views at whole-degree ``azimuths`` of the evaluation orbit (``orbit_cameras``), or its ``n_orbit``
        evenly spaced views when ``azimuths`` is None."""
        import torch

        from distill.scene.cameras import orbit_cameras
        from eval.render import eval_shading, render_cameras

        scene = self._get_scene()
        cams = orbit_cameras(n_orbit, size, size)  # azimuth -180 + i * 360 / n_orbit
        if azimuths is not None:
            cams = cams[torch.tensor([round(a + 180.0) % 360 for a in azimuths])]
        gen = torch.Generator(device=self.device).manual_seed(int(self.opts.seed))
        shading = eval_shading(scene, self.opts.shading)
        return render_cameras(scene, cams.to(self.device), batch_size=4, shading=shading, generator=gen)

    def fixed_views(self) -> RunViews:
        from PIL import Image

        run, key = self.run_dir, self.opts.key("fixed")
        if not (run / CHECKPOINT).is_file():
            return RunViews([], error=f"no {CHECKPOINT}")
        info, _ = read_json(run / FIXED_JSON)
        if not self.overwrite and info and info.get("options") == key and info.get("checkpoint") == _stamp(run):
            paths = [run / FIXED_DIR / f"{n}.png" for n in info["names"]]
            if all(p.is_file() for p in paths):
                imgs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
                return RunViews(list(info["names"]), imgs, bool(info.get("nan")))
        try:
            rendered = self._render([VIEW_AZIMUTHS[v] for v in self.opts.views], self.opts.size)
        except Exception as e:  # noqa: BLE001 - a run that cannot be rendered is shown as such
            return RunViews([], error=f"{type(e).__name__}: {e}")
        names, imgs = list(self.opts.views), rendered.images
        if rendered.camera_independent:
            names, imgs = [IMAGE_VIEW], imgs[:1]
        out = run / FIXED_DIR
        out.mkdir(parents=True, exist_ok=True)
        for n, img in zip(names, imgs, strict=True):
            Image.fromarray(img).save(out / f"{n}.png")
        nan = rendered.nan_views > 0
        write_json(run / FIXED_JSON, {"options": key, "checkpoint": _stamp(run), "names": names, "nan": nan})
        return RunViews(names, imgs, nan)

    def turntable(self) -> Path | None:
        """The run's turntable GIF (None for a 2D scene or a run without a checkpoint)."""
        from PIL import Image

        run, key = self.run_dir, self.opts.key("turntable")
        if not (run / CHECKPOINT).is_file():
            return None
        info, _ = read_json(run / TURNTABLE_JSON)
        if not self.overwrite and info and info.get("options") == key and info.get("checkpoint") == _stamp(run):
            return run / TURNTABLE_GIF if info.get("gif") and (run / TURNTABLE_GIF).is_file() else None
        n = self.opts.turntable_frames
        try:
            rendered = self._render(None, self.opts.turntable_size, n_orbit=n)
        except Exception:  # noqa: BLE001
            return None
        gif = not rendered.camera_independent
        if gif:
            frames = [Image.fromarray(f) for f in rendered.images]
            (run / TURNTABLE_GIF).parent.mkdir(parents=True, exist_ok=True)
            frames[0].save(
                run / TURNTABLE_GIF, save_all=True, append_images=frames[1:], duration=self.opts.turntable_ms, loop=0
            )
        write_json(run / TURNTABLE_JSON, {"options": key, "checkpoint": _stamp(run), "gif": gif})
        return run / TURNTABLE_GIF if gif else None
