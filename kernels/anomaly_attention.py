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
tiles of each key tile, recomputing S, P and g once per score element, and gives dK, dV and (float32 atomic adds)
dQ. With ``torch.use_deterministic_algorithms(True)`` dQ comes instead from a second kernel that walks the key tiles
of each query tile, recomputing every tile again, with no atomics. Extra memory is five (B, H, N) vectors
(log-sum-exp, log Z, R, G, ∂R/∂σ) and, for the atomics, a float32 dQ.

Cost per score element, in SASS instructions (``python -m kernels.bench.sass_report`` prints them per loop and
config): logs are base 2 (MUFU.LG2; error bound in tests/test_kernels_fastlog.py), divisions are approximate
reciprocals, grid coordinates are float arithmetic, the row sums are reduced once after the loop, and key tiles whose
prior is exactly zero (a grid-distance bound against the tile's widest σ) skip the prior's exp, log and reciprocal.

Layers, in order: jit kernels, launchers, ``AnomalyAttentionFunction``, the public ``anomaly_attention``. With
``TRITON_INTERPRET=1`` set before this module is imported the kernels run on CPU tensors through Triton's
interpreter, with fixed block sizes (the autotuner needs a GPU driver).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._utils import (acc_dtype, check_anomaly_attention_inputs, check_fp32_precision, check_triton_device,
                     interpret_enabled, next_power_of_2)

# triton.jit decides at decoration time whether to interpret; remember what it decided.
INTERPRET = interpret_enabled()
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------------------------------
# Everything runs in base 2: scores s2 = q·k·log2(e)/sqrt(d), S = exp2(s2 - lse2); prior P = exp2(-d^2 a2 - log2 Z)
# with a2 = log2(e)/(2σ^2); logs are log2 (one MUFU.LG2 on a GPU, where tl.log is a 24-instruction routine) and the
# natural-log sums are multiplied by ln 2 once, after the loops. The float scalars travel in SCAL, a small tensor of
# the statistics dtype, so float64 kernels see exact float64 constants (a Python float argument would become a
# float32 kernel argument on a GPU): SCAL = [log2(e)/sqrt(d), eps, ln 2, 1/grid_w, grid_w].

@triton.jit
def _grid_coords(offs_f, inv_gw, gw_f):
    """Row and column (as floats) of the tokens offs_f (floats) on a row-major grid with gw_f columns.

    floor((i + 0.5)/gw) is exact while the product's rounding error (i/gw · 2^-24) stays below 0.5/gw, i.e. for
    N < 2^22 tokens (checked by the launcher); it replaces an integer division by a runtime divisor (about twenty
    instructions) with three.
    """
    r = tl.floor((offs_f + 0.5) * inv_gw)
    return r, offs_f - r * gw_f


@triton.jit
def _log2_prior_norm(r_i, c_i, a2, GH, GW, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """log2 Z_i = log2 Σ_j exp2(-d_ij^2 a2_i), separable on the grid: (Σ_r 2^{-(r_i-r)^2 a2})(Σ_c 2^{-(c_i-c)^2 a2}).

    The d = 0 term is exactly 1 (a2 is clamped finite), so Z_i >= 1 and the log never sees an underflowed sum.
    """
    z_row = tl.zeros([BLOCK_M], dtype=ACC)
    for g0 in range(0, GH, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        dr = r_i[:, None] - g.to(ACC)[None, :]  # (BLOCK_M, BLOCK_G)
        z_row += tl.sum(tl.where(g[None, :] < GH, tl.exp2(-(dr * dr) * a2[:, None]), 0.0), 1)
    z_col = tl.zeros([BLOCK_M], dtype=ACC)
    for g0 in range(0, GW, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        dc = c_i[:, None] - g.to(ACC)[None, :]
        z_col += tl.sum(tl.where(g[None, :] < GW, tl.exp2(-(dc * dc) * a2[:, None]), 0.0), 1)
    return tl.log2(z_row) + tl.log2(z_col)


@triton.jit
def _prior_is_zero(m_lo, m_hi, n_lo, n_hi, GW, a2_min, IS_FP64: tl.constexpr):
    """Whether every prior entry of queries m_lo..m_hi x keys n_lo..n_hi underflows to exactly 0.

    A distance bound, not a look at the tile: the grid-row gap between the two token ranges (plus the column gap when
    each range lies in one grid row, which covers 1-D windows) bounds d_ij^2 from below, and
    P_ij <= exp2(-d_ij^2 a2_i) rounds to 0 once d^2 a2 >= 150 (float32; 1075 for float64).
    """
    rq_lo = m_lo // GW
    rq_hi = m_hi // GW
    rk_lo = n_lo // GW
    rk_hi = n_hi // GW
    gap_r = tl.maximum(tl.maximum(rk_lo - rq_hi, rq_lo - rk_hi), 0)
    gap_c = tl.maximum(tl.maximum(n_lo % GW - m_hi % GW, m_lo % GW - n_hi % GW), 0)
    gap_c = tl.where((rq_lo == rq_hi) & (rk_lo == rk_hi), gap_c, 0)
    d2_min = (gap_r * gap_r + gap_c * gap_c).to(a2_min.dtype)
    return d2_min * a2_min >= (1075.0 if IS_FP64 else 150.0)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    # FAST (float32 on a GPU): lg2.approx, one MUFU.LG2; error bound and its effect in tests/test_kernels_fastlog.py.
    # Otherwise (the interpreter, float64) the exact log2; tl.log2 would be libdevice's 12-FMA log2f on a GPU.
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _div(a, b, FAST: tl.constexpr):
    # FAST: div.approx (MUFU.RCP and a multiply, 2 ulp for |b| in [2^-126, 2^126]; b >= ε here) instead of the IEEE
    # division's range checks and slow path.
    if FAST:
        return libdevice.fast_dividef(a, b)
    else:
        return a / b


@triton.jit
def _scalars_of(SCAL, FAST: tl.constexpr):
    """The five float scalars in SCAL, and log2 ε taken with the same log2 as the tiles (so a P = 0 tile's log2(P+ε)
    and the shortcut's log2 ε agree to the bit)."""
    eps = tl.load(SCAL + 1)
    return tl.load(SCAL), eps, tl.load(SCAL + 2), tl.load(SCAL + 3), tl.load(SCAL + 4), _log2(eps, FAST)


@triton.jit
def _row_prior(SIGMA, sig_off, offs, mask, ln2, inv_gw, gw_f, ACC: tl.constexpr):
    """Per query row: σ (1 on padding rows), a2 = log2(e)/(2σ^2) clamped finite, and the row's grid coordinates."""
    sig = tl.load(SIGMA + sig_off, mask=mask, other=1.0).to(ACC)
    # Clamp: with σ^2 underflowed a2 would be inf and d = 0 would give 0 * inf; 1e30 still sends every d >= 1 to 0.
    a2 = tl.minimum(0.5 / (sig * sig * ln2), 1e30)
    r, c = _grid_coords(offs.to(ACC), inv_gw, gw_f)
    return sig, a2, r, c


@triton.jit
def _prior_terms(S, eS, lS, r_i, c_i, a2, logz2, keys_f, n_mask, inv_gw, gw_f, eps, ln2,
                 STATS: tl.constexpr, FAST: tl.constexpr):
    """One (queries, keys) tile's terms of the forward's row sums, where the prior is not known to be zero: with
    diff = log2(S+ε) - log2(P+ε), returns (S-P) diff, S g, P hh, P hh d^2, P d^2 (see sweep 2). Keys past N get
    P = 0 (their row coordinate is pushed far away); S must already be 0 there."""
    r_j, c_j = _grid_coords(keys_f, inv_gw, gw_f)
    r_j = tl.where(n_mask, r_j, 1e18)
    dr = r_i[:, None] - r_j[None, :]
    dc = c_i[:, None] - c_j[None, :]
    d2 = dr * dr + dc * dc
    P = tl.exp2(-d2 * a2[:, None] - logz2[:, None])
    eP = P + eps
    diff = lS - _log2(eP, FAST)
    sp = S - P
    if STATS:
        ph = P * (diff * ln2 + _div(sp, eP, FAST))  # P·hh, hh = -h
        return sp * diff, S * (diff * ln2 + _div(sp, eS, FAST)), ph, ph * d2, P * d2
    else:
        return sp * diff, sp, sp, sp, sp  # only the first is used


@triton.jit
def _store_row_stats(DIS, GSER, DSIG, FLAG, row, m_mask, sig, dis, g, h, t1, t2, ln2, STATS: tl.constexpr):
    """Store R = ln2 Σ(S-P)diff, G and ∂R/∂σ = (H' T2 - T1')/σ^3 for a tile of rows (sums over all keys given).

    A σ that is not positive and finite makes its row NaN and sets FLAG (one int32): checking the values on the host
    costs a sync per call, so on a GPU adcore.ops reads the flag once per step instead (check_sigma_flag)."""
    sig_ok = (sig > 0) & (sig < float("inf"))
    tl.store(DIS + row, tl.where(sig_ok, dis * ln2, float("nan")), mask=m_mask)
    tl.store(FLAG + row * 0, tl.full(row.shape, 1, tl.int32), mask=m_mask & ~sig_ok)
    if STATS:
        tl.store(GSER + row, g, mask=m_mask)
        tl.store(DSIG + row, tl.where(sig_ok, (h * t2 - t1) / (sig * sig * sig), float("nan")), mask=m_mask)


@triton.jit
def _ds_tile(s, lse2, dp, delta, ws, a2, logz2, rq, cq, rk, ck, far, qk_scale, eps, log2_eps, ln2,
             HAS_WS: tl.constexpr, FAST: tl.constexpr):
    """S and dscore for one score tile, in either orientation: per-query and per-key vectors come broadcast.

    dscore = S (dO·v + w g - D'), g = ln(S+ε) - ln(P+ε) + (S-P)/(S+ε) the series branch's ∂R/∂S (P held fixed).
    """
    S = tl.exp2(s * qk_scale - lse2)
    if HAS_WS:
        eS = S + eps
        lS = _log2(eS, FAST)
        if far:  # P = 0 on the whole tile: ln(P+ε) = ln ε
            g = (lS - log2_eps) * ln2 + _div(S, eS, FAST)
        else:
            dr = rq - rk
            dc = cq - ck
            P = tl.exp2(-(dr * dr + dc * dc) * a2 - logz2)
            g = (lS - _log2(P + eps, FAST)) * ln2 + _div(S - P, eS, FAST)
        dp = dp + ws * g
    return S, S * (dp - delta)


# GRID_BH (every kernel): the autotune key's grid size, unused in the body; never specialised, so it adds no compiles.
@triton.jit(do_not_specialize=["GRID_BH"])
def _anomaly_attention_fwd_kernel(
        Q, K, V, SIGMA, SCAL, OUT, LSE, LOGZ, DIS, GSER, DSIG, FLAG,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
        H, N, GH, GW, D_HEAD, GRID_BH,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
        STATS: tl.constexpr, IS_FP64: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (B * H, cdiv(N, BLOCK_M)); B * H on axis 0, which has no 65535 limit. OUT is contiguous (B, H, N, d);
    # LSE ... DSIG are contiguous (B * H, N). LSE and LOGZ are base 2.
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale, eps, ln2, inv_gw, gw_f, log2_eps = _scalars_of(SCAL, FAST)
    m_lo = pid_m * BLOCK_M
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < D_HEAD
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # Sweep 1: online softmax in base 2; keys j >= N score -inf.
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
    lse2 = m_i + tl.log2(l_i)
    row = pid_bh * N + offs_m
    tl.store(OUT + row[:, None] * D_HEAD + offs_d[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + row, lse2, mask=m_mask)

    sig, a2, r_i, c_i = _row_prior(SIGMA, b * ssb + h * ssh + offs_m * ssn, offs_m, m_mask, ln2, inv_gw, gw_f, ACC)
    logz2 = _log2_prior_norm(r_i, c_i, a2, GH, GW, BLOCK_M, BLOCK_G, ACC)
    tl.store(LOGZ + row, logz2, mask=m_mask)
    a2_min = tl.min(tl.where(m_mask, a2, 1e30), 0)
    m_hi = tl.minimum(m_lo + BLOCK_M, N) - 1

    # Sweep 2: S and P tile by tile. Keys j >= N have S = 0 (masked) and P = 0 (their row coordinate is pushed far
    # away), so they add exactly nothing. The row sums are deferred: each is a (BLOCK_M, BLOCK_N) register tile
    # accumulated elementwise and reduced across threads once, after the loop. With diff = log2(S+ε) - log2(P+ε):
    #   R = ln2 Σ (S-P) diff;  G = Σ S g, g = ln2 diff + (S-P)/(S+ε);
    #   hh = -h = ln2 diff + (S-P)/(P+ε), H' = Σ P hh, T1' = Σ P hh d^2, T2 = Σ P d^2, so that
    #   ∂R/∂σ = Σ P (h - H) d^2/σ^3 = (H' T2 - T1')/σ^3.
    arange_nf = tl.arange(0, BLOCK_N).to(ACC)
    dis_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    g_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    h_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    t1_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    t2_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION).to(ACC)
        S = tl.where(n_mask[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        eS = S + eps
        lS = _log2(eS, FAST)
        if _prior_is_zero(m_lo, m_hi, start_n, tl.minimum(start_n + BLOCK_N, N) - 1, GW, a2_min, IS_FP64):
            diff = lS - log2_eps  # P = 0: log2(P + ε) = log2 ε
            dis_t += S * diff
            if STATS:
                g_t += S * (diff * ln2 + _div(S, eS, FAST))
        else:
            dis_e, g_e, h_e, t1_e, t2_e = _prior_terms(S, eS, lS, r_i, c_i, a2, logz2, start_n + arange_nf, n_mask,
                                                       inv_gw, gw_f, eps, ln2, STATS, FAST)
            dis_t += dis_e
            if STATS:
                g_t += g_e
                h_t += h_e
                t1_t += t1_e
                t2_t += t2_e
    _store_row_stats(DIS, GSER, DSIG, FLAG, row, m_mask, sig, tl.sum(dis_t, 1), tl.sum(g_t, 1), tl.sum(h_t, 1),
                     tl.sum(t1_t, 1), tl.sum(t2_t, 1), ln2, STATS)


@triton.jit(do_not_specialize=["GRID_BH"])
def _anomaly_attention_fwd_small_kernel(
        Q, K, V, SIGMA, SCAL, OUT, LSE, LOGZ, DIS, GSER, DSIG, FLAG,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
        H, N, GH, GW, D_HEAD, GRID_BH,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
        STATS: tl.constexpr, IS_FP64: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr):
    # The forward for N <= BLOCK_N (N <= 128; the ViT models run at N = 64): one key tile holds the whole row, so the
    # two sweeps become one. The scores are computed once, the softmax is exact (no running max, no rescaling),
    # S = p / l reuses the softmax's exp2, and the row sums come straight from the same registers. Same grid,
    # arguments and outputs as _anomaly_attention_fwd_kernel.
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale, eps, ln2, inv_gw, gw_f, log2_eps = _scalars_of(SCAL, FAST)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    n_mask = offs_n < N
    d_mask = offs_d < D_HEAD
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                 mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
    s = tl.where(n_mask[None, :], tl.dot(q, kt, input_precision=PRECISION).to(ACC) * qk_scale, float("-inf"))
    m_i = tl.max(s, 1)
    p = tl.exp2(s - m_i[:, None])
    l_i = tl.sum(p, 1)
    vt = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                 mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    inv_l = 1.0 / l_i
    acc = tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION).to(ACC)
    row = pid_bh * N + offs_m
    tl.store(OUT + row[:, None] * D_HEAD + offs_d[None, :], (acc * inv_l[:, None]).to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=m_mask)

    sig, a2, r_i, c_i = _row_prior(SIGMA, b * ssb + h * ssh + offs_m * ssn, offs_m, m_mask, ln2, inv_gw, gw_f, ACC)
    logz2 = _log2_prior_norm(r_i, c_i, a2, GH, GW, BLOCK_M, BLOCK_G, ACC)
    tl.store(LOGZ + row, logz2, mask=m_mask)
    S = p * inv_l[:, None]  # 0 on keys past N
    eS = S + eps
    dis_e, g_e, h_e, t1_e, t2_e = _prior_terms(S, eS, _log2(eS, FAST), r_i, c_i, a2, logz2, offs_n.to(ACC), n_mask,
                                               inv_gw, gw_f, eps, ln2, STATS, FAST)
    _store_row_stats(DIS, GSER, DSIG, FLAG, row, m_mask, sig, tl.sum(dis_e, 1), tl.sum(g_e, 1), tl.sum(h_e, 1),
                     tl.sum(t1_e, 1), tl.sum(t2_e, 1), ln2, STATS)


@triton.jit(do_not_specialize=["GRID_BH"])
def _anomaly_attention_bwd_kernel(
        Q, K, V, SIGMA, SCAL, DO, LSE, LOGZ, DELTA, WS, DQ, DK, DV,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
        H, N, GW, D_HEAD, GRID_BH,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DO: tl.constexpr, HAS_WS: tl.constexpr, DQ_ATOMIC: tl.constexpr, IS_FP64: tl.constexpr,
        FAST: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (B * H, cdiv(N, BLOCK_N)): one key tile per program, walking every query tile. Tiles are transposed,
    # (keys, queries), so S^T and dscore^T are the A operands of dV += S^T dO and dK += dscore^T Q as computed.
    # DQ_ATOMIC: dQ += dscore K is added into the float32 DQ (zeroed) with atomics, sparing the deterministic
    # dQ kernel's second recompute of every tile. DO, DK, DV, DQ are contiguous (B, H, N, d); LSE (base 2), LOGZ
    # (base 2), DELTA (= D'), WS (the gradient w of dis_series) are contiguous (B * H, N).
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale, eps, ln2, inv_gw, gw_f, log2_eps = _scalars_of(SCAL, FAST)
    scale = qk_scale * ln2  # 1/sqrt(d)
    n_lo = pid_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D_HEAD
    nd_mask = n_mask[:, None] & d_mask[None, :]
    # Padding keys load k = v = 0: their dscore then reaches dQ multiplied by k = 0, and their dK, dV are not stored.
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
    r_k, c_k = _grid_coords(offs_n.to(ACC), inv_gw, gw_f)
    r_k = tl.where(n_mask, r_k, 1e18)[:, None]  # padding keys: P = 0
    c_k = c_k[:, None]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    q_base = Q + b * sqb + h * sqh
    for m_lo in range(0, N, BLOCK_M):
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        md_mask = m_mask[:, None] & d_mask[None, :]
        row = pid_bh * N + offs_m
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_mask, other=0.0)
        # Padding queries get lse = +inf, hence S = 0 and dscore = 0, without a mask on the tile.
        lse2 = tl.load(LSE + row, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION).to(ACC)  # (BLOCK_N, BLOCK_M)
        if HAS_DO:
            do = tl.load(DO + row[:, None] * D_HEAD + offs_d[None, :], mask=md_mask, other=0.0)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION).to(ACC)
        else:
            dp = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        if HAS_WS:
            sig_unused, a2, r_q, c_q = _row_prior(SIGMA, b * ssb + h * ssh + offs_m * ssn, offs_m, m_mask, ln2,
                                                  inv_gw, gw_f, ACC)
            logz2 = tl.load(LOGZ + row, mask=m_mask, other=0.0)
            ws = tl.load(WS + row, mask=m_mask, other=0.0)
            # No zero-prior shortcut here: in this orientation its per-query-tile bound cost registers (spills) and
            # more instructions than it saved at the model's σ, which rarely leaves a whole tile pair at P = 0.
            S, ds = _ds_tile(s, lse2[None, :], dp, delta[None, :], ws[None, :], a2[None, :], logz2[None, :],
                             r_q[None, :], c_q[None, :], r_k, c_k, False, qk_scale, eps, log2_eps, ln2, HAS_WS,
                             FAST)
        else:
            S, ds = _ds_tile(s, lse2[None, :], dp, delta[None, :], 0.0, 0.0, 0.0, 0.0, 0.0, r_k, c_k, False,
                             qk_scale, eps, log2_eps, ln2, HAS_WS, FAST)
        if HAS_DO:
            dv += tl.dot(S.to(do.dtype), do, input_precision=PRECISION).to(ACC)
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION).to(ACC)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(ds).to(k.dtype), k, input_precision=PRECISION).to(ACC) * scale
            tl.atomic_add(DQ + row[:, None] * D_HEAD + offs_d[None, :], dq, mask=md_mask, sem="relaxed")
    out_rows = pid_bh * N + offs_n
    tl.store(DK + out_rows[:, None] * D_HEAD + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_rows[:, None] * D_HEAD + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit(do_not_specialize=["GRID_BH"])
def _anomaly_attention_bwd_dq_kernel(
        Q, K, V, SIGMA, SCAL, DO, LSE, LOGZ, DELTA, WS, DQ,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssh, ssn,
        H, N, GW, D_HEAD, GRID_BH,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DO: tl.constexpr, HAS_WS: tl.constexpr, IS_FP64: tl.constexpr, FAST: tl.constexpr,
        PRECISION: tl.constexpr):
    # The deterministic dQ (torch.use_deterministic_algorithms): grid (B * H, cdiv(N, BLOCK_M)), one query tile per
    # program walking every key tile, recomputing the tiles _anomaly_attention_bwd_kernel made; no atomics.
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale, eps, ln2, inv_gw, gw_f, log2_eps = _scalars_of(SCAL, FAST)
    m_lo = pid_m * BLOCK_M
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < D_HEAD
    md_mask = m_mask[:, None] & d_mask[None, :]
    row = pid_bh * N + offs_m
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_mask, other=0.0)
    lse2 = tl.load(LSE + row, mask=m_mask, other=float("inf"))[:, None]
    delta = tl.load(DELTA + row, mask=m_mask, other=0.0)[:, None]
    if HAS_DO:
        do = tl.load(DO + row[:, None] * D_HEAD + offs_d[None, :], mask=md_mask, other=0.0)
    sig_unused, a2, r_q, c_q = _row_prior(SIGMA, b * ssb + h * ssh + offs_m * ssn, offs_m, m_mask, ln2, inv_gw,
                                          gw_f, ACC)
    a2_min = tl.min(tl.where(m_mask, a2, 1e30), 0)
    logz2 = tl.load(LOGZ + row, mask=m_mask, other=0.0)[:, None]
    ws = tl.load(WS + row, mask=m_mask, other=0.0)[:, None]
    m_hi = tl.minimum(m_lo + BLOCK_M, N) - 1
    arange_nf = tl.arange(0, BLOCK_N).to(ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for n_lo in range(0, N, BLOCK_N):
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC)
        if HAS_DO:
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(ACC)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        r_k, c_k = _grid_coords(n_lo + arange_nf, inv_gw, gw_f)
        r_k = tl.where(n_mask, r_k, 1e18)
        far = _prior_is_zero(m_lo, m_hi, n_lo, tl.minimum(n_lo + BLOCK_N, N) - 1, GW, a2_min, IS_FP64)
        s_unused, ds = _ds_tile(s, lse2, dp, delta, ws, a2[:, None], logz2, r_q[:, None], c_q[:, None], r_k[None, :],
                         c_k[None, :], far, qk_scale, eps, log2_eps, ln2, HAS_WS, FAST)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION).to(ACC)  # padding keys: k = 0
    tl.store(DQ + row[:, None] * D_HEAD + offs_d[None, :], (dq * (qk_scale * ln2)).to(DQ.dtype.element_ty),
             mask=md_mask)


# GPU configurations, each compiled and checked by kernels.bench.sass_report (no spills, instructions per element).
# Sweep 2 keeps its five deferred row sums as register tiles, so the forward wants 16 elements of a tile per thread.
# The backward's (keys, queries) tiles hold seven per-query vectors per column a thread owns, and dK, dV
# (BLOCK_N x d) besides: narrow query tiles (BLOCK_M = 16) keep it within 255 registers; BLOCK_M = 32 spilled.
# The interpreter bypasses the autotuner (it needs a driver) and uses _interpret_blocks() or BLOCK_OVERRIDE.
def _fwd_configs(fp32: bool = False):
    # float32 operands take twice the registers of bf16 ones: only 64 x 32 with 8 warps stays spill-free. Under
    # Triton 3.6, 64 x 32 with 4 warps and 128 x 32 with 8 (16 elements per thread) spilled 40 and 72 bytes.
    tiles = ((64, 32, 8),) if fp32 else ((64, 64, 8), (64, 32, 8))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2) for bm, bn, w in tiles]


