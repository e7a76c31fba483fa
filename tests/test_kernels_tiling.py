"""The fused kernels at tilings the default interpreter launch never reaches.

Under the interpreter every launch uses one tile size, the next power of two of N, so a test sees at most two tiles,
never unequal BLOCK_M and BLOCK_N, never a GPU config. ``BLOCK_OVERRIDE`` (test-only) fixes the tiles of every launch:
here small tiles give many tiles per row (the prior's zero-tile shortcut, ragged last tiles, the atomic dQ adding
several key tiles into one query tile) and several MDN programs (the shared parameters' cross-program reduction).
Shapes stay small: the interpreter costs milliseconds per tile.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel modules: triton.jit reads it when decorating.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from adcore import ops  # noqa: E402
from kernels._utils import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
NAMES = ["out", "dis_series", "dis_prior", "dq", "dk", "dv", "dsigma"]


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    monkeypatch.delenv("ADCORE_BACKEND", raising=False)
    torch.manual_seed(0)


def _attention(backend, inputs, grid, weights, cast=None):
    leaves = [(t if cast is None else t.to(cast)).detach().clone().requires_grad_() for t in inputs]
    outs = ops.anomaly_attention(*leaves, grid, backend=backend, fp32_precision="ieee")
    torch.autograd.backward(outs, [w.to(o.dtype) for w, o in zip(weights, outs)])
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _inputs(B, H, grid, d, dev, sigma_range=(0.1, 2.0)):
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, N, d, device=dev) for _ in range(3))
    sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * torch.rand(B, H, N, device=dev)
    weights = (torch.randn(B, H, N, d, device=dev), torch.randn(B, H, N, device=dev), torch.randn(B, H, N, device=dev))
    return (q, k, v, sigma), weights


def _check(got, want, rtol=1e-4, atol=1e-5):
    for name, g, w in zip(NAMES, got, want):
        assert g is not None, name
        torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic_dq"])
@pytest.mark.parametrize("grid,blocks,sigma_range", [
    ((7, 7), (16, 16, 4), (0.1, 2.0)),    # N = 49: four tiles per row, the last one ragged (1 token)
    ((7, 7), (16, 32, 4), (0.1, 2.0)),    # BLOCK_M < BLOCK_N
    ((5, 10), (32, 16, 4), (0.1, 2.0)),   # BLOCK_M > BLOCK_N, non-square grid
    ((8, 8), (16, 16, 4), (0.05, 0.3)),   # narrow priors: far tile pairs take the zero-prior shortcut
    ((1, 40), (16, 16, 4), (0.05, 0.5)),  # 1-D window: the column-gap bound decides the shortcut
])
def test_attention_multi_tile_matches_reference(dev, monkeypatch, grid, blocks, sigma_range, deterministic):
    import kernels.anomaly_attention as aa
    monkeypatch.setattr(aa, "BLOCK_OVERRIDE", blocks)
    inputs, weights = _inputs(1, 2, grid, 16, dev, sigma_range)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = _attention("triton", inputs, grid, weights)
    finally:
        torch.use_deterministic_algorithms(prev)
    want = _attention("torch", inputs, grid, [w.double() for w in weights], cast=torch.float64)
    _check(got, want)


def test_attention_atomic_and_deterministic_dq_agree(dev, monkeypatch):
    """The two dQ paths compute the same sums (in a different order on a GPU)."""
    import kernels.anomaly_attention as aa
    monkeypatch.setattr(aa, "BLOCK_OVERRIDE", (16, 16, 4))
    inputs, weights = _inputs(1, 1, (6, 6), 8, dev)
    results = []
    for deterministic in (False, True):
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            results.append(_attention("triton", inputs, (6, 6), weights))
        finally:
            torch.use_deterministic_algorithms(prev)
    for name, a, b in zip(NAMES, *results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_attention_fp64_multi_tile_is_exact(dev, monkeypatch):
    """float64 through several tiles: the scalars reach the kernel as float64 (SCAL), so only rounding remains."""
    import kernels.anomaly_attention as aa
    monkeypatch.setattr(aa, "BLOCK_OVERRIDE", (16, 16, 4))
    inputs, weights = _inputs(1, 1, (5, 7), 8, dev)
    inputs = [t.double() for t in inputs]
    weights = [w.double() for w in weights]
    _check(_attention("triton", inputs, (5, 7), weights), _attention("torch", inputs, (5, 7), weights),
           rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_attention_bad_sigma_gives_nan_rows(dev):
    """Without the host-side value check (as on a GPU) a non-positive or NaN sigma turns its own row NaN, only it."""
    import kernels.anomaly_attention as aa
    grid = (3, 4)
    (q, k, v, sigma), _ = _inputs(1, 1, grid, 8, dev)
    sigma[0, 0, 2] = 0.0
    sigma[0, 0, 7] = -1.0
    sigma[0, 0, 9] = float("nan")
    _, dis, _ = aa.AnomalyAttentionFunction.apply(q, k, v, sigma, grid, 1e-4, "ieee")
    bad = torch.zeros(12, dtype=torch.bool)
    bad[[2, 7, 9]] = True
    assert torch.isnan(dis[0, 0, bad]).all()
    assert torch.isfinite(dis[0, 0, ~bad]).all()


def test_attention_rejects_unknown_fp32_precision(dev):
    (q, k, v, sigma), _ = _inputs(1, 1, (2, 2), 4, dev)
    with pytest.raises(ValueError, match="fp32_precision"):
        ops.anomaly_attention(q, k, v, sigma, (2, 2), backend="triton", fp32_precision="tf33")


# ---------------------------------------------------------------------------------------------------------------------
# mdn_nll
# ---------------------------------------------------------------------------------------------------------------------

def _mdn(backend, inputs, w, mode, cast=None):
    leaves = [(t if cast is None else t.to(cast)).detach().clone().requires_grad_() for t in inputs]
    loss = ops.mdn_nll(*leaves, mode=mode, backend=backend)
    (loss * w.to(loss.dtype)).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("mode", ["logsumexp", "vtadl"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_row", "shared"])
def test_mdn_several_programs_match_reference(dev, monkeypatch, mode, shared):
    """N = 37 rows in blocks of 8 (five programs, the last ragged) and D = 40 in chunks of 16 (the last ragged): the
    shared parameters' gradients are then summed across programs."""
    import kernels.mdn_nll as mn
    monkeypatch.setattr(mn, "BLOCK_OVERRIDE", (8, 16))
    N, K, D = 37, 3, 40
    x = torch.randn(N, D, device=dev)
    logits = torch.randn(*((K,) if shared else (N, K)), device=dev)
    mu = torch.randn(*((K, D) if shared else (N, K, D)), device=dev)
    log_var = 0.5 * torch.randn(*((K, D) if shared else (N, K, D)), device=dev)
    w = torch.randn(N, device=dev)
    got = _mdn("triton", (x, logits, mu, log_var), w, mode)
    want = _mdn("torch", (x, logits, mu, log_var), w.double(), mode, cast=torch.float64)
    for name, g, r in zip(["loss", "dx", "dlogits", "dmu", "dlog_var"], got, want):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")

