"""The backbones: real EfficientNet-Lite0 weights, WideResNet-50-2 through torchvision's weights API (file, torch hub
cache, download, clear error offline), freezing, the loud random-init switch, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision

import adcore.backbones as backbones
from adcore.backbones import (IMAGENET_MEAN, IMAGENET_STD, BackboneWeightsMissing, _map_efficientnet_lite0,
                              create_backbone, create_classifier)

WRN50_V1 = "wide_resnet50_2-95faca4d.pth"  # torchvision's Wide_ResNet50_2_Weights.IMAGENET1K_V1, as RD4AD loads it

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _imagenet_input(photo: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def classifier():
    return create_classifier()


@pytest.mark.parametrize("photo, classes", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_efficientnet_lite0_weights_are_real_imagenet_weights(classifier, photo, classes):
    with torch.no_grad():
        logits = classifier(_imagenet_input(getattr(skimage.data, photo)()))
    top1 = int(logits.argmax())
    assert top1 in classes, f"{photo} classified as ImageNet class {top1}"
    assert logits.softmax(-1)[0, sorted(classes)].sum() > 0.5


def test_efficientnet_lite0_taps_match_the_classifier(classifier):
    backbone = create_backbone("efficientnet_lite0")
    assert backbone.channels == [24, 40, 112] and backbone.strides == [4, 8, 16]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(images)
        # The same weights run by hand through the classifier: stem, then blocks 0-1 (stride 4) ... 0-4 (stride 16).
        x = classifier.bn1(classifier.conv_stem((images - backbone.mean) / backbone.std))
        expected = []
        for i, block in enumerate(classifier.blocks[:5]):
            x = block(x)
            if i in (1, 2, 4):
                expected.append(x)
    assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want)


def test_backbone_is_frozen_even_inside_a_training_parent():
    backbone = create_backbone("efficientnet_lite0")
    assert not any(p.requires_grad for p in backbone.parameters())
    parent = torch.nn.Sequential(backbone)
    parent.train()
    assert not any(m.training for m in backbone.modules())
    bn = backbone.body.bn1
    before = bn.running_mean.clone()
    backbone(torch.rand(2, 3, 32, 32) * 5)  # far from ImageNet statistics: a training-mode BN would move
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)


def test_efficientnet_lite0_mapping_rejects_wrong_shapes_and_counts():
    import timm

    target = timm.create_model("efficientnet_lite0", pretrained=False)
    source = {f"k{i}": v.clone() for i, (k, v) in enumerate(target.state_dict().items())}
    assert len(_map_efficientnet_lite0(source, target)) == len(source)
    bad = dict(source)
    bad["k0"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match="do not map"):
        _map_efficientnet_lite0(bad, target)
    short = dict(list(source.items())[:-1])
    with pytest.raises(ValueError, match="tensors"):
        _map_efficientnet_lite0(short, target)


@pytest.fixture(scope="module")
def wrn_file(fake_wrn_weights):
    """The session's random WideResNet-50-2 file, and torchvision's own model holding the same weights."""
    model = torchvision.models.wide_resnet50_2(weights=None)
    model.load_state_dict(torch.load(fake_wrn_weights, map_location="cpu", weights_only=True))
    return fake_wrn_weights, model.eval()


def test_wide_resnet50_2_loads_from_weights_path(wrn_file):
    path, model = wrn_file
    backbone = create_backbone("wide_resnet50_2", weights_path=path)
    assert backbone.channels == [256, 512, 1024] and backbone.strides == [4, 8, 16]
    assert backbone.pretrained and backbone.weights_path == str(path)
    assert not any(t.is_meta for t in backbone.state_dict().values())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(images)
        # torchvision's own modules on the normalised images: stem, layer1, layer2, layer3.
        x = model.maxpool(model.relu(model.bn1(model.conv1((images - backbone.mean) / backbone.std))))
        expected = [x := layer(x) for layer in (model.layer1, model.layer2, model.layer3)]
    assert [tuple(f.shape) for f in feats] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want)


@pytest.fixture
def offline(monkeypatch):
    """No network: torchvision's download fails as it does offline (URLError is an OSError); counts the attempts."""
    from urllib.error import URLError

    attempts = []

    def fail():
        attempts.append(1)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(backbones, "_download_wide_resnet50_2", fail)
    return attempts


def test_wide_resnet50_2_cache_file_is_torchvisions():
    from torchvision.models import Wide_ResNet50_2_Weights

    assert backbones.wide_resnet50_2_cache_file().name == Path(Wide_ResNet50_2_Weights.IMAGENET1K_V1.url).name
    assert backbones.wide_resnet50_2_cache_file().name == WRN50_V1


def test_wide_resnet50_2_is_found_in_the_torch_hub_cache(wrn_file, tmp_path, monkeypatch, offline):
    # A temporary TORCH_HOME holding the file where torchvision's weights API caches it: no download is tried.
    path, model = wrn_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / WRN50_V1).symlink_to(path)
    backbone = create_backbone("wide_resnet50_2", out_indices=(1, 2))
    assert backbone.weights_path == str(tmp_path / "hub" / "checkpoints" / WRN50_V1)
    assert backbone.channels == [512, 1024] and backbone.strides == [8, 16]
    torch.testing.assert_close(backbone.body.stem[1].running_var, model.bn1.running_var, rtol=0, atol=0)
    assert not offline


def test_wide_resnet50_2_is_downloaded_when_online_and_not_cached(wrn_file, tmp_path, monkeypatch):
    # Online: torchvision's weights API is asked for the state dict (it downloads into the torch hub cache).
    path, model = wrn_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(backbones, "_download_wide_resnet50_2",
                        lambda: calls.append(1) or torch.load(path, weights_only=True))
    backbone = create_backbone("wide_resnet50_2")
    assert calls == [1] and backbone.pretrained
    assert backbone.weights_path == str(tmp_path / "hub" / "checkpoints" / WRN50_V1)
    torch.testing.assert_close(backbone.body.stem[0].weight, model.conv1.weight, rtol=0, atol=0)


def test_missing_wide_resnet50_2_weights_say_where_to_put_them(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BackboneWeightsMissing) as err:
        create_backbone("wide_resnet50_2")
    assert isinstance(err.value, FileNotFoundError) and offline == [1]
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / WRN50_V1) in message  # where it looked
    assert "weights_path" in message and "download" in message and "TORCH_HOME" in message
    with pytest.raises(BackboneWeightsMissing, match="does not exist"):
        create_backbone("wide_resnet50_2", weights_path=tmp_path / "nope.pth")
    assert offline == [1]  # a missing explicit file is an error at once, never a download


def test_random_initialisation_is_loud():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        create_backbone("wide_resnet50_2", pretrained=False)


def test_a_file_that_is_not_a_wide_resnet50_2_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "wide_resnet50_2-bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision wide_resnet50_2"):
        create_backbone("wide_resnet50_2", weights_path=path)


def test_random_backbone_needs_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    backbone = create_backbone("efficientnet_lite0", pretrained=False, out_indices=(0, 4))
    assert backbone.channels == [16, 320] and backbone.strides == [2, 32] and not backbone.pretrained


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet18"), "unknown backbone"),
    (dict(out_indices=(3, 2)), "increasing"),
    (dict(out_indices=(1, 5)), "0..4"),
    (dict(out_indices=()), "out_indices"),
])
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_backbone(**{"pretrained": False, **kwargs})


def test_bad_image_shape_is_a_value_error():
    backbone = create_backbone("efficientnet_lite0")
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        backbone(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        backbone(torch.rand(3, 32, 32))
