"""Tolerances derived from the computation, so that they hold on any CPU (developers' guide).

Two fp32 evaluations of one network output y (one batched call vs separate calls; another CPU kernel, which torch
picks per machine: AVX2, AVX512, NEON, or ``ATEN_CPU_CAPABILITY=default``) sum in another order and so differ by
rounding only:

    |y_a - y_b| <= NET_ULPS * EPS32 * max|y|

A result that combines such outputs linearly, sum_i c_i y_i, carries up to sum_i |c_i| times that: its
*amplification*. Classifier-free guidance e_u + s (e_c - e_u) = (1 - s) e_u + s e_c amplifies by |1 - s| + |s|
(14 at s = 7.5), HiFA's e_c + s (e_c - e_u) by 1 + 2 s (201 at s = 100); a division by sqrt(alpha_bar) by
1 / sqrt(alpha_bar); a weight w(t) = 1 - alpha_bar by w.

NET_ULPS: measured on the tiny Stable Diffusion UNet (tests/tiny_sd.py, fp32, 8 x 8 latents) at most 12 EPS32 * max|y|
(one batched call vs per-row calls; sliced / eager attention and channels_last vs the default; fp32 vs a float64 copy
of the same weights), under both ATEN_CPU_CAPABILITY=avx2 and =default (2026-12-03, AMD EPYC; `pytest -m numerics`
with both settings). The bound takes 64, 5x that, for other machines' vector widths (a sum's rounding grows with the
number of partial sums it is split into).

A failing check then means more than rounding: a wrong coefficient, a wrong row, a wrong timestep. Each test that
uses these bounds also checks that the terms it combines differ by much more than the bound (so a swapped or
dropped term could not pass).
"""

from __future__ import annotations

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 1.19e-7: the spacing of fp32 numbers at 1
NET_ULPS = 64


def amplification(*coefficients: float) -> float:
    """sum_i |c_i|: how much a linear combination sum_i c_i y_i multiplies the rounding error of each y_i."""
    return float(sum(abs(float(c)) for c in coefficients))


def fp32_tol(magnitude: float, amplification: float = 1.0, ulps: float = NET_ULPS) -> float:
    """The absolute tolerance for a result that combines fp32 values of size ``magnitude`` (their max |y|) with
    the given ``amplification``: amplification * magnitude * ulps * EPS32."""
    return float(amplification) * float(magnitude) * float(ulps) * EPS32


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, why: str = "") -> None:
    """torch.testing.assert_close with an absolute tolerance only (rounding scales with the terms combined, not
    with the result, which may be near 0), the bound and its reason in the failure message."""
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0,
        atol=atol,
        msg=lambda m: f"{m}\nallowed |difference| <= {atol:.3g}: {why}",
    )
