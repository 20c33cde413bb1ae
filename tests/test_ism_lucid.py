"""experiment=ism_lucid as LucidDreamer's loop runs it (issue 27): each setting against the official formulas written
out here (EnVision-Research/LucidDreamer train.py / guidance/sd_utils.py / gaussian_renderer, not imported):
the random flip (a flipped step's render gradient is the flip of the unflipped step's on the flipped render), the
azimuth blend of the view prompts, LucidDreamer's Perp-Neg weights, the depth steps (their input and their share),
the warm-up counted from iteration 1 and the Perp-Neg interval's ceil; the presets carry the official values and
ism_lucid trains on the exact 3D prior."""

import csv
import math
from pathlib import Path

import pytest
import torch

from distill.guidance import CFGConfig
from distill.methods.ism import ISM, ISMConfig, interval
from distill.priors.analytic import AnalyticPrior
from distill.priors.base import NFSD_NEGATIVE_PROMPT
from distill.prompts import PromptConfig, PromptProcessor
from distill.scene.cameras import Cameras
from distill.schedule import TimeSchedule, TimeScheduleConfig
from distill.train import train

AZIMUTHS = (0.0, 30.0, 45.0, 90.0, 135.0, 180.0, -30.0, -90.0, -135.0, 60.0, 170.0)
FAST = ["logger=csv", "trainer.progress=false", "trainer.image_every=0", "trainer.export=false", "trainer.threads=1"]


def warmup_schedule() -> TimeSchedule:
    return TimeSchedule(TimeScheduleConfig("warmup", t_min=0.02, t_max=0.5, t_max_start=0.98, warmup=0.3))


# ---------------------------------------------------------------------------------------------- the official formulas
def official_r(azimuth: float) -> tuple[str, str, float]:
    """train.py: the two views and r of the blend r E(start) + (1 - r) E(end), branch for branch."""
    if -90 <= azimuth < 90:
        r = 1 - azimuth / 90 if azimuth >= 0 else 1 + azimuth / 90
        return "front", "side", r
    r = 1 - (azimuth - 90) / 90 if azimuth >= 0 else 1 + (azimuth + 90) / 90
    return "side", "back", r


def official_perp_neg(azimuth: float, negative_w=-2.0, front_decay=2.0, side_decay=10.0):
    """train.py get_pos_neg_text_embeddings: (negative views, their weights)."""
    start, _, r = official_r(azimuth)
    if start == "front":
        front = 0.0 if r > 0.8 else math.exp(-r * front_decay) * negative_w
        side = 0.0 if r < 0.2 else math.exp(-(1 - r) * side_decay) * negative_w
        return ["front", "side"], [front, side]
    side = 0.0 if r > 0.8 else math.exp(-r * side_decay) * negative_w / 2
    return ["side", "front"], [side, negative_w]


def official_delta(iteration: int, perp_neg: bool, W=1500, start=100, end=80) -> int:
    warm = 1.0 - min(iteration / W, 1.0)
    if perp_neg:
        return int(end + math.ceil(warm * (start - end)))
    return int(end + warm * (start - end))


def official_t(iteration: int, generator: torch.Generator, W=1500) -> int:
    warm = 1.0 - min(iteration / W, 1.0)
    return int(torch.randint(20, 500 + int(int(1000 * (0.98 - 0.5)) * warm), (1,), generator=generator)[0])


