"""A reference that looks at no pixel: the same centred Gaussian as the anomaly map of every image.

Not a method. It measures how much of a benchmark's pixel metrics its defect *placement* alone explains: on the
embedded ``textures`` the synthetic defects sit near the image centre, so a blind centred blob already reaches a pixel
AUROC near 0.77 (ADViT's old score, a positional template, scored the same). Every method's pixel AUROC and AUPRO
should be read against this floor; its image AUROC is 0.5 by construction, since every image gets the same score.
"""
from __future__ import annotations

import torch

from ..recipes import Recipe
from ..registry import register_model
from ..types import AnomalyModel, AnomalyOutput


@register_model("center_prior")
class CenterPrior(AnomalyModel):
    """A fixed centred Gaussian map, the same for every image.

    Args:
        sigma: the Gaussian's standard deviation as a fraction of the image side.
        grid: side of the map it returns (``evaluate`` upsamples it to the mask size like any model's map).
    """

    stages = ()
    recipes = {
        "default": Recipe(num_epochs=0, lr=1.0, batch_size=32, image_size=128,
                          source="no training: lr and batch size are unused"),
    }

    def __init__(self, sigma: float = 0.25, grid: int = 32):
        super().__init__()
        if not 0 < sigma:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid - 0.5  # pixel centres in [-0.5, 0.5]
        d2 = centres[:, None] ** 2 + centres[None, :] ** 2
        self.register_buffer("template", torch.exp(-d2 / (2 * sigma ** 2)), persistent=False)  # (grid, grid)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        b = images.shape[0]
        amap = self.template.to(images.device).expand(b, -1, -1).clone()
        return AnomalyOutput(pred_score=amap.flatten(1).amax(1), anomaly_map=amap)
