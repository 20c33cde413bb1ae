"""Exports of a trained 3D scene: a turntable video, a coloured mesh (and 3D Gaussians as a standard .ply).

Both take any scene with the 3D contract: ``render(cameras, shading=...)`` returning (B, C, H, W)
maps, ``density(points) -> (N,)`` and ``albedo(points) -> (N, 3)``.

Turntable: ``n_frames`` orbit cameras (threestudio's test orbit: elevation 15 deg, distance 2,
fovy 70 deg), rendered without gradients, written as MP4 (H.264 via imageio-ffmpeg) and GIF.
Mesh: marching cubes of sigma(x) = threshold on a res^3 grid over [-bound, bound]^3, vertices
coloured by albedo(x), written as PLY and OBJ (trimesh).
``export_all`` does both for the trainer (files under ``run_dir/export``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distill.scene.cameras import orbit_cameras


class EmptyMeshError(ValueError):
    """Marching cubes found no surface (empty or saturated volume at the threshold)."""


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (img.clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255.0 + 0.5).astype(np.uint8)


@torch.no_grad()
def turntable_frames(
    scene,
    n_frames: int = 120,
    height: int = 256,
    width: int = 256,
    shading: str = "lambertian",
    elevation_deg: float = 15.0,
    distance: float = 2.0,
    fovy_deg: float = 70.0,
    with_normals: bool = True,
    progress: bool = True,
) -> list[np.ndarray]:
    """Frames (H, W', 3) uint8 of an orbit; with_normals puts the normal map ((n+1)/2) beside rgb."""
    if n_frames <= 0:
        raise ValueError(f"n_frames={n_frames} must be a positive integer")
    cams = orbit_cameras(n_frames, height, width, elevation_deg=elevation_deg, distance=distance, fovy_deg=fovy_deg)
    frames = []
    for i in tqdm(range(n_frames), desc="turntable", disable=not progress, leave=False):
        out = scene.render(cams[i], shading=shading)
        img = _to_uint8(out["rgb"][0])
        if with_normals and "normal" in out:
            opacity = out["opacity"][0] if "opacity" in out else 1.0
            nrm = (out["normal"][0] + 1.0) * 0.5 * opacity + (1.0 - opacity)  # white where empty
            img = np.concatenate([img, _to_uint8(nrm)], axis=1)
        frames.append(img)
    return frames


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 30) -> Path:
    """MP4 (H.264, yuv420p; frames padded to even sizes) or GIF, chosen by the suffix."""
    import imageio.v2 as imageio
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        iio.imwrite(path, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
        return path
    if path.suffix != ".mp4":
        raise ValueError(f"video path {str(path)!r} must end in .mp4 or .gif")
    h, w = frames[0].shape[:2]
    ph, pw = h % 2, w % 2
    with imageio.get_writer(
        path,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    ) as writer:
        for f in frames:
            writer.append_data(np.pad(f, ((0, ph), (0, pw), (0, 0)), mode="edge") if (ph or pw) else f)
    return path


def export_turntable(
    scene, out_dir: str | Path, name: str = "turntable", fps: int = 30, progress: bool = True, **frame_kwargs
) -> dict[str, Path]:
    """Render an orbit (see :func:`turntable_frames`) and write ``name``.mp4 and ``name``.gif."""
    frames = turntable_frames(scene, progress=progress, **frame_kwargs)
    out_dir = Path(out_dir)
    return {
        "mp4": write_video(frames, out_dir / f"{name}.mp4", fps),
        "gif": write_video(frames, out_dir / f"{name}.gif", fps),
    }


@torch.no_grad()
def density_grid(scene, resolution: int, bound: float, chunk: int = 65536, progress: bool = True) -> np.ndarray:
    """sigma on the vertices of a res^3 grid over [-bound, bound]^3, indexed [i_x, i_y, i_z]. A scene with its own
    ``density_grid(resolution, bound)`` (the Gaussians: splatted, not evaluated point by point) provides it."""
    own = getattr(scene, "density_grid", None)
    if callable(own):
        return own(resolution, bound).float().cpu().numpy()
    param = next(scene.parameters())
    lin = torch.linspace(-bound, bound, resolution, dtype=param.dtype, device=param.device)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).reshape(-1, 3)
    chunks = pts.split(chunk)
    bar = tqdm(chunks, desc="density grid", disable=not progress, leave=False)
    vals = [scene.density(c).float().cpu() for c in bar]
    return torch.cat(vals).view(resolution, resolution, resolution).numpy()


