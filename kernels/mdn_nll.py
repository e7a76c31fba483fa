"""Fused mixture-density negative log-likelihood: one read of the parameters, no (N, K, D) temporaries.

For an embedding x_n (D,) and a diagonal Gaussian mixture with logits a_nk, means mu_nkd and log-variances lv_nkd,
everything the loss needs from the (N, K, D) parameters is the quadratic form per component,

    Q_nk = Σ_d lv_nkd + (x_nd - mu_nkd)^2 exp(-lv_nkd),

after which both modes are O(K) per row: with log π = log_softmax(a) and ℓ_nk = log π_nk - ½ (Q_nk + D log 2π),

* ``logsumexp``: L_n = -log Σ_k exp(ℓ_nk), taken with the row max subtracted, so x far from every mean stays finite;
* ``vtadl``: L_n = Σ_k π_nk ½ (log 2π + Q_nk), VT-ADL's weighted sum of per-component NLLs (log 2π once, not D times).

The forward kernel gives each program BLOCK_N rows. It streams D in BLOCK_D chunks, loads each x chunk once and, for
every component, the matching mu and log-variance chunks, and accumulates Q into a (BLOCK_N, K) register tile; the
mixing over K then happens in registers. Besides L it stores two (N, K) tables: c_nk = ∂L_n/∂Q_nk (½γ_nk for
log-sum-exp with responsibilities γ = exp(ℓ - log Σ exp ℓ), ½π_nk for VT-ADL) and ∂L_n/∂a_nk (π - γ, or
π (½(log 2π + Q) - L)). The backward is then a single streaming pass with upstream gradient w_n:

    ∂/∂mu = -2 w c (x - mu) e^{-lv},   ∂/∂lv = w c (1 - (x - mu)^2 e^{-lv}),   ∂/∂x = -Σ_k ∂/∂mu,

dx accumulating over k in registers (no atomics). Shared (K, D) parameters are read with a zero row stride; their
gradients are reduced per program into (programs, K, D) partials and summed by torch, which keeps the result
deterministic. Statistics are float32 (float64 for float64 inputs); half-precision inputs are upcast on load.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, check_mdn_nll_inputs, check_triton_device, interpret_enabled, next_power_of_2

INTERPRET = interpret_enabled()
_LOG_2PI = math.log(2 * math.pi)
_SCALARS: dict = {}


# ---------------------------------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _mdn_nll_fwd_kernel(
        X, LOGITS, MU, LV, LOSS, COEF, DLOGIT, SCAL,
        sxn, sxd, san, sak, smn, smk, smd, svn, svk, svd,
        N, K, D,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        MODE_LSE: tl.constexpr, IS_FP64: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N),). Shared parameters come with a zero row stride (san, smn or svn = 0).
    # SCAL = [log 2π, D log 2π] in the statistics dtype: a Python float argument would be a float32 kernel argument on
    # a GPU (and D log 2π computed here an int-times-float32 product), too coarse for float64.
    # LOSS (N,), COEF and DLOGIT (N, K) are contiguous.
    ACC = tl.float64 if IS_FP64 else tl.float32
    log_2pi = tl.load(SCAL)
    d_log_2pi = tl.load(SCAL + 1)
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    quad = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)  # Q_nk
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        nd_mask = n_mask[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=nd_mask, other=0.0).to(ACC)
        for k in range(0, K):
            # Masked lanes load x = mu = lv = 0 and add exactly 0.
            mu = tl.load(MU + offs_n[:, None] * smn + k * smk + offs_d[None, :] * smd, mask=nd_mask, other=0.0)
            lv = tl.load(LV + offs_n[:, None] * svn + k * svk + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
            mu = mu.to(ACC)
            lv = lv.to(ACC)
            diff = x - mu
            q_k = tl.sum(diff * diff * tl.exp(-lv) + lv, 1)  # (BLOCK_N,)
            quad += tl.where(offs_k[None, :] == k, q_k[:, None], 0.0)

    a = tl.load(LOGITS + offs_n[:, None] * san + offs_k[None, :] * sak, mask=n_mask[:, None] & k_mask[None, :],
                other=0.0).to(ACC)
    a = tl.where(k_mask[None, :], a, float("-inf"))  # padding components get π = 0
    a_max = tl.max(a, 1)
    e = tl.exp(a - a_max[:, None])
    e_sum = tl.sum(e, 1)
    pi = e / e_sum[:, None]
    if MODE_LSE:
        ell = a - a_max[:, None] - tl.log(e_sum)[:, None] - 0.5 * (quad + d_log_2pi)
        ell_max = tl.max(ell, 1)
        lse = ell_max + tl.log(tl.sum(tl.exp(ell - ell_max[:, None]), 1))
        loss = -lse
        gamma = tl.exp(ell - lse[:, None])  # responsibilities
        coef = 0.5 * gamma
        dlogit = pi - gamma
    else:
        nll_k = 0.5 * (log_2pi + quad)
        loss = tl.sum(pi * nll_k, 1)
        coef = 0.5 * pi
        dlogit = pi * (nll_k - loss[:, None])
    nk_off = offs_n[:, None] * K + offs_k[None, :]
    nk_mask = n_mask[:, None] & k_mask[None, :]
    tl.store(LOSS + offs_n, loss, mask=n_mask)
    tl.store(COEF + nk_off, coef, mask=nk_mask)
    tl.store(DLOGIT + nk_off, dlogit, mask=nk_mask)


@triton.jit
def _mdn_nll_bwd_kernel(
        X, MU, LV, COEF, W, DX, DMU, DLV,
        sxn, sxd, smn, smk, smd, svn, svk, svd,
        N, K, D,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        MU_SHARED: tl.constexpr, LV_SHARED: tl.constexpr, IS_FP64: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N),). COEF (N, K) and W (N,) are contiguous, DX is contiguous (N, D).
    # DMU / DLV are contiguous (N, K, D), or (programs, K, D) partial sums when the parameter is shared.
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_mask = offs_n < N
    w = tl.load(W + offs_n, mask=n_mask, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        nd_mask = n_mask[:, None] & d_mask[None, :]
        x = tl.load(X + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=nd_mask, other=0.0).to(ACC)
        dx = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for k in range(0, K):
            c = w * tl.load(COEF + offs_n * K + k, mask=n_mask, other=0.0)  # w_n ∂L_n/∂Q_nk; 0 on padding rows
            mu = tl.load(MU + offs_n[:, None] * smn + k * smk + offs_d[None, :] * smd, mask=nd_mask, other=0.0)
            lv = tl.load(LV + offs_n[:, None] * svn + k * svk + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
            diff = x - mu.to(ACC)
            t = diff * tl.exp(-lv.to(ACC))  # (x - mu) / var
            g_mu = -2.0 * c[:, None] * t
            g_lv = c[:, None] * (1.0 - diff * t)
            dx -= g_mu
            if MU_SHARED:
                tl.store(DMU + (pid * K + k) * D + offs_d, tl.sum(g_mu, 0).to(DMU.dtype.element_ty), mask=d_mask)
            else:
                tl.store(DMU + (offs_n[:, None] * K + k) * D + offs_d[None, :], g_mu.to(DMU.dtype.element_ty),
                         mask=nd_mask)
            if LV_SHARED:
                tl.store(DLV + (pid * K + k) * D + offs_d, tl.sum(g_lv, 0).to(DLV.dtype.element_ty), mask=d_mask)
            else:
                tl.store(DLV + (offs_n[:, None] * K + k) * D + offs_d[None, :], g_lv.to(DLV.dtype.element_ty),
                         mask=nd_mask)
        tl.store(DX + offs_n[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=nd_mask)


# GPU configurations, kept few (each costs a compile on first use). Small BLOCK_N keeps enough programs in flight to
# saturate HBM: N = 6272 rows in blocks of 8 gives 784 programs for 132 SMs.
# The backward keeps about eight (BLOCK_N, BLOCK_D) tiles alive (ptxas: 182 registers at 4 x 512 on sm_90), so it
# also gets smaller tiles for occupancy.
def _fwd_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=4, num_stages=2)
            for bn, bd in ((4, 512), (8, 256), (4, 256))]  # spilled on sm_90: (16, 256); (8, 512) fp32 under Triton 3.6


def _bwd_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=4, num_stages=2)
            for bn, bd in ((4, 512), (8, 256), (4, 256), (8, 128))]  # (16, 128) spilled 1 KB on sm_90



def _autotuners():
    """The GPU launchers' autotuned kernels, by launcher name (built without a GPU by the launch-argument tests).
    Neither has a reset_to_zero or restore_value hook: every output element is stored, never accumulated."""
    return dict(fwd=triton.autotune(_fwd_configs(), key=["N", "K", "D", "MODE_LSE"])(_mdn_nll_fwd_kernel),
                bwd=triton.autotune(_bwd_configs(), key=["N", "K", "D"])(_mdn_nll_bwd_kernel))


_TUNED = {} if INTERPRET else _autotuners()

# Backward block when a parameter is shared: the partial-sum buffer's size depends on BLOCK_N, so it is fixed.
_SHARED_BWD_BLOCK_N, _SHARED_BWD_BLOCK_D = 8, 128  # 32 x 128 spilled 2.4 KB on sm_90 (sass_report)


# ---------------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------------

# Test-only: (BLOCK_N, BLOCK_D) for every launch instead of the interpreter's default or the autotuner's pick, so CPU
# tests reach several programs (the shared parameters' cross-program reduction) and ragged D chunks.
BLOCK_OVERRIDE: tuple[int, int] | None = None


def _interpret_blocks(n: int, d: int) -> tuple[int, int]:
    # The interpreter costs milliseconds per program and chunk: few, large blocks.
    return min(64, max(2, next_power_of_2(n))), min(256, max(16, next_power_of_2(d)))

def _new(shape, device, dtype):
    # NaN-initialised under the interpreter, so a missed store fails the CPU tests; uninitialised on a GPU.
    if INTERPRET:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _row_strides(t: torch.Tensor, ndim_full: int):
    """Strides of t as its full (N, K, D) or (N, K) form; a shared tensor gets row stride 0."""
    return (0, *t.stride()) if t.dim() < ndim_full else tuple(t.stride())


def _mdn_nll_fwd(x, logits, mu, log_var, mode):
    """Launch the forward kernel. Returns loss (N,), coef (N, K) and dlogit (N, K), all in the statistics dtype."""
    N, D = x.shape
    K = logits.shape[-1]
    stat = acc_dtype(x.dtype)
    loss = _new((N,), x.device, stat)
    coef, dlogit = _new((N, K), x.device, stat), _new((N, K), x.device, stat)
    scal = _SCALARS.get((str(x.device), stat, D))
    if scal is None:  # built once per (device, dtype, D): a tensor per call would cost a host-to-device copy
        scal = _SCALARS[(str(x.device), stat, D)] = torch.tensor([_LOG_2PI, D * _LOG_2PI], dtype=stat,
                                                                  device=x.device)
    args = (x, logits, mu, log_var, loss, coef, dlogit, scal, *x.stride(), *_row_strides(logits, 2),
            *_row_strides(mu, 3), *_row_strides(log_var, 3), N, K, D)
    meta = dict(BLOCK_K=max(2, next_power_of_2(K)), MODE_LSE=mode == "logsumexp", IS_FP64=x.dtype == torch.float64)
    if BLOCK_OVERRIDE is not None or INTERPRET:
        bn, bd = BLOCK_OVERRIDE or _interpret_blocks(N, D)
        _mdn_nll_fwd_kernel[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_D=bd, **meta)
    else:
        _TUNED["fwd"][lambda c: (triton.cdiv(N, c["BLOCK_N"]),)](*args, **meta)
    return loss, coef, dlogit


def _mdn_nll_bwd(x, mu, log_var, coef, w):
    """Launch the backward kernel for upstream gradient w (N,). Returns dx, dmu, dlog_var in the inputs' shapes."""
    N, D = x.shape
    K = coef.shape[1]
    mu_shared, lv_shared = mu.dim() == 2, log_var.dim() == 2
    stat = coef.dtype
    dx = _new((N, D), x.device, x.dtype)
    shared = mu_shared or lv_shared
    if BLOCK_OVERRIDE is not None or INTERPRET or shared:
        if BLOCK_OVERRIDE is not None:
            bn, bd = BLOCK_OVERRIDE
        elif INTERPRET:
            bn, bd = _interpret_blocks(N, D)
        else:
            bn, bd = _SHARED_BWD_BLOCK_N, _SHARED_BWD_BLOCK_D
        programs = triton.cdiv(N, bn)
    else:
        programs = None
    # Shared gradients are reduced in the statistics dtype, then cast.
    dmu = _new((programs, K, D) if mu_shared else (N, K, D), x.device, stat if mu_shared else mu.dtype)
    dlv = _new((programs, K, D) if lv_shared else (N, K, D), x.device, stat if lv_shared else log_var.dtype)
    args = (x, mu, log_var, coef, w, dx, dmu, dlv, *x.stride(), *_row_strides(mu, 3), *_row_strides(log_var, 3),
            N, K, D)
    meta = dict(MU_SHARED=mu_shared, LV_SHARED=lv_shared, IS_FP64=x.dtype == torch.float64)
    if programs is not None:
        _mdn_nll_bwd_kernel[(programs,)](*args, BLOCK_N=bn, BLOCK_D=bd, **meta)
    else:
        _TUNED["bwd"][lambda c: (triton.cdiv(N, c["BLOCK_N"]),)](*args, **meta)
    if mu_shared:
        dmu = dmu.sum(0).to(mu.dtype)
    if lv_shared:
        dlv = dlv.sum(0).to(log_var.dtype)
    return dx, dmu, dlv


