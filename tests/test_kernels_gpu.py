"""The fused kernels compiled for a CUDA GPU, at model-sized shapes and in half precision (skipped without CUDA).

The CPU suite (test_ops_*.py) checks the same kernels through Triton's interpreter, which computes exactly; here the
GPU's own exp/log and tensor cores round differently, hence the per-dtype tolerances.
"""
import pytest
import torch

from kernels._utils import HAS_TRITON

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")]


@pytest.fixture(scope="module")
def kern():
    # Imported here, not at collection: importing decorates the kernels, which must not happen under the interpreter.
    import kernels.anomaly_attention as aa
    import kernels.mdn_nll as mn
    if aa.INTERPRET or mn.INTERPRET:
        pytest.skip("the kernels were decorated under TRITON_INTERPRET=1 in this process")
    return aa, mn


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    monkeypatch.delenv("ADCORE_BACKEND", raising=False)
    torch.manual_seed(0)


def _attention_inputs(B, H, grid, d, dtype):
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(3))
    sigma = (3 ** (torch.sigmoid(5 * torch.randn(B, H, N, device="cuda")) + 1e-5) - 1).to(dtype)
    return q, k, v, sigma


def _attention_run(backend, inputs, grid, weights, fp32_precision="tf32"):
    from adcore import ops
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = ops.anomaly_attention(*leaves, grid, backend=backend, fp32_precision=fp32_precision)
    torch.autograd.backward(outs, [w.to(o.dtype) for w, o in zip(weights, outs)])
    return [o.detach().float() for o in outs] + [t.grad.float() for t in leaves]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# float64: exact scalars (SCAL) and libdevice's float64 exp2/log2, so only rounding; float32 TF32: 10-bit mantissas
# in the dots (about 1e-3 relative in the scores); IEEE: the fast log2 and division (tests/test_kernels_fastlog.py).
CASES = [(torch.float64, "ieee", 1e-9), (torch.float32, "ieee", 1e-4), (torch.float32, "tf32", 5e-3),
         (torch.float16, "tf32", 1e-2), (torch.bfloat16, "tf32", 2e-2)]


@pytest.mark.parametrize("dtype,precision,tol", CASES, ids=["fp64", "fp32_ieee", "fp32_tf32", "fp16", "bf16"])
@pytest.mark.parametrize("B,H,grid,d", [(2, 4, (14, 14), 64), (1, 2, (28, 28), 32), (2, 1, (1, 100), 16)])
def test_attention_matches_reference(kern, B, H, grid, d, dtype, precision, tol):
    inputs = _attention_inputs(B, H, grid, d, dtype)
    N = grid[0] * grid[1]
    weights = (torch.randn(B, H, N, d, device="cuda"), torch.randn(B, H, N, device="cuda") / N,
               torch.randn(B, H, N, device="cuda") / N)
    got = _attention_run("triton", inputs, grid, weights, precision)
    want = _attention_run("torch", [t.double() for t in inputs], grid, [w.double() for w in weights])
    for name, g, w in zip(["out", "dis_series", "dis_prior", "dq", "dk", "dv", "dsigma"], got, want):
        assert torch.isfinite(g).all(), name
        assert _rel_err(g, w) < tol, (name, _rel_err(g, w))


def _all_configs():
    import kernels.anomaly_attention as aa
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                   for c in aa._fwd_configs() + aa._fwd_configs(fp32=True) + aa._bwd_configs()
                   + aa._bwd_dq_configs()})


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("config", _all_configs() if HAS_TRITON else [])
def test_attention_every_config(kern, monkeypatch, config, deterministic):
    """Every autotune config (forced for every launch through BLOCK_OVERRIDE) on a ragged, multi-tile shape."""
    aa, _ = kern
    monkeypatch.setattr(aa, "BLOCK_OVERRIDE", config)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    inputs = _attention_inputs(2, 2, (14, 15), 64, torch.bfloat16)
    N = 14 * 15
    weights = (torch.randn(2, 2, N, 64, device="cuda"), torch.randn(2, 2, N, device="cuda") / N,
               torch.randn(2, 2, N, device="cuda") / N)
    got = _attention_run("triton", inputs, (14, 15), weights)
    want = _attention_run("torch", [t.double() for t in inputs], (14, 15), [w.double() for w in weights])
    for name, g, w in zip(["out", "dis_series", "dis_prior", "dq", "dk", "dv", "dsigma"], got, want):
        assert _rel_err(g, w) < 2e-2, (config, name, _rel_err(g, w))


