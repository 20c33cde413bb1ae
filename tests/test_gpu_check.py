"""The prepared GPU check (benchmarks/gpu/check.sh) runs end to end on the CPU, and the tests that take the
``test_device`` fixture (SDI_TEST_DEVICE, default cpu; check.sh sets cuda on a GPU machine) compare what runs on
that device against independent computations: the loop reference of the hash grid, the closed form of a
homogeneous sphere, the CPU render, and the fp32 CPU Stable Diffusion prior."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distill.config import base_options

ROOT = Path(__file__).resolve().parents[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ on the device
def test_hashgrid_on_device_matches_loop_reference(test_device):
    import numpy as np
    from test_hashgrid import _random_grid, reference_encoding

    from distill.scene.hashgrid import HashGridConfig

    cfg = HashGridConfig(backend="torch", log2_hashmap_size=14)  # dense and hashed levels
    ref_grid = _random_grid(cfg)  # float64, CPU
    grid = copy.deepcopy(ref_grid).float().to(test_device)
    x64 = torch.rand(48, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    enc = grid(x64.float().to(test_device))
    assert enc.device.type == test_device.type and enc.dtype == torch.float32
    table = ref_grid.params.detach().t().numpy()
    want = np.stack([reference_encoding(x.numpy(), table, cfg, cfg.start_level) for x in x64])
    assert rel_err(enc, torch.from_numpy(want)) < 1e-5
    # gradient w.r.t. the table: the float64 CPU autograd of the same weighted sum
    w = torch.randn(enc.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (enc * w.float().to(test_device)).sum().backward()
    (ref_grid(x64) * w).sum().backward()
    assert rel_err(grid.params.grad, ref_grid.params.grad) < 1e-5


def test_volume_renderer_on_device_matches_sphere_closed_form(test_device):
    from test_renderer import R0, SIGMA, _rays, sphere_field

    from distill.scene.renderer import OccupancyConfig, RendererConfig, VolumeRenderer

    impact = [0.0, 0.2, 0.45, 0.7]
    o, d = (v.float().to(test_device) for v in _rays(impact))
    cfg = RendererConfig(samples_per_ray=512, occupancy=OccupancyConfig(enabled=False))
    out = VolumeRenderer(cfg, radius=R0).to(test_device)(sphere_field, o, d, jitter=None)
    want = [1 - math.exp(-SIGMA * 2 * math.sqrt(max(R0**2 - b**2, 0.0))) for b in impact]
    assert out["opacity"].device.type == test_device.type
    assert out["opacity"][:, 0].double().cpu().tolist() == pytest.approx(want, abs=1e-5)


def test_nerf_scene_render_on_device_matches_cpu(test_device):
    from test_renderer import small_config

    from distill.scene.cameras import orbit_cameras
    from distill.scene.nerf import NeRFScene

    torch.manual_seed(0)
    cpu = NeRFScene(small_config())
    dev = copy.deepcopy(cpu).to(test_device)
    outs = []
    for scene, device in ((cpu, torch.device("cpu")), (dev, test_device)):
        out = scene.render(orbit_cameras(2, 16, 16, device=device), shading="albedo")
        (out["rgb"] * torch.linspace(0, 1, 16, device=device)).sum().backward()
        outs.append((out["rgb"], {n: p.grad for n, p in scene.named_parameters() if p.grad is not None}))
    (rgb_c, g_c), (rgb_d, g_d) = outs
    assert rgb_d.device.type == test_device.type and torch.isfinite(rgb_d).all()
    assert rel_err(rgb_d, rgb_c) < 1e-4
    assert g_c.keys() == g_d.keys() and g_c
    for n in g_c:
        assert torch.isfinite(g_d[n]).all(), n
        if g_c[n].norm() > 0:
            assert rel_err(g_d[n], g_c[n]) < 1e-3, n


def test_sd_prior_on_device_matches_fp32_cpu(test_device, tiny_sd_dir):
    """On CUDA the prior runs in fp16 (its default there): encode (with grad) and eps stay finite, come back in the
    caller's dtype, and agree with the fp32 CPU prior to fp16 accuracy."""
    from distill.priors.stable_diffusion import StableDiffusionPrior

    cfg = StableDiffusionPrior.Config(
        model=str(tiny_sd_dir), resolution=64, dtype="fp32", vae_posterior="mean", embedding_cache_dir=None
    )
    fp16 = test_device.type == "cuda"
    ref = StableDiffusionPrior(cfg, device="cpu")
    dev = StableDiffusionPrior(replace(cfg, dtype="fp16" if fp16 else "fp32"), device=test_device)
    tol = 3e-2 if fp16 else 1e-5
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    grads = []
    for p, device in ((ref, "cpu"), (dev, test_device)):
        x = img.to(device).requires_grad_(True)
        z = p.encode(x)
        assert z.dtype == torch.float32 and z.device.type == torch.device(device).type
        (z * z).sum().backward()
        grads.append((z, x.grad))
    (z_c, g_c), (z_d, g_d) = grads
    assert torch.isfinite(z_d).all() and torch.isfinite(g_d).all()
    assert rel_err(z_d, z_c) < tol
    assert rel_err(g_d, g_c) < 5 * tol
    emb = ref.embed_prompts(["a snowman", ""])
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([980, 250])
    e_c = ref.eps(x_t, t, emb)
    e_d = dev.eps(x_t.to(test_device), t.to(test_device), dev.embed_prompts(["a snowman", ""]))
    assert e_d.dtype == torch.float32 and torch.isfinite(e_d).all()
    assert rel_err(e_d, e_c) < tol


