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


def _attention_run(backend, inputs, grid, weights):
    from adcore import ops
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = ops.anomaly_attention(*leaves, grid, backend=backend)
    torch.autograd.backward(outs, [w.to(o.dtype) for w, o in zip(weights, outs)])
    return [o.detach().float() for o in outs] + [t.grad.float() for t in leaves]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B,H,grid,d", [(2, 4, (14, 14), 64), (1, 2, (28, 28), 32), (2, 1, (1, 100), 16)])
def test_attention_matches_reference(kern, monkeypatch, B, H, grid, d, dtype, tol):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 kernels then use IEEE dots
    inputs = _attention_inputs(B, H, grid, d, dtype)
    N = grid[0] * grid[1]
    weights = (torch.randn(B, H, N, d, device="cuda"), torch.randn(B, H, N, device="cuda") / N,
               torch.randn(B, H, N, device="cuda") / N)
    got = _attention_run("triton", inputs, grid, weights)
    want = _attention_run("torch", [t.double() for t in inputs], grid, [w.double() for w in weights])
    for name, g, w in zip(["out", "dis_series", "dis_prior", "dq", "dk", "dv", "dsigma"], got, want):
        assert torch.isfinite(g).all(), name
        assert _rel_err(g, w) < tol, (name, _rel_err(g, w))


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
    inputs = _attention_inputs(2, 2, (14, 14), 64, torch.float16)
    weights = [torch.randn(2, 2, 196, 64, device="cuda"), torch.randn(2, 2, 196, device="cuda"),
               torch.randn(2, 2, 196, device="cuda")]
    a = _attention_run("triton", inputs, (14, 14), weights)
    b = _attention_run("triton", inputs, (14, 14), weights)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


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