def official_disparity(depth: torch.Tensor, alpha: torch.Tensor, fov_x: float) -> torch.Tensor:
    """gaussian_renderer: one view (1, H, W)."""
    focal = 1 / (2 * math.tan(fov_x / 2))
    disp = focal / (depth + (alpha * 10) + 1e-5)
    bg = disp[alpha <= 0.1]
    min_d = bg.min() if bg.numel() else disp.min()
    return torch.clamp((disp - min_d) / (disp.max() - min_d), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- prompts
class OneHotPrior:
    """Every prompt embeds to its own basis vector, so a conditioning row reads as its mixing coefficients."""

    view_dependent = True

    def __init__(self):
        self.index: dict[str, int] = {}

    def embed_prompts(self, prompts):
        rows = []
        for p in prompts:
            self.index.setdefault(p, len(self.index))
            rows.append(torch.nn.functional.one_hot(torch.tensor(self.index[p]), 16).double())
        return torch.stack(rows)[:, None, :]  # (N, 1, 16)


def cameras_at(azimuths, elevation=10.0) -> Cameras:
    B = len(azimuths)
    return Cameras(
        torch.eye(4).expand(B, 4, 4).clone(),
        torch.full((B,), 0.6),
        torch.full((B,), float(elevation)),
        torch.tensor(azimuths, dtype=torch.float32),
        torch.full((B,), 3.0),
        8,
        8,
    )


def coefficients(prior: OneHotPrior, rows: torch.Tensor, prompt: str) -> dict[str, float]:
    return {d: float(rows[..., prior.index[f"{prompt}, {d} view"]].reshape(-1)[0]) for d in ("front", "side", "back")}


def test_view_prompts_blend_by_azimuth_as_lucid_dreamer():
    prior = OneHotPrior()
    cfg = PromptConfig(prompt="a bagel", negative_prompt="ugly", perp_neg=False, view_prompts="lucid")
    cond = PromptProcessor(cfg, prior)(cameras_at(AZIMUTHS))
    for b, azi in enumerate(AZIMUTHS):
        start, end, r = official_r(azi)
        want = {"front": 0.0, "side": 0.0, "back": 0.0}
        want[start] += r
        want[end] += 1 - r
        got = coefficients(prior, cond.cond[b], "a bagel")
        assert got == pytest.approx(want, abs=1e-12), azi
    # the closed forms the issue quotes: 30 deg 2/3 front + 1/3 side; 45 and 135 deg halfway
    got = {a: coefficients(prior, cond.cond[AZIMUTHS.index(a)], "a bagel") for a in (0.0, 30.0, 45.0, 90.0, 135.0)}
    assert got[30.0]["front"] == pytest.approx(2 / 3) and got[30.0]["side"] == pytest.approx(1 / 3)
    assert got[45.0]["front"] == pytest.approx(0.5) and got[135.0]["back"] == pytest.approx(0.5)
    assert got[0.0]["front"] == 1.0 and got[90.0]["side"] == 1.0
    # threestudio's one suffix per view stays the other value: 30 deg is all front there
    ts = PromptProcessor(PromptConfig(prompt="a bagel", negative_prompt="ugly", perp_neg=False), prior)
    assert coefficients(prior, ts(cameras_at([30.0])).cond[0], "a bagel") == {"front": 1.0, "side": 0.0, "back": 0.0}


def test_perp_neg_weights_are_lucid_dreamers():
    prior = OneHotPrior()
    cfg = PromptConfig(prompt="a cat", negative_prompt="ugly", perp_neg=True, perp_neg_weights="lucid")
    cond = PromptProcessor(cfg, prior)(cameras_at(AZIMUTHS))
    for b, azi in enumerate(AZIMUTHS):
        views, weights = official_perp_neg(azi)
        assert cond.neg_weights[b].tolist() == pytest.approx(weights, abs=1e-6), azi
        for k, view in enumerate(views):  # each negative row is that view's prompt
            assert coefficients(prior, cond.negatives[k, b], "a cat")[view] == 1.0
        start, end, r = official_r(azi)
        pos = coefficients(prior, cond.cond[b], "a cat")
        assert pos[start] == pytest.approx(r) and pos[end] == pytest.approx(1 - r)
    # the numbers at 30 deg: official (front, side) = (-0.527, -0.071); threestudio's (-0.440, -0.960)
    i30 = AZIMUTHS.index(30.0)
    assert cond.neg_weights[i30].tolist() == pytest.approx([-0.527, -0.071], abs=1e-3)
    ts = PromptProcessor(PromptConfig(prompt="a cat", negative_prompt="ugly", perp_neg=True), prior)
    assert ts(cameras_at([30.0])).neg_weights[0].tolist() == pytest.approx([-0.440, -0.960], abs=2e-3)


def test_prompt_settings_name_the_bad_value():
    with pytest.raises(ValueError, match="prompt_processor.view_prompts='magic'"):
        PromptProcessor(PromptConfig(view_prompts="magic"), OneHotPrior())
    with pytest.raises(ValueError, match="prompt_processor.perp_neg_weights='x'"):
        PromptProcessor(PromptConfig(perp_neg_weights="x"), OneHotPrior())


# ---------------------------------------------------------------------------------------------- warm-up bookkeeping
def test_warmup_counts_iterations_from_one_and_perp_neg_ceils_delta():
    prior = AnalyticPrior()
    official = ISM(ISMConfig(), prior, warmup_schedule(), CFGConfig(fwd=7.5))
    project = ISM(ISMConfig(first_iteration=0, interval_rounding="floor"), prior, warmup_schedule(), CFGConfig())
    for step in range(1500):
        for perp in (False, True):
            seed = 7 * step + perp
            i_t, delta = official.draw(step, 5000, torch.Generator().manual_seed(seed), perp_neg=perp)
            assert i_t == official_t(step + 1, torch.Generator().manual_seed(seed)), step
            assert delta == official_delta(step + 1, perp), (step, perp)
    # step 0: official t in [20, 979), delta 99 (Perp-Neg 100); the project's old count [20, 980), delta 100
    assert official.draw(0, 5000)[1] == 99 and official.draw(0, 5000, perp_neg=True)[1] == 100
    assert project.draw(0, 5000)[1] == 100
    sched = warmup_schedule()
    hi = [500 + int(480 * sched.warm(k + 1, 5000)) for k in range(5000)]
    hi_project = [500 + int(480 * sched.warm(k, 5000)) for k in range(5000)]
    assert hi[0] == 979 and hi_project[0] == 980
    # the counts over 5000 steps: t's upper end differs on 480 steps, delta on 20; Perp-Neg's ceil makes
    # delta 1 larger than the project's int() on 1463 of the first 1500 steps
    assert sum(a != b for a, b in zip(hi, hi_project)) == 480
    c = ISMConfig()
    deltas = [(official.draw(k, 5000)[1], project.draw(k, 5000)[1]) for k in range(5000)]
    assert sum(a != b for a, b in deltas) == 20
    perp = [official.draw(k, 5000, perp_neg=True)[1] - project.draw(k, 5000, perp_neg=True)[1] for k in range(1500)]
    assert sum(d == 1 for d in perp) == 1463 and set(perp) <= {0, 1}
    assert interval(0, 5000, sched, c) == 100  # interval() itself takes the iteration it is given


def test_the_step_uses_the_drawn_t_and_delta():
    prior = AnalyticPrior()
    ism = ISM(ISMConfig(), prior, warmup_schedule(), CFGConfig(fwd=7.5))
    cfg = PromptConfig(prompt="a red circle", negative_prompt=NFSD_NEGATIVE_PROMPT, view_dependent=False)
    cfg.perp_neg = False
    cond = PromptProcessor(cfg, prior)(None, 2)
    x0 = prior.sample("a red circle", 2, torch.Generator().manual_seed(0))
    for step in (0, 700, 1600):
        i_t, delta = ism.draw(step, 5000, torch.Generator().manual_seed(step))
        out = ism.step(x0.clone().requires_grad_(True), cond, step, 5000, torch.Generator().manual_seed(step))
        assert out.t == i_t + 1 and out.stats["s"] == max(i_t - delta, 0) + 1


# ---------------------------------------------------------------------------------------------- the encoded input
def _render(B=2, H=6, W=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    opacity = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)
    opacity[:, :, :, :2] = 0.05  # some background
    return {
        "rgb": torch.rand(B, 3, H, W, generator=g, dtype=torch.float64),
        "depth": opacity * (2.0 + torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)),
        "opacity": opacity,
    }


