"""Anomaly-detection metrics, all computed in float64 on the CPU.

Two families live here, under separate names so a notebook can print both side by side:

- The project's protocol: `image_auroc`, `pixel_auroc`, `f1_max` and `aupro`. `aupro` is the MVTec AD
  evaluation's AU-PRO (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021; MVTec's
  `mvtec_ad_evaluation` scripts): an exact curve over every distinct score, integrated up to an FPR limit.
- The papers' own protocols: `pro_rd4ad` (the 200-threshold PRO in RD4AD's `compute_pro`, copied into DMAD's and
  AAND's `test.py`) and `vtadl_pro` (VT-ADL's "PRO", which is a pixel AUROC).

Inputs may be numpy arrays or torch tensors. `maps` and `masks` are (N, H, W); labels and scores are (N,).
Higher scores mean more anomalous. Every function raises ValueError on inputs it cannot score honestly
(shape mismatch, NaN or infinite scores, masks outside {0, 1}, a single class).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

# sklearn.metrics is imported in the functions that use it: at the top it added a second to every `import adcore`
# (each CLI call, notebook kernel and runner process).

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "f1_max",
    "pro_curve",
    "aupro",
    "pro_rd4ad",
    "vtadl_pro",
]

# scipy.ndimage.label structures: 8-connectivity is what MVTec's evaluation (np.ones((3, 3))) and
# skimage.measure.label's 2-D default use; 4-connectivity is kept only to show the difference.
_STRUCTURES = {
    8: np.ones((3, 3), dtype=bool),
    4: scipy.ndimage.generate_binary_structure(2, 1),
}


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


def _to_numpy(x, name: str) -> np.ndarray:
    """Returns `x` as a numpy array; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:  # bfloat16 has no numpy dtype
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as err:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from err


def _check_scores(x, name: str, ndim: int) -> np.ndarray:
    """Returns scores as a numeric array of the given rank, refusing NaN and inf (they have no rank order)."""
    x = _to_numpy(x, name)
    if x.ndim != ndim:
        expected = "(N,)" if ndim == 1 else "(N, H, W)"
        raise ValueError(f"{name} must have shape {expected}, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); all scores must be finite")
    return x


def _check_binary(x, name: str, ndim: int) -> np.ndarray:
    """Returns a bool array from a bool or 0/1 array of the given rank."""
    x = _to_numpy(x, name)
    if x.ndim != ndim:
        expected = "(N,)" if ndim == 1 else "(N, H, W)"
        raise ValueError(f"{name} must have shape {expected}, got shape {x.shape}")
    if x.dtype == bool:
        return x
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got dtype {x.dtype}")
    is_one = x == 1
    if not (is_one | (x == 0)).all():
        others = np.unique(x[~(is_one | (x == 0))])[:5]
        raise ValueError(f"{name} must be bool or hold only 0 and 1, found other values such as {others.tolist()}")
    return is_one


def _check_labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Image-level inputs: (N,) 0/1 labels with both classes present and (N,) finite scores, as float64."""
    labels = _check_binary(labels, "labels", 1)
    scores = _check_scores(scores, "scores", 1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same shape, got {labels.shape} and {scores.shape}")
    if labels.all() or not labels.any():
        raise ValueError(f"labels must contain both good (0) and anomalous (1) images, got only {int(labels[0])}")
    return labels, scores.astype(np.float64)


def _check_maps_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level inputs: (N, H, W) finite maps and (N, H, W) bool/0-1 masks of the same shape."""
    maps = _check_scores(maps, "maps", 3)
    masks = _check_binary(masks, "masks", 3)
    if maps.shape != masks.shape:
        raise ValueError(
            f"maps and masks must have the same shape, got {maps.shape} and {masks.shape}; "
            "upsample the maps to the mask resolution first"
        )
    return maps, masks


# ---------------------------------------------------------------------------------------------------------------
# Image and pixel AUROC, F1-max
# ---------------------------------------------------------------------------------------------------------------


def image_auroc(labels, scores) -> float:
    """Area under the image-level ROC curve.

    Args:
        labels: (N,) 0 for good, 1 for anomalous (bool or 0/1); both classes must be present.
        scores: (N,) image anomaly scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1] (sklearn's `roc_auc_score`; a tie between a good and an anomalous image counts half).
    """
    labels, scores = _check_labels_scores(labels, scores)
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores))


