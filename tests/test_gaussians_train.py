"""scene=gaussians end to end: every guidance on the exact 3D prior, bit-identical resume across densifications,
exports (a standard 3DGS .ply, a non-empty mesh, the turntable), evaluation renders, logging of the number of
Gaussians, faults recorded as diverged; and (with a GPU) the torch rasterizer against gsplat."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import rundir
from distill.config import base_options
from distill.train import train

ROOT = Path(__file__).resolve().parents[1]
GUIDANCES = base_options("guidance")  # the methods; their per-method variants run in test_preset_matrix
TINY = [
    "scene=gaussians",
    "scene.n_init=300",
    "scene.rasterizer=torch",
    "prior=analytic3d",
    "prior.objects_per_prompt=1",
    "prior.n_basis=8",
    "prior.trace_steps=16",
    "prior.supersample=1",
    "camera.height=16",
    "camera.width=16",
    "camera.pool=2",
    "trainer.eval_views=2",
    "trainer.progress=false",
    "trainer.threads=1",
]
FAST = ["logger=none", "trainer.image_every=0", "trainer.export=false"]
DENSIFY = ["scene.densify.start=2", "scene.densify.interval=2", "scene.densify.grad_threshold=0.0"]


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_every_guidance_runs_on_gaussians(compose_cfg, tmp_path, guidance):
    cfg = compose_cfg([*TINY, *FAST, f"guidance={guidance}", "trainer.max_steps=2"])
    m = train(cfg, tmp_path)
    assert m["status"] == "finished" and m["steps"] == 2 and "psnr" in m


def test_resume_is_bit_identical_across_densification(compose_cfg, tmp_path, interrupt_at):
    """Checkpoint at step 4 (after densifications at steps 2 and 4 grew the scene), killed at step 5, re-launched:
    the same tensors, optimiser state and RNG as the uninterrupted run, with a different number of Gaussians in
    the checkpoint than at the start."""
    cfg = compose_cfg(
        [*TINY, *FAST, *DENSIFY, "scene.densify.max_num=1000", "trainer.max_steps=8", "trainer.checkpoint_every=4"]
    )
    train(cfg, tmp_path / "full")
    interrupt_at(cfg, tmp_path / "resumed", 5)
    mid = rundir.load_checkpoint(tmp_path / "resumed")
    assert mid["scene"]["means"].shape[0] > 300  # the checkpoint holds a densified scene
    m = train(cfg, tmp_path / "resumed")
    assert m["resumed_from_step"] == 5 and m["steps"] == 8
    a, b = rundir.load_checkpoint(tmp_path / "full"), rundir.load_checkpoint(tmp_path / "resumed")
    assert a["scene"]["means"].shape[0] == 1000  # capped at max_num
    for k in a["scene"]:
        assert torch.equal(a["scene"][k], b["scene"][k]), k
    assert torch.equal(a["generator"], b["generator"])
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]


def test_checkpoint_loads_with_weights_only(compose_cfg, tmp_path):
    train(compose_cfg([*TINY, *FAST, *DENSIFY, "trainer.max_steps=3"]), tmp_path)
    ckpt = torch.load(tmp_path / rundir.CHECKPOINT, weights_only=True)  # tensors, numbers, strings only
    assert ckpt["scene"]["means"].shape[0] > 300


def _read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    n = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    props = [h.split()[-1] for h in header if h.startswith("property float")]
    data = np.frombuffer(raw[end:], dtype="<f4")
    assert data.size == n * len(props)  # nothing missing, nothing extra
    return props, data.reshape(n, len(props))


def test_exports_eval_render_and_logging(compose_cfg, tmp_path):
    from eval.render import RenderOptions, render_run

    cfg = compose_cfg(
        [*TINY, *DENSIFY, "logger=csv", "trainer.max_steps=4", "trainer.image_every=2", "trainer.log_every=1"]
    )
    m = train(cfg, tmp_path)
    assert m["status"] == "finished"
    # the standard 3DGS .ply, read back with its property names
    props, data = _read_ply(tmp_path / m["gaussians_ply"])
    assert props[:6] == ["x", "y", "z", "nx", "ny", "nz"]
    assert {"f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_3"} <= set(props)
    ckpt = rundir.load_checkpoint(tmp_path)["scene"]
    assert data.shape[0] == ckpt["means"].shape[0]
    np.testing.assert_array_equal(data[:, :3], ckpt["means"].numpy())
    np.testing.assert_array_equal(data[:, props.index("opacity")], ckpt["opacity_logits"].numpy())
    # mesh and turntable
    assert m.get("mesh_vertices", 0) > 0 and m.get("mesh_faces", 0) > 0, m.get("mesh_error")
    assert (tmp_path / m["turntable_mp4"]).stat().st_size > 0
    # the number of Gaussians is logged
    rows = list(csv.reader((tmp_path / "scalars.csv").open()))
    n_logged = [float(r[2]) for r in rows[1:] if r[1] == "n_gaussians"]
    assert n_logged and n_logged[-1] == ckpt["means"].shape[0]
    # evaluation renders of the run (rebuilt from its config and checkpoint)
    res = render_run(tmp_path, RenderOptions(n_views=3, resolution=16), device="cpu", progress=False)
    assert res.status == "rendered" and res.info["shading"] == "albedo" and not res.info["empty"]
    assert len(list((tmp_path / "eval" / "views").glob("view_*.png"))) == 3


def test_pruned_to_nothing_is_diverged_empty(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, *FAST, *DENSIFY, "scene.densify.min_opacity=0.99", "trainer.max_steps=5"])
    m = train(cfg, tmp_path)
    assert m["status"] == "diverged" and m["diverged_reason"] == "empty" and m["steps"] == 2


def test_nan_means_are_diverged_nan(compose_cfg, tmp_path, monkeypatch):
    """A NaN mean is culled by the projection (the render stays finite), so the trainer's parameter check and the
    scene's hook must catch it: the run ends as diverged: nan, recorded, not raised."""
    from distill.scene.gaussians import GaussianScene

    original = GaussianScene.update_step

    def poisoned(self, step, max_steps):
        original(self, step, max_steps)
        if step == 2:
            with torch.no_grad():
                self.means[7, 1] = float("nan")

    monkeypatch.setattr(GaussianScene, "update_step", poisoned)
    m = train(compose_cfg([*TINY, *FAST, "trainer.max_steps=6"]), tmp_path)
    assert m["status"] == "diverged" and m["diverged_reason"] == "nan" and m["steps"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (gsplat's rasterization is CUDA only)")
def test_torch_rasterizer_matches_gsplat_on_cuda():
    gsplat = pytest.importorskip("gsplat")
    from distill.scene.cameras import orbit_cameras
    from distill.scene.gaussians import GaussianScene

    alpha_max = 0.999 if tuple(int(x) for x in gsplat.__version__.split(".")[:3]) <= (1, 5, 3) else 0.99
    raster = {"alpha_max": alpha_max, "near_plane": 0.01, "stop_rule": "le"}
    base = {"n_init": 3000, "background": "white", "raster": raster, "init_opacity": 0.5}
    ours = GaussianScene({**base, "rasterizer": "torch"}).cuda()
    ref = GaussianScene({**base, "rasterizer": "gsplat"}).cuda()
    ref.load_state_dict(ours.state_dict())
    cams = orbit_cameras(2, 64, 64, device="cuda")
    a, b = ours.render(cams, shading="albedo"), ref.render(cams, shading="albedo")
    # float32 on both sides, the same kernel rules; gsplat's own torch-vs-CUDA tests use assert_close defaults
    torch.testing.assert_close(a["rgb"], b["rgb"], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(a["opacity"], b["opacity"], rtol=1e-4, atol=2e-4)
    ga = torch.autograd.grad(ours.render(cams, torch.Generator("cuda"))["rgb"].square().mean(), ours.means)[0]
    gb = torch.autograd.grad(ref.render(cams, torch.Generator("cuda"))["rgb"].square().mean(), ref.means)[0]
    # gsplat's torch-vs-CUDA gradient tolerances are 1e-3 .. 8e-3 (tests/test_basic.py)
    torch.testing.assert_close(ga, gb, rtol=5e-3, atol=5e-5)
