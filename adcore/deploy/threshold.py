"""The decision threshold, fitted on held-out good images only: no anomalous image is ever needed or seen.

Given the scores s_1..s_n of n held-out good images and a target false-positive rate α, the threshold t is the k-th
smallest score. An image is called anomalous when its score is *above* t. Let FPR(t) be the share of all good images
(drawn like the held-out ones) scoring above t: a fixed number once t is fitted, but random over fits, since t
depends on which n images were held out. With continuous scores FPR(t) ~ Beta(n + 1 − k, k), whatever the score
distribution (the k-th order statistic of n uniforms is Beta(k, n + 1 − k)). Two rules choose k:

* **split-conformal** (the default): k = ⌈(n + 1)(1 − α)⌉. It promises E[FPR(t)] = (n + 1 − k)/(n + 1) ≤ α: *on
  average over fits* (equivalently, a new good image drawn after the fit is flagged with probability ≤ α). It does
  not promise that *this* threshold's rate is ≤ α. One fit can be far above: with n = 16 and α = 1 % the threshold
  is the largest score and P(FPR > α) = 0.99¹⁶ = 85 %.
* **with confidence 1 − δ** (``confidence=0.9``): the smallest k with P(FPR(t) > α) = P(Binomial(n, 1 − α) ≥ k)
  ≤ δ (the binomial form of the Beta tail). It promises that *this* threshold's rate exceeds α in at most a share δ
  of fits. It needs n ≥ ln δ / ln(1 − α) held-out images (k ≤ n): 230 for α = 1 %, δ = 10 %
  (:func:`needed_holdout`). With fewer, fitting refuses rather than promise what the data cannot back.

With few held-out images the conformal target may be out of reach: k > n when n < 1/α − 1 (for α = 1 %: fewer than
99 images). The threshold is then the largest held-out score, whose expected false-positive rate is 1/(n + 1) rather
than α; the record says so (``achievable_fpr``) and the training command prints it. Nothing is extrapolated beyond
the data.

The same rule, on each held-out image's map maximum, gives the pixel threshold for masks: a good image's mask is
then empty with the same promise. For models whose image score is the map maximum, both thresholds are equal.
Ties among scores only make either promise more conservative.
"""
from __future__ import annotations

import math

import numpy as np


def check_fpr(fpr) -> float:
    """``fpr`` as a float in (0, 1), or a ValueError (NaN, 0, 1, negative, not a number)."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:  # NaN fails 0 < fpr
        raise ValueError(f"the target false-positive rate (--fpr) must be in (0, 1), got {fpr!r}")
    return float(fpr)


def check_confidence(confidence) -> float | None:
    """``confidence`` as a float in (0, 1), None for the conformal rule, or a ValueError."""
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), e.g. 0.9, got {confidence!r}")
    return float(confidence)


def conformal_rank(n: int, fpr: float) -> int:
    """k, 1-based: the held-out score that is the threshold (clipped to n)."""
    return min(n, math.ceil((n + 1) * (1 - fpr)))


def exceed_probability(n: int, k: int, fpr: float) -> float:
    """P(FPR(t) > fpr) over fits when t is the k-th smallest of n held-out good scores: P(Binomial(n, 1 − fpr) ≥ k)."""
    from scipy.stats import binom

    return float(binom.sf(k - 1, n, 1 - fpr))


def needed_holdout(fpr: float, confidence: float) -> int:
    """The fewest held-out good images for which some order statistic backs ``fpr`` with ``confidence``: the
    smallest n with (1 − fpr)ⁿ ≤ 1 − confidence (then k = n, the largest score, is enough)."""
    n = max(1, math.ceil(math.log(1 - confidence) / math.log(1 - fpr)))
    while exceed_probability(n, n, fpr) > 1 - confidence:  # guard against log rounding at the boundary
        n += 1
    return n


def confident_rank(n: int, fpr: float, confidence: float) -> int:
    """The smallest k (1-based) with P(FPR > fpr) ≤ 1 − confidence.

    Raises:
        ValueError: n < :func:`needed_holdout`, so that even the largest score cannot back it.
    """
    need = needed_holdout(fpr, confidence)
    if n < need:
        raise ValueError(f"a false-positive rate of {fpr:.3g} with confidence {confidence:.3g} needs at least {need} "
                         f"held-out good images; there are {n}. Hold out more (--holdout, more good images), or "
                         "raise --fpr, or drop --confidence for the on-average (split-conformal) rule")
    lo, hi = 1, n  # exceed_probability falls as k rises: bisect for the first k under the bound
    while lo < hi:
        mid = (lo + hi) // 2
        if exceed_probability(n, mid, fpr) <= 1 - confidence:
            hi = mid
        else:
            lo = mid + 1
    return lo


def quantile_threshold(scores, fpr: float, confidence: float | None = None) -> float:
    """The k-th smallest of ``scores``: k = ⌈(n + 1)(1 − fpr)⌉ (the largest when n is too small for ``fpr``), or
    :func:`confident_rank` when ``confidence`` is given."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    k = conformal_rank(n, fpr) if confidence is None else confident_rank(n, fpr, confidence)
    return float(scores[k - 1])


