"""Reverse distillation, the core that DMAD and AAND share.

RD4AD (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022;
code hq-deng/RD4AD): a frozen ImageNet encoder E (the teacher) gives three feature levels; a trainable one-class
bottleneck embedding (OCBE) fuses them into one compact code; a decoder D (the student) mirrors the encoder and must
reproduce every level from that code. On normal images the two agree; where they disagree the image is anomalous:

    anomaly_map = Σ_l upsample(1 − cos_c(E_l, D_l)),      L_RD = Σ_l mean_b(1 − cos(flatten E_l, flatten D_l)).

Faithfulness notes:
- The encoder is ``adcore.backbones.create_backbone``: EfficientNet-Lite0 (24/40/112 channels at strides 4/8/16) by
  default, WideResNet-50-2 (256/512/1024, the papers' choice) through torchvision's weights.
- Widths are parameters because the papers' WideResNet widths do not fit a 2-core CPU budget. With
  ``ocbe_width=None``, ``bottleneck_dim = 2·C3``, ``ocbe_blocks = 3``, ``ocbe_ratio = 0.5``, ``decoder_ratio = 0.5``
  and ``decoder_blocks = (3, 4, 6)`` the student is RD4AD's ``BN_layer(AttnBottleneck, 3)`` +
  ``de_wide_resnet50_2`` (hq-deng/RD4AD ``models/resnet.py``, ``models/de_resnet.py``; ``width_per_group = 128``
  makes every bottleneck's inner width half its output): level 1 goes C1 → C2 → C3 by two stride-2 3×3 convs,
  level 2 C2 → C3 by one, level 3 passes through, and 3·C3 → 2·C3 by three bottlenecks with inner width C3. The
  unused ``conv4``/``bn4`` that RD4AD's ``BN_layer`` declares (never called in ``forward``) are left out.
- Every per-level map is upsampled bilinearly with ``align_corners=True`` (RD4AD's ``cal_anomaly_map``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adcore.backbones import create_backbone
from adcore.types import AnomalyModel, AnomalyOutput

__all__ = ["OCBE", "Decoder", "ReverseDistillation", "anomaly_map", "channel_cosine", "cosine_distance_maps", "rd_loss"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1 → 3×3 → 1×1 + shortcut); ``up=True`` makes the 3×3 a 2×2 transposed conv (×2 size).

    ``stride=2`` halves the size (the OCBE's down-sampling block), ``up=True`` doubles it (RD4AD's
    ``DeBottleneck``, the decoder's first block per level).
    """

    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1, up: bool = False, relu: bool = True):
        super().__init__()
        self.relu = relu
        if up:
            spatial = nn.ConvTranspose2d(mid, mid, 2, stride=2, bias=False)
            shortcut = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
        else:
            spatial = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
            shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            spatial, nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if shortcut is None else nn.Sequential(shortcut, nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x) + self.shortcut(x)
        return F.relu(out) if self.relu else out