# ---------------------------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------------------------

class MDNNLLFunction(torch.autograd.Function):
    """Per-row mixture NLL (N,); inputs are assumed already validated."""

    @staticmethod
    def forward(ctx, x, logits, mu, log_var, mode):
        loss, coef, dlogit = _mdn_nll_fwd(x, logits, mu, log_var, mode)
        ctx.save_for_backward(x, logits, mu, log_var, coef, dlogit)
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        x, logits, mu, log_var, coef, dlogit = ctx.saved_tensors
        need_x, need_logits, need_mu, need_lv = ctx.needs_input_grad[:4]
        w = d_loss.to(coef.dtype).contiguous()
        dx = dmu = dlv = dlogits = None
        if need_x or need_mu or need_lv:
            dx, dmu, dlv = _mdn_nll_bwd(x, mu, log_var, coef, w)
        if need_logits:
            dlogits = w[:, None] * dlogit  # (N, K)
            dlogits = (dlogits.sum(0) if logits.dim() == 1 else dlogits).to(logits.dtype)
        return (dx if need_x else None, dlogits, dmu if need_mu else None, dlv if need_lv else None, None)


# ---------------------------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------------------------

def mdn_nll(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
            mode: str = "logsumexp") -> torch.Tensor:
    """Fused mixture NLL through Triton (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Same contract as :func:`kernels.reference.mdn_nll_ref`: x (N, D); logits (N, K) or (K,); mu and log_var
    (N, K, D) or (K, D); returns the (N,) loss.

    Raises:
        ValueError: bad ranks, shapes, devices, dtypes or mode.
    """
    check_mdn_nll_inputs(x, logits, mu, log_var, mode)
    check_triton_device(x, INTERPRET)
    return MDNNLLFunction.apply(x, logits, mu, log_var, mode)



