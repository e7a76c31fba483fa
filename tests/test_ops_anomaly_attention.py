"""adcore.ops.anomaly_attention: the fused Triton kernel (through Triton's CPU interpreter) against the reference.

Shapes stay tiny: the interpreter costs milliseconds per tile. On a CUDA machine the Triton cases run on the GPU
instead (the interpreter is only switched on where there is no GPU); tests/test_kernels_gpu.py adds GPU-sized cases.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of kernels.anomaly_attention: triton.jit reads it when decorating.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from adcore import ops  # noqa: E402
from kernels import reference  # noqa: E402
from kernels._utils import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("ADCORE_BACKEND", raising=False)
    torch.manual_seed(0)


def make_inputs(B, H, grid, d, dtype=torch.float32, device="cpu", sigma_range=(0.1, 2.0)):
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, N, d, dtype=dtype, device=device) for _ in range(3))
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(B, H, N, dtype=dtype, device=device)
    return q, k, v, sigma


def run(backend, q, k, v, sigma, grid, weights):
    """Forward, then one backward of Σ w·out + Σ w_s·dis_series + Σ w_p·dis_prior; returns outputs and grads."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sigma)]
    out, dis_s, dis_p = ops.anomaly_attention(*leaves, grid, backend=backend)
    w_o, w_s, w_p = weights
    ((out * w_o).sum() + (dis_s * w_s).sum() + (dis_p * w_p).sum()).backward()
    return [out.detach(), dis_s.detach(), dis_p.detach()] + [t.grad for t in leaves]


NAMES = ["out", "dis_series", "dis_prior", "dq", "dk", "dv", "dsigma"]


def assert_all_close(got, want, rtol, atol):
    for name, g, w in zip(NAMES, got, want):
        assert g is not None and w is not None, name
        # equal_nan=False: a NaN on either side fails.
        torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,H,grid,d", [
    (2, 2, (7, 7), 16),   # N = 49, ragged against every block size
    (1, 2, (5, 10), 8),   # N = 50, non-square grid
    (1, 1, (14, 14), 16),  # N = 196, several tiles
    (2, 1, (1, 12), 4),   # 1-D window, Anomaly Transformer's case
    (1, 1, (3, 1), 5),    # a column grid, d not a power of two
])
def test_matches_reference_fp32(dev, B, H, grid, d):
    inputs = make_inputs(B, H, grid, d, device=dev)
    N = grid[0] * grid[1]
    weights = (torch.randn(B, H, N, d, device=dev), torch.randn(B, H, N, device=dev),
               torch.randn(B, H, N, device=dev))
    got = run("triton", *inputs, grid, weights)
    want = run("torch", *(t.double() for t in inputs), grid, tuple(w.double() for w in weights))
    assert_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_matches_reference_fp64(dev):
    inputs = make_inputs(1, 2, (4, 5), 8, dtype=torch.float64, device=dev)
    weights = tuple(torch.randn_like(t) for t in (inputs[0], inputs[3], inputs[3]))
    got = run("triton", *inputs, (4, 5), weights)
    want = run("torch", *inputs, (4, 5), weights)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("grid,d", [((3, 4), 4), ((1, 5), 3)])
