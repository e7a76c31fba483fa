"""The kNN baseline: output contract, a constructed defect it must find, determinism, and its two building blocks."""
from __future__ import annotations

import pytest
import torch

from adcore.models.knn import KNNDetector, fold_batchnorm, greedy_coreset, knn_distance
from adcore.registry import create_model, list_models
from adcore.training import fit
from adcore.types import AnomalyModel, AnomalyOutput

SIZE = 96


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _stripes(gen: torch.Generator) -> torch.Tensor:
    """A normal image: blue-grey vertical stripes of period 8 px at a random phase, plus mild noise. (3, S, S)."""
    phase = float(torch.rand(1, generator=gen)) * 8
    x = torch.arange(SIZE, dtype=torch.float32)
    wave = 0.5 + 0.3 * torch.sin(2 * torch.pi * (x + phase) / 8)  # (S,)
    image = torch.stack([0.6 * wave, 0.7 * wave, wave])[:, None, :].expand(3, SIZE, SIZE)
    return (image + 0.03 * torch.randn(3, SIZE, SIZE, generator=gen)).clamp(0, 1)


def _with_defect(image: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """Paint a 14×14 orange blob at a random place; return the image and the blob's centre."""
    top, left = (int(v) for v in torch.randint(20, SIZE - 34, (2,), generator=gen))  # away from the zero padding
    image = image.clone()
    image[:, top:top + 14, left:left + 14] = torch.tensor([0.95, 0.55, 0.1]).view(3, 1, 1)
    return image, (top + 7, left + 7)


@pytest.fixture(scope="module")
def train_data():
    gen = torch.Generator().manual_seed(0)
    return [{"image": _stripes(gen)} for _ in range(10)]


@pytest.fixture(scope="module")
def fitted(train_data):
    torch.set_num_threads(1)
    # 10 images × 144 patches is below the default coreset_min_patches; 0 runs the coreset anyway.
    model = KNNDetector(coreset_ratio=0.25, coreset_min_patches=0, seed=0)
    history = fit(model, train_data, num_epochs=0, lr=1e-3, batch_size=4, progress=False)
    assert history == []
    return model


def test_knn_is_registered_and_trains_nothing():
    assert "knn" in list_models()
    model = create_model("knn", coreset_ratio=0.5, num_neighbors=3, seed=1)
    assert isinstance(model, AnomalyModel) and isinstance(model, KNNDetector)
    assert model.stages == () and model.own_image_score  # PatchCore's image score: the max patch distance
    assert not any(p.requires_grad for p in model.parameters())
    # The published setting: strides 8 + 16 (efficientnet_lite0 blocks.2 + blocks.4, 40 + 112 channels).
    assert model.feature_strides == (8, 16) and model.memory_bank.shape == (0, 40 + 112)
    default = create_model("knn")
    assert default.coreset_ratio == 0.1 and default.coreset_min_patches == 10_000 and default.num_neighbors == 1


def test_output_contract(fitted, train_data):
    # 10 images × (96/8)² patches, 25 % kept.
    assert fitted.memory_bank.shape == (round(0.25 * 10 * 144), 152)
    out = fitted.predict(torch.rand(3, 3, SIZE, SIZE))
    assert isinstance(out, AnomalyOutput)
    assert out.pred_score.shape == (3,) and out.anomaly_map.shape == (3, SIZE // 8, SIZE // 8)
    assert out.pred_score.dtype == torch.float32 and out.anomaly_map.dtype == torch.float32
    assert torch.isfinite(out.anomaly_map).all() and (out.anomaly_map >= 0).all()
    torch.testing.assert_close(out.pred_score, out.anomaly_map.flatten(1).amax(1))
    # A training image is (almost) in the bank: its patches lie close to it.
    seen = fitted.predict(train_data[0]["image"][None])
    assert seen.pred_score.item() < out.pred_score.min().item()


def test_a_painted_defect_scores_higher_and_is_located(fitted):
    gen = torch.Generator().manual_seed(123)
    normal = torch.stack([_stripes(gen) for _ in range(4)])
    defects = [_with_defect(_stripes(gen), gen) for _ in range(3)]
    anomalous = torch.stack([image for image, _ in defects])
    normal_out, anomalous_out = fitted.predict(normal), fitted.predict(anomalous)
    assert anomalous_out.pred_score.min() > 1.5 * normal_out.pred_score.max()
    for amap, (_, (cy, cx)) in zip(anomalous_out.anomaly_map, defects):
        row, col = divmod(int(amap.argmax()), amap.shape[1])
        # Map cell (row, col) covers pixels [8 row, 8 row + 8). Peaks sit up to a cell down-right of the blob: the
        # backbone's symmetric padding centres a cell's receptive field at 8 row, not 8 row + 4, and the stride-16
        # half is upsampled with align_corners=False (PatchCore's geometry, kept as is).
        assert abs(row * 8 + 4 - cy) <= 12 and abs(col * 8 + 4 - cx) <= 12, ((row, col), (cy, cx))


def test_same_seed_same_bank_other_seed_other_bank(train_data, fitted):
    again = KNNDetector(coreset_ratio=0.25, coreset_min_patches=0, seed=0)
    fit(again, train_data, num_epochs=0, batch_size=4, progress=False)
    torch.testing.assert_close(again.memory_bank, fitted.memory_bank, rtol=0, atol=0)
    probe = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.predict(probe).anomaly_map, fitted.predict(probe).anomaly_map, rtol=0, atol=0)
    other = KNNDetector(coreset_ratio=0.25, coreset_min_patches=0, seed=1)
    fit(other, train_data, num_epochs=0, batch_size=4, progress=False)
    assert other.memory_bank.shape == fitted.memory_bank.shape
    assert not torch.equal(other.memory_bank, fitted.memory_bank)


@pytest.mark.parametrize("strides, dim", [((8, 16), 40 + 112), ((4, 8), 24 + 40), ((4, 8, 16), 24 + 40 + 112)])
def test_feature_strides_are_concatenated_on_the_stride_8_grid(strides, dim):
    model = KNNDetector(feature_strides=strides)
    assert model.backbone.strides == list(strides)
    assert model.embed(torch.rand(2, 3, SIZE, SIZE)).shape == (2, dim, SIZE // 8, SIZE // 8)


def test_memory_bank_survives_a_state_dict_round_trip(fitted):
    fresh = KNNDetector()
    fresh.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh.memory_bank, fitted.memory_bank, rtol=0, atol=0)
    probe = torch.rand(1, 3, SIZE, SIZE)
    torch.testing.assert_close(fresh.predict(probe).pred_score, fitted.predict(probe).pred_score)


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        KNNDetector().predict(torch.rand(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("kwargs, match", [
    (dict(coreset_ratio=0.0), "coreset_ratio"),
    (dict(coreset_ratio=1.5), "coreset_ratio"),
    (dict(num_neighbors=0), "num_neighbors"),
    (dict(backbone="resnet18"), "backbone"),
    (dict(feature_strides=(16, 8)), "feature_strides"),
    (dict(feature_strides=(32,)), "feature_strides"),
    (dict(feature_strides=8), "feature_strides"),
    (dict(projection_dim=2.5), "projection_dim"),
    (dict(coreset_min_patches=-1), "coreset_min_patches"),
    (dict(coreset_min_patches=1.5), "coreset_min_patches"),
])
def test_bad_parameters_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KNNDetector(**kwargs)


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_greedy_coreset_picks_one_point_per_separated_cluster(projection_dim):
    gen = torch.Generator().manual_seed(0)
    centres = 20 * torch.randn(6, 32, generator=gen)
    labels = torch.arange(6).repeat_interleave(50)
    points = centres[labels] + 0.1 * torch.randn(300, 32, generator=gen)
    chosen = greedy_coreset(points, 6, projection_dim=projection_dim, seed=3)
    assert chosen.shape == (6,) and chosen.dtype == torch.int64
    assert sorted(labels[chosen].tolist()) == list(range(6))
    torch.testing.assert_close(chosen, greedy_coreset(points, 6, projection_dim=projection_dim, seed=3))


def test_greedy_coreset_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_samples"):
        greedy_coreset(torch.rand(5, 3), 6)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        greedy_coreset(torch.rand(5), 1)


@pytest.mark.parametrize("num_neighbors", [1, 3])
def test_chunked_knn_distance_matches_brute_force(num_neighbors):
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 16, generator=gen), torch.randn(23, 16, generator=gen)
    brute = (queries[:, None] - bank[None]).norm(dim=-1).sort(dim=1).values[:, :num_neighbors].mean(1)
    torch.testing.assert_close(knn_distance(queries, bank, num_neighbors, chunk_size=None), brute)
    torch.testing.assert_close(knn_distance(queries, bank, num_neighbors, chunk_size=5), brute)
    with pytest.raises(ValueError, match="num_neighbors"):
        knn_distance(queries, bank, 24)
    with pytest.raises(ValueError, match="share D"):
        knn_distance(queries, bank[:, :8])


def test_coreset_turns_on_only_above_coreset_min_patches(train_data):
    full = KNNDetector(coreset_ratio=0.25)  # 1,440 patches <= 10,000: the exact bank is kept
    fit(full, train_data, num_epochs=0, batch_size=4, progress=False)
    assert full.memory_bank.shape == (10 * 144, 152)
    for threshold, rows in ((1439, 360), (1440, 1440)):
        model = KNNDetector(coreset_ratio=0.25, coreset_min_patches=threshold)
        fit(model, train_data, num_epochs=0, batch_size=4, progress=False)
        assert model.memory_bank.shape[0] == rows


def test_neighbourhood_mean_counts_the_zero_padding():
    # PatchCore's 3×3 aggregation over zero-padded maps: on constant taps a corner patch averages 4 of 9 cells and an
    # edge patch 6, so border patches of every image carry the same, known attenuation (not counting the padding
    # gave them a statistic of their own). The stride-16 tap (8×8 at 128 px) is then resized to the 16×16 grid.
    model = KNNDetector(feature_strides=(8, 16))
    model.backbone.forward = lambda images: [torch.ones(len(images), 40, 16, 16), torch.ones(len(images), 112, 8, 8)]
    emb = model.embed(torch.rand(1, 3, 128, 128))
    assert emb.shape == (1, 152, 16, 16)
    fine = emb[0, 0]
    torch.testing.assert_close(fine[[0, 0, 15, 15], [0, 15, 0, 15]], torch.full((4,), 4 / 9))
    torch.testing.assert_close(fine[0, 1:15], torch.full((14,), 6 / 9))
    torch.testing.assert_close(fine[1:15, 1:15], torch.ones(14, 14))


def test_folded_batchnorm_gives_the_same_features():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 5, 3, padding=1, bias=True), torch.nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    net = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        fold_batchnorm(net)
        assert isinstance(net[1], torch.nn.Identity)
        torch.testing.assert_close(net(x), expected)
        # The backbone as the knn model runs it (folded, channels-last) against the backbone as loaded.
        images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        fast, slow = KNNDetector(), KNNDetector(fast_backbone=False)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.backbone.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in slow.backbone.modules())
        torch.testing.assert_close(fast.embed(images), slow.embed(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("active", [None, 8, 32])
def test_greedy_coreset_is_exact_greedy_k_centre(active):
    # The slow twin written out: each step takes the point farthest (Euclidean) from everything chosen so far. The
    # lazy path (active=8, 32: few points updated per step, many refreshes) must choose the same points.
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(300, 16, generator=gen) * torch.linspace(0.2, 3, 300)[:, None]  # uneven spread
    chosen = greedy_coreset(points, 60, projection_dim=None, seed=4, active=active)
    first = int(torch.randint(300, (1,), generator=torch.Generator().manual_seed(4)))
    expected, min_dist = [first], (points - points[first]).norm(dim=1)
    for _ in range(59):
        expected.append(int(min_dist.argmax()))
        min_dist = torch.minimum(min_dist, (points - points[expected[-1]]).norm(dim=1))
    assert chosen.tolist() == expected


def test_recipes_state_the_published_setting():
    import inspect

    default, paper = KNNDetector.recipes["default"], KNNDetector.recipes["paper"]
    assert default.num_epochs == 0 and default.image_size == 128 and default.model_params == {}
    assert paper.num_epochs == 0 and paper.image_size == 224
    assert paper.model_params == dict(backbone="wide_resnet50_2", feature_strides=(8, 16), coreset_ratio=0.1,
                                      num_neighbors=1)
    assert set(paper.model_params) <= set(inspect.signature(KNNDetector).parameters)


def test_fold_batchnorm_on_a_resnet_backbone():
    # torchvision's Bottleneck registers conv1, bn1, conv2, bn2, conv3, bn3, relu, downsample: folding by registration
    # order must pair them right. Random weights and BatchNorm statistics, so every fold changes something.
    import copy

    from adcore.backbones import create_backbone

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        slow = create_backbone("wide_resnet50_2", pretrained=False, out_indices=(0, 1))
    for m in slow.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    fast = fold_batchnorm(copy.deepcopy(slow))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(fast(images), slow(images)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