def test_flipped_step_gradient_is_the_flip_of_the_gradient():
    """flip_p = 1: the step on the render equals, gradient for gradient, the unflipped step on the mirrored render
    with its gradient mirrored back (T.RandomHorizontalFlip before encoding, noise drawn after)."""
    prior = AnalyticPrior()
    cfg = PromptConfig(prompt="a red circle", negative_prompt=NFSD_NEGATIVE_PROMPT, view_dependent=False)
    cfg.perp_neg = False
    cond = PromptProcessor(cfg, prior)(None, 2)
    img = prior.decode(prior.sample("a red circle", 2, torch.Generator().manual_seed(1)) + 0.05).clamp(0, 1)
    img = img[..., torch.randperm(img.shape[-1], generator=torch.Generator().manual_seed(2))]  # not mirror-symmetric

    def grad_of(method, rgb, gen):
        rgb = rgb.clone().requires_grad_(True)
        x0 = prior.encode(method.encoder_input({"rgb": rgb}, None, 10, 100, gen))
        method.step(x0, cond, 10, 100, gen).loss.backward()
        return rgb.grad

    sched = TimeSchedule(TimeScheduleConfig("uniform", t_min=0.3, t_max=0.6))
    flip = ISM(ISMConfig(flip_p=1.0), prior, sched, CFGConfig(fwd=7.5))
    plain = ISM(ISMConfig(flip_p=0.0), prior, sched, CFGConfig(fwd=7.5))
    g_flip = grad_of(flip, img, torch.Generator().manual_seed(5))
    assert flip.last_input == {"depth": False, "flip": True}
    gen = torch.Generator().manual_seed(5)
    torch.rand((), generator=gen)  # the flip's coin
    g_plain = grad_of(plain, img.flip(-1), gen)
    assert float(g_plain.abs().max()) > 1e-4
    torch.testing.assert_close(g_flip, g_plain.flip(-1), rtol=0, atol=0)
    # and it is not the unflipped step's gradient
    g_none = grad_of(plain, img, torch.Generator().manual_seed(5))
    assert float((g_none - g_flip).abs().max()) > 1e-4


