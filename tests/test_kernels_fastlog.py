"""The error bound of the fast log2 and division the float32 anomaly-attention kernels use on a GPU.

On a GPU the float32 kernels take log2 from ``lg2.approx`` (one MUFU.LG2; ``tl.log2`` would be libdevice's 12-FMA
log2f) and divide with ``div.approx`` (MUFU.RCP and a multiply). The interpreter runs the exact functions, so the CPU
suite cannot see their error; this test bounds its effect instead, in float64, at goal-like shapes.

The bound assumed (PTX ISA, ``lg2.approx.f32``: at most 2^-22 absolute error for arguments in (0.5, 2), 2^-22
relative elsewhere; ``div.approx.f32``: 2 ulp for divisors in [2^-126, 2^126]):

    |lg2.approx(x) - log2 x| <= 2^-22 max(1, |log2 x|),    |div.approx(a, b) - a/b| <= 2^-22 |a/b|.

Every log here has an argument in [ε, 1 + ε] = [1e-4, 1.0001], so the log error is at most 2^-22 · 13.3 = 3.2e-6
(base 2). Propagated through R = Σ_j (S - P)(ln(S+ε) - ln(P+ε)) and the series branch's
dscore = S (w (g - G)) with g = ln(S+ε) - ln(P+ε) + (S - P)/(S + ε), worst case (every error with the sign that hurts),
the relative change must stay below the float32 GPU tests' tolerance (1e-4) with a wide margin.
"""
import math

import pytest
import torch

from adcore.models.vit import prior_sigma
from kernels import reference

LOG_ERR = 2.0 ** -22
EPS = 1e-4


def _log2_err(x):
    return LOG_ERR * torch.clamp(torch.log2(x).abs(), min=1.0)


@pytest.mark.parametrize("grid", [(14, 14), (28, 28)])
def test_fast_log_and_division_error_is_far_below_the_float32_tolerance(grid):
    torch.manual_seed(0)
    B, H, d = 1, 2, 64
    N = grid[0] * grid[1]
    q, k = (torch.randn(B, H, N, d, dtype=torch.float64) for _ in range(2))
    # The model's own sigma: its transform of a freshly initialised Linear's output on unit-variance tokens.
    raw = torch.nn.Linear(H * d, H).double()(torch.randn(B, N, H * d, dtype=torch.float64)).transpose(1, 2)
    sigma = prior_sigma(raw, max(grid) / 8).detach()
    S = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    P = reference.prior_association(sigma, grid)
    diff = torch.log(S + EPS) - torch.log(P + EPS)
    R = ((S - P) * diff).sum(-1)
    # Worst-case error of ln(S+ε) - ln(P+ε) (each log2 error times ln 2) and of (S - P)/(S + ε).
    d_diff = math.log(2) * (_log2_err(S + EPS) + _log2_err(P + EPS))
    ratio = (S - P) / (S + EPS)
    d_g = d_diff + LOG_ERR * ratio.abs()
    d_R = ((S - P).abs() * d_diff).sum(-1)
    assert (d_R / R.abs()).max() < 1e-5

    w = torch.randn(B, H, N, 1, dtype=torch.float64)
    g = diff + ratio
    G = (S * g).sum(-1, keepdim=True)
    ds = S * w * (g - G)
    d_ds = S * w.abs() * (d_g + (S * d_g).sum(-1, keepdim=True))
    assert d_ds.norm() / ds.norm() < 1e-5