def _dtype_prune(configs_of):
    """An early_config_prune that keeps, of the union an autotuner holds, the configs of the launch's dtype."""
    def prune(configs, named_args, **kwargs):
        keep = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                for c in configs_of(fp32=named_args["Q"].dtype == torch.float32)}
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) in keep]
    return prune


def _bwd_configs(fp32: bool = False):
    # float32: 16 x 64 with 4 warps spilled 40 bytes under Triton 3.6.
    tiles = ((16, 128, 8),) if fp32 else ((16, 128, 8), (16, 64, 4))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2) for bm, bn, w in tiles]


def _bwd_dq_configs():
    # 64 x 64 with 8 warps evaluated every exp and log twice (12 MUFU per element against 6: two warpgroups);
    # 32 x 64 with 4 warps spilled 292 bytes under Triton 3.6, 32 x 32 spills under neither 3.6 nor 3.8.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
            for bm, bn, w in ((32, 32, 4),)]


def _fwd_small_configs(block_n: int = 128):
    """(BLOCK_M, num_warps) of the single-pass forward for a row of block_n keys. Its code runs once per program, not
    per key tile, so the per-thread set-up (loads, reductions, stores) is amortised only over the elements a thread
    owns: 32 per thread counted 122-136 SASS per element under Triton 3.6 and 3.8 without spills, 8 to 16 per thread
    160-220 (sass_report); 64 x 64 with 4 warps spilled 8 bytes under 3.6, 64 x 128 with 8 warps 600-900."""
    tiles = ((32, 2),) if block_n <= 64 else ((16, 2),)
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=2) for bm, w in tiles]


