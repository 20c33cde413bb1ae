"""The memory levers of issue 20 change what is held for the backward, never what is learned:
ray-chunked rendering with activation checkpointing equals the plain render (forward and parameter gradients) up to
summation order; skipping unused normals is exact; the field under autocast stays within a measured bound; and a run
with every lever on still resumes bit-identically."""

from __future__ import annotations

import copy

import pytest
import torch
from test_renderer import small_config
from test_train import FAST, _equal_state

from distill import rundir
from distill.scene.cameras import orbit_cameras
from distill.scene.nerf import NeRFScene
from distill.train import train

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
EPS64 = torch.finfo(torch.float64).eps  # 2.2e-16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _scene(**renderer) -> NeRFScene:
    """A small scene with a non-trivial field (random table, scale 0.5, as test_renderer's) and lambertian shading from
    step 0, so every path of the render carries gradient: density, albedo, normals (shading, orientation, convexity)."""
    cfg = small_config()
    cfg.material.ambient_only_steps, cfg.material.diffuse_prob, cfg.material.textureless_prob = 0, 1.0, 0.0
    cfg.renderer.chunk_rays, cfg.renderer.checkpoint = 0, False  # the plain render (the defaults chunk at 512 px)
    for k, v in renderer.items():
        setattr(cfg.renderer, k, v)
    scene = NeRFScene(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        scene.encoding.params.copy_(torch.randn(scene.encoding.params.shape, generator=g) * 0.5)
    scene.update_occupancy(0)  # occupancy of this field (all cells stay occupied before the first update)
    return scene


def _render_and_grads(scene: NeRFScene, res: int = 12) -> tuple[dict, dict]:
    """One training render (jitter and light from a fixed generator) -> its maps and the parameter gradients of
    a loss that touches every output the regularisers use."""
    scene.zero_grad(set_to_none=True)
    out = scene.render(orbit_cameras(2, res, res), torch.Generator().manual_seed(3))
    assert scene.last_shading == "lambertian"
    w = torch.linspace(0.5, 1.5, res * res, dtype=out["rgb"].dtype).view(1, 1, res, res)
    loss = (out["rgb"] * w).sum() + sum(scene.regularisers(out, 0).values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in scene.named_parameters() if p.grad is not None}
    maps = {k: v.detach() for k, v in out.items()}
    return maps, grads


MAPS = ("rgb", "opacity", "depth", "z_variance", "orientation", "normal", "comp_normal")


@pytest.mark.parametrize("ckpt", [False, True], ids=["chunked", "chunked+checkpoint"])
def test_chunked_render_equals_plain_render_forward_and_gradients(ckpt):
    """Chunks of 37 rays (not dividing the ray count, so the last chunk is short), with and without checkpointing,
    against the unchunked render of the same scene.

    float64: the two compute the same sums in a different order (the gradient's index_add over points is split
    into per-chunk partial sums; a chunk boundary changes the matmul batch), so they agree to a few thousand eps64
    relative (n ~ 1e3 terms per sum, each reordering costs at most n eps |terms|); a bug (a lost chunk, a stale
    recomputation) is an O(1) error. float32: the chunked render is as close to the float64 result as the plain
    float32 render is (both are fp32 roundings of the same sums), within 4x or 10 eps32."""
    plain = _scene()
    chunked = copy.deepcopy(plain)
    chunked.cfg.renderer.chunk_rays, chunked.cfg.renderer.checkpoint = 37, ckpt
    assert chunked.renderer.cfg is chunked.cfg.renderer

    ref_maps, ref_grads = _render_and_grads(copy.deepcopy(plain).double())
    m64, g64 = _render_and_grads(copy.deepcopy(chunked).double())
    p64_maps, _ = _render_and_grads(copy.deepcopy(plain).double())
    assert int(m64["n_samples"]) == int(ref_maps["n_samples"]) > 100
    for k in MAPS:
        assert torch.equal(p64_maps[k], ref_maps[k]), k  # the plain render is deterministic
        assert rel_err(m64[k], ref_maps[k]) < 1e3 * EPS64, k
    assert ref_grads.keys() == g64.keys() and "encoding.params" in ref_grads
    for n in ref_grads:
        assert rel_err(g64[n], ref_grads[n]) < 1e4 * EPS64, n

    p_maps, p_grads = _render_and_grads(plain)
    c_maps, c_grads = _render_and_grads(chunked)
    assert int(c_maps["n_samples"]) == int(p_maps["n_samples"]) == int(ref_maps["n_samples"])
    for k in MAPS:
        err_plain = rel_err(p_maps[k], ref_maps[k])
        assert rel_err(c_maps[k], ref_maps[k]) <= max(4 * err_plain, 10 * EPS32), k
    for n in ref_grads:
        err_plain = rel_err(p_grads[n], ref_grads[n])
        assert rel_err(c_grads[n], ref_grads[n]) <= max(4 * err_plain, 10 * EPS32), n


def test_checkpointed_render_frees_the_field_activations():
    """What checkpointing is for: the activations saved for the backward (counted by saved-tensor hooks) shrink to
    about one chunk's, and the backward still reaches the parameters."""
    from distill.memory import SavedBytes

    plain = _scene()
    chunked = copy.deepcopy(plain)
    chunked.cfg.renderer.chunk_rays, chunked.cfg.renderer.checkpoint = 16, True
    saved = {}
    for name, scene in (("plain", plain), ("ckpt", chunked)):
        with SavedBytes() as sb:
            out = scene.render(orbit_cameras(2, 16, 16), torch.Generator().manual_seed(3))
        saved[name] = sb.total
        out["rgb"].sum().backward()
        assert scene.encoding.params.grad.abs().sum() > 0
    assert saved["ckpt"] < 0.25 * saved["plain"], saved


def test_renderer_lever_config_is_checked():
    cfg = small_config()
    assert cfg.renderer.checkpoint and cfg.renderer.chunk_rays == 16384  # the defaults (conf/scene/nerf.yaml)
    cfg.renderer.chunk_rays = 0  # checkpointing without chunks
    with pytest.raises(ValueError, match="chunk_rays > 0"):
        NeRFScene(cfg)
    cfg.renderer.checkpoint, cfg.renderer.chunk_rays = False, -1
    with pytest.raises(ValueError, match="chunk_rays=-1"):
        NeRFScene(cfg)
    with pytest.raises(ValueError, match="field_autocast='fp8'"):
        NeRFScene(small_config(field_autocast="fp8"))


def test_unused_normals_are_skipped_exactly():
    """normals=auto leaves the normals out of an albedo training render whose orientation and convexity weights are
    0 (nothing is computed for them), and the render and gradients are bit-identical to normals=always; with the
    official weights (orientation 0.1, convexity > 0) or a lit shading they are always computed."""
    base = _scene()
    assert base.needs_normals("albedo", 0) and base.needs_normals("albedo", 10**6)  # official: convexity ends at 0.1
    assert base.needs_normals("lambertian", 0)
    runs = {}
    for normals in ("auto", "always"):
        scene = copy.deepcopy(base)
        scene.cfg.normals = normals
        scene.cfg.material.diffuse_prob = 0.0  # albedo
        r = scene.cfg.regularisers
        r.orientation.start = r.orientation.end = r.convexity.start = r.convexity.end = 0.0
        scene.zero_grad(set_to_none=True)
        out = scene.render(orbit_cameras(2, 12, 12), torch.Generator().manual_seed(3))
        assert scene.last_shading == "albedo"
        (out["rgb"].sum() + sum(scene.regularisers(out, 0).values())).backward()
        runs[normals] = (out, {n: p.grad for n, p in scene.named_parameters() if p.grad is not None})
    (auto, g_auto), (always, g_always) = runs["auto"], runs["always"]
    assert "normal" not in auto and "orientation" not in auto and "normal" in always
    for k in auto:
        assert torch.equal(auto[k], always[k]), k
    assert g_auto.keys() == g_always.keys()
    for n in g_auto:
        assert torch.equal(g_auto[n], g_always[n]), n
    # evaluation renders always have normals (normal maps, export)
    ev = copy.deepcopy(base)
    ev.cfg.normals = "auto"
    assert "normal" in ev.render(orbit_cameras(1, 8, 8), shading="albedo")


# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. The field's outputs go through a 32-input and a 64-input
# matmul (inputs and outputs each rounded once to bf16: a few u relative), then the sigmoid / softplus and the
# compositing in fp32, which do not amplify relative errors (derivatives bounded by 1): the maps stay within 4u of
# fp32 (measured on this scene: rgb 2.3e-4, opacity and depth 1.2e-5). The gradients are a measured bound, not a
# derived one: the backward of the bf16 matmuls rounds the incoming gradients too, and the analytic normals' path
# (input gradient of the MLP times the hash-grid Jacobian, then normalised) cancels; measured 6.1e-2 (hash table),
# 3.9e-2 (first density layer), 1.4e-2 (first albedo layer), so GRAD_BOUND = 0.15 (~2.5x the largest). That is
# why autocast is off by default (fidelity first): a 6 % gradient change is far beyond fp32 rounding.
GRAD_BOUND = 0.15
U_BF16 = 2.0**-8


def test_field_autocast_bf16_stays_within_its_rounding_bound():
    ref = _scene()
    amp = copy.deepcopy(ref)
    amp.cfg.field_autocast = "bf16"
    r_maps, r_grads = _render_and_grads(ref)
    a_maps, a_grads = _render_and_grads(amp)
    assert a_maps["rgb"].dtype == torch.float32  # compositing stays in the parameters' dtype
    for k in ("rgb", "opacity", "depth"):
        err = rel_err(a_maps[k], r_maps[k])
        assert 0 < err < 4 * U_BF16, (k, err)  # > 0: autocast did run the field in bf16
    for n in ("encoding.params", "density_net.layers.0.weight", "feature_net.layers.0.weight"):
        err = rel_err(a_grads[n], r_grads[n])
        assert err < GRAD_BOUND, (n, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast of the field is a CUDA lever; no GPU here")
def test_field_autocast_fp16_on_cuda_stays_within_its_rounding_bound():
    u = 2.0**-11  # fp16 unit roundoff; same reasoning as bf16 above (gradients: the bf16 bound scaled by 2^-3)
    ref = _scene().cuda()
    amp = copy.deepcopy(ref)
    amp.cfg.field_autocast = "fp16"
    r_maps, r_grads = _render_and_grads(ref)
    a_maps, a_grads = _render_and_grads(amp)
    for k in ("rgb", "opacity", "depth"):
        assert rel_err(a_maps[k], r_maps[k]) < 4 * u, k
    for n in ("encoding.params", "density_net.layers.0.weight"):
        assert rel_err(a_grads[n], r_grads[n]) < GRAD_BOUND / 8, n


LEVERS = [
    "scene.renderer.chunk_rays=96",
    "scene.renderer.checkpoint=true",
    "scene.normals=auto",
    "scene.field_autocast=bf16",
    "camera.height=16",
    "camera.width=16",
]


def test_resume_is_bit_identical_with_every_lever_on(compose_cfg, tmp_path, interrupt_at):
    """The default 3D SDI run (NeRF on the analytic 3D prior) with chunks, checkpointing, skipped normals and a bf16
    field, killed at step 2 and re-launched: the same scene, generator and guidance state as the uninterrupted run."""
    cfg = compose_cfg([*LEVERS, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_views=1", *FAST])
    assert cfg.scene.renderer.checkpoint and cfg.scene.renderer.chunk_rays == 96
    train(cfg, tmp_path / "full")
    interrupt_at(cfg, tmp_path / "resumed", 2)
    assert train(cfg, tmp_path / "resumed")["resumed_from_step"] == 2
    a, b = rundir.load_checkpoint(tmp_path / "full"), rundir.load_checkpoint(tmp_path / "resumed")
    assert torch.equal(a["generator"], b["generator"])
    for k in a["scene"]:
        assert torch.equal(a["scene"][k], b["scene"][k]), k
    assert _equal_state(a["guidance"], b["guidance"])
