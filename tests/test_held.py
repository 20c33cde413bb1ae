"""trainer.target_every: any method's target held for N steps (distill.held), against hand-computed gradients."""

from __future__ import annotations

import pytest
import torch

from distill.guidance import CFGConfig
from distill.held import HeldTarget
from distill.methods import build_guidance
from distill.methods.csd import CSD, CSDConfig
from distill.methods.ism import ISM, ISMConfig
from distill.priors.analytic import AnalyticPrior
from distill.prompts import Conditioning
from distill.schedule import TimeSchedule, TimeScheduleConfig

FAST = ["logger=none", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false"]


class CountingPrior(AnalyticPrior):
    """The 2D analytic prior, counting its eps calls (a held step must make none)."""

    calls = 0

    def eps(self, *args, **kwargs):
        CountingPrior.calls += 1
        return super().eps(*args, **kwargs)


@pytest.fixture(scope="module")
def prior():
    return CountingPrior()


def _cond(prior, B):
    emb = prior.embed_prompts(["a red circle", ""])
    return Conditioning(emb[:1].expand(B, *emb.shape[1:]), emb[1:].expand(B, *emb.shape[1:]))


def _grad(guidance, x0, cond, step, g):
    x = x0.clone().requires_grad_(True)
    out = guidance.step(x, cond, step, 10, g)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize(
    "make, per_batch",
    [
        (lambda p, s: CSD(CSDConfig(loss_reduction="sum"), p, s), True),  # d loss / d x0 = grad / B
        (lambda p, s: ISM(ISMConfig(loss_reduction="official"), p, s, CFGConfig()), False),  # = grad (no / B)
    ],
    ids=["csd_sum", "ism_official"],
)
def test_a_held_step_pulls_towards_the_held_target_without_a_model_call(prior, make, per_batch):
    """Step 0 forms the target (the method's own gradient); steps 1, 2 reuse it: d loss / d x0 = (x0 - x0_hat) / B
    (ISM official: no / B) at the new x0, with no prior call and no random draw; step 3 forms a new target."""
    B = 2
    sched = TimeSchedule(TimeScheduleConfig(name="uniform"), prior.num_train_timesteps)
    held = HeldTarget(make(prior, sched), every=3)
    cond = _cond(prior, B)
    x0 = torch.randn(B, *prior.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    out0, grad0 = _grad(held, x0, cond, 0, g)
    target = out0.x0_hat
    torch.testing.assert_close(grad0, (x0 - target) / (B if per_batch else 1))  # x0_hat = x0 - grad
    state, calls = g.get_state(), CountingPrior.calls
    x1 = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    for step in (1, 2):
        out, grad = _grad(held, x1, cond, step, g)
        expected = (x1 - target) / (B if per_batch else 1)
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
        assert (out.t, out.model_calls) == (out0.t, 0)
        assert out.stats["grad_norm"] == pytest.approx(float((x1 - target).norm()))
    assert CountingPrior.calls == calls and torch.equal(g.get_state(), state)
    out3, _ = _grad(held, x1, cond, 3, g)
    assert out3.model_calls > 0 and CountingPrior.calls > calls
    assert not torch.equal(out3.x0_hat, target)


def test_target_every_one_builds_the_bare_method(compose_cfg, prior):
    """trainer.target_every=1 (every preset but the notebook ones): the method itself, not wrapped."""
    node = compose_cfg(["guidance=csd"]).guidance
    sched = TimeSchedule(TimeScheduleConfig(), prior.num_train_timesteps)
    assert type(build_guidance(node, prior=prior, schedule=sched)) is CSD
    assert type(build_guidance(node, target_every=4, prior=prior, schedule=sched).method) is CSD


def test_target_every_below_one_is_refused_naming_the_key(compose_cfg):
    from distill.config import ConfigError
    from distill.train import check_run_config

    with pytest.raises(ConfigError, match=r"trainer.target_every=0 must be >= 1"):
        check_run_config(compose_cfg(["experiment=sdi_2d", "trainer.target_every=0"]))


def test_vsd_under_the_notebook_protocol_resumes_mid_hold_bit_identically(compose_cfg, tmp_path, interrupt_at):
    """experiment=sdi_notebook_2d guidance=vsd: the held target and phi both live in the checkpoint, so a run
    interrupted in the middle of a hold (step 4 of a 3-step cadence) ends where the uninterrupted run ends."""
    from distill import rundir
    from distill.train import train

    cfg = compose_cfg(
        ["experiment=sdi_notebook_2d", "guidance=vsd", "trainer.target_every=3", "trainer.max_steps=7"]
        + ["trainer.checkpoint_every=2", "trainer.eval_views=1", *FAST]
    )
    full = train(cfg, tmp_path / "full")
    assert full["status"] == "finished"
    interrupt_at(cfg, tmp_path / "resumed", 4)
    assert train(cfg, tmp_path / "resumed")["resumed_from_step"] == 4
    a, b = rundir.load_checkpoint(tmp_path / "full"), rundir.load_checkpoint(tmp_path / "resumed")
    for k in a["scene"]:
        assert torch.equal(a["scene"][k], b["scene"][k]), k
    assert a["guidance"]["phi"]["steps"] == b["guidance"]["phi"]["steps"] == 3  # phi trains at steps 0, 3, 6 only
    assert all(torch.equal(a["guidance"]["held"][k], b["guidance"]["held"][k]) for k in ("x0_hat", "eps_hat"))
