"""The decision threshold, fitted on held-out good images only: no anomalous image is ever needed or seen.

Given the scores s_1..s_n of n held-out good images and a target false-positive rate α, the threshold is the k-th
smallest score with k = ⌈(n + 1)(1 − α)⌉: the split-conformal quantile. If good images are exchangeable (drawn like
the held-out ones), a new good image then scores above it with probability at most 1 − k/(n + 1) ≤ α, whatever the
score distribution. An image is called anomalous when its score is *above* the threshold.

With few held-out images the target may be out of reach: k > n when n < 1/α − 1 (for α = 1 %: fewer than 99
images). The threshold is then the largest held-out score, whose false-positive rate is about 1/(n + 1) rather than
α; the record says so (``achievable_fpr``) and the training command prints it. Nothing is extrapolated beyond the
data.

The same rule, on each held-out image's map maximum, gives the pixel threshold for masks: a good image's mask is
then empty with the same probability. For models whose image score is the map maximum, both thresholds are equal.
"""
from __future__ import annotations

import math

import numpy as np


def conformal_rank(n: int, fpr: float) -> int:
    """k, 1-based: the held-out score that is the threshold (clipped to n)."""
    return min(n, math.ceil((n + 1) * (1 - fpr)))


def quantile_threshold(scores, fpr: float) -> float:
    """The ⌈(n + 1)(1 − fpr)⌉-th smallest of ``scores`` (the largest when n is too small for ``fpr``)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    return float(scores[conformal_rank(len(scores), fpr) - 1])


def fit_threshold(image_scores, map_maxima, map_minima, fpr: float = 0.01) -> dict:
    """The threshold record stored in a model file.

    Args:
        image_scores: (n,) image scores of held-out good images (the score the model decides on).
        map_maxima: (n,) maxima of their smoothed anomaly maps (for the pixel threshold of masks).
        map_minima: (n,) minima of those maps (their median is the floor of the overlays' colour scale).
        fpr: the target false-positive rate α, in (0, 1).

    Returns:
        A plain dict: ``value`` (image threshold), ``pixel_value``, ``target_fpr``, ``achievable_fpr`` (the bound
        the held-out set can back: max(α-rank bound, 1/(n + 1))), ``n_holdout``, ``rank``, ``rule``, the held-out
        scores themselves (``holdout_scores``, sorted) and their summary (``holdout_summary``: min, quartiles, p90,
        p99, max, mean, std) and ``map_floor``.
    """
    if not (isinstance(fpr, (int, float)) and 0 < fpr < 1):
        raise ValueError(f"the target false-positive rate must be in (0, 1), got {fpr!r}")
    scores = np.asarray(image_scores, dtype=np.float64)
    maxima = np.asarray(map_maxima, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 1 or maxima.shape != scores.shape:
        raise ValueError(f"need one image score and one map maximum per held-out image, got shapes {scores.shape} "
                         f"and {maxima.shape}")
    if not (np.isfinite(scores).all() and np.isfinite(maxima).all()):
        raise ValueError("held-out scores contain NaN or infinity; the model is not usable as trained")
    n = len(scores)
    k = conformal_rank(n, fpr)
    q = np.quantile(scores, [0.25, 0.5, 0.75, 0.9, 0.99])
    return {
        "value": quantile_threshold(scores, fpr),
        "pixel_value": quantile_threshold(maxima, fpr),
        "target_fpr": float(fpr),
        "achievable_fpr": (n + 1 - k) / (n + 1),
        "n_holdout": n,
        "rank": k,
        "rule": "split-conformal: the ceil((n+1)(1-target_fpr))-th smallest held-out good score (the largest if n is "
                "too small); anomalous if score > value",
        "holdout_scores": sorted(float(s) for s in scores),
        "holdout_summary": {"min": float(scores.min()), "p25": float(q[0]), "median": float(q[1]), "p75": float(q[2]),
                            "p90": float(q[3]), "p99": float(q[4]), "max": float(scores.max()),
                            "mean": float(scores.mean()), "std": float(scores.std())},
        "map_floor": float(np.median(np.asarray(map_minima, dtype=np.float64))),
    }


def describe(threshold: dict) -> str:
    """One line for people: the threshold, the rate it targets and the rate its held-out set can back."""
    t = threshold
    line = (f"threshold {t['value']:.6g} from {t['n_holdout']} held-out good images (target false-positive rate "
            f"{t['target_fpr']:.2%}")
    if t["achievable_fpr"] > t["target_fpr"] + 1e-12:
        need = math.ceil(1 / t["target_fpr"] - 1)
        return line + (f"; NOT reachable with {t['n_holdout']} images: this threshold is the largest held-out score, "
                       f"expect about {t['achievable_fpr']:.1%}. Hold out at least {need} good images for the target)")
    return line + f", backed up to {t['achievable_fpr']:.2%})"
