"""adcore.metrics against brute-force references, sklearn, hand-computed curves, and bad input."""
import numpy as np
import pytest
import scipy.ndimage
import torch
from sklearn.metrics import roc_auc_score

from adcore import metrics
from aupro_reference import aupro_exact, pro_curve_exact, pro_rd4ad_loop


def random_case(seed, levels=None, num_images=3, size=(10, 12)):
    """Random maps with blob-shaped masks; image 0 is always good. `levels` quantises the maps to force ties."""
    rng = np.random.default_rng(seed)
    shape = (num_images, *size)
    maps = rng.random(shape)
    if levels is not None:
        maps = np.floor(maps * levels) / levels
    # Thresholded smoothed noise gives regions of varied size and shape, some touching only diagonally.
    blobs = scipy.ndimage.gaussian_filter(rng.random(shape), sigma=(0, 1, 1))
    masks = blobs > np.quantile(blobs, 0.8)
    masks[0] = False
    # Anomalous pixels score a little higher on average, so the curves are not trivial.
    maps = maps + 0.3 * masks * rng.random(shape) if levels is None else maps
    return maps, masks


def exact_curve_floats(maps, masks, connectivity=8):
    fprs, pros = pro_curve_exact(maps, masks, connectivity)
    return np.array([float(f) for f in fprs]), np.array([float(p) for p in pros])


