"""Helpers shared by the kernels: interpreter detection, block sizes and the input checks that run before any launch.

Nothing here imports Triton, so ``adcore.ops`` can validate inputs and pick a backend on machines without it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter.

    ``triton.jit`` reads the variable when a kernel is *decorated*, so each kernel module calls this once at import,
    just before its ``@triton.jit`` lines, and keeps the answer as its ``INTERPRET`` flag.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_triton_device(t: torch.Tensor, interpret: bool) -> None:
    """Raise ValueError when the Triton kernels (decorated with ``interpret`` as their mode) cannot take ``t``."""
    if t.device.type == "cuda" and not interpret:
        return
    if t.device.type == "cpu" and interpret:
        return
    if t.device.type == "cuda":
        raise ValueError("the kernels were decorated under TRITON_INTERPRET=1 and cannot take CUDA tensors; "
                         "unset TRITON_INTERPRET or pass CPU tensors")
    raise ValueError(f"the Triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before the "
                     f"kernels module is first imported; got a tensor on {t.device}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same(name_ref: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {name_ref} is on {ref.device}; "
                             "all inputs must share a device")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {name_ref} has {ref.dtype}; "
                             "all inputs must share a dtype")


def _check_tensor(name: str, t, ndim) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_grid_hw(grid_hw, num_tokens: int) -> tuple[int, int]:
    """Validate ``grid_hw`` against the token count and return it as two ints (rows, columns)."""
    try:
        gh, gw = (int(g) for g in grid_hw)
    except (TypeError, ValueError):
        raise ValueError(f"grid_hw must be a pair (grid_h, grid_w), got {grid_hw!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"grid_hw must be positive, got {grid_hw!r}")
    if gh * gw != num_tokens:
        raise ValueError(f"grid_hw {gh}x{gw} = {gh * gw} tokens but q has N = {num_tokens}; "
                         "tokens must be the grid's cells in row-major order")
    return gh, gw


def check_anomaly_attention_inputs(q, k, v, sigma, grid_hw, eps: float = 1e-4,
                                   check_values: bool = True) -> tuple[int, int]:
    """Raise ValueError for anything ``anomaly_attention`` cannot take; return the grid as (grid_h, grid_w).

    Args:
        q, k, v: (B, H, N, d) tensors of one floating dtype on one device.
        sigma: (B, H, N) prior widths in grid cells, strictly positive and finite; q's dtype, or float32 beside
            float16/bfloat16 q.
        grid_hw: (grid_h, grid_w) with grid_h * grid_w == N.
        eps: the KL smoothing constant, > 0.
        check_values: also check ``sigma > 0`` and finiteness (reads sigma, so it synchronises a GPU stream).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    _check_tensor("sigma", sigma, 3)
    _check_same("q", q, k=k, v=v)
    if sigma.device != q.device:
        raise ValueError(f"sigma is on {sigma.device} but q is on {q.device}; all inputs must share a device")
    # sigma may be float32 beside half q: models compute it in float32 under autocast (a bfloat16 σ underflows),
    # and the kernels read it into float32 statistics either way.
    if sigma.dtype != q.dtype and not (sigma.dtype == torch.float32 and q.dtype in (torch.float16, torch.bfloat16)):
        raise ValueError(f"sigma has dtype {sigma.dtype} but q has {q.dtype}; sigma must have q's dtype, or float32 "
                         "when q is float16/bfloat16")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must all be (B, H, N, d) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    B, H, N, d = q.shape
    if min(B, H, N, d) < 1:
        raise ValueError(f"q must have non-empty (B, H, N, d), got {tuple(q.shape)}")
    if sigma.shape != (B, H, N):
        raise ValueError(f"sigma must be (B, H, N) = {(B, H, N)}, got {tuple(sigma.shape)}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    grid = check_grid_hw(grid_hw, N)
    if check_values:
        check_sigma_values(sigma)
    return grid


def check_sigma_values(sigma: torch.Tensor) -> None:
    """Raise ValueError unless sigma is positive and finite everywhere (reads sigma: a host sync on a GPU)."""
    if not bool(torch.all(torch.isfinite(sigma) & (sigma > 0))):
        bad = sigma[~(torch.isfinite(sigma) & (sigma > 0))].flatten()[:3].tolist()
        raise ValueError(f"sigma must be positive and finite everywhere (grid-cell units); found e.g. {bad}")


FP32_PRECISIONS = ("tf32", "ieee")


def check_fp32_precision(fp32_precision: str) -> None:
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")


MDN_MODES = ("logsumexp", "vtadl")


def check_mdn_nll_inputs(x, logits, mu, log_var, mode: str) -> tuple[int, int, int]:
    """Raise ValueError for anything ``mdn_nll`` cannot take; return (N, K, D).

    Args:
        x: (N, D) embeddings.
        logits: (N, K) per-row or (K,) shared mixture logits.
        mu, log_var: (N, K, D) per-row or (K, D) shared component means and log-variances.
        mode: "logsumexp" or "vtadl".
    """
    if mode not in MDN_MODES:
        raise ValueError(f"mode must be one of {MDN_MODES}, got {mode!r}")
    _check_tensor("x", x, 2)
    _check_tensor("logits", logits, (1, 2))
    _check_tensor("mu", mu, (2, 3))
    _check_tensor("log_var", log_var, (2, 3))
    _check_same("x", x, logits=logits, mu=mu, log_var=log_var)
    N, D = x.shape
    K = logits.shape[-1]
    if N < 1 or D < 1 or K < 1:
        raise ValueError(f"x must be non-empty (N, D) and logits must have K >= 1, got x {tuple(x.shape)}, "
                         f"logits {tuple(logits.shape)}")
    if logits.dim() == 2 and logits.shape[0] != N:
        raise ValueError(f"logits must be (N, K) = ({N}, K) or (K,), got {tuple(logits.shape)}")
    for name, t in (("mu", mu), ("log_var", log_var)):
        want = (N, K, D) if t.dim() == 3 else (K, D)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be (N, K, D) = {(N, K, D)} or (K, D) = {(K, D)}, got {tuple(t.shape)}")
    return N, K, D