def _small_prune(configs, named_args, **kwargs):
    keep = {(c.kwargs["BLOCK_M"], c.num_warps) for c in _fwd_small_configs(kwargs["BLOCK_N"])}
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.num_warps) in keep]


def _union(configs_of):
    seen, out = set(), []
    for c in configs_of() + configs_of(fp32=True):
        key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# GRID_BH is the launch grid's B * H rounded up to a power of two: a tile picked for 8 programs per query tile is not
# reused at 256 (the fill of 132 SMs decides between them), while batch sizes of one power-of-two bucket share a pick.
_TUNE_KEY = ["N", "GW", "D_HEAD", "BLOCK_D", "GRID_BH"]


def _autotuners():
    """The GPU launchers' autotuned kernels, by launcher name. Built at import on a GPU; tests build them without one
    (an Autotuner touches the driver only when launched) to check what the launchers pass them."""
    return dict(
        fwd=triton.autotune(_union(_fwd_configs), key=_TUNE_KEY + ["STATS", "IS_FP64", "PRECISION"],
                            prune_configs_by={"early_config_prune": _dtype_prune(_fwd_configs)})(
            _anomaly_attention_fwd_kernel),
        fwd_small=triton.autotune(_fwd_small_configs(64) + _fwd_small_configs(128),
                                  key=_TUNE_KEY + ["STATS", "IS_FP64", "PRECISION"],
                                  prune_configs_by={"early_config_prune": _small_prune})(
            _anomaly_attention_fwd_small_kernel),
        # reset_to_zero: the autotuner launches each config several times, and DQ accumulates. The launcher must
        # therefore never pass, as DQ, a buffer that is also another argument (tests/test_kernels_launch_args.py).
        bwd=triton.autotune(_union(_bwd_configs),
                            key=_TUNE_KEY + ["HAS_DO", "HAS_WS", "DQ_ATOMIC", "IS_FP64", "PRECISION"],
                            prune_configs_by={"early_config_prune": _dtype_prune(_bwd_configs)},
                            reset_to_zero=["DQ"])(_anomaly_attention_bwd_kernel),
        bwd_dq=triton.autotune(_bwd_dq_configs(), key=_TUNE_KEY + ["HAS_DO", "HAS_WS", "IS_FP64", "PRECISION"])(
            _anomaly_attention_bwd_dq_kernel),
    )


