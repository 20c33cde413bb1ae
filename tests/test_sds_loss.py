"""guidance.loss: threestudio's SDS (grad = (1 - ab)(eps_hat - eps)) and the SDI code's x0-space loss."""

import math

import pytest
import torch

from distill.config import ConfigError, typed
from distill.guidance import CFGConfig, GuidanceConfig, ScoreDistillation
from distill.kappa import KappaConfig, make_kappa
from distill.priors.base import DiffusionPrior, scaled_linear_alphas_cumprod
from distill.prompts import PromptConfig, PromptProcessor


class AffinePrior(DiffusionPrior):
    """eps(x, t, e) = 0.3 x + e: every branch is known in closed form."""

    shape = (4, 3, 3)

    def __init__(self):
        super().__init__(scaled_linear_alphas_cumprod())

    def encode(self, images):
        return images

    def decode(self, x0):
        return x0

    def embed_prompts(self, prompts):
        gen = lambda p: torch.Generator().manual_seed(7 + len(p))  # noqa: E731 - one fixed row per prompt length
        return torch.stack([torch.randn(self.shape, generator=gen(p), dtype=torch.float64) for p in prompts])

    def eps(self, x_t, t, embeddings, cameras=None):
        return 0.3 * x_t + embeddings.to(x_t.dtype)


def _step(loss: str, t: int, reduction: str = "sum", scale: float = 100.0, rule: str = "threestudio", seed: int = 1):
    prior = AffinePrior()
    cond = PromptProcessor(PromptConfig(prompt="a cat", view_dependent=False, perp_neg=False), prior)(None, 2)
    sd = ScoreDistillation(
        prior,
        make_kappa(KappaConfig("random_resampled")),
        lambda step, max_steps, generator=None: t,  # a fixed t
        GuidanceConfig(name="sds", loss=loss, loss_reduction=reduction, cfg_rule=rule),
        CFGConfig(scale, 1.0),
    )
    x0 = torch.randn(2, *prior.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0.requires_grad_(True)
    out = sd.step(x0, cond, 0, 10, torch.Generator().manual_seed(seed))
    out.loss.backward()
    return prior, cond, x0, out


@pytest.mark.parametrize("t", [20, 500, 980])
def test_threestudio_gradient_matches_hand_computation_from_separate_eps_calls(t):
    """dreamfusion-sd.yaml: eps_hat = eps_c + 100 (eps_c - eps_u), grad = (1 - ab_t)(eps_hat - eps), d loss/dx0 =
    grad / B, loss = 0.5 ||grad||^2 / B. float64 throughout: agreement to 1e-10 relative."""
    prior, cond, x0, out = _step("threestudio", t)
    ab = prior.alphas_cumprod[t].double()
    eps = out.kappa.double()
    x_t = ab.sqrt() * x0.detach() + (1 - ab).sqrt() * eps
    assert torch.allclose(out.x_t.double(), x_t, rtol=1e-12, atol=1e-12)
    tv = torch.full((2,), t)
    eps_c = prior.eps(x_t, tv, cond.cond)  # separate calls, not the batched one under test
    eps_u = prior.eps(x_t, tv, cond.uncond)
    grad = (1 - ab) * (eps_c + 100.0 * (eps_c - eps_u) - eps)
    B = x0.shape[0]
    assert torch.allclose(x0.grad, grad / B, rtol=1e-10, atol=1e-12)
    assert math.isclose(float(out.loss.detach()), 0.5 * float((grad**2).sum()) / B, rel_tol=1e-10)


@pytest.mark.parametrize("t", [20, 250, 500, 700, 980])
def test_x0_over_threestudio_gradient_ratio_is_one_over_sqrt_ab_one_minus_ab(t):
    """Same noise and eps_hat: the x0 loss's gradient is (sigma / alpha)(eps_hat - eps) / B, threestudio's
    sigma^2 (eps_hat - eps) / B, so their ratio is 1 / sqrt(ab (1 - ab)) everywhere (float64: 1e-9 relative).
    With loss_reduction=mean the x0 gradient is further divided by numel over the whole batch (B N)."""
    _, _, x_ts, ts = _step("threestudio", t)
    prior, _, x_x0, x0 = _step("x0", t)
    assert torch.equal(ts.kappa, x0.kappa)
    ab = float(prior.alphas_cumprod[t])
    ratio = 1.0 / math.sqrt(ab * (1.0 - ab))
    assert torch.allclose(x_x0.grad, ratio * x_ts.grad, rtol=1e-9, atol=1e-14)
    _, _, x_mean, _ = _step("x0", t, reduction="mean")
    numel = x_mean.numel()  # mse mean divides by B N (all elements)
    assert torch.allclose(x_mean.grad * numel, x_x0.grad, rtol=1e-9, atol=1e-14)


def test_ratio_values_quoted_in_the_issue():
    """The SD 2.1 schedule's 1 / sqrt(ab (1 - ab)): 13.1 at t=980, 2.2 at 500, 7.4 at 20 (issue 19, docs/methods.md)."""
    ab = scaled_linear_alphas_cumprod().double()
    r = lambda t: float(1 / (ab[t] * (1 - ab[t])).sqrt())  # noqa: E731
    assert round(r(980), 1) == 13.1 and round(r(500), 1) == 2.2 and round(r(20), 1) == 7.4


def test_loss_option_is_validated():
    with pytest.raises(ConfigError, match="guidance.loss='sds'.*x0, threestudio"):
        typed({"loss": "sds"}, GuidanceConfig, "guidance")


def test_which_runs_use_which_loss(compose_cfg):
    """Table 6.1's SDS row and guidance=sds: threestudio (dreamfusion-sd.yaml); the Fig. 6.2 ladder and the 2D
    experiments run the SDI code with inversion off: x0; SDI itself: x0."""
    g = lambda *o: compose_cfg(list(o)).guidance  # noqa: E731
    assert (g("guidance=sds").loss, g("guidance=sds").loss_reduction) == ("threestudio", "sum")
    assert (g("experiment=table61_sds").loss, g("experiment=table61_sds").loss_reduction) == ("threestudio", "sum")
    for ablation in ("sds_lowres", "sds_highres", "sds_anneal"):
        assert (g(f"+ablation={ablation}").loss, g(f"+ablation={ablation}").loss_reduction) == ("x0", "mean")
    for exp in ("sds_2d", "sds_notebook_2d"):
        assert g(f"experiment={exp}").loss == "x0"
    assert typed(g("guidance=ddim_inversion"), GuidanceConfig, "guidance").loss == "x0"
