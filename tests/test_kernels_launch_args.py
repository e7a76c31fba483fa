"""What the GPU launchers hand their autotuners, checked without a GPU.

An autotuner times each config by launching it several times, and between launches it zeroes the arguments named in
``reset_to_zero`` and saves/restores those in ``restore_value``. If such an argument shares storage with another
argument of the same launch, the hook corrupts that other input: the backward once passed the forward's
log-sum-exp as its unused DQ, so on a GPU the first call per autotune key zeroed lse before the backward read it.
The interpreter never builds the autotuners and a CPU test cannot time anything, so a numerical test cannot see
this. Here the autotuners are built for real (``_autotuners()``; no driver is touched until a launch), wrapped in
recorders, and every launcher mode is called with the GPU path selected: each recorded launch is then checked.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are first imported

import pytest  # noqa: E402

from kernels._utils import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


class _Recorder:
    """Stands in for an Autotuner: ``tuned[grid](*args, **meta)`` records the launch by argument name."""

    def __init__(self, tuner):
        self.tuner, self.calls = tuner, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append(dict(zip(self.tuner.arg_names, args), **meta))
        return launch


def _record(monkeypatch, module):
    recorders = {name: _Recorder(t) for name, t in module._autotuners().items()}
    monkeypatch.setattr(module, "_TUNED", recorders)
    monkeypatch.setattr(module, "INTERPRET", False)  # the launchers take the autotuned path; nothing is launched
    monkeypatch.setattr(module, "BLOCK_OVERRIDE", None)
    return recorders


def _aliasing(recorders):
    """'launcher: HOOKED shares storage with OTHER' for every hooked argument that aliases another argument."""
    bad = []
    for name, rec in recorders.items():
        hooked = set(rec.tuner.reset_to_zero) | set(rec.tuner.restore_value)
        for call in rec.calls:
            tensors = {k: v for k, v in call.items() if torch.is_tensor(v)}
            for h in hooked & tensors.keys():
                ptr = tensors[h].untyped_storage().data_ptr()
                bad += [f"{name}: {h} shares storage with {other}" for other, t in tensors.items()
                        if other != h and t.untyped_storage().data_ptr() == ptr]
    return bad


def test_attention_autotuners_have_the_hooks_this_test_guards():
    import kernels.anomaly_attention as aa
    tuners = aa._autotuners()
    assert tuners["bwd"].reset_to_zero == ["DQ"]  # otherwise the test below checks nothing
    for t in tuners.values():
        assert set(t.reset_to_zero) | set(t.restore_value) <= set(t.arg_names)
        assert "GRID_BH" in t.keys  # a tile picked at one grid size is not reused at another


# Every backward mode: deterministic dQ or atomic dQ or no dQ at all, with and without dK/dV, and each upstream
# gradient present or absent.
MODES = [(need_dq, need_dkdv, det, has_do, has_ws)
         for need_dq in (True, False) for need_dkdv in (True, False) for det in (False, True)
         for has_do, has_ws in ((True, True), (True, False), (False, True)) if need_dq or need_dkdv]


@pytest.mark.parametrize("grid", [(3, 4), (12, 12)], ids=["single_pass_fwd", "two_sweep_fwd"])
@pytest.mark.parametrize("need_dq,need_dkdv,deterministic,has_do,has_ws", MODES)
def test_attention_hooked_arguments_alias_nothing(monkeypatch, need_dq, need_dkdv, deterministic, has_do, has_ws,
                                                  grid):
    import kernels.anomaly_attention as aa
    rec = _record(monkeypatch, aa)
    B, H, N, d = 2, 2, grid[0] * grid[1], 16
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    sigma = torch.rand(B, H, N) + 0.5
    out, lse, log_z, dis, g_ser, dsig = aa._anomaly_attention_fwd(q, k, v, sigma, grid, 1e-4, stats=True)
    delta = torch.zeros_like(lse)
    do = torch.randn_like(q) if has_do else None
    ws = torch.randn_like(lse) if has_ws else None
    aa._anomaly_attention_bwd(q, k, v, sigma, grid, 1e-4, lse, log_z, delta, do, ws, need_dq=need_dq,
                              need_dkdv=need_dkdv, deterministic=deterministic)
    assert len(rec["fwd_small" if N <= aa.SMALL_N else "fwd"].calls) == 1
    assert len(rec["fwd" if N <= aa.SMALL_N else "fwd_small"].calls) == 0
    assert len(rec["bwd"].calls) == int(need_dkdv or (need_dq and not deterministic))
    assert len(rec["bwd_dq"].calls) == int(need_dq and deterministic)
    assert not _aliasing(rec)
    for call in rec["bwd"].calls + rec["bwd_dq"].calls + rec["fwd"].calls + rec["fwd_small"].calls:
        assert call["GRID_BH"] == 4  # next power of two of B * H


def test_mdn_hooked_arguments_alias_nothing(monkeypatch):
    import kernels.mdn_nll as mn
    rec = _record(monkeypatch, mn)
    N, K, D = 10, 3, 16
    x, logits = torch.randn(N, D), torch.randn(N, K)
    mu, log_var = torch.randn(N, K, D), torch.randn(N, K, D)
    loss, coef, dlogit = mn._mdn_nll_fwd(x, logits, mu, log_var, "logsumexp")
    mn._mdn_nll_bwd(x, mu, log_var, coef, torch.randn(N))
    assert len(rec["fwd"].calls) == 1 and len(rec["bwd"].calls) == 1
    assert not _aliasing(rec)


def test_small_n_single_pass_only_with_tensor_core_dots(monkeypatch):
    """IEEE float32 dots in the single-pass forward spill about 40 KB (sass_report --fp32-precision ieee): at N <= 128
    they take the two-sweep kernel; TF32 and half dots take the single pass."""
    import kernels.anomaly_attention as aa
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    sigma = torch.rand(1, 2, 12) + 0.5
    for precision, used in (("ieee", "fwd"), ("tf32", "fwd_small")):
        rec = _record(monkeypatch, aa)
        aa._anomaly_attention_fwd(q, k, v, sigma, (3, 4), 1e-4, stats=True, fp32_precision=precision)
        assert len(rec[used].calls) == 1 and sum(len(r.calls) for r in rec.values()) == 1, precision