# ------------------------------------------------------------------------------------------------ report.py
def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_x" time="0.5"/>
<testcase classname="tests.test_b" name="test_y" time="0.1">
<failure message="ModuleNotFoundError: No module named 'wandb'">E   No module named 'wandb'</failure></testcase>
<testcase classname="tests.test_c" name="test_z[cuda]" time="0.2">
<failure message="AssertionError: 1 != 2">x</failure></testcase>
<testcase classname="tests.test_d" name="test_w" time="0.0"><skipped message="no slurm"/></testcase>
</testsuite></testsuites>"""
LOG = """tests/test_a.py::test_x PASSED [ 25%]
[gw1] [ 50%] FAILED tests/test_b.py::test_y
[gw0] [ 75%] FAILED tests/test_c.py::test_z[cuda]
"""


def test_pytest_report_counts_missing_modules_apart_from_real_failures(tmp_path):
    rep = _report_module()
    (tmp_path / "pytest.log").write_text(LOG)
    (tmp_path / "junit.xml").write_text(JUNIT)
    args = ["pytest", "--log", str(tmp_path / "pytest.log"), "--device", "cuda"]
    assert rep.main([*args, "--junit", str(tmp_path / "junit.xml"), "--out", str(tmp_path / "full.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["complete"] is True
    assert full["counts"] == {"passed": 1, "failed_missing_module": 1, "failed": 1, "skipped": 1}
    assert full["missing_modules"] == {"wandb": 1}
    assert full["real_failures"] == ["tests/test_c.py::test_z[cuda]"]
    # a run stopped by its time limit writes no junit: the -v lines still give each outcome seen so far
    assert rep.main([*args, "--junit", str(tmp_path / "none.xml"), "--out", str(tmp_path / "cut.json")]) == 0
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["complete"] is False and cut["counts"] == {"passed": 1, "failed": 2}


def test_summary_rows_ratios_and_stage_verdicts(tmp_path, capsys):
    rep = _report_module()
    ok = dict(guidance="ddim_inversion", status="ok", it_per_s=4.0, projected_minutes=41.5, projected_steps=10000,
              peak_reserved_gb=30.0, peak_rss_gb=None, unet_calls_per_step=8.6, steps_timed=50, nonfinite_steps=0,
              parts_share={"render": 0.3, "unet": 0.7})  # fmt: skip
    bad = dict(guidance="vsd", status="failed", error="RuntimeError: boom")
    (tmp_path / "train_step.json").write_text(json.dumps({"methods": [ok]}))
    (tmp_path / "train_methods.json").write_text(json.dumps({"methods": [bad]}))
    stages = tmp_path / "stages.tsv"
    stages.write_text("env\t0\t3\t30\ntrain\t0\t60\t75\npytest\t1\t90\t100\nmethods\t124\t120\t120\n")
    args = ["summary", "--dir", str(tmp_path), "--stages", str(stages), "--out", str(tmp_path / "summary.json")]
    assert rep.main(args) == 1  # a stage ran past its limit
    s = json.loads((tmp_path / "summary.json").read_text())
    verdict = {st["stage"]: (st["ok"], st["timed_out"]) for st in s["stages"]}
    assert verdict == {"env": (True, False), "train": (True, False), "pytest": (True, False), "methods": (False, True)}
    r_ok, r_bad = s["rows"]
    assert r_ok["time_ratio"] == pytest.approx(41.5 / 20.0) and r_ok["mem_ratio"] == pytest.approx(30.0 / 24.0)
    assert r_ok["paper"] == "119 min / 39.2 GB"
    assert r_bad["status"] == "failed" and "boom" in r_bad["error"]
    out = capsys.readouterr().out
    assert "TIMED OUT" in out and "FAILED: RuntimeError: boom" in out
    # the same without the timed-out stage: every stage ran
    stages.write_text("env\t0\t3\t30\npytest\t1\t90\t100\n")
    assert rep.main(args) == 0


# ------------------------------------------------------------------------------------------------ the script
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_check_sh_cpu_tiny_end_to_end(tmp_path):
    """check.sh --cpu --tiny: every stage runs inside its budget, every JSON is written with finite numbers, and the
    summary table is printed, so the script cannot rot between GPU loans."""
    out = tmp_path / "out"
    # stage shares x3: on a loaded 2-core CI box a stage's seconds say nothing; the budget logic still runs
    env = dict(os.environ, PYTHON=sys.executable, SDI_CHECK_SLACK="3")
    env.pop("OUT", None)
    env.pop("SDI_TEST_DEVICE", None)
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu" / "check.sh"),
            "--cpu",
            "--tiny",
            "--out",
            str(out),
            "--wheels",
            str(tmp_path / "no-wheels"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = sorted(p.name for p in out.iterdir())
    want = ["check.log", "env.json", "pytest.json", "sd_step.json", "summary.json", "tcnn.json"]
    assert files == sorted([*want, "train_methods.json", "train_step.json"]), files
    assert len(files) <= 8  # the device tool brings back at most 8 files
    assert "GPU check summary" in log and "GPU check summary" in (out / "check.log").read_text()
    assert "the installed environment" in log  # no wheels: nothing installed

    load = lambda name: json.loads((out / name).read_text())  # noqa: E731
    env_info = load("env.json")
    assert env_info["cuda_available"] is False and env_info["versions"]["diffusers"][0].isdigit()

    sd = load("sd_step.json")
    assert {(r["impl"], r["method"]) for r in sd["results"]} == {
        ("official", "sds"), ("ours", "sds"), ("official", "sdi"), ("ours", "sdi")
    }  # fmt: skip
    for r in sd["results"]:
        assert _finite(r["ms_median"]) and r["ms_median"] > 0 and r["finite"]
        assert r["unet_calls_per_step"] == r["expected_unet_calls"]

    def check_method(m, sdi: bool):
        assert m["status"] == "ok", m
        for k in ("it_per_s", "ms_mean", "projected_minutes", "time_ratio_to_goal", "memory_ratio_to_goal"):
            assert _finite(m[k]) and m[k] > 0, (k, m[k])
        assert _finite(m["peak_rss_gb"]) and m["peak_rss_gb"] > 0.1
        assert m["projected_minutes"] == pytest.approx(m["ms_mean"] * 10000 / 6e4)
        # exclusive part timers: none negative (a double count would drive "other" below 0), they add up
        assert all(v >= -0.02 for v in m["parts_share"].values()), m["parts_share"]
        assert sum(m["parts_share"].values()) == pytest.approx(1.0)
        assert m["parts_ms"]["render"] > 0 and m["parts_ms"]["vae_encode"] > 0 and m["parts_ms"]["backward"] > 0
        # SDI: 1 + ceil((t - 1)/100) inversion calls + 1 forward; t in [250, 980] over the anneal
        lo, hi = (5, 12) if sdi else (1, 2)
        assert lo <= m["unet_calls_per_step"] <= hi

    train = load("train_step.json")
    assert [m["guidance"] for m in train["methods"]] == ["ddim_inversion"]
    check_method(train["methods"][0], sdi=True)
    assert train["methods"][0]["speedup_over_paper"] > 0

    methods = load("train_methods.json")["methods"]
    options = base_options("guidance")  # check.sh leaves out the per-method variants (sds_x0, ...)
    assert sorted(m["guidance"] for m in methods) == sorted(set(options) - {"ddim_inversion"})
    sds = next(m for m in methods if m["guidance"] == "sds")
    check_method(sds, sdi=False)
    for m in methods:  # every other method: a measured row or a failed row with its error, never missing
        assert m["status"] == "ok" or m.get("error"), m

    pt = load("pytest.json")
    assert pt["complete"] and pt["counts"].get("passed", 0) >= 4 and not pt["real_failures"], pt["counts"]
    assert all("on_device" in n for n in pt["tests"])

    tc = load("tcnn.json")
    assert tc["available"] is False and tc["reason"]

    summary = load("summary.json")
    assert summary["all_stages_ok"] is True
    stages = [s["stage"] for s in summary["stages"]]
    for s in ("env", "sd_step", "pipeline", "train", "methods", "memory", "pytest", "tcnn", "gaussians"):
        assert s in stages
    gs = summary["gaussians"]  # the Gaussians stage, folded into summary.json
    assert gs["parity"]["status"] == "skipped" and gs["steps"][0]["backend"] == "torch"
    assert gs["steps"][0]["status"] == "ok" and _finite(gs["steps"][0]["step_ms"])
    # the memory stage (issue 20) travels inside summary.json: render rows by lever, VAE rows, whole steps
    mem = {(r["part"], r.get("lever", r.get("levers"))): r for r in summary["memory"]["rows"]}
    off, ckpt = mem[("render", "off")], mem[("render", "ckpt")]
    assert off["samples"] == ckpt["samples"] > 0 and 0 < ckpt["saved_bytes"] < off["saved_bytes"]
    assert mem[("vae_encode_backward", "vae_checkpointing")]["saved_bytes"] > 0 and mem[("vae_encode_backward", "off")]
    assert {mem[("train_step", s)]["status"] for s in ("off", "on")} == {"ok"}
    assert all(s["seconds"] <= s["limit"] + 1 for s in summary["stages"])
    ok_rows = [r for r in summary["rows"] if r["status"] == "ok"]
    assert any(r["stage"] == "train" and r["method"] == "ddim_inversion" for r in ok_rows)
    for r in ok_rows:
        for k in ("minutes_10k", "peak_gb", "time_ratio", "mem_ratio"):
            assert _finite(r[k]) and r[k] > 0, (r["method"], k, r[k])
