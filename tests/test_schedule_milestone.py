"""VSD / ESD's t_max milestone at the reference's step: prolificdreamer.yaml [5000, 0.98, 0.5, 5001]."""

import torch

from distill.schedule import TimeSchedule, TimeScheduleConfig


def threestudio_C(value: list, step: int) -> float:
    """threestudio.utils.misc.C for [start_step, start_value, end_value, end_step]: linear, clamped."""
    s0, v0, v1, s1 = value
    return v0 + (v1 - v0) * max(min(1.0, (step - s0) / (s1 - s0)), 0.0)


def test_step_schedule_t_max_at_4999_5000_5001(compose_cfg):
    """t ~ U{20, ..., int(1000 C([5000, 0.98, 0.5, 5001], step))}: 980 at 4999 and 5000, 500 from 5001 on. Each
    draw must equal threestudio's randint(min_step, max_step + 1) from a generator in the same state."""
    sc = compose_cfg(["guidance=vsd"]).schedule
    cfg = TimeScheduleConfig(sc.name, sc.t_min, sc.t_max, sc.milestone, sc.t_max_after)
    assert (cfg.name, cfg.milestone, cfg.t_max, cfg.t_max_after) == ("step", 5000, 0.98, 0.5)
    s = TimeSchedule(cfg)
    highs = {}
    for step in (4999, 5000, 5001, 5002, 25000):
        hi = highs[step] = int(1000 * threestudio_C([5000, 0.98, 0.5, 5001], step))
        g, ref = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        for _ in range(50):
            assert s(step, 25000, g) == int(torch.randint(20, hi + 1, (1,), generator=ref))
    assert highs == {4999: 980, 5000: 980, 5001: 500, 5002: 500, 25000: 500}


def test_esd_uses_the_same_milestone(compose_cfg):
    sc = compose_cfg(["guidance=esd"]).schedule
    assert (sc.name, sc.milestone, sc.t_max_after) == ("step", 5000, 0.5)
