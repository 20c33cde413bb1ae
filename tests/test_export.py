"""Exports: a playable MP4/GIF with the right frame count, a coloured mesh of the initial blob."""

from __future__ import annotations

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from distill.export import EmptyMeshError, export_all, export_mesh, export_turntable
from distill.scene.cameras import CameraSamplerConfig
from distill.scene.nerf import NeRFScene


def _scene() -> NeRFScene:
    cfg = NeRFScene.Config()
    cfg.encoding.log2_hashmap_size = 12
    cfg.encoding.n_levels = 8
    cfg.renderer.samples_per_ray = 12
    return NeRFScene(cfg)


def test_turntable_writes_playable_videos(tmp_path):
    paths = export_turntable(_scene(), tmp_path, n_frames=6, height=18, width=17, fps=10, progress=False)
    reader = imageio.get_reader(paths["mp4"], format="FFMPEG")
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 6
    assert frames[0].shape == (18, 34, 3)  # rgb | normals, width padded to even
    assert frames[0].std() > 5  # not a blank frame: the blob is visible
    gif = iio.imread(paths["gif"], index=None)
    assert gif.shape[0] == 6 and gif.shape[1:3] == (18, 34)


def test_mesh_of_initial_blob(tmp_path):
    scene = _scene()
    paths = export_mesh(scene, tmp_path, resolution=48, threshold=5.0, bound=1.0, progress=False)
    mesh = trimesh.load(paths["ply"], process=False)
    assert len(mesh.vertices) > 100 and len(mesh.faces) > 100
    r = np.linalg.norm(mesh.vertices, axis=1)  # blob: softplus(10 (1 - r / 0.5)) = 5 at r ~ 0.25
    assert abs(np.median(r) - 0.25) < 0.03
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    obj = trimesh.load(paths["obj"], process=False, force="mesh")
    assert len(obj.vertices) == len(mesh.vertices)
    assert mesh.volume > 0  # outward orientation
    auto = trimesh.load(export_mesh(scene, tmp_path / "auto", resolution=32, bound=1.0, progress=False)["ply"])
    assert len(auto.vertices) > 50
    with pytest.raises(EmptyMeshError, match="no surface"):
        export_mesh(scene, tmp_path, resolution=8, threshold=1e6, progress=False)


def test_export_all_for_the_trainer(tmp_path):
    logged = []

    class Logger:
        def log_video(self, name, path, step):
            logged.append((name, path, step))

    res = export_all(
        _scene(),
        tmp_path,
        CameraSamplerConfig(height=12, width=12),
        logger=Logger(),
        step=7,
        n_frames=3,
        mesh_resolution=24,
    )
    assert (tmp_path / res["turntable_mp4"]).exists() and (tmp_path / res["mesh_ply"]).exists()
    assert res["mesh_vertices"] > 0 and logged[0][0] == "turntable" and logged[0][2] == 7
