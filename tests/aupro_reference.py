"""Brute-force references for the PRO metrics, used only by the tests.

Written for obviousness, not speed: one loop iteration per threshold, per-region counts taken with boolean
indexing, and exact rational arithmetic (`fractions.Fraction`) for the MVTec curve and its area, so the only
float rounding is the final conversion. Regions come from `skimage.measure.label`, an independent labelling
from the `scipy.ndimage.label` that `adcore.metrics` uses. Suitable for maps of a few hundred pixels.
"""

from __future__ import annotations

import bisect
import statistics
from fractions import Fraction

import numpy as np
from skimage import measure


def _regions(masks: np.ndarray, connectivity: int) -> list[np.ndarray]:
    """Every ground-truth region of every mask, as a boolean (N, H, W) array that is True only on that region."""
    skimage_connectivity = {8: 2, 4: 1}[connectivity]
    regions = []
    for i, mask in enumerate(masks):
        labeled = measure.label(mask.astype(np.uint8), connectivity=skimage_connectivity, background=0)
        for k in range(1, labeled.max() + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[i] = labeled == k
            regions.append(region)
    return regions


def pro_curve_exact(maps: np.ndarray, masks: np.ndarray, connectivity: int = 8) -> tuple[list, list]:
    """MVTec PRO curve as exact fractions: (0, 0), then one point per distinct score s, highest first.

    At s, a pixel is anomalous iff its score >= s; FPR counts OK pixels of all images, PRO averages the
    covered fraction over all regions of all images.
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    regions = _regions(masks, connectivity)
    ok = ~masks
    num_ok = int(ok.sum())
    fprs, pros = [Fraction(0)], [Fraction(0)]
    for s in sorted(set(maps.ravel().tolist()), reverse=True):
        positive = maps >= s
        fprs.append(Fraction(int((positive & ok).sum()), num_ok))
        overlaps = [Fraction(int((positive & r).sum()), int(r.sum())) for r in regions]
        pros.append(sum(overlaps, Fraction(0)) / len(regions))
    return fprs, pros


def aupro_exact(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, connectivity: int = 8) -> float:
    """MVTec AU-PRO from the exact curve: trapezoids up to the limit, PRO interpolated there, divided by it.

    The limit is taken as the decimal it is written as (0.3 is 3/10), so a curve point at FPR 3/10 hits it.
    """
    fprs, pros = pro_curve_exact(maps, masks, connectivity)
    limit = Fraction(repr(float(fpr_limit)))
    area = Fraction(0)
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x1 <= limit:
            area += (y0 + y1) / 2 * (x1 - x0)
    ins = bisect.bisect_right(fprs, limit)
    if fprs[ins - 1] < limit:
        x0, x1, y0, y1 = fprs[ins - 1], fprs[ins], pros[ins - 1], pros[ins]
        y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (y0 + y_at_limit) / 2 * (limit - x0)
    return float(area / limit)


def pro_rd4ad_loop(maps: np.ndarray, masks: np.ndarray, num_th: int = 200) -> float:
    """RD4AD's `compute_pro` step by step: a loop over thresholds, skimage regions, statistics.mean, sklearn auc."""
    from sklearn.metrics import auc

    masks = np.asarray(masks).astype(int)
    min_th, max_th = maps.min(), maps.max()
    rows = []  # (fpr, pro) per threshold, in threshold order
    for th in np.arange(min_th, max_th, (max_th - min_th) / num_th):
        binary = maps > th
        overlaps = []
        for binary_map, mask in zip(binary, masks):
            for region in measure.regionprops(measure.label(mask)):
                rows_idx, cols_idx = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(binary_map[rows_idx, cols_idx].sum() / region.area)
        normal = 1 - masks
        fpr = np.logical_and(normal, binary).sum() / normal.sum()
        rows.append((fpr, statistics.mean(overlaps)))
    kept = [(f, p) for f, p in rows if f < 0.3]
    max_fpr = max(f for f, _ in kept)
    return float(auc([f / max_fpr for f, _ in kept], [p for _, p in kept]))