def _marching_cubes(volume: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    try:
        import mcubes

        return mcubes.marching_cubes(volume.astype(np.float64), threshold)
    except ImportError:
        from skimage import measure

        v, f, _, _ = measure.marching_cubes(volume, level=threshold)
        return v, f


@torch.no_grad()
def export_mesh(
    scene,
    out_dir: str | Path,
    name: str = "mesh",
    resolution: int = 128,
    threshold: float | str = "auto",
    bound: float | None = None,
    chunk: int = 65536,
    progress: bool = True,
) -> dict[str, Path]:
    """Marching cubes at sigma = ``threshold``, vertex colours from albedo; writes ``name``.ply and
    ``name``.obj. ``threshold="auto"`` is threestudio's rule: the mean of sigma over the grid
    vertices where sigma > 1e-5. Raises EmptyMeshError if there is no surface."""
    import trimesh

    if resolution < 2:
        raise ValueError(f"resolution={resolution} must be at least 2")
    bound = float(bound if bound is not None else scene.cfg.radius)
    vol = density_grid(scene, resolution, bound, chunk, progress)
    if threshold == "auto" and getattr(getattr(scene, "cfg", None), "mesh_threshold", None) is not None:
        threshold = float(scene.cfg.mesh_threshold)  # a scene's own iso-level (Gaussians: threestudio-3dgs's 0.8)
    if threshold == "auto":
        positive = vol[vol > 1e-5]
        threshold = float(positive.mean()) if positive.size else 0.0
    elif isinstance(threshold, str):
        raise ValueError(f"threshold={threshold!r} must be a number or 'auto'")
    if not (vol.min() < threshold < vol.max()):
        raise EmptyMeshError(
            f"no surface at density threshold {threshold}: the density ranges over "
            f"[{vol.min():.4g}, {vol.max():.4g}] on the {resolution}^3 grid"
        )
    verts, faces = _marching_cubes(vol, threshold)
    verts = verts * (2 * bound / (resolution - 1)) - bound
    param = next(scene.parameters())
    vt = torch.as_tensor(verts, dtype=param.dtype, device=param.device)
    colors = torch.cat([scene.albedo(c).float().cpu() for c in vt.split(chunk)]).clamp(0, 1).numpy()
    rgba = np.concatenate([(colors * 255 + 0.5).astype(np.uint8), np.full((len(verts), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(vertices=verts, faces=faces.astype(np.int64), vertex_colors=rgba, process=False)
    if mesh.is_watertight and mesh.volume < 0:  # outward-facing triangles
        mesh.invert()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"ply": out_dir / f"{name}.ply", "obj": out_dir / f"{name}.obj"}
    mesh.export(paths["ply"])
    mesh.export(paths["obj"], include_color=True)
    return paths


PLY_PROPERTIES = "x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3".split()


@torch.no_grad()
def export_gaussians_ply(scene, out_dir: str | Path, name: str = "gaussians") -> Path:
    """The Gaussians as the standard 3DGS ``.ply`` (graphdeco's layout, opened by SuperSplat, the antimatter15 and
    gsplat viewers): binary little-endian float32 vertices with x y z, nx ny nz (0), f_dc_0..2 (SH degree 0),
    opacity (the logit), scale_0..2 (log scales), rot_0..3 (quaternion wxyz)."""
    cols = [
        scene.means,
        torch.zeros_like(scene.means),
        scene.f_dc,
        scene.opacity_logits[:, None],
        scene.log_scales,
        scene.quats,
    ]
    data = torch.cat([c.detach().float().cpu() for c in cols], dim=1).numpy().astype("<f4")
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(data)}"]
    header += [f"property float {p}" for p in PLY_PROPERTIES] + ["end_header"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.ply"
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())
    return path


def export_all(
    scene,
    run_dir: str | Path,
    camera: Any = None,
    logger: Any = None,
    step: int = 0,
    n_frames: int = 120,
    mesh_resolution: int = 128,
    mesh_threshold: float | str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Turntable (at the training camera's height x width, ``n_frames`` views) and mesh into
    ``run_dir/export``; logs the video with ``logger.log_video``. Returns entries for metrics.json:
    paths relative to run_dir, ``mesh_vertices`` / ``mesh_faces``, or ``mesh_error`` when the
    volume has no surface. Shading: albedo for albedo-trained scenes, else lambertian."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "export"
    h, w = (int(camera.height), int(camera.width)) if camera is not None else (256, 256)
    shading = "albedo" if getattr(getattr(scene, "cfg", None), "shading", None) == "albedo" else "lambertian"
    video = export_turntable(scene, out_dir, n_frames=n_frames, height=h, width=w, shading=shading, progress=progress)
    result: dict[str, Any] = {
        "turntable_mp4": str(video["mp4"].relative_to(run_dir)),
        "turntable_gif": str(video["gif"].relative_to(run_dir)),
    }
    if logger is not None:
        logger.log_video("turntable", video["mp4"], step)
    if hasattr(scene, "opacity_logits"):  # 3D Gaussians: the standard .ply as well
        result["gaussians_ply"] = str(export_gaussians_ply(scene, out_dir).relative_to(run_dir))
    try:
        mesh = export_mesh(scene, out_dir, resolution=mesh_resolution, threshold=mesh_threshold, progress=progress)
    except EmptyMeshError as e:
        result["mesh_error"] = str(e)
        return result
    import trimesh

    m = trimesh.load(mesh["ply"], process=False)
    result.update(
        mesh_ply=str(mesh["ply"].relative_to(run_dir)),
        mesh_obj=str(mesh["obj"].relative_to(run_dir)),
        mesh_vertices=int(len(m.vertices)),
        mesh_faces=int(len(m.faces)),
    )
    return result