def pixel_auroc(maps, masks, reference: bool = False) -> float:
    """Area under the ROC curve over all pixels of all images pooled together.

    The AUROC equals the probability that a random anomalous pixel outscores a random normal one, ties counted
    half (the Mann-Whitney U statistic). The default path computes exactly that by sorting the normal scores
    and binary-searching the anomalous ones, with int64 counts; on 100 maps of 256x256 it is about 20x faster
    than sklearn's `roc_auc_score`, which builds the whole ROC curve with an argsort.

    Args:
        maps: (N, H, W) anomaly maps at the mask resolution.
        masks: (N, H, W) ground truth, bool or 0/1; both normal and anomalous pixels must be present.
        reference: if True, use `sklearn.metrics.roc_auc_score` instead (same value up to float rounding).

    Returns:
        Pixel AUROC in [0, 1].
    """
    maps, masks = _check_maps_masks(maps, masks)
    if masks.all() or not masks.any():
        raise ValueError("masks must contain both normal (0) and anomalous (1) pixels to compute a pixel AUROC")
    scores, positive = maps.ravel(), masks.ravel()
    if reference:
        from sklearn.metrics import roc_auc_score
        return float(roc_auc_score(positive, scores.astype(np.float64)))
    normal_sorted = np.sort(scores[~positive])
    anomalous = np.sort(scores[positive])  # sorted queries keep the binary searches cache-friendly
    below = np.searchsorted(normal_sorted, anomalous, side="left")  # normal pixels strictly lower
    not_above = np.searchsorted(normal_sorted, anomalous, side="right")  # ... lower or equal
    # Each anomalous pixel wins 1 against every lower normal pixel and 1/2 against every equal one.
    twice_wins = int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))
    return twice_wins / (2 * normal_sorted.size * anomalous.size)


