"""The kNN baseline: output contract, a constructed defect it must find, determinism, and its two building blocks."""
from __future__ import annotations

import pytest
import torch

from adcore.models.knn import KNNDetector, greedy_coreset, knn_distance
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
    model = KNNDetector(coreset_ratio=0.25, seed=0)
    history = fit(model, train_data, num_epochs=0, lr=1e-3, batch_size=4, progress=False)
    assert history == []
    return model


def test_knn_is_registered_and_trains_nothing():
    assert "knn" in list_models()
    model = create_model("knn", coreset_ratio=0.5, num_neighbors=3, seed=1)
    assert isinstance(model, AnomalyModel) and isinstance(model, KNNDetector)
    assert model.stages == () and not model.own_image_score
    assert not any(p.requires_grad for p in model.parameters())
    assert model.feature_strides == (8,) and model.memory_bank.shape == (0, 40)


def test_output_contract(fitted, train_data):
    # 10 images × (96/8)² patches, 25 % kept.
    assert fitted.memory_bank.shape == (round(0.25 * 10 * 144), 40)
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
    again = KNNDetector(coreset_ratio=0.25, seed=0)
    fit(again, train_data, num_epochs=0, batch_size=4, progress=False)
    torch.testing.assert_close(again.memory_bank, fitted.memory_bank, rtol=0, atol=0)
    probe = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.predict(probe).anomaly_map, fitted.predict(probe).anomaly_map, rtol=0, atol=0)
    other = KNNDetector(coreset_ratio=0.25, seed=1)
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