_TUNED = {} if INTERPRET else _autotuners()


# ---------------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------------

# Test-only: (BLOCK_M, BLOCK_N, num_warps) for every launch instead of the interpreter's default tiles or the
# autotuner's pick, so CPU tests reach multi-tile, unequal and ragged tilings and GPU tests reach a given config.
BLOCK_OVERRIDE: tuple[int, int, int] | None = None
MAX_TOKENS = 1 << 22  # _grid_coords is exact below this


SMALL_N = 128  # up to this N the forward takes the single-pass kernel on a GPU (one key tile holds the row)


def _small_block_n(n: int) -> int:
    # 64 at least: the configs are counted (sass_report) at 64 and 128 keys; a shorter row pads to 64.
    return max(64, next_power_of_2(n))


_FLAGS: dict = {}


def sigma_flag(device) -> torch.Tensor:
    """The (1,) int32 flag the forward kernels set, on ``device``, when a row's sigma is not positive and finite."""
    key = str(device)
    if key not in _FLAGS:
        _FLAGS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _FLAGS[key]


def _interpret_blocks(n: int) -> int:
    # The interpreter costs a few ms per tile iteration whatever the tile size: use few, large tiles.
    return min(128, max(16, next_power_of_2(n)))


def _dot_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    # float32 operands take TF32 tensor cores unless fp32_precision="ieee" (IEEE dots run on the CUDA cores and
    # spill); float64 needs the exact path; half dtypes ignore the setting.
    if dtype == torch.float32:
        return fp32_precision
    return "ieee" if dtype == torch.float64 else "tf32"