def test_gradcheck_fp64(dev, grid, d):
    q, k, v, sigma = (t.requires_grad_() for t in make_inputs(1, 1, grid, d, dtype=torch.float64, device=dev))

    # gradcheck compares against finite differences, which see no detach(): check each routed branch on its own.
    def series_branch(q, k, v):
        out, dis_s, _ = ops.anomaly_attention(q, k, v, sigma.detach(), grid, backend="triton")
        return out, dis_s

    def prior_branch(sigma):
        return ops.anomaly_attention(q.detach(), k.detach(), v.detach(), sigma, grid, backend="triton")[2]

    # fast_mode checks random projections of the Jacobian: a few launches instead of one per input element.
    assert torch.autograd.gradcheck(series_branch, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(prior_branch, (sigma,), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_minimax_branches_are_routed(dev, backend):
    grid = (4, 4)
    q, k, v, sigma = (t.requires_grad_() for t in make_inputs(1, 2, grid, 8, device=dev))
    out, dis_s, dis_p = ops.anomaly_attention(q, k, v, sigma, grid, backend=backend)
    torch.testing.assert_close(dis_s, dis_p, rtol=0, atol=0)
    assert (dis_s > 0).all()

    dis_s.sum().backward(retain_graph=True)  # series branch: prior held fixed
    assert sigma.grad is None or sigma.grad.abs().max() == 0
    assert v.grad is None or v.grad.abs().max() == 0
    g_series = [q.grad.clone(), k.grad.clone()]
    assert g_series[0].abs().max() > 0 and g_series[1].abs().max() > 0
    for t in (q, k, v, sigma):
        t.grad = None

    dis_p.sum().backward(retain_graph=True)  # prior branch: series held fixed
    for t in (q, k, v):
        assert t.grad is None or t.grad.abs().max() == 0
    g_prior = sigma.grad.clone()
    assert g_prior.abs().max() > 0
    for t in (q, k, v, sigma):
        t.grad = None

    # Anomaly Transformer's loss1.backward(retain_graph=True); loss2.backward() equals one backward of the sum.
    rec = out.square().mean()
    ((rec - 3 * dis_s.mean()) + (rec + 3 * dis_p.mean())).backward()
    q2, k2, v2, s2 = (t.detach().clone().requires_grad_() for t in (q, k, v, sigma))
    out2, ds2, dp2 = ops.anomaly_attention(q2, k2, v2, s2, grid, backend=backend)
    rec2 = out2.square().mean()
    (rec2 - 3 * ds2.mean()).backward(retain_graph=True)
    (rec2 + 3 * dp2.mean()).backward()
    for a, b in ((q, q2), (k, k2), (v, v2), (sigma, s2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_output_gradient_alone_and_discrepancy_alone(dev, which):
    """Backward from one output only: the other two hand autograd None, not zeros (set_materialize_grads(False))."""
    grid, N = (5, 5), 25
    inputs = make_inputs(1, 1, grid, 8, device=dev)
    upstream = [torch.randn(1, 1, N, 8, device=dev), torch.randn(1, 1, N, device=dev),
                torch.randn(1, 1, N, device=dev)][which]
    grads = {}
    for backend, cast in (("triton", None), ("torch", torch.float64)):
        leaves = [(t if cast is None else t.to(cast)).detach().clone().requires_grad_() for t in inputs]
        outs = ops.anomaly_attention(*leaves, grid, backend=backend)
        outs[which].backward(upstream.to(outs[which].dtype))
        grads[backend] = [t.grad for t in leaves]
    for name, g, w in zip(["dq", "dk", "dv", "dsigma"], grads["triton"], grads["torch"]):
        if w is None:  # the reference's graph does not reach this input: the kernel must give None or zeros
            assert g is None or g.abs().max() == 0, name
        else:
            assert g is not None, name
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert (grads["triton"][3] is None) == (which != 2)  # only dis_prior reaches sigma
    assert grads["triton"][0] is not None if which != 2 else grads["triton"][0] is None


def test_no_grad_forward_matches(dev):
    grid = (7, 7)
    q, k, v, sigma = make_inputs(2, 1, grid, 16, device=dev)
    with torch.no_grad():
        got = ops.anomaly_attention(q, k, v, sigma, grid, backend="triton")
    want = reference.anomaly_attention_ref(q.double(), k.double(), v.double(), sigma.double(), grid)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sigma_range", [(1e-5, 2e-5), (1e-5, 1e4), (300.0, 1e4)])
def test_sigma_extremes(dev, sigma_range):
    """Thuml's sigma spans (1.1e-5, 2): a one-hot prior; wide sigmas give a uniform one. Nothing may turn NaN."""
    # 14 x 14 spans several tiles, so tiles whose prior is exactly zero take the kernels' shortcut.
    grid = (14, 14)
    inputs = make_inputs(1, 1, grid, 8, device=dev, sigma_range=sigma_range)
    weights = (torch.randn(1, 1, 196, 8, device=dev), torch.randn(1, 1, 196, device=dev),
               torch.randn(1, 1, 196, device=dev))
    got = run("triton", *inputs, grid, weights)
    want = run("torch", *(t.double() for t in inputs), grid, tuple(w.double() for w in weights))
    for g in got:
        assert torch.isfinite(g).all()
    assert_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_tiny_sigma_prior_is_one_hot():
    p = reference.prior_association(torch.full((1, 1, 6), 1e-30), (2, 3))
    torch.testing.assert_close(p[0, 0], torch.eye(6))


def test_non_contiguous_inputs(dev):
    grid, B, H, N, d = (4, 6), 2, 2, 24, 8
    # (B, N, H, d) projections viewed as (B, H, N, d), as a ViT's qkv split gives them.
    qkv = torch.randn(B, N, 3, H, d, device=dev)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    sigma = (0.2 + torch.rand(B, N, H, device=dev)).transpose(1, 2)
    assert not q.is_contiguous() and not sigma.is_contiguous()
    weights = (torch.randn(B, H, N, d, device=dev), torch.randn(B, H, N, device=dev), torch.randn(B, H, N, device=dev))
    got = run("triton", q, k, v, sigma, grid, weights)
    want = run("torch", q.contiguous(), k.contiguous(), v.contiguous(), sigma.contiguous(), grid, weights)
    assert_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_fp16_forward(dev):
    grid = (7, 7)
    q, k, v, sigma = make_inputs(1, 2, grid, 16, dtype=torch.float16, device=dev)
    out, dis_s, _ = ops.anomaly_attention(q, k, v, sigma, grid, backend="triton")
    assert out.dtype == torch.float16 and dis_s.dtype == torch.float32
    want = reference.anomaly_attention_ref(q.float(), k.float(), v.float(), sigma.float(), grid)
    torch.testing.assert_close(out.float(), want[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dis_s, want[1], rtol=1e-2, atol=1e-2)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_input_propagates(dev, backend):
    grid = (3, 3)
    q, k, v, sigma = make_inputs(1, 1, grid, 4, device=dev)
    q[0, 0, 4, 1] = float("nan")
    out, dis_s, _ = ops.anomaly_attention(q, k, v, sigma, grid, backend=backend)
    assert torch.isnan(out[0, 0, 4]).all() and torch.isnan(dis_s[0, 0, 4])
    assert torch.isfinite(out[0, 0, :4]).all()


def test_reference_matches_thuml_1d_prior_formula():
    """On a (1, N) grid the prior is thuml's 1/(sqrt(2π)σ) exp(-|i-j|²/(2σ²)) divided by its row sum."""
    N = 10
    sigma = torch.rand(2, 3, N, dtype=torch.float64) + 0.3
    i = torch.arange(N, dtype=torch.float64)
    dist = (i[:, None] - i[None, :]).abs()
    prior = 1.0 / (2 * torch.pi) ** 0.5 / sigma[..., None] * torch.exp(-dist ** 2 / 2 / sigma[..., None] ** 2)
    prior = prior / prior.sum(-1, keepdim=True)
    torch.testing.assert_close(reference.prior_association(sigma, (1, N)), prior, rtol=1e-12, atol=1e-14)

    s = torch.softmax(torch.randn(2, 3, N, N, dtype=torch.float64), -1)

    def my_kl_loss(p, q):  # thuml solver.py, before its mean over heads
        return torch.sum(p * (torch.log(p + 1e-4) - torch.log(q + 1e-4)), dim=-1)

    torch.testing.assert_close(reference.symmetric_kl(s, prior), my_kl_loss(s, prior) + my_kl_loss(prior, s))


def test_auto_backend_dispatch(dev, monkeypatch):
    grid = (3, 3)
    q, k, v, sigma = (t.requires_grad_() for t in make_inputs(1, 1, grid, 4, device=dev))
    out = ops.anomaly_attention(q, k, v, sigma, grid, backend="auto")[0]
    fused = "AnomalyAttentionFunction" in type(out.grad_fn).__name__
    assert fused == (dev.type == "cuda")
    monkeypatch.setenv("ADCORE_BACKEND", "triton")
    out = ops.anomaly_attention(q, k, v, sigma, grid, backend="auto")[0]
    assert "AnomalyAttentionFunction" in type(out.grad_fn).__name__
    out = ops.anomaly_attention(q, k, v, sigma, grid, backend="torch")[0]  # an explicit backend wins
    assert "AnomalyAttentionFunction" not in type(out.grad_fn).__name__
    monkeypatch.setenv("ADCORE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ADCORE_BACKEND"):
        ops.anomaly_attention(q, k, v, sigma, grid)


def _bad_inputs():
    q, k, v, sigma = make_inputs(1, 2, (3, 4), 4)
    yield "q must be 4-D", (q[0], k, v, sigma, (3, 4)), {}
    yield "same shape|one shape", (q, k[:, :, :-1], v, sigma, (3, 4)), {}
    yield "sigma must be", (q, k, v, sigma[..., :-1], (3, 4)), {}
    yield "grid_hw", (q, k, v, sigma, (4, 4)), {}
    yield "grid_hw", (q, k, v, sigma, 12), {}
    yield "dtype", (q, k.double(), v, sigma, (3, 4)), {}
    yield "dtype", (q, k, v, sigma.double(), (3, 4)), {}
    yield "floating", (q.long(), k.long(), v.long(), sigma.long(), (3, 4)), {}
    yield "device", (q, k, v, sigma.to("meta"), (3, 4)), {}
    yield "positive", (q, k, v, sigma.clone().fill_(0.0), (3, 4)), {}
    yield "positive", (q, k, v, -sigma, (3, 4)), {}
    yield "positive", (q, k, v, sigma.clone().fill_(float("nan")), (3, 4)), {}
    yield "eps", (q, k, v, sigma, (3, 4)), {"eps": 0.0}
    yield "backend", (q, k, v, sigma, (3, 4)), {"backend": "cuda"}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", range(14))
def test_bad_input_raises_value_error(backend, case):
    match, args, kwargs = list(_bad_inputs())[case]
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=match):
        ops.anomaly_attention(*args, **kwargs)


def test_triton_function_rejects_wrong_device():
    import kernels.anomaly_attention as aa
    q, k, v, sigma = make_inputs(1, 1, (2, 2), 4)
    if aa.INTERPRET:
        pytest.skip("CPU tensors are valid for the interpreter")
    with pytest.raises(ValueError, match="CUDA"):
        aa.anomaly_attention(q, k, v, sigma, (2, 2))


def test_resolve_backend(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ops.resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert ops.resolve_backend("auto", cuda, torch.float32) == "triton"
    assert ops.resolve_backend("auto", cuda, torch.float64) == "torch"  # float64 kernels are for gradcheck only
    assert ops.resolve_backend("auto", cpu, torch.float32) == "torch"
    assert ops.resolve_backend("torch", cuda, torch.float32) == "torch"
    monkeypatch.setenv("ADCORE_BACKEND", "torch")
    assert ops.resolve_backend("auto", cuda, torch.float32) == "torch"
    assert ops.resolve_backend("triton", cuda, torch.float32) == "triton"
    monkeypatch.setenv("ADCORE_BACKEND", "")
    assert ops.resolve_backend("auto", cuda, torch.float32) == "triton"


def test_minimax_training_steps_match_between_backends(dev):
    """A few Adam steps of the minimax (maximise over q, k; minimise over sigma) follow the same path on both."""
    grid, B, H, N, d = (4, 5), 1, 2, 20, 8
    x0 = torch.randn(B, N, 16, device=dev)
    losses = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(1)
        qkv = torch.nn.Linear(16, 3 * H * d).to(dev)
        sig = torch.nn.Linear(16, H).to(dev)
        opt = torch.optim.Adam([*qkv.parameters(), *sig.parameters()], lr=1e-2)
        losses[backend] = []
        for _ in range(3):
            q, k, v = qkv(x0).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
            sigma = (3 ** (torch.sigmoid(5 * sig(x0)) + 1e-5) - 1).transpose(1, 2)  # thuml's transform
            out, dis_s, dis_p = ops.anomaly_attention(q, k, v, sigma, grid, backend=backend)
            rec = (out.transpose(1, 2).reshape(B, N, H * d)[..., :16] - x0).square().mean()
            loss = (rec - 3 * dis_s.mean()) + (rec + 3 * dis_p.mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append((rec.item(), dis_s.mean().item()))
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), rtol=1e-4, atol=1e-5)
    assert abs(losses["torch"][-1][1] - losses["torch"][0][1]) > 1e-2  # the steps did move the discrepancy


def test_float32_sigma_beside_half_q_is_accepted_and_nothing_else_mixes():
    """Models compute σ in float32 under autocast; the op takes it beside bfloat16/float16 q, not other mixes."""
    from kernels._utils import check_anomaly_attention_inputs
    q, k, v, sigma = make_inputs(1, 1, (2, 3), 4)
    for half in (torch.bfloat16, torch.float16):
        check_anomaly_attention_inputs(q.to(half), k.to(half), v.to(half), sigma, (2, 3))
    out, dis, _ = ops.anomaly_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sigma, (2, 3), backend="torch")
    assert out.dtype == torch.bfloat16 and torch.isfinite(dis).all()
    with pytest.raises(ValueError, match="sigma has dtype"):
        check_anomaly_attention_inputs(q, k, v, sigma.half(), (2, 3))
    with pytest.raises(ValueError, match="sigma has dtype"):
        check_anomaly_attention_inputs(q.double(), k.double(), v.double(), sigma, (2, 3))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("grid", [(3, 4), (12, 12)], ids=["single_pass", "two_sweep"])
def test_bad_sigma_sets_the_device_flag_once(dev, grid):
    """What a GPU run relies on instead of a host check per call: the kernel flags a bad σ, check_sigma_flag raises
    once and clears it, and a good call leaves it clear."""
    import kernels.anomaly_attention as aa
    q, k, v, sigma = make_inputs(1, 1, grid, 4, device=dev)
    with contextlib.suppress(ValueError):  # clear what an earlier test in this process left (xdist orders vary)
        ops.check_sigma_flag(dev)
    aa.AnomalyAttentionFunction.apply(q, k, v, sigma, grid, 1e-4, "ieee")
    ops.check_sigma_flag(dev)  # a good sigma: no flag
    sigma[0, 0, 1] = -1.0
    aa.AnomalyAttentionFunction.apply(q, k, v, sigma, grid, 1e-4, "ieee")
    with pytest.raises(ValueError, match="not positive and finite"):
        ops.check_sigma_flag(dev)
    ops.check_sigma_flag(dev)  # cleared
