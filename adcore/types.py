"""The one output contract every adcore model honours, and the base class that declares it.

Imitates anomalib's ``InferenceBatch`` (``pred_score``, ``anomaly_map``) so that metrics, plots and the heatmap viewer
never special-case a paper.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class AnomalyOutput(NamedTuple):
    """What ``AnomalyModel.predict`` returns for a batch of B images.

    Attributes:
        pred_score: (B,) image-level score, higher = more anomalous.
        anomaly_map: (B, h, w) pixel-level score at any resolution; ``evaluate`` upsamples it to the mask size.
        score_terms: (B, K) the raw terms an own image score combines, or None. Only for measuring a paper's own
            protocol that normalises them over the test set (DMAD's ``code_protocol``); never part of a result.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    score_terms: torch.Tensor | None = None


class AnomalyModel(nn.Module):
    """Base class for every registered model.

    ``adcore.fit`` drives training through these hooks; a model only says what one step computes. Images reaching a
    model are float32 (B, 3, S, S) in [0, 1]; a model that wants ImageNet normalisation applies it itself.
    """

    #: Training stages in order; ``()`` for models without gradient training (the kNN baseline).
    stages: tuple[str, ...] = ("main",)
    #: False: the image score is the max of the smoothed map (the project's shared protocol).
    #: True: ``evaluate`` uses ``pred_score``, a score the paper defines itself.
    own_image_score: bool = False

    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        raise NotImplementedError

    def configure_optimizers(self, stage: str, lr: float):
        """Return ``(optimizer, scheduler_or_None)`` for ``stage``; the scheduler is stepped once per epoch."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=lr), None

    def training_step(self, images: torch.Tensor, stage: str) -> dict[str, torch.Tensor]:
        """Return a dict with the scalar ``"loss"`` to backpropagate; other entries are logged."""
        raise NotImplementedError

    def on_fit_start(self, train_loader) -> None:
        pass

    def on_stage_start(self, stage: str, train_loader) -> None:
        pass

    def on_fit_end(self, train_loader) -> None:
        pass