def _fast_math(dtype: torch.dtype) -> bool:
    # MUFU log2 and approximate division for float32 statistics on a GPU; the interpreter has no libdevice.
    return not INTERPRET and dtype != torch.float64


def _new(shape, device, dtype):
    # Under the interpreter (the CPU tests) outputs start as NaN, so an element a kernel forgets to store fails a test
    # instead of passing as stale memory; on a GPU they start uninitialised, saving one fill launch per buffer.
    if INTERPRET:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


_SCALARS: dict = {}


def _scalars(device, dtype, d, eps, gw):
    """SCAL for the kernels, built once per (device, dtype, d, eps, grid_w): creating it each call would cost a
    host-to-device copy per launch."""
    key = (str(device), dtype, d, eps, gw)
    if key not in _SCALARS:
        _SCALARS[key] = torch.tensor([math.log2(math.e) / math.sqrt(d), eps, math.log(2.0), 1.0 / gw, float(gw)],
                                     dtype=dtype, device=device)
    return _SCALARS[key]


def _fixed_blocks(n: int):
    """(BLOCK_M, BLOCK_N, num_warps) for a launch without the autotuner, or None to autotune."""
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE
    if INTERPRET:
        bm = _interpret_blocks(n)
        return bm, bm, 4
    return None


def _anomaly_attention_fwd(q, k, v, sigma, grid_hw, eps, stats, fp32_precision="tf32"):
    """Launch the forward kernel. Returns out (B, H, N, d) and (B*H, N) lse2, log_z2, dis, g_ser, dsig."""
    B, H, N, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernel takes head dim d <= {MAX_HEAD_DIM} (one register tile), got d = {d}; "
                         "use backend='torch'")
    if N >= MAX_TOKENS:
        raise ValueError(f"the Triton kernel takes N < {MAX_TOKENS} tokens, got {N}; use backend='torch'")
    gh, gw = grid_hw
    stat = acc_dtype(q.dtype)
    out = _new((B, H, N, d), q.device, q.dtype)
    lse, log_z, dis = (_new((B * H, N), q.device, stat) for _ in range(3))
    g_ser, dsig = (_new((B * H, N), q.device, stat) for _ in range(2)) if stats else (dis, dis)  # unused if no STATS
    args = (q, k, v, sigma, _scalars(q.device, stat, d, eps, gw), out, lse, log_z, dis, g_ser, dsig,
            sigma_flag(q.device), *_strides(q, k, v, sigma), H, N, gh, gw, d, next_power_of_2(B * H))
    meta = dict(BLOCK_D=max(16, next_power_of_2(d)), BLOCK_G=min(64, max(16, next_power_of_2(max(gh, gw)))),
                STATS=stats, IS_FP64=q.dtype == torch.float64, FAST=_fast_math(q.dtype),
                PRECISION=_dot_precision(q.dtype, fp32_precision))
    fixed = _fixed_blocks(N)
    if fixed:
        bm, bn, warps = fixed
        kernel = _anomaly_attention_fwd_small_kernel if bn >= N else _anomaly_attention_fwd_kernel
        kernel[(B * H, triton.cdiv(N, bm))](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **meta)
    elif N <= SMALL_N and meta["PRECISION"] == "tf32":  # IEEE float32 dots spill 40 KB in one pass (sass_report)
        _TUNED["fwd_small"][lambda c: (B * H, triton.cdiv(N, c["BLOCK_M"]))](*args, BLOCK_N=_small_block_n(N),
                                                                             **meta)
    else:
        _TUNED["fwd"][lambda c: (B * H, triton.cdiv(N, c["BLOCK_M"]))](*args, **meta)
    return out, lse, log_z, dis, g_ser, dsig


