"""Plain-PyTorch references for the two fused ops: the semantics every kernel is tested against, and the CPU path.

``anomaly_attention_ref`` follows Anomaly Transformer (Xu et al., ICLR 2022; thuml/Anomaly-Transformer
``model/attn.py`` ``AnomalyAttention.forward`` and ``solver.py`` ``my_kl_loss``), with the 1-D window distance
``|i - j|`` replaced by the Euclidean distance between patch-grid cells (ADViT publishes no 2-D prior; see
/work/shared/reference/methods.md §2). ``mdn_nll_ref`` is the diagonal Gaussian-mixture negative log-likelihood, either
the textbook log-sum-exp or VT-ADL's own weighted sum of per-component NLLs (pankajmishra000/VT-ADL ``mdn1.py``
``log_gmm``).

Both work in any floating dtype (float16/bfloat16 inputs are upcast to float32 for the statistics) and build only the
tensors the formulas need: the attention builds the (B, H, N, N) series and prior once each and a single (N, N)
distance matrix shared by every batch and head.
"""
from __future__ import annotations

import math

import torch

from ._utils import acc_dtype


def grid_sq_dist(grid_hw: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Squared Euclidean distance between the cells of a row-major grid.

    Args:
        grid_hw: (grid_h, grid_w); (1, N) gives Anomaly Transformer's 1-D window, where d_ij^2 = (i - j)^2.
        device, dtype: of the result.

    Returns:
        (N, N) tensor with N = grid_h * grid_w.
    """
    gh, gw = grid_hw
    idx = torch.arange(gh * gw, device=device)
    r = (idx // gw).to(dtype)
    c = (idx % gw).to(dtype)
    return (r[:, None] - r[None, :]).square() + (c[:, None] - c[None, :]).square()  # (N, N)


def prior_association(sigma: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Row-normalised Gaussian prior P_ij ∝ exp(-d_ij^2 / (2 sigma_i^2)).

    Anomaly Transformer scales each row by 1/(sqrt(2π) sigma_i) and then divides by the row sum in the solver; the
    constant cancels, so a softmax over j of -d_ij^2 / (2 sigma_i^2) is the same prior, computed stably.

    Args:
        sigma: (B, H, N) positive widths in grid cells.
        grid_hw: (grid_h, grid_w) with grid_h * grid_w == N.

    Returns:
        (B, H, N, N) prior, each row summing to 1.
    """
    d2 = grid_sq_dist(grid_hw, sigma.device, sigma.dtype)  # (N, N)
    # clamp: a sigma whose square underflows must give a one-hot row, not 0 / 0 on the diagonal.
    inv_2s2 = 0.5 / sigma.square().clamp_min(torch.finfo(sigma.dtype).tiny)  # (B, H, N)
    return torch.softmax(-d2 * inv_2s2[..., None], dim=-1)


def symmetric_kl(s: torch.Tensor, p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """my_kl_loss(s, p) + my_kl_loss(p, s) per row, before Anomaly Transformer's mean over heads.

    Σ_j s (log(s+eps) - log(p+eps)) + Σ_j p (log(p+eps) - log(s+eps)) = Σ_j (s - p)(log(s+eps) - log(p+eps)).

    Args:
        s, p: (..., N) rows of two distributions.
        eps: thuml's 1e-4 smoothing; load-bearing, since sigma down to 1e-5 makes the pure KL unbounded.

    Returns:
        (...,) symmetric KL per row.
    """
    return ((s - p) * (torch.log(s + eps) - torch.log(p + eps))).sum(-1)


def anomaly_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                          grid_hw: tuple[int, int], eps: float = 1e-4):
    """Anomaly attention: attention output and the association discrepancy, with thuml's gradient routing.

    Args:
        q, k, v: (B, H, N, d) with N = grid_h * grid_w patch tokens in row-major order.
        sigma: (B, H, N) prior widths in grid cells (already transformed by the model), positive.
        grid_hw: (grid_h, grid_w); (1, N) for a 1-D sequence.
        eps: smoothing inside the logs of the KL terms.

    Returns:
        out: (B, H, N, d) = softmax(q k^T / sqrt(d)) v, in q's dtype.
        dis_series: (B, H, N) discrepancy R_i = KL(S‖P) + KL(P‖S) with the prior detached: its gradient reaches
            only q and k (the maximise phase of the minimax).
        dis_prior: (B, H, N) the same values with the series detached: its gradient reaches only sigma.
        Both are float32 for half-precision inputs, else q's dtype.
    """
    stat = acc_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(-1, -2)).to(stat) * scale  # (B, H, N, N)
    series = torch.softmax(logits, dim=-1)
    out = torch.matmul(series.to(v.dtype), v)  # (B, H, N, d)
    prior = prior_association(sigma.to(stat), grid_hw)  # (B, H, N, N)
    # solver.py: series_loss uses prior.detach(), prior_loss uses series.detach().
    dis_series = symmetric_kl(series, prior.detach(), eps)
    dis_prior = symmetric_kl(series.detach(), prior, eps)
    return out, dis_series, dis_prior


def mdn_nll_ref(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
                mode: str = "logsumexp") -> torch.Tensor:
    """Negative log-likelihood of x under a diagonal Gaussian mixture.

    Args:
        x: (N, D) embeddings.
        logits: (N, K) or (K,) mixture logits; π = softmax(logits).
        mu: (N, K, D) or (K, D) component means.
        log_var: (N, K, D) or (K, D) component log-variances.
        mode: "logsumexp" for -log Σ_k π_k N(x | mu_k, diag exp(log_var_k)); "vtadl" for VT-ADL's
            Σ_k π_k · ½ (log 2π + Σ_d [log_var_kd + (x_d - mu_kd)^2 exp(-log_var_kd)]), where log 2π is added once,
            not once per dimension (mdn1.py ``log_gaussian``); by Jensen it bounds the true NLL from above, up to
            that constant.

    Returns:
        (N,) per-row loss, float32 for half-precision inputs, else x's dtype.
    """
    if mode not in ("logsumexp", "vtadl"):
        raise ValueError(f"mode must be 'logsumexp' or 'vtadl', got {mode!r}")
    stat = acc_dtype(x.dtype)
    x, logits, mu, log_var = (t.to(stat) for t in (x, logits, mu, log_var))
    D = x.shape[-1]
    # (N, K): Σ_d log_var + (x - mu)^2 / var; the one (N, K, D) temporary chain of the eager path.
    quad = ((x[:, None, :] - mu).square() * torch.exp(-log_var) + log_var).sum(-1)
    log_pi = torch.log_softmax(logits, dim=-1).expand(quad.shape)
    log2pi = math.log(2 * math.pi)
    if mode == "logsumexp":
        return -torch.logsumexp(log_pi - 0.5 * (quad + D * log2pi), dim=-1)
    return (log_pi.exp() * 0.5 * (log2pi + quad)).sum(-1)
