"""Fused anomaly attention: attention output and association discrepancy without an N x N matrix in memory.

Per (batch, head) and query token i on a grid_h x grid_w patch grid, Anomaly Transformer's attention needs

* the series association S_i = softmax_j(q_i·k_j / sqrt(d)) and the output o_i = Σ_j S_ij v_j;
* the prior association P_i = softmax_j(-d_ij^2 / (2 σ_i^2)), d_ij the grid distance between tokens i and j;
* the discrepancy R_i = Σ_j (S_ij - P_ij) (log(S_ij + ε) - log(P_ij + ε)) = KL(S‖P) + KL(P‖S) with thuml's ε = 1e-4.

The ε makes log S impossible to take from the log-sum-exp, so the forward kernel makes two sweeps over the keys of
each query tile. Sweep 1 is FlashAttention-2's online softmax (exp2 domain, running max and sum) and gives o_i and the
row's log-sum-exp. Sweep 2 recomputes the score tile, forms S and P tile by tile (d_ij^2 comes from index arithmetic,
the prior's normaliser Z_i from two short separable sums over grid rows and columns) and reduces R_i. When gradients
are needed it also reduces two per-row scalars that make the backward cheap:

* series branch (P held fixed): g_ij = ∂R_i/∂S_ij = log(S+ε) - log(P+ε) + (S - P)/(S + ε), and G_i = Σ_j S_ij g_ij,
  so ∂R_i/∂score_ij = S_ij (g_ij - G_i), which has the shape of the softmax backward;
* prior branch (S held fixed): h_ij = log(P+ε) - log(S+ε) + (P - S)/(P + ε), and
  ∂R_i/∂σ_i = Σ_j P_ij (h_ij - H_i) d_ij^2 / σ_i^3 with H_i = Σ_j P_ij h_ij, finished in the forward.

Gradients are routed like thuml's ``detach()``: ``dis_series`` reaches only q and k, ``dis_prior`` only sigma. The
backward folds the series branch into FlashAttention's: with w_i the gradient of dis_series,
dS_ij = dO_i·v_j + w_i g_ij and D'_i = dO_i·o_i + w_i G_i, then dscore = S (dS - D'). One kernel walks the query
tiles for each key tile (dK, dV), a second walks the key tiles for each query tile (dQ), both recomputing S, P and g;
no atomics, so results are deterministic. Extra memory is five (B, H, N) vectors: log-sum-exp, log Z, R, G, ∂R/∂σ.

Layers, in order: jit kernels, launchers, ``AnomalyAttentionFunction``, the public ``anomaly_attention``. With
``TRITON_INTERPRET=1`` set before this module is imported the kernels run on CPU tensors through Triton's
interpreter, with fixed block sizes (the autotuner needs a GPU driver).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (acc_dtype, check_anomaly_attention_inputs, check_triton_device, interpret_enabled,
                     next_power_of_2)

# triton.jit decides at decoration time whether to interpret; remember what it decided.
INTERPRET = interpret_enabled()
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _log_prior_norm(r_i, c_i, inv_2s2, GH, GW, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
                    IS_FP64: tl.constexpr):
    """log Z_i = log Σ_j exp(-d_ij^2 / (2σ_i^2)), separable on the grid: (Σ_r e^{-(r_i-r)^2 a})(Σ_c e^{-(c_i-c)^2 a}).

    The d = 0 term is exactly 1, so Z_i >= 1 and the log never sees an underflowed sum.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    z_row = tl.zeros([BLOCK_M], dtype=ACC)
    for g0 in range(0, GH, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        dr = (r_i[:, None] - g[None, :]).to(ACC)  # (BLOCK_M, BLOCK_G)
        # where(): with σ^2 underflowed inv_2s2 is inf and 0 * inf must not reach the sum.
        e = tl.where(dr == 0, 1.0, tl.exp(-(dr * dr) * inv_2s2[:, None]))
        z_row += tl.sum(tl.where(g[None, :] < GH, e, 0.0), 1)
    z_col = tl.zeros([BLOCK_M], dtype=ACC)
    for g0 in range(0, GW, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        dc = (c_i[:, None] - g[None, :]).to(ACC)
        e = tl.where(dc == 0, 1.0, tl.exp(-(dc * dc) * inv_2s2[:, None]))
        z_col += tl.sum(tl.where(g[None, :] < GW, e, 0.0), 1)
    return tl.log(z_row) + tl.log(z_col)


@triton.jit
def _prior_tile(offs_m, offs_n, valid, inv_2s2, log_z, eps, log_eps, GW, IS_FP64: tl.constexpr):
    """Prior tile for query tokens offs_m x key tokens offs_n on a row-major grid with GW columns.

    Returns P (BLOCK_M, BLOCK_N), log(P + eps) and u = -d^2/(2σ^2), with P = 0 and u = -inf outside ``valid``.
    Far from the diagonal the prior is exactly zero: when every u of the tile is below the exponent at which exp
    underflows to 0 (denormals included), P = 0 and log(P + eps) = log(eps) are written directly, saving two of the
    tile's five exp/log evaluations without changing a bit. Most key tiles take that path at N = 3136.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    dr = (offs_m[:, None] // GW - offs_n[None, :] // GW).to(ACC)
    dc = (offs_m[:, None] % GW - offs_n[None, :] % GW).to(ACC)
    d2 = dr * dr + dc * dc
    # where(): d = 0 must give u = 0 even when σ^2 underflowed and inv_2s2 is inf.
    u = tl.where(valid, tl.where(d2 == 0, 0.0, -d2 * inv_2s2[:, None]), float("-inf"))
    if tl.max(tl.max(u, 1), 0) < (-746.0 if IS_FP64 else -104.0):
        P = tl.zeros_like(u)
        log_p = tl.zeros_like(u) + log_eps
    else:
        P = tl.exp(u - log_z[:, None])
        log_p = tl.log(P + eps)
    return P, log_p, u


@triton.jit
def _anomaly_attention_fwd_kernel(
        Q, K, V, SIGMA, OUT, LSE, LOGZ, DIS, GSER, DSIG,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
        H, N, GH, GW, D_HEAD, qk_scale, eps, log_eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
        STATS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (cdiv(N, BLOCK_M), B * H). OUT is contiguous (B, H, N, d); LSE ... DSIG are contiguous (B * H, N).
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < D_HEAD
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # Sweep 1: online softmax in base 2 (qk_scale = log2(e) / sqrt(d)); keys j >= N score -inf.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION).to(ACC) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                     mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)  # base-2 log-sum-exp of the scaled scores
    row = pid_bh * N + offs_m
    tl.store(OUT + row[:, None] * D_HEAD + offs_d[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + row, lse2, mask=m_mask)

    # Prior of each query row: σ_i, 1/(2σ_i^2) and log Z_i. Padding rows get σ = 1 to stay finite.
    sig = tl.load(SIGMA + b * ssb + h * ssh + offs_m * ssn, mask=m_mask, other=1.0).to(ACC)
    inv_2s2 = 0.5 / (sig * sig)
    log_z = _log_prior_norm(offs_m // GW, offs_m % GW, inv_2s2, GH, GW, BLOCK_M, BLOCK_G, IS_FP64)
    tl.store(LOGZ + row, log_z, mask=m_mask)

    # Sweep 2: S and P tile by tile; masked keys have S = P = 0 and add exactly nothing.
    dis = tl.zeros([BLOCK_M], dtype=ACC)
    g_ser = tl.zeros([BLOCK_M], dtype=ACC)  # G_i = Σ S g
    h_pri = tl.zeros([BLOCK_M], dtype=ACC)  # H_i = Σ P h
    t1 = tl.zeros([BLOCK_M], dtype=ACC)  # Σ P h d^2/σ^2
    t2 = tl.zeros([BLOCK_M], dtype=ACC)  # Σ P d^2/σ^2
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION).to(ACC) * qk_scale
        S = tl.where(n_mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        P, log_p, u = _prior_tile(offs_m, offs_n, m_mask[:, None] & n_mask[None, :], inv_2s2, log_z, eps, log_eps,
                                  GW, IS_FP64)
        diff = tl.log(S + eps) - log_p
        sp = S - P
        dis += tl.sum(sp * diff, 1)
        if STATS:
            g_ser += tl.sum(S * (diff + sp / (S + eps)), 1)
            ph = P * (-diff - sp / (P + eps))
            # d^2/σ^2 = -2u, zeroed where P = 0 (u may be -inf there and 0 * inf must not reach the sums).
            w = tl.where(P > 0, -2.0 * u, 0.0)
            h_pri += tl.sum(ph, 1)
            t1 += tl.sum(ph * w, 1)
            t2 += tl.sum(P * w, 1)
    tl.store(DIS + row, dis, mask=m_mask)
    if STATS:
        tl.store(GSER + row, g_ser, mask=m_mask)
        tl.store(DSIG + row, (t1 - h_pri * t2) / sig, mask=m_mask)


@triton.jit
def _anomaly_attention_bwd_dkdv_kernel(
        Q, K, V, SIGMA, DO, LSE, LOGZ, DELTA, WS, DK, DV,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
        H, N, GW, D_HEAD, qk_scale, scale, eps, log_eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DO: tl.constexpr, HAS_WS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N), B * H): one key tile per program, walking every query tile.
    # DO, DK, DV are contiguous (B, H, N, d); LSE, LOGZ, DELTA (= D'), WS are contiguous (B * H, N).
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D_HEAD
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    q_base = Q + b * sqb + h * sqh
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        md_mask = m_mask[:, None] & d_mask[None, :]
        row = pid_bh * N + offs_m
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_mask, other=0.0)
        lse2 = tl.load(LSE + row, mask=m_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * qk_scale  # (BLOCK_M, BLOCK_N)
        S = tl.where(m_mask[:, None] & n_mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dS = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if HAS_DO:
            do = tl.load(DO + row[:, None] * D_HEAD + offs_d[None, :], mask=md_mask, other=0.0)
            dv += tl.dot(tl.trans(S).to(do.dtype), do, input_precision=PRECISION).to(ACC)
            dS += tl.dot(do, tl.trans(v), input_precision=PRECISION).to(ACC)
        if HAS_WS:
            sig = tl.load(SIGMA + b * ssb + h * ssh + offs_m * ssn, mask=m_mask, other=1.0).to(ACC)
            log_z = tl.load(LOGZ + row, mask=m_mask, other=0.0)
            ws = tl.load(WS + row, mask=m_mask, other=0.0)
            P, log_p, u = _prior_tile(offs_m, offs_n, m_mask[:, None] & n_mask[None, :], 0.5 / (sig * sig), log_z,
                                      eps, log_eps, GW, IS_FP64)
            g = tl.log(S + eps) - log_p + (S - P) / (S + eps)
            dS += ws[:, None] * g
        delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
        ds = S * (dS - delta[:, None])  # gradient w.r.t. the unscaled score q·k
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION).to(ACC)
    out_rows = pid_bh * N + offs_n
    tl.store(DK + out_rows[:, None] * D_HEAD + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_rows[:, None] * D_HEAD + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _anomaly_attention_bwd_dq_kernel(
        Q, K, V, SIGMA, DO, LSE, LOGZ, DELTA, WS, DQ,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
        H, N, GW, D_HEAD, qk_scale, scale, eps, log_eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DO: tl.constexpr, HAS_WS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (cdiv(N, BLOCK_M), B * H): one query tile per program, walking every key tile.
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < D_HEAD
    md_mask = m_mask[:, None] & d_mask[None, :]
    row = pid_bh * N + offs_m
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_mask, other=0.0)
    lse2 = tl.load(LSE + row, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
    if HAS_DO:
        do = tl.load(DO + row[:, None] * D_HEAD + offs_d[None, :], mask=md_mask, other=0.0)
    if HAS_WS:
        sig = tl.load(SIGMA + b * ssb + h * ssh + offs_m * ssn, mask=m_mask, other=1.0).to(ACC)
        inv_2s2 = 0.5 / (sig * sig)
        log_z = tl.load(LOGZ + row, mask=m_mask, other=0.0)
        ws = tl.load(WS + row, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * qk_scale
        S = tl.where(n_mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dS = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if HAS_DO:
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
            dS += tl.dot(do, tl.trans(v), input_precision=PRECISION).to(ACC)
        if HAS_WS:
            P, log_p, u = _prior_tile(offs_m, offs_n, m_mask[:, None] & n_mask[None, :], inv_2s2, log_z, eps, log_eps,
                                      GW, IS_FP64)
            g = tl.log(S + eps) - log_p + (S - P) / (S + eps)
            dS += ws[:, None] * g
        ds = S * (dS - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION).to(ACC)
    tl.store(DQ + row[:, None] * D_HEAD + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


# GPU configurations, kept few: every config costs a compile (seconds each) on first use. Sweep 2 keeps about ten
# (BLOCK_M, BLOCK_N) fp32 tiles alive, so 64 x 64 tiles want 8 warps (with 4 they spill on sm_90). The interpreter
# bypasses the autotuner (it needs a driver) and uses _interpret_blocks().
def _fwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
            for bm, bn, w in ((64, 64, 8), (64, 32, 4), (128, 32, 8), (32, 64, 4))]


def _bwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
            for bm, bn, w in ((64, 64, 8), (32, 64, 4), (64, 32, 4), (32, 32, 4))]


_TUNE_KEY = ["N", "GW", "D_HEAD", "BLOCK_D"]
if not INTERPRET:
    _fwd_tuned = triton.autotune(_fwd_configs(), key=_TUNE_KEY + ["STATS"])(_anomaly_attention_fwd_kernel)
    _bwd_dkdv_tuned = triton.autotune(_bwd_configs(), key=_TUNE_KEY + ["HAS_DO", "HAS_WS"])(
        _anomaly_attention_bwd_dkdv_kernel)
    _bwd_dq_tuned = triton.autotune(_bwd_configs(), key=_TUNE_KEY + ["HAS_DO", "HAS_WS"])(
        _anomaly_attention_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------------

def _interpret_blocks(n: int) -> int:
    # The interpreter costs a few ms per tile iteration whatever the tile size: use few, large tiles.
    return min(128, max(16, next_power_of_2(n)))


def _dot_precision(dtype: torch.dtype) -> str:
    # Only float32 operands are affected. They follow torch's own matmul switch (off by default), so the fused op
    # and the eager reference round alike; half dtypes keep Triton's default, float64 needs the exact path.
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def _new(shape, device, dtype):
    # Under the interpreter (the CPU tests) outputs start as NaN, so an element a kernel forgets to store fails a test
    # instead of passing as stale memory; on a GPU they start uninitialised, saving one fill launch per buffer.
    if INTERPRET:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _anomaly_attention_fwd(q, k, v, sigma, grid_hw, eps, stats):
    """Launch the forward kernel. Returns out (B, H, N, d) and (B*H, N) lse2, log_z, dis, g_ser, dsig."""
    B, H, N, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernel takes head dim d <= {MAX_HEAD_DIM} (one register tile), got d = {d}; "
                         "use backend='torch'")
    gh, gw = grid_hw
    stat = acc_dtype(q.dtype)
    out = _new((B, H, N, d), q.device, q.dtype)
    lse, log_z, dis = (_new((B * H, N), q.device, stat) for _ in range(3))
    g_ser, dsig = (_new((B * H, N), q.device, stat) for _ in range(2)) if stats else (dis, dis)  # unused if no STATS
    block_d = max(16, next_power_of_2(d))
    block_g = min(64, max(16, next_power_of_2(max(gh, gw))))
    args = (q, k, v, sigma, out, lse, log_z, dis, g_ser, dsig, *_strides(q, k, v, sigma),
            H, N, gh, gw, d, (d ** -0.5) * math.log2(math.e), float(eps), math.log(eps))
    meta = dict(BLOCK_D=block_d, BLOCK_G=block_g, STATS=stats, IS_FP64=q.dtype == torch.float64,
                PRECISION=_dot_precision(q.dtype))
    if INTERPRET:
        bm = _interpret_blocks(N)
        _anomaly_attention_fwd_kernel[(triton.cdiv(N, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bm, **meta)
    else:
        _fwd_tuned[lambda c: (triton.cdiv(N, c["BLOCK_M"]), B * H)](*args, **meta)
    return out, lse, log_z, dis, g_ser, dsig


def _anomaly_attention_bwd(q, k, v, sigma, grid_hw, eps, lse, log_z, delta, do, ws, need_dq, need_dkdv):
    """Launch the two backward kernels. ``do`` (B, H, N, d) and ``ws`` (B*H, N) may be None. Returns dq, dk, dv."""
    B, H, N, d = q.shape
    gw = grid_hw[1]
    has_do, has_ws = do is not None, ws is not None
    dummy = lse  # never read when the matching HAS_* flag is off
    common = (*_strides(q, k, v, sigma), H, N, gw, d, (d ** -0.5) * math.log2(math.e), d ** -0.5, float(eps),
              math.log(eps))
    meta = dict(BLOCK_D=max(16, next_power_of_2(d)), HAS_DO=has_do, HAS_WS=has_ws,
                IS_FP64=q.dtype == torch.float64, PRECISION=_dot_precision(q.dtype))
    do_arg = do if has_do else dummy
    ws_arg = ws if has_ws else dummy
    dq = dk = dv = None
    if need_dkdv:
        dk, dv = _new(q.shape, q.device, q.dtype), _new(q.shape, q.device, q.dtype)
        args = (q, k, v, sigma, do_arg, lse, log_z, delta, ws_arg, dk, dv, *common)
        if INTERPRET:
            bm = _interpret_blocks(N)
            _anomaly_attention_bwd_dkdv_kernel[(triton.cdiv(N, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bm, **meta)
        else:
            _bwd_dkdv_tuned[lambda c: (triton.cdiv(N, c["BLOCK_N"]), B * H)](*args, **meta)
    if need_dq:
        dq = _new(q.shape, q.device, q.dtype)
        args = (q, k, v, sigma, do_arg, lse, log_z, delta, ws_arg, dq, *common)
        if INTERPRET:
            bm = _interpret_blocks(N)
            _anomaly_attention_bwd_dq_kernel[(triton.cdiv(N, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bm, **meta)
        else:
            _bwd_dq_tuned[lambda c: (triton.cdiv(N, c["BLOCK_M"]), B * H)](*args, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------------------------

class AnomalyAttentionFunction(torch.autograd.Function):
    """out, dis_series, dis_prior with thuml's detach() routing; inputs are assumed already validated."""

    @staticmethod
    def forward(ctx, q, k, v, sigma, grid_hw, eps):
        # forward() runs with grad mode off; needs_input_grad says whether a backward can come.
        stats = any(ctx.needs_input_grad[:4])
        out, lse, log_z, dis, g_ser, dsig = _anomaly_attention_fwd(q, k, v, sigma, grid_hw, eps, stats)
        B, H, N, _ = q.shape
        dis = dis.view(B, H, N)
        ctx.grid_hw, ctx.eps = grid_hw, eps
        ctx.save_for_backward(q, k, v, sigma, out, lse, log_z, g_ser, dsig)
        ctx.set_materialize_grads(False)
        # Two outputs with one value: autograd hands each its own gradient, which is how the routing is done.
        return out, dis, dis.clone()

    @staticmethod
    def backward(ctx, d_out, d_dis_series, d_dis_prior):
        q, k, v, sigma, out, lse, log_z, g_ser, dsig = ctx.saved_tensors
        need_q, need_k, need_v, need_sigma = ctx.needs_input_grad[:4]
        dq = dk = dv = dsigma = None
        if need_sigma and d_dis_prior is not None:
            dsigma = (d_dis_prior.reshape(dsig.shape).to(dsig.dtype) * dsig).view(sigma.shape).to(sigma.dtype)
        has_do = d_out is not None and (need_q or need_k or need_v)
        has_ws = d_dis_series is not None and (need_q or need_k)
        if has_do or has_ws:
            stat = lse.dtype
            do = d_out.contiguous() if has_do else None
            delta = torch.zeros_like(lse)  # D'_i = dO_i·o_i + w_i G_i
            if has_do:
                delta += (do.to(stat) * out.to(stat)).sum(-1).view_as(lse)
            ws = None
            if has_ws:
                ws = d_dis_series.reshape(lse.shape).to(stat).contiguous()
                delta += ws * g_ser
            dq, dk, dv = _anomaly_attention_bwd(q, k, v, sigma, ctx.grid_hw, ctx.eps, lse, log_z, delta, do, ws,
                                                need_dq=need_q, need_dkdv=need_k or need_v)
            if not has_do and dv is not None:
                dv = torch.zeros_like(dv)  # dis_series does not depend on v
        return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
                dsigma, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------------------------

def anomaly_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                      grid_hw: tuple[int, int], eps: float = 1e-4):
    """Fused anomaly attention through Triton (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Same contract as :func:`kernels.reference.anomaly_attention_ref`: returns ``(out, dis_series, dis_prior)`` with
    out (B, H, N, d) and the two (B, H, N) discrepancies whose gradients reach only q, k and only sigma.

    Raises:
        ValueError: bad ranks, shapes, devices or dtypes, ``N != grid_h * grid_w``, or a non-positive sigma.
    """
    grid = check_anomaly_attention_inputs(q, k, v, sigma, grid_hw, eps)
    check_triton_device(q, INTERPRET)
    return AnomalyAttentionFunction.apply(q, k, v, sigma, grid, float(eps))



def sass_variants(dtype: str, variant):
    """Every variant the GPU launchers can pick, for ``python -m kernels.bench.sass_report`` (``dtype`` as Triton
    names it: bf16, fp16, fp32, fp64). Inner loops are listed in code order with the elements one iteration covers."""
    fp64 = dtype == "fp64"
    prec = "ieee" if dtype in ("fp32", "fp64") else "tf32"
    stat = {"LSE", "LOGZ", "DIS", "GSER", "DSIG", "DELTA", "WS"}
    out = []
    for cfg in _fwd_configs():
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        for stats in (True, False):
            out.append(variant("anomaly_attention", "fwd", _anomaly_attention_fwd_kernel, dtype,
                               dict(cfg.kwargs, BLOCK_D=64, BLOCK_G=64, STATS=stats, IS_FP64=fp64, PRECISION=prec),
                               cfg.num_warps, cfg.num_stages,
                               [("sweep1", bm * bn), ("logZ_rows", None), ("logZ_cols", None), ("sweep2", bm * bn)],
                               stat=stat, floats={"qk_scale", "eps", "log_eps"}, counted=stats))
    for cfg in _bwd_configs():
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        for has_do, has_ws in ((True, True), (True, False), (False, True)):
            for fn, name in ((_anomaly_attention_bwd_dkdv_kernel, "dkdv"), (_anomaly_attention_bwd_dq_kernel, "dq")):
                out.append(variant("anomaly_attention", "bwd", fn, dtype,
                                   dict(cfg.kwargs, BLOCK_D=64, HAS_DO=has_do, HAS_WS=has_ws, IS_FP64=fp64,
                                        PRECISION=prec), cfg.num_warps, cfg.num_stages, [(name, bm * bn)],
                                   stat=stat, floats={"qk_scale", "scale", "eps", "log_eps"},
                                   counted=has_do and has_ws))
    return out
