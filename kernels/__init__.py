"""Fused Triton kernels for adcore, each beside an exact plain-PyTorch reference.

* :mod:`kernels.anomaly_attention`: Anomaly Transformer attention with the association discrepancy, forward and
  backward, never writing an N x N matrix (reference: :func:`kernels.reference.anomaly_attention_ref`).
* :mod:`kernels.mdn_nll`: diagonal Gaussian-mixture NLL fused over K and D (reference:
  :func:`kernels.reference.mdn_nll_ref`).
* :mod:`kernels.bench`: benchmark scripts for a CUDA machine, appending to ``kernels/bench/results.csv``.

adcore calls them through :mod:`adcore.ops`, which validates inputs and picks the backend. The kernel modules are
imported lazily (``kernels.anomaly_attention`` etc. on first attribute access) because importing them decorates the
kernels, and ``triton.jit`` reads ``TRITON_INTERPRET`` at that moment.
"""
from __future__ import annotations

import importlib

from ._utils import HAS_TRITON

__all__ = ["HAS_TRITON", "anomaly_attention", "mdn_nll", "reference"]


def __getattr__(name):
    if name in ("anomaly_attention", "mdn_nll", "reference"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
