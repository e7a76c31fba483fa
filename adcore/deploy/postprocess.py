"""The project's post-processing as a torch module, so that ``predict`` and the exported ONNX graph share it.

``adcore.evaluation._postprocess`` does it with SciPy: the raw map (B, h, w) is upsampled bilinearly
(``align_corners=False``) to the image side S, smoothed with ``scipy.ndimage.gaussian_filter(σ=4)`` (mode
``'reflect'``, i.e. half-sample symmetric ``d c b a | a b c d | d c b a``, truncate 4.0, so radius 16), and the
image score is the max of the smoothed map unless the model defines its own (``own_image_score``).

Here the Gaussian is one (S, S) matrix per axis, ``smoothed = A_h @ map @ A_wᵀ``: row i of A holds SciPy's 33 kernel
weights, each added at the column its reflected index lands on. That reproduces ``mode='reflect'`` exactly for any
map size, including maps smaller than the radius (where the reflection wraps more than once), and it exports to
ONNX as two MatMuls. ``tests/test_deploy.py`` checks it against SciPy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(n, n) float64 matrix A with ``A @ x == scipy.ndimage.gaussian_filter1d(x, sigma, mode='reflect')``."""
    radius = int(truncate * float(sigma) + 0.5)  # SciPy's own rounding
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / float(sigma) ** 2 * offsets.astype(np.float64) ** 2)
    weights /= weights.sum()
    a = np.zeros((n, n))
    for i in range(n):
        j = (i + offsets) % (2 * n)  # the reflected signal repeats with period 2n
        j = np.where(j >= n, 2 * n - 1 - j, j)
        np.add.at(a[i], j, weights)
    return a


class Postprocess(nn.Module):
    """Raw anomaly map (B, h, w) → smoothed map (B, H, W) at the input resolution, as ``evaluate`` computes it.

    Args:
        size: (H, W) of the output map: the model's input side, ``(S, S)``.
        sigma: the Gaussian's σ in output pixels (the project's 4); 0 turns smoothing off.
    """

    def __init__(self, size: tuple[int, int], sigma: float = 4.0):
        super().__init__()
        self.size, self.sigma = (int(size[0]), int(size[1])), float(sigma)
        if sigma > 0:
            rows, cols = (torch.from_numpy(gaussian_matrix(n, sigma)).float() for n in self.size)
            self.register_buffer("rows", rows, persistent=False)     # (H, H)
            self.register_buffer("cols_t", cols.T.contiguous(), persistent=False)  # (W, W), transposed once

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        amap = anomaly_map.float()
        if tuple(amap.shape[-2:]) != self.size:
            amap = F.interpolate(amap[:, None], size=self.size, mode="bilinear", align_corners=False)[:, 0]
        if self.sigma > 0:
            amap = self.rows @ amap @ self.cols_t  # (H, H) @ (B, H, W) @ (W, W)
        return amap


class ScoringGraph(nn.Module):
    """Images (B, 3, S, S) float in [0, 1] → (image score (B,), anomaly map (B, S, S)), the shared protocol end to end.

    The torch path of ``python -m adcore predict`` runs this module and ``python -m adcore export`` exports it, so
    both compute the same thing. The score is the max of the smoothed map, or the model's ``pred_score`` when it
    declares ``own_image_score`` (as ``evaluate`` does).
    """

    def __init__(self, model: nn.Module, image_size: int, sigma: float = 4.0):
        super().__init__()
        self.model = model
        self.postprocess = Postprocess((image_size, image_size), sigma)
        self.own_image_score = bool(getattr(model, "own_image_score", False))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.predict(images)
        amap = self.postprocess(out.anomaly_map)
        score = out.pred_score.float() if self.own_image_score else amap.flatten(1).amax(1)
        return score, amap