# ---------------------------------------------------------------------------------------------------------------
# AU-PRO against the brute-force reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 5])  # continuous scores, and heavy ties
def test_aupro_matches_bruteforce(seed, levels):
    maps, masks = random_case(seed, levels)
    for limit in (0.3, 0.05, 0.5, 1.0):
        expected = aupro_exact(maps, masks, limit)
        assert abs(metrics.aupro(maps, masks, limit) - expected) <= 1e-12
        assert abs(metrics.aupro(maps, masks, limit, reference=True) - expected) <= 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_pro_curve_reference_is_every_distinct_score(seed):
    maps, masks = random_case(seed, levels=7 if seed else None)
    fpr, pro = metrics.pro_curve(maps, masks, reference=True)
    fpr_exact, pro_exact = exact_curve_floats(maps, masks)
    assert len(fpr) == len(np.unique(maps)) + 1
    np.testing.assert_allclose(fpr, fpr_exact, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, pro_exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pro_curve_corners_lie_on_the_exact_curve(seed):
    maps, masks = random_case(seed, levels=6 if seed == 2 else None)
    fpr, pro = metrics.pro_curve(maps, masks)
    fpr_exact, pro_exact = exact_curve_floats(maps, masks)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    exact_points = np.stack([fpr_exact, pro_exact], axis=1)
    for point in zip(fpr, pro):
        assert np.abs(exact_points - point).max(axis=1).min() <= 1e-12, f"corner {point} is not on the exact curve"
    # Every area, cut anywhere (at a curve point or between two), is the same as under the exact curve.
    for limit in np.unique(np.concatenate([fpr_exact[1:], (fpr_exact[1:] + fpr_exact[:-1]) / 2])):
        if limit > 0:
            area, area_exact = metrics._area_up_to(fpr, pro, limit), metrics._area_up_to(fpr_exact, pro_exact, limit)
            assert abs(area - area_exact) <= 1e-12


def test_ties_are_merged_into_one_diagonal_step():
    # One image, 1 region of 2 pixels (scores 5 and 2), 4 OK pixels scored 5, 2, 2, 1.
    maps = np.array([[[5.0, 2.0, 5.0], [2.0, 2.0, 1.0]]])
    masks = np.array([[[1, 1, 0], [0, 0, 0]]])
    fpr, pro = metrics.pro_curve(maps, masks, reference=True)
    # s=5: 1 of 4 OK, 1 of 2 region; s=2: 3 of 4 OK, 2 of 2; s=1: 4 of 4. One point per distinct score.
    np.testing.assert_array_equal(fpr, [0, 0.25, 0.75, 1])
    np.testing.assert_array_equal(pro, [0, 0.5, 1, 1])
    corner_fpr, corner_pro = metrics.pro_curve(maps, masks)
    np.testing.assert_array_equal(corner_fpr, fpr)
    np.testing.assert_array_equal(corner_pro, pro)
    # Trapezoids to 0.3: [0, .25] under 0.5/2 on average, then the tied diagonal from (.25, .5) towards (.75, 1).
    y_at_limit = 0.5 + 0.5 * (0.3 - 0.25) / 0.5
    expected = (0.25 * 0.25 + 0.05 * (0.5 + y_at_limit) / 2) / 0.3
    assert metrics.aupro(maps, masks) == pytest.approx(expected, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# Hand-made curves: connectivity, the integration limit, the inflation case
# ---------------------------------------------------------------------------------------------------------------


def diagonal_case():
    """A single pixel touching a 3-pixel L only at a corner: one region under 8-connectivity, two under 4."""
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = True  # the single pixel, scored high
    masks[0, 2, 2] = masks[0, 2, 3] = masks[0, 3, 2] = True  # the L, scored like the background
    maps = np.zeros((1, 6, 6))
    maps[0, 1, 1] = 1.0
    return maps, masks


@pytest.mark.parametrize("connectivity, overlap", [(8, 0.25), (4, 0.5)])
def test_connectivity_changes_the_regions(connectivity, overlap):
    maps, masks = diagonal_case()
    # Curve (0,0) -> (0, overlap) -> (1, 1): at FPR 0.3 the PRO is overlap + 0.3 (1 - overlap).
    expected = (0.3 * (overlap + overlap + 0.3 * (1 - overlap)) / 2) / 0.3
    assert metrics.aupro(maps, masks, connectivity=connectivity) == pytest.approx(expected, abs=1e-15)
    assert abs(aupro_exact(maps, masks, connectivity=connectivity) - expected) <= 1e-15


@pytest.mark.parametrize("seed", range(2))
def test_four_connectivity_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    maps = rng.random((2, 10, 10))
    masks = rng.random((2, 10, 10)) > 0.6  # salt-and-pepper masks: many pixels touch only at corners
    assert abs(metrics.aupro(maps, masks, connectivity=4) - aupro_exact(maps, masks, connectivity=4)) <= 1e-12
    assert metrics.aupro(maps, masks, connectivity=4) != metrics.aupro(maps, masks, connectivity=8)


def limit_case():
    """10 OK pixels scored 1..10 and one 2-pixel region scored 100 and 8 (tied with an OK pixel).

    PRO curve: (0,0) (0,.5) (.1,.5) (.2,.5) (.3,1) (.4,1) ... (1,1); the tie makes the step to (.3,1) diagonal.
    """
    maps = np.array([[[100.0, 8.0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]])
    masks = np.zeros(maps.shape, dtype=np.uint8)
    masks[0, 0, :2] = 1
    return maps, masks


def test_limit_hit_exactly():
    maps, masks = limit_case()
    # 0.1 * 0.5 + 0.1 * 0.5 + 0.1 * (0.5 + 1) / 2 = 0.175, over 0.3.
    assert metrics.aupro(maps, masks, 0.3) == pytest.approx(0.175 / 0.3, abs=1e-15)
    assert abs(aupro_exact(maps, masks, 0.3) - 0.175 / 0.3) <= 1e-15


def test_limit_between_points_is_interpolated():
    maps, masks = limit_case()
    # 0.25 falls on the diagonal (.2,.5)-(.3,1), where PRO is 0.75: 0.1 + 0.05 * (0.5 + 0.75) / 2 = 0.13125.
    assert metrics.aupro(maps, masks, 0.25) == pytest.approx(0.13125 / 0.25, abs=1e-15)
    # 0.35 falls on the flat (.3,1)-(.4,1): 0.175 + 0.05.
    assert metrics.aupro(maps, masks, 0.35) == pytest.approx(0.225 / 0.35, abs=1e-15)
    # The full curve: 0.175 + 0.7 * 1.
    assert metrics.aupro(maps, masks, 1.0) == pytest.approx(0.875, abs=1e-15)


def test_fpr_that_jumps_past_the_limit_stays_at_most_one():
    # Old anomalib (<= 2.2) divided by the last FPR reached below the limit; when the background is one tied
    # block, that FPR is 0 or tiny and the score exceeded 1. Here the FPR jumps from 0 to 1 in one step.
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, 2:4, 2:6] = True
    perfect = masks.astype(float)
    assert metrics.aupro(perfect, masks) == 1.0
    half = perfect.copy()
    half[1, 3, 2:6] = 0.0  # half the region tied with the background: curve (0,0) (0,.5) (1,1)
    assert metrics.aupro(half, masks) == pytest.approx(0.5 + 0.3 * 0.5 / 2, abs=1e-15)
    for seed in range(5):
        maps, masks_r = random_case(seed, levels=2)
        assert 0.0 <= metrics.aupro(maps, masks_r) <= 1.0


def test_invariant_to_strictly_increasing_transforms():
    maps, masks = random_case(3)
    labels = masks.any(axis=(1, 2)).astype(int)
    labels[0], labels[1] = 0, 1  # keep both classes whatever the random masks are
    scores = maps.max(axis=(1, 2))
    for transform in (lambda x: 3 * x + 7, np.exp, lambda x: np.arctan(x - 0.5), lambda x: x**3):
        t_maps, t_scores = transform(maps), transform(scores)
        assert metrics.aupro(t_maps, masks) == metrics.aupro(maps, masks)
        assert metrics.pixel_auroc(t_maps, masks) == metrics.pixel_auroc(maps, masks)
        assert metrics.image_auroc(labels, t_scores) == metrics.image_auroc(labels, scores)
        assert metrics.f1_max(labels, t_scores) == metrics.f1_max(labels, scores)


def test_good_images_count_in_the_fpr():
    maps, masks = random_case(5)
    with_good = metrics.aupro(maps, masks)
    maps_bad_good = maps.copy()
    maps_bad_good[0] += 1.0  # the good image now outscores everything: all its pixels are false positives
    assert metrics.aupro(maps_bad_good, masks) < with_good
    assert metrics.aupro(maps[1:], masks[1:]) != with_good


# ---------------------------------------------------------------------------------------------------------------
# AUROC, F1, the papers' protocols
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 4])
def test_auroc_agrees_with_sklearn(levels):
    maps, masks = random_case(7, levels, num_images=6)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(metrics.pixel_auroc(maps, masks) - expected) <= 1e-12
    assert abs(metrics.pixel_auroc(maps, masks, reference=True) - expected) <= 1e-12
    rng = np.random.default_rng(levels or 0)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40), 1)  # ties between the classes
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_counts_ties_half():
    maps = np.array([[[0.0, 1.0, 1.0, 2.0]]])
    masks = np.array([[[0, 0, 1, 1]]])
    # anomalous 1 vs normal {0, 1}: 1 + 1/2; anomalous 2: 1 + 1. (1.5 + 2) / 4.
    assert metrics.pixel_auroc(maps, masks) == 0.875