def test_depth_steps_encode_lucid_dreamers_disparity_at_their_share():
    prior = AnalyticPrior()
    ism = ISM(ISMConfig(as_latent_ratio=0.2, flip_p=0.5), prior, warmup_schedule(), CFGConfig())
    render = _render()
    cams = cameras_at([0.0, 90.0])
    cams = Cameras(cams.c2w, torch.tensor([0.5, 0.7]), cams.elevation, cams.azimuth, cams.distance, 6, 10)
    gen, ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    n_depth = n_flip = 0
    for _ in range(1000):
        x = ism.encoder_input(render, cams, 0, 100, gen)
        depth_step = bool(torch.rand((), generator=ref) < 0.2)  # the loop's coin, then the flip's
        flip = bool(torch.rand((), generator=ref) < 0.5)
        assert ism.last_input == {"depth": depth_step, "flip": flip}
        if depth_step:
            want = []
            for b in range(2):
                fov_x = 2 * math.atan(math.tan(float(cams.fovy[b]) / 2) * 10 / 6)
                want.append(official_disparity(render["depth"][b], render["opacity"][b], fov_x).repeat(3, 1, 1))
            want = torch.stack(want)
        else:
            want = render["rgb"]
        torch.testing.assert_close(x, want.flip(-1) if flip else want, rtol=1e-6, atol=1e-7)
        n_depth += depth_step
        n_flip += flip
    # 1000 Bernoulli(0.2) / (0.5) draws: 5 standard deviations are 0.063 / 0.079
    assert abs(n_depth / 1000 - 0.2) < 0.063 and abs(n_flip / 1000 - 0.5) < 0.079
    assert 0 < n_depth < 1000
    with pytest.raises(ValueError, match="guidance.as_latent_ratio=0.2 needs a scene that renders depth"):
        ism.encoder_input({"rgb": render["rgb"]}, None, 0, 100, gen)


def test_ism_settings_name_the_bad_value():
    for kw, match in (
        ({"first_iteration": 2}, "guidance.first_iteration=2"),
        ({"interval_rounding": "round"}, "guidance.interval_rounding='round'"),
        ({"flip_p": 1.5}, "guidance.flip_p=1.5"),
        ({"as_latent_ratio": -0.1}, "guidance.as_latent_ratio=-0.1"),
    ):
        with pytest.raises(ValueError, match=match):
            ISMConfig(**kw).validate()


# ---------------------------------------------------------------------------------------------- presets, end to end
def test_presets_carry_lucid_dreamers_values(compose_cfg):
    c = compose_cfg(["experiment=ism_lucid"])
    assert c.guidance.flip_p == 0.5 and c.guidance.as_latent_ratio == 0.2 and c.guidance.first_iteration == 1
    assert c.guidance.interval_rounding == "official"
    assert c.prompt_processor.view_prompts == "lucid" and c.prompt_processor.perp_neg is False
    p = compose_cfg(["experiment=ism_lucid_perpneg"])
    assert p.prompt_processor.perp_neg is True and p.prompt_processor.perp_neg_weights == "lucid"
    assert p.guidance.as_latent_ratio == 0.2 and p.camera.batch_size == 4 and p.experiment_name == "ism_lucid_perpneg"
    # the project's other methods keep threestudio's conventions
    t = compose_cfg(["experiment=table61_sds"])
    assert t.prompt_processor.get("view_prompts", "threestudio") == "threestudio"


def test_ism_lucid_trains_on_the_exact_3d_prior(compose_cfg, tmp_path):
    cfg = compose_cfg(
        [
            "experiment=ism_lucid",
            "prior=analytic3d",
            "scene=nerf_cpu",
            "cfg=analytic3d",
            "prompt=a snowman",
            "prompt_processor.negative_prompt=negative",
            "camera.height=16",
            "camera.width=16",
            "camera.batch_size=2",
            "camera.pool=4",
            "trainer.eval_views=1",
            "trainer.max_steps=12",
            "trainer.checkpoint_every=0",
            "trainer.log_every=1",
            "guidance.as_latent_ratio=0.5",  # so that 12 steps surely hold depth steps (seeded run)
            *FAST,
        ]
    )
    m = train(cfg, tmp_path / "run")
    assert m["status"] == "finished" and m["method"] == "ism" and m["steps"] == 12
    rows = list(csv.DictReader(open(Path(tmp_path / "run" / "scalars.csv"))))
    depth = [float(r["value"]) for r in rows if r["name"] == "input_depth"]
    flip = [float(r["value"]) for r in rows if r["name"] == "input_flip"]
    assert len(depth) == len(flip) == 12 and 0 < sum(depth) < 12 and 0 < sum(flip) < 12
    losses = [float(r["value"]) for r in rows if r["name"] == "loss"]
    assert all(math.isfinite(v) for v in losses)