class OCBE(nn.Module):
    """One-class bottleneck embedding: three levels (strides 4/8/16) → one code at stride 32.

    ``width=None`` is RD4AD's layout: level 1 goes C1 → C2 → C3 by two stride-2 3×3 convs, level 2 C2 → C3 by one,
    level 3 passes through unchanged (3·C3 channels). An int ``width`` is DMAD's image-model layout (``vq=True`` in
    DMAD-PPDM ``resnet.py``): every level is first squeezed to ``width`` by a stride-1 3×3 conv, then level 1 goes
    down ×4 and level 2 ×2 by stride-2 3×3 convs (3·width channels). ``extra_channels`` more channels at stride 16
    may be concatenated last (DMAD's vector-quantised level 3). Then ``num_blocks`` bottlenecks, the first with
    stride 2, map the concatenation → ``out_dim`` with inner width ``ratio · out_dim`` (RD4AD: 0.5).
    """

    def __init__(self, channels: Sequence[int], width: int | None, out_dim: int, num_blocks: int = 1,
                 extra_channels: int = 0, ratio: float = 0.25):
        super().__init__()
        c1, c2, c3 = channels
        if width is None:
            self.level1 = nn.Sequential(conv_bn_relu(c1, c2, 2), conv_bn_relu(c2, c3, 2))
            self.level2 = conv_bn_relu(c2, c3, 2)
            self.level3 = nn.Identity()
            cin = 3 * c3
        else:
            self.level1 = nn.Sequential(conv_bn_relu(c1, width), conv_bn_relu(width, width, 2),
                                        conv_bn_relu(width, width, 2))
            self.level2 = nn.Sequential(conv_bn_relu(c2, width), conv_bn_relu(width, width, 2))
            self.level3 = conv_bn_relu(c3, width)
            cin = 3 * width
        cin += extra_channels
        mid = max(int(round(out_dim * ratio)), 8)
        blocks = [Bottleneck(cin, out_dim, mid, stride=2)] + [Bottleneck(out_dim, out_dim, mid)
                                                              for _ in range(num_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, features: Sequence[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        parts = [self.level1(features[0]), self.level2(features[1]), self.level3(features[2])]
        if extra is not None:
            parts.append(extra)
        # Odd input sizes make the levels differ by a pixel; level 3 sets the grid.
        size = parts[2].shape[-2:]
        parts = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                 for p in parts]
        return self.blocks(torch.cat(parts, dim=1))  # (B, out_dim, S/32, S/32)


class Decoder(nn.Module):
    """The student: mirrors the encoder from the stride-32 code back to levels 3, 2, 1 (strides 16, 8, 4).

    Each level is one up-sampling bottleneck plus plain ones, ``num_blocks`` in all: an int for every level or one
    count per level, deepest first (RD4AD's ``de_wide_resnet50_2``: 3, 4, 6). Its output has exactly the encoder's
    channels at that level and is compared to it directly. The bottleneck inner width is ``ratio · C_l`` (RD4AD's
    WideResNet decoder: 0.5, from ``width_per_group = 128``). ``relu_output=False`` drops the ReLU after each
    level's last block, for teachers whose features are signed (EfficientNet's linear bottlenecks: about half the
    values are negative, which a ReLU output could never reproduce); WideResNet's features are post-ReLU, as RD4AD's
    decoder outputs.
    """

    def __init__(self, channels: Sequence[int], in_dim: int, num_blocks: int | Sequence[int] = 1, ratio: float = 1.0,
                 relu_output: bool = True):
        super().__init__()
        counts = [num_blocks] * len(channels) if isinstance(num_blocks, int) else list(num_blocks)
        stages, cin = [], in_dim
        for c, n in zip(reversed(list(channels)), counts):
            mid = max(int(round(c * ratio)), 8)
            blocks = [Bottleneck(cin, c, mid, up=True)] + [Bottleneck(c, c, mid) for _ in range(n - 1)]
            blocks[-1].relu = relu_output
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, code: torch.Tensor, sizes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """``sizes``: the encoder's (h, w) per level, fine to coarse; returns features fine to coarse."""
        out, x = [], code
        for stage, size in zip(self.stages, reversed(list(sizes))):
            x = stage(x)
            if x.shape[-2:] != size:  # non-multiple-of-32 inputs
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(x)
        return out[::-1]


def channel_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity over dim 1: (B, C, h, w) × 2 → (B, h, w); the same as ``F.cosine_similarity(a, b, dim=1)``
    to 1e-6, written out because that reduction over a non-last dimension is several times slower on CPU."""
    return (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)).clamp_min(eps * eps).sqrt()


def cosine_distance_maps(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, 1 − cosine similarity over channels: a list of (B, h_l, w_l)."""
    return [1 - channel_cosine(t, s) for t, s in zip(teacher, student)]


def anomaly_map(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], size) -> torch.Tensor:
    """Σ_l bilinear-upsampled (align_corners=True) cosine-distance maps: (B, *size)."""
    maps = cosine_distance_maps(teacher, student)
    return sum(F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=True)[:, 0] for m in maps)


