"""The two fused ops adcore's models call, each with one switch between the Triton kernel and its PyTorch twin.

``backend`` picks the implementation per call:

* ``"torch"``: the plain-PyTorch reference in :mod:`kernels.reference` (any device, any float dtype);
* ``"triton"``: the fused kernels in :mod:`kernels` (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was
  set before the kernels were first imported, which is how CI runs them);
* ``"auto"`` (what models pass): the environment variable ``ADCORE_BACKEND`` (``auto``/``triton``/``torch``) if set,
  otherwise Triton for float16/bfloat16/float32 CUDA tensors and the reference for everything else.

Inputs are validated here, before anything is launched, so both backends fail the same way on bad input.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

from kernels import reference
from kernels._utils import (HAS_TRITON, check_anomaly_attention_inputs, check_fp32_precision, check_mdn_nll_inputs,
                            check_sigma_values, check_triton_device)

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "ADCORE_BACKEND"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``backend`` ("auto", "triton" or "torch") into the one that runs for tensors of this device and dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # float64 stays on the reference: the kernels' float64 path exists for gradcheck under the interpreter.
        on_gpu = torch.device(device).type == "cuda" and dtype != torch.float64
        return "triton" if on_gpu and HAS_TRITON else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("backend='triton' but triton is not installed; use backend='torch'")
    return backend


def _kernel_module(name: str):
    # Imported on first use: importing decorates the kernels, which must happen after TRITON_INTERPRET is settled.
    return importlib.import_module(f"kernels.{name}")


def anomaly_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                      grid_hw: tuple[int, int], eps: float = 1e-4, backend: str = "auto",
                      fp32_precision: str = "tf32"):
    """Anomaly Transformer attention on a patch grid: output plus association discrepancy.

    S = softmax(q k^T / sqrt(d)) per head; P_ij ∝ exp(-d_ij^2 / (2 sigma_i^2)) with d_ij the Euclidean distance of
    tokens i and j on the grid, rows normalised; out = S v; R_i = KL(S_i‖P_i) + KL(P_i‖S_i) with thuml's
    log(· + eps) smoothing.

    Args:
        q, k, v: (B, H, N, d), N = grid_h * grid_w tokens in row-major order.
        sigma: (B, H, N) positive prior widths in grid cells (the model applies its own sigma transform).
        grid_hw: (grid_h, grid_w); (1, N) for a 1-D sequence.
        eps: the KL smoothing constant (Anomaly Transformer's 1e-4).
        backend: "auto", "triton" or "torch" (see the module docstring).
        fp32_precision: float32 dots of the Triton kernel on a GPU (half and float64 inputs ignore it):
            "tf32", the default, runs them on the tensor cores with 10-bit mantissas: about 1e-3 relative error in
            the scores and 2e-3 in outputs and gradients (tests/test_kernels_gpu.py), within the SASS budget.
            "ieee" gives exact float32 dots (1e-4 against float64) but runs them on the CUDA cores: several times
            slower, and its compile uses more registers (sass_report lists its count and spills, outside the
            budget). The torch backend follows torch's own matmul settings
            (``torch.backends.cuda.matmul.allow_tf32``). Models take it as their ``fp32_precision`` parameter.

    Determinism: the Triton backward adds dQ with float32 atomics, whose order varies between runs (last bits).
    Under ``torch.use_deterministic_algorithms(True)`` (:func:`adcore.utils.set_deterministic`) it takes an
    atomic-free second kernel instead, bitwise repeatable on one GPU and stack, at the cost of recomputing every
    score tile once more (the deterministic backward does about 1.5x the atomic one's exp/log work).

    sigma's values (positive, finite) are checked on the host on CPU and for the torch backend. For the Triton
    backend on CUDA a host check would synchronise every call; the kernel instead writes NaN into a bad row and
    sets a device flag, which :func:`check_sigma_flag` reads once per step.

    Returns:
        out (B, H, N, d); dis_series and dis_prior, both (B, H, N) with equal values. dis_series sends gradient only
        into q and k (prior held fixed), dis_prior only into sigma (series held fixed), so one backward of
        ``rec - lam * dis_series.mean() + rec + lam * dis_prior.mean()`` gives the minimax's two passes at once.

    Raises:
        ValueError: wrong ranks or shapes, N != grid_h * grid_w, mismatched devices or dtypes (sigma may be
            float32 beside float16/bfloat16 q), non-positive or non-finite sigma (for the Triton backend on CUDA:
            NaN rows and the flag :func:`check_sigma_flag` reads), an unknown backend or fp32_precision, or a
            Triton backend that cannot run on these tensors.
    """
    # The value check (sigma > 0) reads tensor data, which an ONNX export cannot trace; shapes are still checked.
    # On CUDA the Triton path skips it too (reading sigma back is a host sync on every call); the kernel writes NaN
    # for a row whose sigma is not positive and finite instead.
    grid = check_anomaly_attention_inputs(q, k, v, sigma, grid_hw, eps, check_values=False)
    check_fp32_precision(fp32_precision)
    use_torch = resolve_backend(backend, q.device, q.dtype) == "torch"
    if not torch.compiler.is_exporting() and (use_torch or q.device.type != "cuda"):
        check_sigma_values(sigma)
    if use_torch:
        return reference.anomaly_attention_ref(q, k, v, sigma, grid, eps)
    mod = _kernel_module("anomaly_attention")
    check_triton_device(q, mod.INTERPRET)
    return mod.AnomalyAttentionFunction.apply(q, k, v, sigma, grid, float(eps), fp32_precision)


def check_sigma_flag(device=None) -> None:
    """Raise ValueError if a fused anomaly_attention forward on ``device`` (default: the current CUDA device) met a
    sigma that was not positive and finite since the last check, and clear the flag.

    Reads one int32 from the device: a host sync, so call it once per training step (where the loop already waits
    for the loss) rather than per layer. A no-op where the fused kernels never ran (CPU runs check on the host).
    """
    if "kernels.anomaly_attention" not in sys.modules:
        return
    mod = sys.modules["kernels.anomaly_attention"]
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    flag = mod._FLAGS.get(str(torch.device(device)))
    if flag is not None and bool(flag.item()):
        flag.zero_()
        raise ValueError("anomaly_attention got a sigma that was not positive and finite (its rows came out NaN); "
                         "sigma must be > 0 and finite in grid-cell units")


def mdn_nll(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
            mode: str = "logsumexp", backend: str = "auto") -> torch.Tensor:
    """Negative log-likelihood of each row of x under a diagonal Gaussian mixture.

    Args:
        x: (N, D) embeddings.
        logits: (N, K) per-row or (K,) shared mixture logits.
        mu, log_var: (N, K, D) per-row or (K, D) shared means and log-variances.
        mode: "logsumexp" for -log Σ_k softmax(logits)_k N(x | mu_k, diag exp(log_var_k)); "vtadl" for VT-ADL's
            Σ_k softmax(logits)_k ½ (log 2π + Σ_d [log_var_kd + (x_d - mu_kd)^2 exp(-log_var_kd)]).
        backend: "auto", "triton" or "torch" (see the module docstring).

    Returns:
        (N,) loss per row (float32 for half-precision inputs).

    Raises:
        ValueError: wrong ranks or shapes, mismatched devices or dtypes, an unknown mode or backend, or a Triton
            backend that cannot run on these tensors.
    """
    check_mdn_nll_inputs(x, logits, mu, log_var, mode)
    if resolve_backend(backend, x.device, x.dtype) == "torch":
        return reference.mdn_nll_ref(x, logits, mu, log_var, mode)
    mod = _kernel_module("mdn_nll")
    check_triton_device(x, mod.INTERPRET)
    return mod.MDNNLLFunction.apply(x, logits, mu, log_var, mode)
