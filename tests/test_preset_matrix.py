"""Every experiment preset with every guidance option: conf/experiment/*.yaml x conf/guidance/*.yaml, one step each.

A preset describes a protocol (prior, scene, camera, schedule, held-target cadence ``trainer.target_every``, steps)
and a guidance option a method, so the two groups must compose: ``python train.py experiment=E guidance=M`` runs for
every E and M, M with its own defaults under E's protocol. Every pair does today, so no preset declares a method it
cannot host. Each pair is composed as the CLI composes it and trained for one optimiser step on the CPU through
``distill.train.train`` (status "finished": a non-finite loss would be "diverged"), shrunk where the run's size is
not the point: 3D renders at 32 px and batch 1, a smaller hash grid / Gaussian count / analytic-3D trace, the SD
presets on the tiny SD pipeline (tests/tiny_sd.py; VSD / ESD's phi too), no export, no images, no logger.

Size: 17 presets x 12 guidance options (8 methods, 4 per-method variants) = 204 one-step runs. All of them (the file
with ``-m "slow or not slow"``, 206 tests) took 1641 s on the shared 2-core VM at load average ~7, torch threads 2.
The default run keeps one preset of each kind with all 12 options, 36 runs (``cached_notebook_2d``: 2D, held
targets, x0_hat start, cached kappa; ``ism_analytic3d``: the exact 3D prior on the NeRF; ``table61_vsd``: SD on the
NeRF with a render-size milestone): 271 s on the same VM at load average ~5 (``python -m pytest
tests/test_preset_matrix.py``). The other 14 presets x 12 = 168 runs are marked slow (``pytest -m slow``); the static
check that no preset writes a ``guidance.*`` key covers all 17 in the default run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from distill.train import check_run_config, train

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "guidance").glob("*.yaml"))
# one preset of each kind runs in the default tier: 2D analytic (the notebook protocol: held targets, x0_hat start,
# cached kappa), 3D analytic, SD (a render-size milestone)
FAST = ("cached_notebook_2d", "ism_analytic3d", "table61_vsd")

SMALL = [
    "trainer.max_steps=1",
    "trainer.checkpoint_every=0",
    "trainer.image_every=0",
    "trainer.export=false",
    "trainer.eval_views=1",
    "trainer.progress=false",
    "logger=none",
    "camera.height=32",
    "camera.width=32",
    "camera.batch_size=1",
    "++camera.milestones=[]",
]


def test_no_preset_names_a_method_key():
    """The failure this matrix exists for, over every preset at once: a preset that writes into the guidance node
    names keys that only its own method has. Method settings live in conf/guidance (a method or a per-method variant
    such as sds_x0); protocol settings in the trainer, schedule, cfg, scene, camera and prior groups."""
    for preset in PRESETS:
        node = OmegaConf.load(CONF / "experiment" / f"{preset}.yaml")
        assert "guidance" not in node, f"conf/experiment/{preset}.yaml sets guidance.{list(node.guidance)}"


def run_one_step(preset: str, method: str, compose, tiny_sd: Path, run_dir: Path) -> None:
    cfg = compose([f"experiment={preset}", f"guidance={method}", *SMALL])
    assert cfg.guidance.name == compose([f"guidance={method}"]).guidance.name  # the method asked for is the one run
    with open_dict(cfg):  # sizes only: what the pair composes to is the CLI's
        prior, scene = cfg.prior._target_, cfg.scene._target_
        if "stable_diffusion" in prior:  # SD presets: the tiny pipeline, at 64 px
            cfg.prior.update(model=str(tiny_sd), resolution=64, dtype="fp32", embedding_cache_dir=None)
            if "phi" in cfg.guidance:  # VSD / ESD's phi UNet too
                cfg.guidance.phi.model = str(tiny_sd)
        if "Analytic3D" in prior:
            cfg.prior.update(supersample=1, trace_steps=16, objects_per_prompt=1, n_basis=8)
        if "NeRF" in scene:
            cfg.scene.encoding.log2_hashmap_size = 12
            cfg.scene.renderer.samples_per_ray = 16
        if "Gaussian" in scene:
            cfg.scene.n_init = 256
    metrics = train(cfg, run_dir)
    assert (metrics["status"], metrics["steps"]) == ("finished", 1), metrics


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("preset", FAST)
def test_one_step_of_each_kind_of_preset(preset, method, compose_cfg, tiny_sd_dir, tmp_path):
    run_one_step(preset, method, compose_cfg, tiny_sd_dir, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in FAST])
def test_one_step_of_every_other_preset(preset, method, compose_cfg, tiny_sd_dir, tmp_path):
    run_one_step(preset, method, compose_cfg, tiny_sd_dir, tmp_path / "run")


def test_the_issue_commands_compose_with_the_protocol_kept(compose_cfg):
    """experiment=sds_2d guidance=vsd and experiment=sdi_notebook_2d guidance=ism: the method is the one asked for,
    with its own defaults, and the protocol (held-target cadence, schedule, start, optimiser) is the preset's."""
    vsd = compose_cfg(["experiment=sds_2d", "guidance=vsd"])
    assert (vsd.guidance.name, vsd.guidance.loss_reduction, "loss" in vsd.guidance) == ("vsd", "sum", False)
    assert vsd.trainer.max_steps == 500 and vsd.prior._target_.endswith("AnalyticPrior")
    ism = compose_cfg(["experiment=sdi_notebook_2d", "guidance=ism"])
    notebook = compose_cfg(["experiment=sdi_notebook_2d"])
    assert ism.guidance.name == "ism" and ism.guidance.cfg_rule == "standard"  # ISM's own rule, not the notebook's
    for key in ("trainer", "optimizer", "scene"):
        assert ism[key] == notebook[key], key
    assert check_run_config(ism).schedule == check_run_config(notebook).schedule  # ISM's warmup keys unused by anneal
    assert notebook.trainer.target_every == 25 and notebook.guidance.cfg_rule == "threestudio"