def _anomaly_attention_bwd(q, k, v, sigma, grid_hw, eps, lse, log_z, delta, do, ws, need_dq, need_dkdv,
                           deterministic, fp32_precision="tf32"):
    """Launch the backward. ``do`` (B, H, N, d) and ``ws`` (B*H, N) may be None. Returns dq, dk, dv.

    One kernel walks the query tiles of each key tile for dK and dV and, unless ``deterministic``, adds dQ with
    float32 atomics (order-dependent in the last bits); deterministic runs compute dQ in a second kernel instead.
    """
    B, H, N, d = q.shape
    stat = lse.dtype
    has_do, has_ws = do is not None, ws is not None
    dummy = lse  # DO, WS: never read when the matching HAS_* flag is off
    scal = _scalars(q.device, stat, d, eps, grid_hw[1])
    common = (*_strides(q, k, v, sigma), H, N, grid_hw[1], d, next_power_of_2(B * H))
    meta = dict(BLOCK_D=max(16, next_power_of_2(d)), HAS_DO=has_do, HAS_WS=has_ws,
                IS_FP64=q.dtype == torch.float64, FAST=_fast_math(q.dtype),
                PRECISION=_dot_precision(q.dtype, fp32_precision))
    do_arg = do if has_do else dummy
    ws_arg = ws if has_ws else dummy
    fixed = _fixed_blocks(N)
    atomic = need_dq and not deterministic
    dq = dk = dv = None
    if need_dkdv or atomic:
        dk, dv = _new(q.shape, q.device, q.dtype), _new(q.shape, q.device, q.dtype)
        # Without atomics DQ is never read or written, but the autotuner still zeroes it (reset_to_zero) before each
        # timed launch: it gets a buffer of its own, never one the kernel reads (lse once was, and was zeroed).
        dq_acc = torch.zeros(q.shape if atomic else (1,), device=q.device, dtype=stat)
        args = (q, k, v, sigma, scal, do_arg, lse, log_z, delta, ws_arg, dq_acc, dk, dv, *common)
        if fixed:
            bm, bn, warps = fixed
            _anomaly_attention_bwd_kernel[(B * H, triton.cdiv(N, bn))](*args, BLOCK_M=bm, BLOCK_N=bn, DQ_ATOMIC=atomic,
                                                                       num_warps=warps, **meta)
        else:
            _TUNED["bwd"][lambda c: (B * H, triton.cdiv(N, c["BLOCK_N"]))](*args, DQ_ATOMIC=atomic, **meta)
        if atomic:
            dq = dq_acc.to(q.dtype)
    if need_dq and deterministic:
        dq = _new(q.shape, q.device, q.dtype)
        args = (q, k, v, sigma, scal, do_arg, lse, log_z, delta, ws_arg, dq, *common)
        if fixed:
            bm, bn, warps = fixed
            _anomaly_attention_bwd_dq_kernel[(B * H, triton.cdiv(N, bm))](*args, BLOCK_M=bm, BLOCK_N=bn,
                                                                          num_warps=warps, **meta)
        else:
            _TUNED["bwd_dq"][lambda c: (B * H, triton.cdiv(N, c["BLOCK_M"]))](*args, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------------------------

class AnomalyAttentionFunction(torch.autograd.Function):
    """out, dis_series, dis_prior with thuml's detach() routing; inputs are assumed already validated."""

    @staticmethod
    def forward(ctx, q, k, v, sigma, grid_hw, eps, fp32_precision="tf32"):
        # forward() runs with grad mode off; needs_input_grad says whether a backward can come.
        stats = any(ctx.needs_input_grad[:4])
        out, lse, log_z, dis, g_ser, dsig = _anomaly_attention_fwd(q, k, v, sigma, grid_hw, eps, stats,
                                                                   fp32_precision)
        B, H, N, _ = q.shape
        dis = dis.view(B, H, N)
        ctx.grid_hw, ctx.eps, ctx.fp32_precision = grid_hw, eps, fp32_precision
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
                                                need_dq=need_q, need_dkdv=need_k or need_v,
                                                deterministic=torch.are_deterministic_algorithms_enabled(),
                                                fp32_precision=ctx.fp32_precision)
            if not has_do and dv is not None:
                dv = torch.zeros_like(dv)  # dis_series does not depend on v
        return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
                dsigma, None, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------------------------