def test_attention_more_than_65535_heads(kern):
    """B * H = 65600 programs on one grid axis: it must be axis 0 (2^31 - 1), not axis 1 (65535)."""
    from adcore import ops
    q, k, v, sigma = _attention_inputs(8200, 8, (2, 2), 16, torch.float32)
    got = ops.anomaly_attention(q, k, v, sigma, (2, 2), backend="triton", fp32_precision="ieee")
    want = ops.anomaly_attention(q, k, v, sigma, (2, 2), backend="torch")
    for g, w in zip(got, want):
        assert _rel_err(g, w) < 1e-4


def test_attention_memory_is_linear_in_n(kern):
    """At N = 3136 the fused forward+backward allocates far less than one (B, H, N, N) float32 matrix."""
    from adcore import ops
    B, H, grid, d = 1, 2, (56, 56), 64
    N = grid[0] * grid[1]
    q, k, v, sigma = (t.requires_grad_() for t in _attention_inputs(B, H, grid, d, torch.float16))
    upstream = None
    for _ in range(2):  # the first call autotunes
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs = ops.anomaly_attention(q, k, v, sigma, grid, backend="triton")
        upstream = upstream or [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, upstream)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        del outs
        for t in (q, k, v, sigma):
            t.grad = None
    assert extra < 0.1 * B * H * N * N * 4, extra


def test_attention_backward_is_deterministic(kern):
    """With torch.use_deterministic_algorithms(True) dQ comes from the atomic-free kernel: bitwise repeatable."""
    inputs = _attention_inputs(2, 2, (14, 14), 64, torch.float16)
    weights = [torch.randn(2, 2, 196, 64, device="cuda"), torch.randn(2, 2, 196, device="cuda"),
               torch.randn(2, 2, 196, device="cuda")]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        a = _attention_run("triton", inputs, (14, 14), weights)
        b = _attention_run("triton", inputs, (14, 14), weights)
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    atomic = _attention_run("triton", inputs, (14, 14), weights)  # float32 atomics: equal up to summation order
    for x, y in zip(a, atomic):
        assert _rel_err(y, x) < 1e-5


def test_auto_backend_uses_triton_on_cuda(kern):
    from adcore import ops
    q, k, v, sigma = (t.requires_grad_() for t in _attention_inputs(1, 1, (4, 4), 16, torch.float32))
    assert "AnomalyAttentionFunction" in type(ops.anomaly_attention(q, k, v, sigma, (4, 4))[0].grad_fn).__name__


@pytest.mark.parametrize("mode", ["logsumexp", "vtadl"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mdn_matches_reference(kern, mode, shared, dtype):
    from adcore import ops
    N, K, D = 6272, 10, 512
    x = torch.randn(N, D, device="cuda")
    logits = torch.randn(*((K,) if shared else (N, K)), device="cuda")
    mu = torch.randn(*((K, D) if shared else (N, K, D)), device="cuda")
    log_var = 0.5 * torch.randn(*((K, D) if shared else (N, K, D)), device="cuda")
    w = torch.randn(N, device="cuda")
    # The kernel upcasts on load, so the reference sees the same (rounded) values in float64.
    inputs = [t.to(dtype) for t in (x, logits, mu, log_var)]
    results = []
    for backend, cast in (("triton", None), ("torch", torch.float64)):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in inputs]
        loss = ops.mdn_nll(*leaves, mode=mode, backend=backend)
        (loss * w.to(loss.dtype)).sum().backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded on store
    for i, (g, r) in enumerate(zip(*results)):
        assert torch.isfinite(g).all()
        assert _rel_err(g.float(), r) < (1e-5 if i == 0 else grad_tol), (i, _rel_err(g.float(), r))