def rd_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """RD4AD's loss: Σ_l mean_b(1 − cos(flatten E_l, flatten D_l)), the cosine over each whole feature map."""
    return sum((1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean() for t, s in zip(teacher, student))


class ReverseDistillation(AnomalyModel):
    """Frozen encoder + OCBE + decoder; plain RD4AD training and scoring, meant to be subclassed.

    Args:
        backbone: ``"efficientnet_lite0"`` (offline ImageNet weights) or ``"wide_resnet50_2"`` (``weights_path``,
            the torch hub cache, or torchvision's download).
        weights_path: the backbone's weights file, if not the default.
        pretrained: False gives a randomly initialised encoder (tests only; it warns).
        ocbe_width: None: RD4AD's OCBE (levels brought to C3, level 3 passed through); an int: every level squeezed
            to that width first (DMAD's image model: 64). See :class:`OCBE`.
        bottleneck_dim: channels of the stride-32 code (default 2·C3, as RD4AD's 2048 for WideResNet's 1024).
        ocbe_blocks: bottleneck blocks in the OCBE (RD4AD: 3).
        ocbe_ratio: OCBE bottleneck inner width as a fraction of ``bottleneck_dim`` (RD4AD: 0.5, i.e. 1024).
        decoder_blocks: bottleneck blocks per decoder level, an int or one per level deepest first (RD4AD: 3, 4, 6).
        decoder_ratio: decoder bottleneck inner width as a fraction of the level's channels (RD4AD: 0.5).
        extra_level3: the OCBE also takes a full-width (C3) tensor at stride 16 beside the three levels (DMAD's
            vector-quantised level 3), passed as ``extra`` to :meth:`student`.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights_path: str | None = None, pretrained: bool = True,
                 ocbe_width: int | None = None, bottleneck_dim: int | None = None, ocbe_blocks: int = 1,
                 ocbe_ratio: float = 0.25, decoder_blocks: int | Sequence[int] = 1, decoder_ratio: float = 1.0,
                 extra_level3: bool = False):
        super().__init__()
        positive = lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1  # noqa: E731
        if not positive(ocbe_blocks):
            raise ValueError(f"ocbe_blocks must be a positive int, got {ocbe_blocks!r}")
        counts = [decoder_blocks] * 3 if positive(decoder_blocks) else decoder_blocks
        if not (isinstance(counts, (list, tuple)) and len(counts) == 3 and all(positive(n) for n in counts)):
            raise ValueError(f"decoder_blocks must be a positive int or three (deepest level first), "
                             f"got {decoder_blocks!r}")
        for name, value in [("ocbe_ratio", ocbe_ratio), ("decoder_ratio", decoder_ratio)]:
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if ocbe_width is not None and (isinstance(ocbe_width, bool) or not isinstance(ocbe_width, int)
                                       or ocbe_width < 1):
            raise ValueError(f"ocbe_width must be None or a positive int, got {ocbe_width!r}")
        self.encoder = create_backbone(backbone, pretrained=pretrained, weights_path=weights_path)
        self.encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.channels = list(self.encoder.channels)
        c3 = self.channels[-1]
        self.ocbe = OCBE(self.channels, ocbe_width, bottleneck_dim or 2 * c3, ocbe_blocks,
                         extra_channels=c3 if extra_level3 else 0, ratio=ocbe_ratio)
        # WideResNet taps follow a ReLU; EfficientNet-Lite0's are linear-bottleneck outputs of either sign.
        self.decoder = Decoder(self.channels, bottleneck_dim or 2 * c3, tuple(counts), decoder_ratio,
                               relu_output=backbone.startswith("wide_resnet"))

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: its BatchNorm statistics must never move
        return self

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher features E_l(images), fine to coarse: [(B, C1, S/4, S/4), (B, C2, S/8, S/8), (B, C3, S/16, S/16)]."""
        return list(self.encoder(images))

    def student(self, features: Sequence[torch.Tensor], extra: torch.Tensor | None = None) -> list[torch.Tensor]:
        """D(OCBE(features)): the student's reconstruction of every level, shaped like ``features``."""
        return self.decoder(self.ocbe(features, extra), [f.shape[-2:] for f in features])

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.ocbe.parameters()) + list(self.decoder.parameters())

    def configure_optimizers(self, stage: str, lr: float):
        # RD4AD, DMAD and AAND all use Adam(W) with betas (0.5, 0.999).
        return torch.optim.Adam(self.student_parameters(), lr=lr, betas=(0.5, 0.999)), None

    def training_step(self, images: torch.Tensor, stage: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher = self.encode(images)
        return {"loss": rd_loss(teacher, self.student(teacher))}

    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        teacher = self.encode(images)
        amap = anomaly_map(teacher, self.student(teacher), images.shape[-2:])
        return AnomalyOutput(pred_score=amap.flatten(1).amax(dim=1), anomaly_map=amap)