def test_f1_max_matches_a_threshold_sweep():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 30)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(30) + 0.3 * labels, 1)
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & (labels == 1))
        if tp:
            precision, recall = tp / predicted.sum(), tp / labels.sum()
            best = max(best, 2 * precision * recall / (precision + recall))
    assert metrics.f1_max(labels, scores) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pro_rd4ad_matches_the_original_loop(dtype):
    maps, masks = random_case(4, num_images=3, size=(12, 12))
    maps = maps.astype(dtype)
    expected = pro_rd4ad_loop(maps, masks)
    assert abs(metrics.pro_rd4ad(maps, masks) - expected) <= 1e-12
    assert abs(metrics.pro_rd4ad(maps, masks, reference=True) - expected) <= 1e-12
    assert abs(metrics.pro_rd4ad(maps, masks, num_th=37) - pro_rd4ad_loop(maps, masks, num_th=37)) <= 1e-12


def test_pro_rd4ad_differs_from_aupro_by_design():
    maps, masks = limit_case()
    # FPR < 0.3 keeps only thresholds >= 8 (at most OK pixels 9 and 10 above them). There the region pixel 100
    # is above and its tied twin 8 is not ("> th"), so PRO is 0.5 throughout; with FPR rescaled by its largest
    # kept value (0.2) the area is 0.5. MVTec's curve reaches (0.3, 1) through the tie and gives 0.175 / 0.3.
    assert metrics.pro_rd4ad(maps, masks) == pytest.approx(0.5, abs=1e-15)
    assert pro_rd4ad_loop(maps, masks) == pytest.approx(0.5, abs=1e-15)
    assert metrics.aupro(maps, masks) == pytest.approx(0.175 / 0.3, abs=1e-15)