def f1_max(labels, scores) -> float:
    """Best image-level F1 over all thresholds.

    This is an *oracle* number: the threshold is chosen on the very test set it is scored on, so it is an upper
    bound on what a deployed detector with a fixed threshold would reach (anomalib's `F1Max`, and its
    `F1AdaptiveThreshold` on its default validation = test split, report the same thing).

    Args:
        labels: (N,) 0 for good, 1 for anomalous; both classes must be present.
        scores: (N,) image anomaly scores, higher = more anomalous.

    Returns:
        max over thresholds t of 2PR / (P + R) for the rule "anomalous iff score >= t".
    """
    labels, scores = _check_labels_scores(labels, scores)
    from sklearn.metrics import precision_recall_curve
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def f1_at_threshold(labels, scores, threshold: float) -> float:
    """Image-level F1 of the fixed rule "anomalous iff score > threshold".

    The honest counterpart of :func:`f1_max`: the threshold must come from somewhere other than this test set (for
    ``evaluate``, the largest score of the normal training images).

    Args:
        labels: (N,) 0 for good, 1 for anomalous; both classes must be present.
        scores: (N,) image anomaly scores, higher = more anomalous.
        threshold: a finite number fixed beforehand.

    Returns:
        2·TP / (2·TP + FP + FN) (the denominator is positive because anomalous images are present).
    """
    labels, scores = _check_labels_scores(labels, scores)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    pred = scores > threshold
    tp = int((pred & (labels == 1)).sum())
    fp = int((pred & (labels == 0)).sum())
    fn = int((~pred & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn)


# ---------------------------------------------------------------------------------------------------------------
# MVTec AU-PRO
# ---------------------------------------------------------------------------------------------------------------


def _label_regions(masks: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components of every mask, numbered 1..R uniquely across the whole set (0 = OK pixel)."""
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 8 or 4, got {connectivity!r}")
    structure = _STRUCTURES[connectivity]
    regions = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labeled, n = scipy.ndimage.label(mask, structure=structure, output=np.int64)
        # Shift this image's labels past the previous images' so a region id means one region in the whole set.
        regions[i] = np.where(labeled > 0, labeled + num_regions, 0)
        num_regions += n
    return regions, num_regions


def _pro_curve_all_points(scores: np.ndarray, regions: np.ndarray, num_regions: int, num_ok: int):
    """MVTec's construction: one argsort over all pixels, cumulative sums, one point per distinct score."""
    # Per pixel, how much it moves each curve once the threshold drops to its score: an OK pixel adds one false
    # positive, a pixel of region c adds 1/|c| to that region's overlap.
    inverse_size = np.zeros(num_regions + 1, dtype=np.float64)
    inverse_size[1:] = 1.0 / np.bincount(regions, minlength=num_regions + 1)[1:]
    order = np.argsort(scores)[::-1]  # highest score first; the order within ties is irrelevant (merged below)
    sorted_scores = scores[order]
    sorted_regions = regions[order]
    fp_counts = np.cumsum(sorted_regions == 0, dtype=np.int64)  # exact integer counts
    overlap_sums = np.cumsum(inverse_size[sorted_regions])  # float64
    # Keep the last pixel of each run of equal scores: after it, every pixel with score >= s has been counted.
    last = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.concatenate([[0.0], fp_counts[last] / num_ok])
    pro = np.concatenate([[0.0], overlap_sums[last] / num_regions])
    pro[-1] = 1.0  # at the lowest score every pixel is counted; the float sum can miss 1 by an ulp
    return fpr, pro


def _pro_curve_corners(scores: np.ndarray, regions: np.ndarray, num_regions: int, num_ok: int):
    """The same polyline as `_pro_curve_all_points`, keeping only its corners.

    Between two consecutive distinct region scores r_{j-1} > r_j only OK pixels enter, so the curve runs
    horizontally there; its points are collinear and add nothing to the area or to the interpolation at the
    limit. The corners per r_j are A_j = (FPR(> r_j), PRO(> r_j)) and B_j = (FPR(>= r_j), PRO(>= r_j)); FPR
    counts come from binary searches in the sorted OK scores, so only the region pixels need an argsort.
    """
    in_region = regions > 0
    ok_sorted = np.sort(scores[~in_region])
    region_scores = scores[in_region]
    region_ids = regions[in_region]
    weights = 1.0 / np.bincount(region_ids, minlength=num_regions + 1)[region_ids]  # 1/|c| per region pixel

    order = np.argsort(region_scores)  # ascending
    r_sorted = region_scores[order]
    weight_above = np.cumsum(weights[order][::-1])[::-1]  # weight_above[i] = sum of weights of r_sorted[i:]
    first = np.concatenate([[True], r_sorted[1:] != r_sorted[:-1]])  # first index of each run of ties
    r_values = r_sorted[first]  # distinct region scores, ascending
    pro_ge = weight_above[first] / num_regions  # PRO(>= r_j)
    pro_ge[0] = 1.0  # every region pixel scores >= the lowest region score; the float sum can miss 1 by an ulp
    pro_gt = np.append(pro_ge[1:], 0.0)  # PRO(> r_j) = PRO(>= next higher value)
    fp_ge = num_ok - np.searchsorted(ok_sorted, r_values, side="left")
    fp_gt = num_ok - np.searchsorted(ok_sorted, r_values, side="right")

    # Interleave A_j, B_j from the highest r_j down, framed by (0, 0) and the final horizontal run to FPR 1.
    fp = np.concatenate([[0], np.stack([fp_gt, fp_ge], axis=1)[::-1].ravel(), [num_ok]])
    pro = np.concatenate([[0.0], np.stack([pro_gt, pro_ge], axis=1)[::-1].ravel(), [pro_ge[0]]])
    distinct = np.append(True, (np.diff(fp) != 0) | (np.diff(pro) != 0))  # drop repeated points
    return fp[distinct] / num_ok, pro[distinct]


def pro_curve(maps, masks, connectivity: int = 8, reference: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap (PRO) curve of the MVTec AD evaluation.

    For each distinct score s (ties merged), with the rule "pixel anomalous iff score >= s":

        FPR(s) = #{OK pixels with score >= s} / #OK pixels          (OK pixels of *all* images, good ones too)
        PRO(s) = mean over GT regions c of #{p in c : score_p >= s} / |c|

    GT regions are the connected components of each mask (8-connectivity by default, as in MVTec's
    `scipy.ndimage.label(gt, structure=np.ones((3, 3)))`), pooled over all images: the mean is over regions,
    not over images.

    By default only the corners of the curve are returned: the points dropped lie on horizontal runs between
    them (thresholds that only add OK pixels), so the plotted polyline and every area under it are the same.

    Args:
        maps: (N, H, W) anomaly maps at the mask resolution.
        masks: (N, H, W) ground truth, bool or 0/1. Must contain at least one region and one OK pixel.
        connectivity: 8 (MVTec) or 4.
        reference: if True, return one point per distinct score, built as MVTec does (one argsort over all
            pixels and cumulative sums); slower, same polyline.

    Returns:
        (fpr, pro): float64 arrays of equal length, from (0, 0) to (1, 1), FPR non-decreasing.
    """
    maps, masks = _check_maps_masks(maps, masks)
    regions, num_regions = _label_regions(masks, connectivity)
    if num_regions == 0:
        raise ValueError("masks contain no anomalous region; PRO is undefined without ground-truth regions")
    regions = regions.ravel()
    num_ok = int(np.count_nonzero(regions == 0))
    if num_ok == 0:
        raise ValueError("masks contain no OK (0) pixel; the false-positive rate is undefined")
    build = _pro_curve_all_points if reference else _pro_curve_corners
    fpr, pro = build(maps.ravel(), regions, num_regions, num_ok)
    return fpr, np.minimum(pro, 1.0)  # summing 1/|c| in float64 can pass 1 by an ulp


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max], with y linearly interpolated at x_max.

    `x` is non-decreasing with x[0] <= x_max <= x[-1]. Equal x values (vertical steps) add no area. This is the
    rule of MVTec's `generic_util.trapezoid`: the segment that crosses x_max is cut there.
    """
    ins = int(np.searchsorted(x, x_max, side="right"))  # first index with x > x_max
    xs, ys = x[:ins], y[:ins]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < x_max:  # x_max falls strictly inside segment [ins - 1, ins]
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at_max) * (x_max - x0)
    return area


def aupro(maps, masks, fpr_limit: float = 0.3, connectivity: int = 8, reference: bool = False) -> float:
    """Normalised area under the PRO curve up to an FPR limit: the MVTec AD evaluation's AU-PRO.

    The curve is `pro_curve(maps, masks)` (every distinct score, ties merged, FPR over the OK pixels of all
    images including the good ones). It is integrated with the trapezoid rule from FPR 0 to `fpr_limit`, with
    PRO linearly interpolated at the limit, and divided by `fpr_limit`, so a perfect map scores 1 and the
    result never exceeds 1. Counts are int64 and sums float64.

    Pass the maps and masks of *all* test images of a category: leaving out the good images changes the FPR.

    Args:
        maps: (N, H, W) anomaly maps at the mask resolution.
        masks: (N, H, W) ground truth, bool or 0/1, with at least one anomalous region.
        fpr_limit: upper FPR integration limit in (0, 1]; MVTec and most papers use 0.3.
        connectivity: 8 (MVTec) or 4, for the ground-truth regions.
        reference: if True, integrate the one-point-per-score curve (see `pro_curve`); slower, same value up to
            float rounding.

    Returns:
        AU-PRO in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(maps, masks, connectivity=connectivity, reference=reference)
    return _area_up_to(fpr, pro, float(fpr_limit)) / fpr_limit


# ---------------------------------------------------------------------------------------------------------------
# The papers' own protocols
# ---------------------------------------------------------------------------------------------------------------


def pro_rd4ad(maps, masks, num_th: int = 200, reference: bool = False) -> float:
    """The threshold-sampled PRO of RD4AD's `compute_pro`, as used in DMAD's and AAND's `test.py`.

    Their procedure, reproduced here:
    1. thresholds `np.arange(min, max, (max - min) / num_th)` over all scores (about `num_th` of them; float
       rounding in `arange` can add one more), and the rule "anomalous iff score > th" (strict);
    2. per threshold, PRO = mean over all GT regions (skimage 8-connected components, pooled over images) of
       the fraction of the region above th, and FPR = false positives / normal pixels over all images;
    3. keep the thresholds with FPR < 0.3, divide FPR by its largest kept value, and take sklearn's `auc`.

    It differs from `aupro` in three ways: the threshold grid is coarse, there is no interpolation at 0.3, and
    the normalisation is by the largest sampled FPR below 0.3 rather than by 0.3. Use it only to compare with
    numbers those papers print; `aupro` is the reference definition.

    The original loops over thresholds and regions; this version sorts the normal scores and each region's
    scores once and counts with `searchsorted`, which gives the same counts.

    Args:
        maps: (N, H, W) anomaly maps at the mask resolution.
        masks: (N, H, W) ground truth, bool or 0/1, with at least one anomalous region and one normal pixel.
        num_th: number of thresholds.
        reference: if True, binarise the maps at every threshold and count, as the original does (slower).

    Returns:
        The RD4AD-style PRO.
    """
    if not (isinstance(num_th, (int, np.integer)) and num_th >= 2):
        raise ValueError(f"num_th must be an integer >= 2, got {num_th!r}")
    maps, masks = _check_maps_masks(maps, masks)
    regions, num_regions = _label_regions(masks, 8)
    if num_regions == 0:
        raise ValueError("masks contain no anomalous region; PRO is undefined without ground-truth regions")
    # The original builds its thresholds with `np.arange` in the maps' own dtype and compares in that dtype;
    # doing the same keeps the counts identical for float32 maps. Other dtypes are widened to float64.
    scores = maps.ravel()
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    if masks.all():
        raise ValueError("masks contain no normal (0) pixel; the false-positive rate is undefined")
    lo, hi = scores.min(), scores.max()
    if lo == hi:
        raise ValueError("maps are constant; the threshold grid of pro_rd4ad needs max > min")
    thresholds = np.arange(lo, hi, (hi - lo) / num_th)
    flat_regions = regions.ravel()
    if reference:
        fpr, pro = _rd4ad_points_by_loop(scores, flat_regions, num_regions, thresholds)
    else:
        fpr, pro = _rd4ad_points_by_sorting(scores, flat_regions, num_regions, thresholds)

    keep = fpr < 0.3
    if np.count_nonzero(keep) < 2:
        raise ValueError("fewer than 2 thresholds have FPR < 0.3; pro_rd4ad cannot integrate (try more num_th)")
    fpr, pro = fpr[keep], pro[keep]
    if fpr.max() == 0:
        raise ValueError("every kept threshold has FPR 0; pro_rd4ad's normalisation by max FPR divides by 0")
    from sklearn.metrics import auc
    return float(auc(fpr / fpr.max(), pro))


def _rd4ad_points_by_loop(scores, flat_regions, num_regions, thresholds):
    """(FPR, PRO) per threshold: binarise all pixels at each threshold, count per region with bincount."""
    normal = flat_regions == 0
    num_normal = np.count_nonzero(normal)
    sizes = np.bincount(flat_regions, minlength=num_regions + 1)[1:]
    fpr, pro = np.empty(thresholds.size), np.empty(thresholds.size)
    for i, th in enumerate(thresholds):
        above = scores > th
        fpr[i] = np.count_nonzero(above & normal) / num_normal
        covered = np.bincount(flat_regions[above], minlength=num_regions + 1)[1:]
        pro[i] = np.mean(covered / sizes)
    return fpr, pro


def _rd4ad_points_by_sorting(scores, flat_regions, num_regions, thresholds):
    """(FPR, PRO) per threshold from sorted scores and binary searches; same counts as the loop."""
    normal = flat_regions == 0
    num_normal = int(np.count_nonzero(normal))

    # FPR per threshold: normal pixels with score > th, counted by binary search in the sorted normal scores.
    normal_sorted = np.sort(scores[normal])
    fpr = (num_normal - np.searchsorted(normal_sorted, thresholds, side="right")) / num_normal

    # PRO per threshold: sort pixels by (region, score) once; each region is then a sorted slice.
    in_region = np.flatnonzero(flat_regions)
    order = np.lexsort((scores[in_region], flat_regions[in_region]))
    region_ids = flat_regions[in_region][order]
    region_scores = scores[in_region][order]
    bounds = np.searchsorted(region_ids, np.arange(1, num_regions + 2))  # slice [bounds[r-1], bounds[r]) = r
    overlap = np.zeros(thresholds.size, dtype=np.float64)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        above = (stop - start) - np.searchsorted(region_scores[start:stop], thresholds, side="right")
        overlap += above / (stop - start)
    return fpr, overlap / num_regions


def vtadl_pro(maps, masks) -> float:
    """VT-ADL's "PRO", which is in fact the pixel AUROC.

    VT-ADL's `test.py` (`Patch_Overlap_Score`) reports `PRO_score = roc_auc_score(masks, scores)` over all test
    pixels, so its "PRO" column is a pixel-level ROC-AUC, not a per-region overlap. This function is
    `pixel_auroc` under that paper's name, so a notebook can put the paper's number next to ours honestly.

    Args:
        maps: (N, H, W) anomaly maps at the mask resolution.
        masks: (N, H, W) ground truth, bool or 0/1.

    Returns:
        Pixel AUROC in [0, 1].
    """
    return pixel_auroc(maps, masks)