def sass_goal_args():
    """[(label, integer arguments by name)] at the goal shape N = 6272, K = 10, D = 512 (per-row parameters,
    contiguous), for ``sass_report --specialise``."""
    N, K, D = 6272, 10, 512
    return [(f"N={N}", dict(N=N, K=K, D=D, sxn=D, sxd=1, san=K, sak=1, smn=K * D, smk=D, smd=1, svn=K * D, svk=D,
                            svd=1))]


def sass_variants(dtype: str, variant):
    """Every variant the GPU launchers can pick, for ``python -m kernels.bench.sass_report``; the inner loop (over
    the K components) covers BLOCK_N x BLOCK_D parameter elements per iteration."""
    fp64 = dtype == "fp64"
    stat = {"LOSS", "COEF", "DLOGIT", "W", "SCAL"}
    out = []
    for cfg in _fwd_configs():
        for lse in (True, False):
            out.append(variant("mdn_nll", "fwd", _mdn_nll_fwd_kernel, dtype,
                               dict(cfg.kwargs, BLOCK_K=16, MODE_LSE=lse, IS_FP64=fp64), cfg.num_warps,
                               cfg.num_stages, [("k", cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_D"])], stat=stat,
                               counted=lse))
    shared_cfg = triton.Config({"BLOCK_N": _SHARED_BWD_BLOCK_N, "BLOCK_D": _SHARED_BWD_BLOCK_D}, num_warps=4,
                               num_stages=2)
    for cfg, shared in [(c, False) for c in _bwd_configs()] + [(shared_cfg, True)]:
        out.append(variant("mdn_nll", "bwd", _mdn_nll_bwd_kernel, dtype,
                           dict(cfg.kwargs, MU_SHARED=shared, LV_SHARED=shared, IS_FP64=fp64), cfg.num_warps,
                           cfg.num_stages, [("k", cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_D"])],
                           stat=stat | ({"DMU", "DLV"} if shared else set()), counted=not shared))
    return out