def test_vtadl_pro_is_pixel_auroc():
    maps, masks = random_case(2)
    assert metrics.vtadl_pro(maps, masks) == metrics.pixel_auroc(maps, masks)


def test_torch_and_numpy_inputs_agree():
    maps, masks = random_case(6)
    maps32 = maps.astype(np.float32)
    t_maps, t_masks = torch.from_numpy(maps32), torch.from_numpy(masks.astype(np.uint8))
    assert metrics.aupro(t_maps, t_masks) == metrics.aupro(maps32, masks)
    assert metrics.aupro(t_maps, t_masks.bool()) == metrics.aupro(maps32, masks.astype(np.uint8))
    assert metrics.pixel_auroc(t_maps, t_masks) == metrics.pixel_auroc(maps32, masks)
    assert metrics.pro_rd4ad(t_maps, t_masks) == metrics.pro_rd4ad(maps32, masks)
    labels, scores = torch.tensor([0, 1, 0, 1]), torch.tensor([0.1, 0.4, 0.5, 0.8])  # 3 of 4 pairs ordered
    assert metrics.image_auroc(labels, scores) == 0.75


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

PIXEL_METRICS = [metrics.aupro, metrics.pixel_auroc, metrics.pro_rd4ad, metrics.vtadl_pro, metrics.pro_curve]


@pytest.mark.parametrize("fn", PIXEL_METRICS)
def test_pixel_metrics_reject_bad_input(fn):
    maps, masks = random_case(0)
    with pytest.raises(ValueError, match="same shape"):
        fn(maps[:, :-1], masks)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        fn(maps[0], masks[0])
    nan_maps = maps.copy()
    nan_maps[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(nan_maps, masks)
    with pytest.raises(ValueError, match="only 0 and 1"):
        fn(maps, masks.astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="no anomalous|both normal"):
        fn(maps, np.zeros_like(masks))


def test_pro_needs_ok_pixels_and_valid_options():
    maps, masks = random_case(0)
    with pytest.raises(ValueError, match="no OK"):
        metrics.aupro(maps, np.ones_like(masks))
    for limit in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            metrics.aupro(maps, masks, fpr_limit=limit)
    with pytest.raises(ValueError, match="connectivity"):
        metrics.aupro(maps, masks, connectivity=6)
    with pytest.raises(ValueError, match="constant"):
        metrics.pro_rd4ad(np.zeros(maps.shape), masks)
    with pytest.raises(ValueError, match="num_th"):
        metrics.pro_rd4ad(maps, masks, num_th=1)


@pytest.mark.parametrize("fn", [metrics.image_auroc, metrics.f1_max])
def test_image_metrics_reject_bad_input(fn):
    with pytest.raises(ValueError, match="both good"):
        fn([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same shape"):
        fn([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        fn([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="only 0 and 1"):
        fn([0, 2, 1], [0.1, 0.2, 0.3])


def test_f1_at_threshold_counts_the_fixed_rule():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.9, 0.4, 0.8, 1.0])
    # threshold 0.6: predicted anomalous {0.9, 0.8, 1.0} -> TP 2, FP 1, FN 1 -> F1 = 4 / 6
    assert metrics.f1_at_threshold(labels, scores, 0.6) == pytest.approx(4 / 6)
    # strictly greater: a score equal to the threshold is normal
    assert metrics.f1_at_threshold(labels, scores, 1.0) == 0.0
    assert metrics.f1_at_threshold(labels, scores, -1.0) == pytest.approx(2 * 3 / (2 * 3 + 3))
    assert metrics.f1_at_threshold(labels, scores, 0.6) <= metrics.f1_max(labels, scores)
    with pytest.raises(ValueError, match="finite"):
        metrics.f1_at_threshold(labels, scores, float("nan"))