def fit_threshold(image_scores, map_maxima, map_minima, fpr: float = 0.01, confidence: float | None = None) -> dict:
    """The threshold record stored in a model file.

    Args:
        image_scores: (n,) image scores of held-out good images (the score the model decides on).
        map_maxima: (n,) maxima of their smoothed anomaly maps (for the pixel threshold of masks).
        map_minima: (n,) minima of those maps (their median is the floor of the overlays' colour scale).
        fpr: the target false-positive rate α, in (0, 1).
        confidence: None for the split-conformal rule (α on average over fits), or 1 − δ: the rate exceeds α in at
            most a share δ of fits.

    Returns:
        A plain dict: ``value`` (image threshold), ``pixel_value``, ``target_fpr``, ``confidence``,
        ``achievable_fpr`` (the expected rate of the chosen rank, (n + 1 − k)/(n + 1)), ``exceed_probability``
        (P(FPR > α) over fits), ``n_holdout``, ``rank``, ``rule``, ``promise`` (in words), the held-out
        scores themselves (``holdout_scores``, sorted) and their summary (``holdout_summary``: min, quartiles, p90,
        p99, max, mean, std) and ``map_floor``.
    """
    fpr, confidence = check_fpr(fpr), check_confidence(confidence)
    scores = np.asarray(image_scores, dtype=np.float64)
    maxima = np.asarray(map_maxima, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 1 or maxima.shape != scores.shape:
        raise ValueError(f"need one image score and one map maximum per held-out image, got shapes {scores.shape} "
                         f"and {maxima.shape}")
    if not (np.isfinite(scores).all() and np.isfinite(maxima).all()):
        raise ValueError("held-out scores contain NaN or infinity; the model is not usable as trained")
    n = len(scores)
    k = conformal_rank(n, fpr) if confidence is None else confident_rank(n, fpr, confidence)
    q = np.quantile(scores, [0.25, 0.5, 0.75, 0.9, 0.99])
    if confidence is None:
        rule = ("split-conformal: the ceil((n+1)(1-target_fpr))-th smallest held-out good score (the largest if n is "
                "too small); anomalous if score > value")
        promise = ("on average over fits (held-out draws), the share of good images above value is at most "
                   "achievable_fpr; a single fit can be above target_fpr with probability exceed_probability")
    else:
        rule = ("order statistic with confidence: the smallest rank k with P(Binomial(n, 1-target_fpr) >= k) <= "
                "1-confidence; anomalous if score > value")
        promise = ("the share of good images above value exceeds target_fpr in at most a share 1-confidence of fits "
                   "(exceed_probability)")
    return {
        "value": float(np.sort(scores)[k - 1]),
        "pixel_value": float(np.sort(maxima)[k - 1]),
        "target_fpr": fpr,
        "confidence": confidence,
        "achievable_fpr": (n + 1 - k) / (n + 1),
        "exceed_probability": exceed_probability(n, k, fpr),
        "n_holdout": n,
        "rank": k,
        "rule": rule,
        "promise": promise,
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
    if t.get("confidence") is not None:
        return line + (f" with confidence {t['confidence']:.0%}: rank {t['rank']} of {t['n_holdout']}, P(rate > "
                       f"target) = {t['exceed_probability']:.1%}; this needs at least "
                       f"{needed_holdout(t['target_fpr'], t['confidence'])} held-out good images)")
    if t["achievable_fpr"] > t["target_fpr"] + 1e-12:
        need = math.ceil(1 / t["target_fpr"] - 1)
        return line + (f"; NOT reachable with {t['n_holdout']} images: this threshold is the largest held-out score, "
                       f"expect about {t['achievable_fpr']:.1%} on average over fits, and a fit exceeds the target "
                       f"with probability {t['exceed_probability']:.0%}. Hold out at least {need} good images for the "
                       "target)")
    return line + (f", on average over fits: expected rate {t['achievable_fpr']:.2%}; this fit exceeds the target "
                   f"with probability {t['exceed_probability']:.0%}; --confidence 0.9 bounds that, and needs "
                   f"{needed_holdout(t['target_fpr'], 0.9)} held-out good images)")
