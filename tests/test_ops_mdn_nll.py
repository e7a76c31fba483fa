"""adcore.ops.mdn_nll: the fused Triton kernel (through Triton's CPU interpreter) against the reference.

On a CUDA machine the Triton cases run on the GPU instead (the interpreter is only switched on without a GPU).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of kernels.mdn_nll: triton.jit reads it when decorating.
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


def make_inputs(N, K, D, shared=(False, False, False), dtype=torch.float32, device="cpu", lv_scale=0.5):
    """x (N, D); logits, mu, log_var per row or shared according to ``shared`` = (logits, mu, log_var)."""
    x = torch.randn(N, D, dtype=dtype, device=device)
    logits = torch.randn(*((K,) if shared[0] else (N, K)), dtype=dtype, device=device)
    mu = torch.randn(*((K, D) if shared[1] else (N, K, D)), dtype=dtype, device=device)
    log_var = lv_scale * torch.randn(*((K, D) if shared[2] else (N, K, D)), dtype=dtype, device=device)
    return x, logits, mu, log_var


def run(backend, inputs, mode, w):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = ops.mdn_nll(*leaves, mode=mode, backend=backend)
    (loss * w).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves]


NAMES = ["loss", "dx", "dlogits", "dmu", "dlog_var"]


def assert_all_close(got, want, rtol, atol):
    for name, g, w in zip(NAMES, got, want):
        assert g is not None and w is not None, name
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


CASES = [  # N, K, D, shared (logits, mu, log_var)
    (37, 3, 17, (False, False, False)),
    (37, 10, 130, (False, False, False)),   # VT-ADL's K = 10; D ragged against every block size
    (50, 4, 300, (True, True, True)),       # shared components, D not a multiple of the block
    (19, 5, 33, (True, False, True)),       # mixed sharing
    (8, 1, 16, (False, False, False)),      # K = 1: both modes reduce to one Gaussian
    (3, 2, 1, (False, True, False)),        # D = 1
]


@pytest.mark.parametrize("mode", ["logsumexp", "vtadl"])
@pytest.mark.parametrize("N,K,D,shared", CASES)
def test_matches_reference_fp32(dev, N, K, D, shared, mode):
    inputs = make_inputs(N, K, D, shared, device=dev)
    w = torch.randn(N, device=dev)
    got = run("triton", inputs, mode, w)
    want = run("torch", [t.double() for t in inputs], mode, w.double())
    # |loss| grows like D: tolerance relative, with an absolute floor scaled by D.
    assert_all_close(got, want, rtol=1e-4, atol=1e-5 * D)


@pytest.mark.parametrize("mode", ["logsumexp", "vtadl"])
@pytest.mark.parametrize("shared", [(False, False, False), (True, True, True)])
def test_gradcheck_fp64(dev, mode, shared):
    inputs = tuple(t.requires_grad_() for t in make_inputs(5, 3, 17, shared, dtype=torch.float64, device=dev))
    assert torch.autograd.gradcheck(lambda *a: ops.mdn_nll(*a, mode=mode, backend="triton"), inputs,
                                    eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_logsumexp_matches_torch_distributions(dev):
    """The textbook mixture likelihood, independently: guards against LSE slips such as `s = exp(...)` for `+=`."""
    N, K, D = 11, 4, 6
    x, logits, mu, log_var = make_inputs(N, K, D, dtype=torch.float64, device=dev)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * log_var).exp()), 1))
    want = -mix.log_prob(x)
    for backend in ("triton", "torch"):
        torch.testing.assert_close(ops.mdn_nll(x, logits, mu, log_var, backend=backend), want,
                                   rtol=1e-10, atol=1e-10)


def test_vtadl_matches_its_formula(dev):
    """VT-ADL mdn1.py: Σ_k π_k · ½ (log 2π + Σ_d [s + (x - mu)^2 / exp(s)]), written out with loops."""
    N, K, D = 3, 2, 5
    x, logits, mu, log_var = make_inputs(N, K, D, dtype=torch.float64, device=dev)
    pi = torch.softmax(logits, -1)
    want = torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        for kk in range(K):
            s, m = log_var[n, kk].cpu(), mu[n, kk].cpu()
            nll = 0.5 * (math.log(2 * math.pi) + (s + (x[n].cpu() - m) ** 2 / s.exp()).sum())
            want[n] += pi[n, kk].cpu() * nll
    for backend in ("triton", "torch"):
        torch.testing.assert_close(ops.mdn_nll(x, logits, mu, log_var, mode="vtadl", backend=backend).cpu(), want)


@pytest.mark.parametrize("mode", ["logsumexp", "vtadl"])
def test_x_far_from_every_mean(dev, mode):
    N, K, D = 6, 3, 40
    x, logits, mu, log_var = make_inputs(N, K, D, device=dev)
    x = x + 1e3  # each log-density near -1e6 / var
    log_var = log_var - 4.0
    w = torch.randn(N, device=dev)
    got = run("triton", (x, logits, mu, log_var), mode, w)
    want = run("torch", [t.double() for t in (x, logits, mu, log_var)], mode, w.double())
    for g in got:
        assert torch.isfinite(g).all()
    assert got[0].min() > 1e6
    assert_all_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("lv", [-10.0, 10.0])
def test_log_var_extremes(dev, lv):
    N, K, D = 9, 3, 20
    x, logits, mu, log_var = make_inputs(N, K, D, device=dev)
    log_var = torch.full_like(log_var, lv)
    log_var[:, 0] += torch.randn(N, D, device=dev)
    w = torch.randn(N, device=dev)
    for mode in ("logsumexp", "vtadl"):
        got = run("triton", (x, logits, mu, log_var), mode, w)
        want = run("torch", [t.double() for t in (x, logits, mu, log_var)], mode, w.double())
        assert_all_close(got, want, rtol=1e-4, atol=1e-3)


def test_one_hot_mixture(dev):
    """A -inf logit switches a component off: the loss is the remaining component's NLL, with no NaN anywhere."""
    N, K, D = 7, 3, 12
    x, logits, mu, log_var = make_inputs(N, K, D, device=dev)
    logits[:, 1:] = float("-inf")
    w = torch.randn(N, device=dev)
    single = run("torch", [x.double(), logits[:, :1].double(), mu[:, :1].double(), log_var[:, :1].double()],
                 "logsumexp", w.double())
    for mode in ("logsumexp", "vtadl"):
        got = run("triton", (x, logits, mu, log_var), mode, w)
        for g in got:
            assert not torch.isnan(g).any()
        shift = 0.0 if mode == "logsumexp" else -0.5 * (D - 1) * math.log(2 * math.pi)  # vtadl counts log 2π once
        torch.testing.assert_close(got[0], (single[0] + shift).float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got[1], single[1].float(), rtol=1e-4, atol=1e-5)
        assert (got[3][:, 1:] == 0).all() and (got[4][:, 1:] == 0).all()


