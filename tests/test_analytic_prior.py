"""The 2D analytic prior is exact: eps is the score of its log-density; samples have its moments."""

import math

import pytest
import torch

from distill.priors.analytic import AnalyticPrior, AnalyticPriorConfig, dct_matrix
from distill.priors.base import PriorError


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=8, components_per_class=2, scale=2.0))


def test_dct_is_orthonormal():
    C = dct_matrix(8)
    assert torch.allclose(C @ C.T, torch.eye(8, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("t", [5, 300, 900])
@pytest.mark.parametrize("prompt", ["a red circle", "", "negative"])
def test_eps_is_the_finite_difference_score(prior, t, prompt):
    """eps(x_t) = -sqrt(1 - ab_t) * grad log p_t(x_t), checked by central differences (float64)."""
    g = torch.Generator().manual_seed(t)
    emb = prior.embed_prompts([prompt])
    x0 = prior.sample(prompt, 1, g)
    ab = prior.alphas_cumprod[t]
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tt = torch.tensor([t])
    eps = prior.eps(x, tt, emb)
    idx = torch.randint(0, x.numel(), (12,), generator=g)
    h = 1e-5
    for i in idx.tolist():
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[i] = h
        e = e.view_as(x)
        d = (prior.log_prob(x + e, tt, emb) - prior.log_prob(x - e, tt, emb)) / (2 * h)
        assert float(eps.flatten()[i]) == pytest.approx(float(-(1 - ab).sqrt() * d), rel=1e-5, abs=1e-7)


def test_sample_moments_match_the_model(prior):
    """Per DCT coefficient: E[z] = mixture mean, Var[z] = Lambda + between-component variance."""
    n = 6000
    z = prior.to_dct(prior.sample("a blue square", n, torch.Generator().manual_seed(0)))
    comps = torch.nonzero(prior.owner == prior.class_index("a blue square")).flatten()
    mu = prior.means_dct[comps]
    mean = mu.mean(0)
    var = prior.lam + mu.pow(2).mean(0) - mean.pow(2)
    se = (var / n).sqrt()
    assert ((z.mean(0) - mean).abs() / se).max() < 5.0
    rel = z.var(0) / var
    assert (rel - 1).abs().max() < 6 * math.sqrt(2 / n)  # chi-square standard error, 6 sigma


def test_realism_is_one_for_samples_and_zero_for_the_mean(prior):
    x = prior.sample("a red circle", 64, torch.Generator().manual_seed(3))
    hi = torch.tensor([prior.image_metrics(x[i : i + 1], "a red circle")["realism_high_band"] for i in range(64)])
    assert hi.mean() == pytest.approx(1.0, abs=0.1)
    k = int(torch.nonzero(prior.owner == 0)[0])
    m = prior.image_metrics(prior.means[k : k + 1], "a red circle")
    assert m["realism_high_band"] == 0.0 and m["nearest_component"] == k


def test_unknown_prompt_names_the_allowed_ones(prior):
    with pytest.raises(PriorError, match="a purple hexagon.*a red circle"):
        prior.embed_prompts(["a purple hexagon"])


def test_wrong_image_size_is_a_clear_error(prior):
    with pytest.raises(PriorError, match="8x8"):
        prior.encode(torch.zeros(1, 3, 16, 16))


def test_negative_class_is_dull_and_leaves_the_other_rows_alone(prior):
    """NFSD's negative prompt is a class of its own (dark, low-contrast, blurred copies of every component): its
    eps differs from the unconditional one, "" still mixes only the real classes, and unknown text still fails."""
    from distill.priors.base import NFSD_NEGATIVE_PROMPT

    emb = prior.embed_prompts([NFSD_NEGATIVE_PROMPT, "negative", "", "a red circle"])
    assert torch.equal(emb[0], emb[1]) and emb[2, -1] == 0 and emb[3, -1] == 0
    g = torch.Generator().manual_seed(0)
    neg = prior.sample("negative", 64, g)
    real = prior.sample("", 64, g)
    # darker and lower-contrast than the real classes (pixel units in [-1, 1])
    assert float(neg.mean()) < float(real.mean()) - 0.2
    C = len(prior.prompts)
    contrast = lambda m: float(m.std(dim=(2, 3)).mean())  # noqa: E731 - spatial contrast of the component means
    assert contrast(prior.means[prior.owner == C]) < 0.5 * contrast(prior.means[prior.owner < C])
    x = torch.randn(2, *neg.shape[1:], generator=g, dtype=torch.float64)
    t = torch.tensor([400, 400])
    e_neg, e_unc = prior.eps(x, t, emb[[0, 0]]), prior.eps(x, t, emb[[2, 2]])
    assert float((e_neg - e_unc).abs().max()) > 1e-3
    with pytest.raises(PriorError):
        prior.embed_prompts(["a purple hexagon"])