def anomaly_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                      grid_hw: tuple[int, int], eps: float = 1e-4, fp32_precision: str = "tf32"):
    """Fused anomaly attention through Triton (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Same contract as :func:`kernels.reference.anomaly_attention_ref`: returns ``(out, dis_series, dis_prior)`` with
    out (B, H, N, d) and the two (B, H, N) discrepancies whose gradients reach only q, k and only sigma.
    ``fp32_precision`` ("tf32" or "ieee") picks the float32 dots on a GPU: TF32 tensor cores (10-bit mantissas, about
    1e-3 relative error in the scores) or exact IEEE dots on the CUDA cores. The interpreter always computes exactly.
    On a CUDA device sigma's values are not checked here (that reads them back, a host sync); a row whose sigma is
    not positive and finite comes out NaN instead.

    Raises:
        ValueError: bad ranks, shapes, devices or dtypes, ``N != grid_h * grid_w``, a non-positive sigma (CPU), or an
            unknown ``fp32_precision``.
    """
    grid = check_anomaly_attention_inputs(q, k, v, sigma, grid_hw, eps, check_values=q.device.type != "cuda")
    check_triton_device(q, INTERPRET)
    check_fp32_precision(fp32_precision)
    return AnomalyAttentionFunction.apply(q, k, v, sigma, grid, float(eps), fp32_precision)


