"""DMAD (PPDM variant): diversity-measurable anomaly detection on reverse distillation.

Liu, Chang, Ma, Shan, Chen, "Diversity-Measurable Anomaly Detection", CVPR 2023, pp. 12147–12156, arXiv 2303.05047;
code FlappyPeggy/DMAD (``DMAD-PPDM/resnet.py``, ``Train_mvtec.py``, ``test.py``).

Idea: a reconstruction model that generalises too well reconstructs anomalies too; one that is too strict
misreconstructs normal diversity. DMAD splits the two: a *pyramid deformation module* (PDM) first warps the input
with smooth, bounded offset fields (normal diversity is explained as deformation), and an *information-compression
module* (ICM: vector quantisation of the deepest features) limits what the reconstruction can carry. Anomalies then
show up either as reconstruction error or as large deformation.

    x' = warp(warp(x, g1), g2),   g_i = identity + O_i  (O1 coarse, ≤ 8/256 of the side; O2 fine, ≤ 3/256)
    L = L_RD(E(x'), D(OCBE(E(x'), VQ(E_3(x'))))) + mean‖O1‖ + mean‖O2‖ + Σ smooth(O·) + γ·MSE(warpᵀ(x̃'), x̃) + L_vq
    map(x) = warpᵀ(Σ_l up(1 − cos(E_l, D_l)))          (back through the inverse fields O2ᵀ, O1ᵀ)
    deformation(x) = warp(‖O2ᵀ‖, g1ᵀ) + ‖O1ᵀ‖

where x̃ is the ImageNet-normalised image.

Faithfulness notes:
- Two models, as the repository trains them (``Train_mvtec.py`` saves ``_I.pth`` and ``_P.pth``): ``mode="sp"``, the
  image-level model, vector-quantises level 3 and squeezes each level to 64 channels before RD4AD's bottleneck
  (64 + 64 + 64 + 1024 = 1216 input channels); ``mode="px"``, the pixel-level model, has no VQ and RD4AD's own OCBE
  over 3 × 1024 channels. Both share the deformation module, the decoder and the losses. The paper's image AUROC
  belongs to the sp model, its pixel AUROC to the px model. The CPU default trains the sp model only and reads both
  results from it. ``vq=False`` (the ablation without the ICM) drops the 64-channel squeeze with the VQ, as the
  repository's ``BN_layer(vq=False)`` does: the sp model without VQ *is* the px model.
- The deformation network as ``resnet.py``'s ``OffsetNet``: it sees ImageNet-normalised images (the repository's data
  transform normalises before it), and its residual block is ``x + conv1×1(ReLU(BN(conv3×3(ReLU(x)))))`` followed by
  a BatchNorm, concatenated before the trunk's output. The shortcut itself is the identity; the 1×1 convolution and
  the BatchNorm are on the residual path. The smoothness loss is ``Smooth_Loss``: the 3×3 kernel over *both*
  channels of a field at once (one output channel, the two filtered channels summed before |·|), zero-padded to the
  field's size.
- Cycle loss. Because the OffsetNet receives ImageNet-normalised images, γ·MSE is measured in normalised units
  (1/std² ≈ 20× larger than on [0, 1] images); it is computed on normalised images here too. Warping commutes with
  the per-channel normalisation (bilinear weights sum to one), so the [0, 1] images can be warped and fed to the
  teacher, which normalises them itself.
- Image score. The repository returns max(AUROC with, AUROC without the deformation term) on the *test set*, with
  per-class weights (0.2 for screw/carpet/metal_nut, else 0.05) and min-max normalisation over the test set. Here
  one weight is fixed a priori, ``deformation_weight = 0.05`` (the repository's default class), and both terms are
  min-max normalised with statistics of the *training* images, gathered after training (``on_fit_end``, stored as
  buffers); nothing looks at test data. Both terms are the max of the map after the shared Gaussian (σ = 4 px).
  ``predict`` also returns the two raw terms (``score_terms``), so that :meth:`DMAD.code_protocol` can measure the
  repository's own protocol on the test set (for the shortcuts chapter, never as our result).
- Pixel map. The repository's pixel score is the same sum per pixel, min-max normalised over all test pixels, again
  the better of with and without. ``deformation_in_map=True`` offers it, with per-pixel min-max statistics of the
  training images; the default (False) keeps the reconstruction map alone, the shared protocol's map.
- Widths (``offset_width`` 16 instead of 64, EfficientNet-Lite0 levels) are reduced for a CPU budget; offsets are
  bounded as fractions of the image side, so they mean the same at any resolution.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adcore.backbones import IMAGENET_MEAN, IMAGENET_STD
from adcore.metrics import image_auroc
from adcore.models.rd import ReverseDistillation, anomaly_map, rd_loss
from adcore.recipes import Recipe
from adcore.registry import register_model
from adcore.types import AnomalyOutput

__all__ = ["DMAD", "OffsetNet", "VectorQuantizer", "code_protocol_auroc", "cycle_loss", "gaussian_blur"]

# resnet.py / Train_mvtec.py: the classes whose deformation term gets weight 0.2 in test.py (``ifgeom``); 0.05 else.
CODE_GEOMETRIC_CLASSES = ("screw", "carpet", "metal_nut")


def add_coords(x: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """CoordConv input: append global x, y in [−1, 1] and x, y relative to a ``cell``-pixel grid (4 channels)."""
    b, _, h, w = x.shape
    yy = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)[:, None].expand(h, w)
    xx = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)[None, :].expand(h, w)
    ry = (torch.arange(h, device=x.device, dtype=x.dtype) % cell / (cell - 1) * 2 - 1)[:, None].expand(h, w)
    rx = (torch.arange(w, device=x.device, dtype=x.dtype) % cell / (cell - 1) * 2 - 1)[None, :].expand(h, w)
    return torch.cat([x, torch.stack([xx, yy, rx, ry]).expand(b, 4, h, w)], dim=1)


class CoordConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin + 4, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(add_coords(x))))


def _offset_head(cin: int, width: int, num_down: int) -> nn.Sequential:
    """``num_down`` stride-2 conv-BN-ReLU, then a 3×3 conv to 2 channels (dx, dy) and tanh: a field at S/2^num_down."""
    layers = []
    for _ in range(num_down):
        layers += [nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        cin = width
    layers += [nn.Conv2d(cin, 2, 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """``resnet.py``'s OffsetNet ResBlock with ``bn=True``: x + conv1×1(ReLU(BN(conv3×3(ReLU(x))))), biased convs."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class OffsetNet(nn.Module):
    """DMAD's ψ: forward offsets O1 (coarse, S/8) and O2 (fine, S/2) and their inverses O1ᵀ, O2ᵀ.

    Input: ImageNet-normalised images, as the repository's. Trunk: two CoordConv-BN-ReLU, then a residual block and a
    BatchNorm, whose output is concatenated before the trunk's (2·width channels); four heads of the same shape
    give the fields. Each field is tanh-bounded, scaled to at most
    ``max_offset`` of the image side (in grid_sample's [−1, 1] units that is 2·max_offset) and upsampled to S.
    ``stride=2`` runs the trunk on the image average-pooled ×2 (4× cheaper; DMAD: 1); the fields keep their
    resolutions (S/8 and S/2).
    """

    def __init__(self, width: int = 16, max_offset_coarse: float = 8 / 256, max_offset_fine: float = 3 / 256,
                 stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"offset stride must be 1 or 2, got {stride!r}")
        self.stride = stride
        self.trunk = nn.Sequential(CoordConvBNReLU(3, width), CoordConvBNReLU(width, width))
        self.res = nn.Sequential(ResBlock(width), nn.BatchNorm2d(width))
        down = stride // 2  # the trunk already sits at S/stride
        self.coarse, self.coarse_inv = (_offset_head(2 * width, width, 3 - down) for _ in range(2))
        self.fine, self.fine_inv = (_offset_head(2 * width, width, 1 - down) for _ in range(2))
        self.scales = (2 * max_offset_coarse, 2 * max_offset_fine)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) normalised images → dict of four (B, 2, S, S) offset fields in grid units: o1, o2, o1_inv,
        o2_inv."""
        t = self.trunk(F.avg_pool2d(x, self.stride) if self.stride > 1 else x)
        feat = torch.cat([self.res(t), t], dim=1)
        size = x.shape[-2:]
        up = lambda o, s: F.interpolate(o * s, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        c, f = self.scales
        return {"o1": up(self.coarse(feat), c), "o2": up(self.fine(feat), f),
                "o1_inv": up(self.coarse_inv(feat), c), "o2_inv": up(self.fine_inv(feat), f)}


def warp(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` (B, C, S, S) at identity + ``offset`` (B, 2, S, S; grid units, (dx, dy)), clamped to the image."""
    b, _, h, w = offset.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(b, 2, 3)
    identity = F.affine_grid(theta, (b, 1, h, w), align_corners=True)  # (B, S, S, 2) with (x, y) last
    grid = (identity + offset.permute(0, 2, 3, 1)).clamp(-1, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def field_norm(offset: torch.Tensor) -> torch.Tensor:
    """(B, 2, S, S) → (B, S, S) Euclidean length; ``Tensor.norm(dim=1)`` is ~50× slower here on CPU."""
    return (offset.square().sum(1) + 1e-12).sqrt()


def smoothness(offset: torch.Tensor) -> torch.Tensor:
    """DMAD's Smooth_Loss on a (B, 2, S, S) field: mean |Σ_c pad₀(offset_c) ∗ k| with the 3×3 kernel k = centre 1,
    the eight neighbours −1/8, one kernel over both channels (summed before |·|) and zero padding of 1, so the
    border pulls the field towards zero as well."""
    k = torch.full((3, 3), -1 / 8, device=offset.device, dtype=offset.dtype)
    k[1, 1] = 1
    return F.conv2d(F.pad(offset, (1, 1, 1, 1)), k.expand(1, offset.shape[1], 3, 3)).abs().mean()


def cycle_loss(back: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """MSE between two (B, 3, S, S) images in [0, 1], measured after ImageNet normalisation, as DMAD's OffsetNet
    sees them: mean(((back − x) / std_c)²). The mean cancels in the difference."""
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return ((back - images) / std).square().mean()


class VectorQuantizer(nn.Module):
    """VQ-VAE quantiser (van den Oord et al. 2017) as DMAD's ICM: nearest of K codes, straight-through gradient.

    Codebook initialised U(−1/K, 1/K); loss ``β·MSE(z, sg(q)) + MSE(sg(z), q)`` with β = 0.25.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1 / num_codes, 1 / num_codes)
        self.beta = beta

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) → (quantised (B, D, h, w) with straight-through gradient, scalar loss)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        idx = torch.cdist(flat, self.codebook.weight).argmin(dim=1)
        q = self.codebook(idx).view(b, h, w, d).permute(0, 3, 1, 2)
        loss = self.beta * F.mse_loss(z, q.detach()) + F.mse_loss(q, z.detach())
        return z + (q - z).detach(), loss


def code_protocol_auroc(labels, terms, weight: float) -> dict[str, float]:
    """DMAD's ``test.py: evaluation`` (mode "sp") on one test set: both terms min-max normalised over *the test set*,
    combined as map + weight · deformation, and the better of that AUROC and the map's alone.

    Args:
        labels: (N,) 0 good, 1 anomalous.
        terms: (N, 2) raw per-image maxima of the smoothed map and deformation map (``DMAD.predict``'s score_terms).
        weight: the deformation weight (the repository's: :func:`code_weight`).

    Returns ``{"combined": AUROC(map' + w·deformation'), "map": AUROC(map), "reported": the max of the two}``;
    the repository rounds each to 3 decimals before the max, which is left out so the gain is not a rounding effect.
    """
    terms = np.asarray(terms, dtype=np.float64)
    norm = (terms - terms.min(0)) / (terms.max(0) - terms.min(0) + 1e-8)  # test.py's minmax, its 1e-8 too
    combined = image_auroc(labels, norm[:, 0] + weight * norm[:, 1])
    alone = image_auroc(labels, terms[:, 0])
    return {"combined": combined, "map": alone, "reported": max(combined, alone)}


def code_weight(category: str) -> float:
    """The repository's per-class deformation weight: 0.2 for screw, carpet and metal_nut, 0.05 for every other."""
    return 0.2 if category in CODE_GEOMETRIC_CLASSES else 0.05


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) → (B, H, W) separable Gaussian blur, truncated at 4σ with edge replication (≈ scipy's filter)."""
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


_SOURCE = "DMAD-PPDM (FlappyPeggy/DMAD) Train_mvtec.py and resnet.py"


@register_model("dmad")
class DMAD(ReverseDistillation):
    """DMAD-PPDM: pre-deformation + (in the image model) vector-quantised reverse distillation.

    Args:
        mode: ``"sp"``, the repository's image-level model (VQ on level 3, every level squeezed to ``ocbe_width``
            before the bottleneck), or ``"px"``, its pixel-level model (no VQ, RD4AD's OCBE).
        deform: use the pyramid deformation module (False: the ablation without it).
        vq: vector quantisation on the deepest level; None: the mode's (sp: on, px: off); False in sp mode is the
            ablation without it, which (as in the repository) also drops the ``ocbe_width`` squeeze: the px model.
        num_codes: VQ codebook size K (DMAD: 200).
        offset_width: channels of the offset network (DMAD: 64).
        offset_stride: 2 runs the offset network's trunk at half resolution (DMAD: 1).
        max_offset_coarse: bound of O1 as a fraction of the image side (DMAD: 8 px at 256).
        max_offset_fine: bound of O2 (DMAD: 3 px at 256).
        cycle_weight: γ of the cycle loss, on ImageNet-normalised images (DMAD: 1).
        deformation_weight: the one fixed weight of the deformation term in the image score (DMAD's default 0.05).
        deformation_in_map: add the deformation term to the pixel map too, with the same weight (DMAD's pixel
            score); False: the reconstruction map alone.
        score_sigma: Gaussian σ (pixels at image resolution) before the max in the image score (the shared 4).
        cosine_epochs: cosine-anneal the lr over a period of this many epochs: an int is epochs, set explicitly;
            a float in (0, 1] is a fraction of the training's ``num_epochs`` (``fit`` sets ``planned_epochs``), so
            the period follows an epoch override: the paper recipe's 1.0 is DMAD's T_max = 400 of 400 epochs, and
            50 epochs anneal over 50. None keeps the lr constant.
        ocbe_width: the VQ model's per-level squeeze width (DMAD: 64); without VQ the OCBE is RD4AD's and ignores it.
        **rd_params: the reverse-distillation core's parameters (:class:`ReverseDistillation`).
    """

    own_image_score = True
    recipes = {
        "default": Recipe(
            num_epochs=8, lr=0.005, batch_size=8, image_size=128,
            model_params=dict(mode="sp", backbone="efficientnet_lite0", num_codes=200, offset_width=16,
                              offset_stride=2, ocbe_width=64, bottleneck_dim=None, ocbe_blocks=1, ocbe_ratio=0.25,
                              decoder_blocks=(1, 1, 1), decoder_ratio=1.0, deformation_weight=0.05,
                              deformation_in_map=False, cosine_epochs=None),
            source="CPU default: narrowed widths and EfficientNet-Lite0 at 128 px for a 2-core budget; lr and batch "
                   "are the code's. Epochs: at most 8, the CPU budget (the notebook's main run and two ablations over "
                   "three categories in the book's ~8 minutes on 2 cores), and 8 is the best of 2/4/6/8 on the "
                   "synthetic-anomaly validation curve of held-out training images "
                   "(adcore/validation_curves/dmad.json); no test data."),
        "paper": Recipe(
            num_epochs=400, lr=0.005, batch_size=8, image_size=256,
            model_params=dict(backbone="wide_resnet50_2", num_codes=200, offset_width=64, offset_stride=1,
                              ocbe_width=64, bottleneck_dim=2048, ocbe_blocks=3, ocbe_ratio=0.5,
                              decoder_blocks=(3, 4, 6), decoder_ratio=0.5, deformation_weight=0.05,
                              deformation_in_map=False, cosine_epochs=1.0),
            source=f"{_SOURCE}: 400 epochs, AdamW lr 0.005 betas (0.5, 0.999), CosineAnnealingLR(T_max=400) (here "
                   "cosine_epochs=1.0, the whole training, so that the period follows an epoch override), "
                   "batch 8, 256 px, WideResNet-50-2, RD4AD's full-width student. Two models (mode='sp' for the "
                   "image results, 'px' for the pixel results) train with these same settings; paper.yaml says "
                   "mode: both."),
    }

    def __init__(self, mode: str = "sp", deform: bool = True, vq: bool | None = None, num_codes: int = 200,
                 offset_width: int = 16, offset_stride: int = 2, max_offset_coarse: float = 8 / 256,
                 max_offset_fine: float = 3 / 256, cycle_weight: float = 1.0, deformation_weight: float = 0.05,
                 deformation_in_map: bool = False, score_sigma: float = 4.0, cosine_epochs: int | None = None,
                 ocbe_width: int = 64, **rd_params):
        if mode not in ("sp", "px"):
            raise ValueError(f"mode must be 'sp' (the image-level model) or 'px' (the pixel-level model), got {mode!r}")
        for name, value in [("num_codes", num_codes), ("offset_width", offset_width)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in [("max_offset_coarse", max_offset_coarse), ("max_offset_fine", max_offset_fine)]:
            if not 0 < value < 1:
                raise ValueError(f"{name} is a fraction of the image side and must be in (0, 1), got {value!r}")
        epochs_ok = isinstance(cosine_epochs, int) and not isinstance(cosine_epochs, bool) and cosine_epochs >= 1
        fraction_ok = isinstance(cosine_epochs, float) and 0 < cosine_epochs <= 1
        if cosine_epochs is not None and not (epochs_ok or fraction_ok):
            raise ValueError(f"cosine_epochs must be None, a positive int (epochs) or a float in (0, 1] (a fraction "
                             f"of num_epochs), got {cosine_epochs!r}")
        vq = (mode == "sp") if vq is None else bool(vq)
        if mode == "px" and vq:
            raise ValueError("mode='px' is DMAD's pixel-level model, which has no VQ; use mode='sp' for VQ")
        super().__init__(ocbe_width=ocbe_width if vq else None, extra_level3=vq, **rd_params)
        c3 = self.channels[-1]
        self.mode, self.deform, self.use_vq = mode, bool(deform), vq
        self.offsets = OffsetNet(offset_width, max_offset_coarse, max_offset_fine, offset_stride) if deform else None
        self.quantizer = VectorQuantizer(num_codes, c3) if vq else None
        self.cycle_weight, self.deformation_weight = cycle_weight, deformation_weight
        self.deformation_in_map = bool(deformation_in_map)
        self.score_sigma, self.cosine_epochs = score_sigma, cosine_epochs
        # Min and max of (map, deformation) over the training images, set by on_fit_end: of the per-image maxima of
        # the smoothed maps (image score), and of all their pixels (pixel map).
        self.register_buffer("score_min", torch.zeros(2))
        self.register_buffer("score_max", torch.ones(2))
        self.register_buffer("pixel_min", torch.zeros(2))
        self.register_buffer("pixel_max", torch.ones(2))

    def configure_optimizers(self, stage: str, lr: float):
        params = self.student_parameters() + ([] if self.quantizer is None else list(self.quantizer.parameters()))
        params += [] if self.offsets is None else list(self.offsets.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.5, 0.999))
        period = self.cosine_period(stage)
        scheduler = None if period is None else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=period)
        return optimizer, scheduler

    def cosine_period(self, stage: str = "main") -> int | None:
        """T_max in epochs: ``cosine_epochs`` if an int, else that fraction of the stage's planned epochs."""
        if self.cosine_epochs is None or isinstance(self.cosine_epochs, int):
            return self.cosine_epochs
        planned = getattr(self, "planned_epochs", None)
        if not planned:
            raise ValueError(f"cosine_epochs={self.cosine_epochs} is a fraction of num_epochs, which only adcore.fit "
                             "knows (it sets model.planned_epochs); pass an int to train otherwise")
        return max(1, round(self.cosine_epochs * planned[stage]))

    def decided(self) -> dict:
        """What training resolved: the cosine period in epochs (None: constant lr)."""
        return {"cosine_epochs": self.cosine_period() if getattr(self, "planned_epochs", None) else None}

    def _forward(self, images: torch.Tensor) -> dict:
        """Deform, encode, quantise, reconstruct; everything the loss and the scores need."""
        out = {"x": images}
        if self.offsets is not None:
            mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            out.update(self.offsets((images - mean) / std))
            images = warp(warp(images, out["o1"]), out["o2"])
        out["x_def"] = images
        teacher = self.encode(images)
        extra = None
        if self.quantizer is not None:
            extra, out["vq_loss"] = self.quantizer(teacher[-1])
        out["teacher"], out["student"] = teacher, self.student(teacher, extra)
        return out

    def training_step(self, images: torch.Tensor, stage: str) -> dict[str, torch.Tensor]:
        out = self._forward(images)
        logs = {"rec": rd_loss(out["teacher"], out["student"])}
        if self.offsets is not None:
            fields = [out[k] for k in ("o1", "o2", "o1_inv", "o2_inv")]
            logs["magnitude"] = field_norm(out["o1"]).mean() + field_norm(out["o2"]).mean()
            logs["smooth"] = sum(smoothness(o) for o in fields)
            back = warp(warp(out["x_def"], out["o2_inv"]), out["o1_inv"])
            logs["cycle"] = self.cycle_weight * cycle_loss(back, images)
        if self.quantizer is not None:
            logs["vq"] = out["vq_loss"]
        logs["loss"] = sum(logs.values())
        return logs

    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly map warped back to the input's coordinates, deformation map), both (B, S, S)."""
        out = self._forward(images)
        amap = anomaly_map(out["teacher"], out["student"], images.shape[-2:])
        if self.offsets is None:
            return amap, torch.zeros_like(amap)
        amap = warp(warp(amap[:, None], out["o2_inv"]), out["o1_inv"])[:, 0]
        deformation = warp(field_norm(out["o2_inv"])[:, None], out["o1_inv"])[:, 0] + field_norm(out["o1_inv"])
        return amap, deformation

    def _smoothed(self, amap: torch.Tensor, deformation: torch.Tensor) -> list[torch.Tensor]:
        return [gaussian_blur(amap, self.score_sigma), gaussian_blur(deformation, self.score_sigma)]

    def _raw_scores(self, amap: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
        """(B, 2): max of each smoothed map."""
        return torch.stack([m.flatten(1).amax(1) for m in self._smoothed(amap, deformation)], dim=1)

    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        amap, deformation = self.maps(images)
        raw = self._raw_scores(amap, deformation)
        norm = (raw - self.score_min) / (self.score_max - self.score_min).clamp_min(1e-8)
        with_deformation = self.offsets is not None
        score = norm[:, 0] + (self.deformation_weight * norm[:, 1] if with_deformation else 0)
        if self.deformation_in_map and with_deformation:
            # Linear in both maps, so the evaluation's Gaussian afterwards equals DMAD's sum of smoothed maps.
            scale = (self.pixel_max - self.pixel_min).clamp_min(1e-8)
            amap = ((amap - self.pixel_min[0]) / scale[0]
                    + self.deformation_weight * (deformation - self.pixel_min[1]) / scale[1])
        return AnomalyOutput(pred_score=score, anomaly_map=amap, score_terms=raw)

    @staticmethod
    def code_protocol(labels, terms, category: str) -> dict:
        """The repository's image-level test protocol on this test set (a measurement of its shortcut, read by
        ``adcore.book.shortcuts``): :func:`code_protocol_auroc` with the repository's weight for ``category``."""
        weight = code_weight(category)
        out = code_protocol_auroc(labels, terms, weight)
        return {"image_auroc_code_combined": out["combined"], "image_auroc_code": out["reported"],
                "code_weight": weight}

    @torch.no_grad()
    def on_fit_end(self, train_loader) -> None:
        """Min-max statistics of both terms over the training images (never the test set)."""
        was_training = self.training
        self.eval()
        device = self.score_min.device
        raw, low, high = [], [], []
        for batch in train_loader:
            smoothed = self._smoothed(*self.maps(batch["image"].to(device)))
            raw.append(torch.stack([m.flatten(1).amax(1) for m in smoothed], dim=1))
            low.append(torch.stack([m.amin() for m in smoothed]))
            high.append(torch.stack([m.amax() for m in smoothed]))
        raw = torch.cat(raw)
        self.score_min.copy_(raw.amin(0))
        self.score_max.copy_(raw.amax(0))
        self.pixel_min.copy_(torch.stack(low).amin(0))
        self.pixel_max.copy_(torch.stack(high).amax(0))
        self.train(was_training)
