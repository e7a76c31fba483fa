"""The one Vision Transformer core shared by VT-ADL, ADViT and AnoViT, plus the parts their losses need.

What lives here, in reading order:

* :func:`gaussian_window` / :func:`ssim_map` / :func:`ssim`: a small differentiable SSIM (Wang et al. 2004) with the
  11×11 Gaussian window of σ 1.5 and zero padding that VT-ADL's ``pytorch_ssim`` uses.
* :func:`prior_sigma`: Anomaly Transformer's σ transform, rescaled to the patch grid.
* :class:`AnomalyAttention`: multi-head attention whose softmax "series association" is compared with a Gaussian
  "prior association" on the 2-D patch grid through :func:`adcore.ops.anomaly_attention`.
* :class:`Block` and :class:`ViTEncoder`: a pre-norm ViT built from timm's ``PatchEmbed``, ``Attention`` and
  ``Mlp``, with one switch, ``attention="plain" | "anomaly"``.
* :class:`ConvDecoder`: a transposed-convolution decoder from a (B, C, h, w) map to a (B, 3, S, S) image.
* :class:`MDNHead`: VT-ADL's Gaussian mixture density network on patch embeddings, scored through
  :func:`adcore.ops.mdn_nll`.

Fast paths and their slow twins: plain attention is timm's, which uses ``F.scaled_dot_product_attention`` unless
``TIMM_FUSED_ATTN=0`` (or ``block.attn.fused_attn = False``); anomaly attention and the MDN likelihood go through
``adcore.ops`` with ``backend="auto"`` (Triton where it applies) or ``backend="torch"`` (the plain reference).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, PatchEmbed, trunc_normal_
from torch import nn

from kernels._utils import check_fp32_precision


# --------------------------------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------------------------------
def gaussian_window(size: int = 11, sigma: float = 1.5, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """A normalised 1-D Gaussian window (size,); the 2-D window is its outer product with itself."""
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


def _gaussian_blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # The 2-D Gaussian is separable: a column pass then a row pass (22 taps instead of 121), zero padding.
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), padding=(k // 2, 0), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), padding=(0, k // 2), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
             data_range: float = 1.0) -> torch.Tensor:
    """Local SSIM of two (B, C, H, W) batches → (B, C, H, W), differentiable in both.

    Local statistics come from a Gaussian window with zero padding of ``window_size // 2`` (as ``pytorch_ssim``'s
    depthwise conv), with C1 = (0.01 L)², C2 = (0.03 L)² for data range L.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim expects two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    g = gaussian_window(window_size, sigma, device=x.device, dtype=x.dtype)
    mu_x, mu_y = _gaussian_blur(x, g), _gaussian_blur(y, g)
    var_x = _gaussian_blur(x * x, g) - mu_x**2
    var_y = _gaussian_blur(y * y, g) - mu_y**2
    cov = _gaussian_blur(x * y, g) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, *, reduction: str = "mean", **kwargs) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) of two (B, C, H, W) batches; see :func:`ssim_map`.

    Args:
        reduction: ``"mean"`` → scalar (``pytorch_ssim``'s ``size_average=True``); ``"none"`` → (B,) per image.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"ssim reduction must be 'mean' or 'none', got {reduction!r}")
    m = ssim_map(x, y, **kwargs)
    return m.mean() if reduction == "mean" else m.flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------
def prior_sigma(raw: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Anomaly Transformer's σ = 3^(sigmoid(5·raw) + 1e-5) − 1 ∈ (1e-5, 2), times ``scale`` (in patch units).

    thuml/Anomaly-Transformer ``model/attn.py`` applies this to a 1-D window of 100 time steps; :class:`ViTEncoder`
    sets ``scale = max(grid_h, grid_w) / 8`` so that σ reaches the same fraction of the grid as it does on the
    8×8 grid of VT-ADL's 512-px images with 64-px patches (scale 1 there and on any grid of side ≤ 8).
    """
    return scale * (torch.pow(3.0, torch.sigmoid(5.0 * raw) + 1e-5) - 1.0)


class AnomalyAttention(nn.Module):
    """Multi-head self-attention that also returns the association discrepancy of every token.

    Series association S = softmax(q kᵀ / √d) per head; prior association P_i = a Gaussian of the Euclidean
    patch-grid distance to token i with a learned, data-dependent width σ_i per head (a linear projection of the
    token, as Anomaly Transformer's ``sigma_projection``), row-normalised. ``adcore.ops.anomaly_attention`` returns
    the attention output and R_i = KL(S_i‖P_i) + KL(P_i‖S_i) twice: ``dis_series`` sends gradients only into q and
    k (P treated as constant), ``dis_prior`` only into σ (S treated as constant), which is what the minimax needs.
    """

    def __init__(self, dim: int, num_heads: int, grid_hw: tuple[int, int], *, sigma_scale: float = 1.0,
                 backend: str = "auto", fp32_precision: str = "tf32"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_fp32_precision(fp32_precision)
        self.num_heads = num_heads
        self.grid_hw = tuple(grid_hw)
        self.sigma_scale = sigma_scale
        self.backend = backend
        self.fp32_precision = fp32_precision
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # bias-free like VT-ADL's lucidrains-style attention
        self.sigma_proj = nn.Linear(dim, num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor):
        """x (B, N, D) → (out (B, N, D), (dis_series, dis_prior) each (B, nh, N))."""
        from adcore import ops

        b, n, d = x.shape
        if n != self.grid_hw[0] * self.grid_hw[1]:
            raise ValueError(f"anomaly attention needs one token per grid cell: got {n} tokens for grid "
                             f"{self.grid_hw}")
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # σ always in float32: under autocast a bfloat16 sigmoid rounds 3^(...) - 1 to 0 for raw values below about
        # -1.1 (a NaN prior), and on CUDA pow would come out float32 beside half q anyway. The op takes it so.
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                sigma = prior_sigma(self.sigma_proj(x.float()), self.sigma_scale)
        else:
            sigma = prior_sigma(self.sigma_proj(x).float(), self.sigma_scale)
        sigma = sigma.transpose(1, 2)  # (B, nh, N) float32
        out, dis_series, dis_prior = ops.anomaly_attention(q, k, v, sigma, self.grid_hw, backend=self.backend,
                                                           fp32_precision=self.fp32_precision)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), (dis_series, dis_prior)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (GELU), no dropout."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, *, attention: str = "plain",
                 grid_hw: tuple[int, int] | None = None, sigma_scale: float = 1.0, backend: str = "auto",
                 fp32_precision: str = "tf32"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention == "plain":
            self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False)
        elif attention == "anomaly":
            self.attn = AnomalyAttention(dim, num_heads, grid_hw, sigma_scale=sigma_scale, backend=backend,
                                         fp32_precision=fp32_precision)
        else:
            raise ValueError(f"attention must be 'plain' or 'anomaly', got {attention!r}")
        self.attention = attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor):
        """x (B, N, D) → (x (B, N, D), association: None or (dis_series, dis_prior))."""
        assoc = None
        if self.attention == "plain":
            x = x + self.attn(self.norm1(x))
        else:
            a, assoc = self.attn(self.norm1(x))
            x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, assoc


class ViTEncoder(nn.Module):
    """Patch embedding + learned position embedding + ``depth`` blocks, trained from scratch.

    Args:
        image_size: side S of the square input.
        patch_size: side P of a patch; S must be a multiple of P, giving a (S/P)×(S/P) grid of N tokens.
        embed_dim, depth, num_heads, mlp_ratio: width D, number of blocks, heads, MLP hidden = D·mlp_ratio.
        attention: ``"plain"`` (softmax attention) or ``"anomaly"`` (:class:`AnomalyAttention` in every block).
        class_token: prepend a learned token (VT-ADL does, then drops it); not allowed with anomaly attention,
            whose grid prior has no place for it.
        final_norm: a LayerNorm on the output tokens (VT-ADL has none).
        backend: ``adcore.ops`` backend for anomaly attention.
        fp32_precision: float32 dots of the fused anomaly attention on a GPU, ``"tf32"`` or ``"ieee"`` (see
            :func:`adcore.ops.anomaly_attention`).
    """

    def __init__(self, image_size: int = 64, patch_size: int = 8, embed_dim: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 2.0, *, attention: str = "plain", class_token: bool = False,
                 final_norm: bool = False, backend: str = "auto", fp32_precision: str = "tf32"):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("embed_dim", embed_dim),
                            ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if attention == "anomaly" and class_token:
            raise ValueError("anomaly attention has no grid position for a class token; use class_token=False")
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, embed_dim)
        self.grid_hw = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_hw[0] * self.grid_hw[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + int(class_token), embed_dim))
        sigma_scale = max(1.0, max(self.grid_hw) / 8)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attention=attention, grid_hw=self.grid_hw,
                                          sigma_scale=sigma_scale, backend=backend, fp32_precision=fp32_precision)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim) if final_norm else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor):
        """images (B, 3, S, S) → (patch tokens (B, N, D) without the class token, list of per-block associations)."""
        x = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        assocs = []
        for block in self.blocks:
            x, assoc = block(x)
            if assoc is not None:
                assocs.append(assoc)
        x = self.norm(x)
        if self.cls_token is not None:
            x = x[:, 1:]
        return x, assocs


def _init_weights(m: nn.Module) -> None:
    # timm's ViT init (truncated normal 0.02, zero bias). VT-ADL's code uses Kaiming-normal on every Linear/Conv
    # (``VT_AE.initialize_weights``); this is a stated difference, not a fix.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------------------------
class ConvDecoder(nn.Module):
    """(B, C, h, h) feature map → (B, 3, S, S) image in [0, 1].

    One ConvTranspose2d(k4, s2, p1) + BatchNorm + ReLU per doubling of the side (S/h must be a power of two),
    with ``width`` channels halved at each doubling (never below 16), then a 3×3 conv to RGB and a sigmoid.
    VT-ADL's ``decoder2`` (six odd-sized transposed convs hard-wired to 512 px, ending in tanh) only fits 512-px
    inputs; this is the same idea for any size, and a sigmoid because targets lie in [0, 1].
    """

    def __init__(self, in_channels: int, in_size: int, out_size: int, width: int = 128):
        super().__init__()
        ratio = out_size // in_size
        if out_size % in_size or ratio & (ratio - 1):
            raise ValueError(f"decoder output size {out_size} must be a power-of-two multiple of its input size "
                             f"{in_size}")
        layers, c = [], in_channels
        for i in range(int(math.log2(ratio))):
            c_out = max(width // 2**i, 16)
            layers += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c = c_out
        layers += [nn.Conv2d(c, 3, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self.in_channels, self.in_size = in_channels, in_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


# --------------------------------------------------------------------------------------------------------------------
# Mixture density network
# --------------------------------------------------------------------------------------------------------------------
class MDNHead(nn.Module):
    """VT-ADL's mixture density network (``mdn1.MDN``) on D-dimensional patch embeddings.

    ``conditional=True`` (the code): for an embedding x, h = clamp(x, min=eps); π-logits = W_π h; μ = W_μ h;
    log σ² = softplus(W_s h), all bias-free linear maps, so every variance is ≥ 1 (the code's choice). The mixture
    models the same vector it is conditioned on (target = input x). μ and log σ² are laid out (…, K, D) with D
    contiguous (the code's view is (…, D, K)); the weights are learned, so only the layout differs.

    ``conditional=False`` (the paper's description, a mixture over patch embeddings): one mixture shared by all
    patches, π-logits (K,), μ (K, D) and log σ² = softplus(·) (K, D) learned as free parameters — a density of patch
    embeddings that does not depend on the embedding being scored.

    K = ``num_components`` (paper 150, code 10).
    """

    def __init__(self, dim: int, num_components: int = 10, conditional: bool = True):
        super().__init__()
        if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}")
        self.dim, self.num_components, self.conditional = dim, num_components, conditional
        if conditional:
            self.pi = nn.Linear(dim, num_components, bias=False)
            self.mu = nn.Linear(dim, num_components * dim, bias=False)
            self.log_var = nn.Linear(dim, num_components * dim, bias=False)
        else:
            self.pi = nn.Parameter(torch.zeros(num_components))
            self.mu = nn.Parameter(torch.randn(num_components, dim) * 0.1)
            self.log_var = nn.Parameter(torch.zeros(num_components, dim))

    def forward(self, x: torch.Tensor):
        """x (..., D) → logits (..., K), mu (..., K, D), log_var (..., K, D); shared (K,), (K, D) if unconditional."""
        if not self.conditional:
            return self.pi, self.mu, F.softplus(self.log_var)
        h = x.clamp(min=float(np.finfo(float).eps))
        shape = (*x.shape[:-1], self.num_components, self.dim)
        return self.pi(h), self.mu(h).view(shape), F.softplus(self.log_var(h)).view(shape)

    def nll(self, x: torch.Tensor, *, mode: str = "vtadl", backend: str = "auto") -> torch.Tensor:
        """Negative log-likelihood of each embedding under its mixture: x (..., D) → (...).

        ``mode="vtadl"`` is the code's Σ_k π_k·NLL_k (a weighted sum of per-component NLLs, with log 2π counted
        once); ``mode="logsumexp"`` is the true −log Σ_k π_k N(x; μ_k, σ_k²).
        """
        from adcore import ops

        logits, mu, log_var = self(x)
        k, d = self.num_components, self.dim
        if self.conditional:
            logits, mu, log_var = logits.reshape(-1, k), mu.reshape(-1, k, d), log_var.reshape(-1, k, d)
        # Under autocast the head's Linear outputs are half while x (a residual sum) is float32: one dtype for the op.
        logits, mu, log_var = (t.to(x.dtype) for t in (logits, mu, log_var))
        out = ops.mdn_nll(x.reshape(-1, d), logits, mu, log_var, mode=mode, backend=backend)
        return out.view(x.shape[:-1])


def check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Raise a clear ValueError unless ``images`` is (B, 3, S, S) with S = ``model.image_size``."""
    s = model.image_size
    if images.ndim != 4 or images.shape[1:] != (3, s, s):
        raise ValueError(f"{type(model).__name__} expects images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Capsule squashing (Sabour et al. 2017): v = |s|²/(1+|s|²) · s/|s|."""
    n2 = (s * s).sum(dim, keepdim=True)
    return n2 / (1 + n2) * s / torch.sqrt(n2 + 1e-8)