def sass_goal_args():
    """[(label, integer arguments by name)] at the goal shapes, for ``sass_report --specialise``: B=32, H=8, d=64 at
    N = 196 and 784, B=4 at N = 3136, and the ViT models' B=8, N = 64 (the small-N path); contiguous inputs."""
    out = []
    for B, H, (gh, gw), d in ((8, 8, (8, 8), 64), (32, 8, (14, 14), 64), (32, 8, (28, 28), 64),
                              (4, 8, (56, 56), 64)):
        N = gh * gw
        ints = dict(H=H, N=N, GH=gh, GW=gw, D_HEAD=d, GRID_BH=next_power_of_2(B * H), ssb=H * N, ssh=N, ssn=1)
        for t in "qkv":
            ints.update(zip([f"s{t}b", f"s{t}h", f"s{t}n", f"s{t}d"], (H * N * d, N * d, d, 1)))
        out.append((f"N={N}", ints))
    return out


def sass_variants(dtype: str, variant):
    """Every variant the GPU launchers can pick, for ``python -m kernels.bench.sass_report`` (``dtype`` as Triton
    names it: bf16, fp16, fp32, fp64). Inner loops are listed in code order with the elements one iteration covers.
    Counted in the fwd+bwd total: the training path (forward with statistics, backward with both upstream gradients
    and atomic dQ); the deterministic dQ kernel and the one-gradient variants are listed beside it."""
    fp64 = dtype == "fp64"
    prec = "ieee" if dtype == "fp64" else "tf32"
    stat = {"SCAL", "LSE", "LOGZ", "DIS", "GSER", "DSIG", "DELTA", "WS", "DQ"}
    out = []
    for cfg in _fwd_configs(fp32=dtype == "fp32"):
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        for stats in (True, False):
            out.append(variant("anomaly_attention", "fwd", _anomaly_attention_fwd_kernel, dtype,
                               dict(cfg.kwargs, BLOCK_D=64, BLOCK_G=64, STATS=stats, IS_FP64=fp64, FAST=not fp64,
                                    PRECISION=prec),
                               cfg.num_warps, cfg.num_stages,
                               [("sweep1", bm * bn), ("logZ_rows", None), ("logZ_cols", None), ("sweep2", bm * bn)],
                               stat=stat, int_ptrs={"FLAG"}, counted=stats, n_range=(SMALL_N + 1, float("inf"))))
    for bn in (64, 128):  # the single-pass forward at N = 64 (the ViT models) and its largest row
        for cfg in _fwd_small_configs(bn):
            for stats in (True, False):
                out.append(variant("anomaly_attention", "fwd", _anomaly_attention_fwd_small_kernel, dtype,
                                   dict(cfg.kwargs, BLOCK_N=bn, BLOCK_D=64, BLOCK_G=16, STATS=stats, IS_FP64=fp64,
                                        FAST=not fp64, PRECISION=prec),
                                   cfg.num_warps, cfg.num_stages, [("logZ_rows", None), ("logZ_cols", None)],
                                   stat=stat, int_ptrs={"FLAG"}, counted=stats,
                                   n_range=(1 if bn == 64 else bn // 2 + 1, bn),
                                   straight=cfg.kwargs["BLOCK_M"] * bn))
    for cfg in _bwd_configs(fp32=dtype == "fp32"):
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        for has_do, has_ws in ((True, True), (True, False), (False, True)):
            flags = dict(BLOCK_D=64, HAS_DO=has_do, HAS_WS=has_ws, IS_FP64=fp64, FAST=not fp64, PRECISION=prec)
            out.append(variant("anomaly_attention", "bwd", _anomaly_attention_bwd_kernel, dtype,
                               dict(cfg.kwargs, DQ_ATOMIC=True, **flags), cfg.num_warps, cfg.num_stages,
                               [("dkdv+dq", bm * bn)], stat=stat, counted=has_do and has_ws))
            if has_do and has_ws:
                out.append(variant("anomaly_attention", "bwd_deterministic", _anomaly_attention_bwd_kernel, dtype,
                                   dict(cfg.kwargs, DQ_ATOMIC=False, **flags), cfg.num_warps, cfg.num_stages,
                                   [("dkdv", bm * bn)], stat=stat, counted=False))
    for cfg in _bwd_dq_configs():
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        flags = dict(BLOCK_D=64, HAS_DO=True, HAS_WS=True, IS_FP64=fp64, FAST=not fp64, PRECISION=prec)
        out.append(variant("anomaly_attention", "bwd_deterministic", _anomaly_attention_bwd_dq_kernel, dtype,
                           dict(cfg.kwargs, **flags), cfg.num_warps, cfg.num_stages, [("dq", bm * bn)],
                           stat=stat - {"DQ"}, counted=False))
    return out