def test_non_contiguous_inputs(dev):
    N, K, D = 21, 3, 24
    x = torch.randn(D, N, device=dev).t()
    logits = torch.randn(K, N, device=dev).t()
    mu = torch.randn(N, D, K, device=dev).permute(0, 2, 1)  # VT-ADL's (…, D, K) head layout
    log_var = (0.3 * torch.randn(N, K, 2 * D, device=dev))[..., ::2]
    assert not any(t.is_contiguous() for t in (x, logits, mu, log_var))
    w = torch.randn(N, device=dev)
    for mode in ("logsumexp", "vtadl"):
        got = run("triton", (x, logits, mu, log_var), mode, w)
        want = run("torch", [t.contiguous().double() for t in (x, logits, mu, log_var)], mode, w.double())
        assert_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_inputs_upcast(dev):
    if dev.type == "cpu":
        pytest.skip("bf16 arithmetic is not supported by Triton's interpreter")
    x, logits, mu, log_var = make_inputs(64, 10, 96, device=dev)
    got = ops.mdn_nll(*(t.bfloat16() for t in (x, logits, mu, log_var)), backend="triton")
    want = reference.mdn_nll_ref(*(t.bfloat16().double() for t in (x, logits, mu, log_var)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-3)


def test_fp16_inputs_upcast(dev):
    x, logits, mu, log_var = (t.half() for t in make_inputs(16, 3, 40, device=dev))
    got = ops.mdn_nll(x, logits, mu, log_var, backend="triton")
    want = reference.mdn_nll_ref(*(t.double() for t in (x, logits, mu, log_var)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_input_propagates(dev, backend):
    x, logits, mu, log_var = make_inputs(4, 3, 8, device=dev)
    mu[2, 1, 5] = float("nan")
    loss = ops.mdn_nll(x, logits, mu, log_var, backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


def test_auto_backend_dispatch(dev, monkeypatch):
    inputs = [t.requires_grad_() for t in make_inputs(4, 2, 8, device=dev)]
    loss = ops.mdn_nll(*inputs)
    assert ("MDNNLLFunction" in type(loss.grad_fn).__name__) == (dev.type == "cuda")
    monkeypatch.setenv("ADCORE_BACKEND", "triton")
    assert "MDNNLLFunction" in type(ops.mdn_nll(*inputs).grad_fn).__name__
    assert "MDNNLLFunction" not in type(ops.mdn_nll(*inputs, backend="torch").grad_fn).__name__


def _bad_inputs():
    x, logits, mu, log_var = make_inputs(6, 3, 5)
    yield "x must be 2-D", (x[None], logits, mu, log_var), {}
    yield "logits must be", (x, logits[:-1], mu, log_var), {}
    yield "logits must be", (x, logits[None], mu, log_var), {}
    yield "mu must be", (x, logits, mu[:, :2], log_var), {}
    yield "log_var must be", (x, logits, mu, log_var[..., :4]), {}
    yield "mu must be", (x, logits, mu[0, :, :4], log_var), {}
    yield "dtype", (x, logits, mu.double(), log_var), {}
    yield "floating", (x.long(), logits.long(), mu.long(), log_var.long()), {}
    yield "device", (x, logits, mu, log_var.to("meta")), {}
    yield "mode", (x, logits, mu, log_var), {"mode": "paper"}
    yield "backend", (x, logits, mu, log_var), {"backend": "gpu"}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", range(11))
def test_bad_input_raises_value_error(backend, case):
    match, args, kwargs = list(_bad_inputs())[case]
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=match):
        ops.mdn_nll(*args, **kwargs)
