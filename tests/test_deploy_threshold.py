"""What each threshold rule promises, checked by simulation: many fits, each on its own draw of held-out good scores
from one distribution, and the true false-positive rate of each fitted threshold from that distribution's CDF.

* split-conformal: the false-positive rate is at most the target *on average over fits*, and one fit exceeds the
  target often (85 % of fits with 16 held-out images at 1 %, as the issue measured);
* ``confidence``: one fit exceeds the target in at most 1 − confidence of fits.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import gamma

from adcore.deploy.threshold import (confident_rank, conformal_rank, describe, exceed_probability, fit_threshold,
                                     needed_holdout)

FITS = 20_000


def _true_fprs(n: int, k: int, seed: int) -> np.ndarray:
    """(FITS,) the good-image false-positive rate of the k-th smallest of n gamma(2) scores, for FITS draws."""
    draws = gamma.rvs(2.0, size=(FITS, n), random_state=np.random.default_rng(seed))
    kth = np.partition(draws, k - 1, axis=1)[:, k - 1]
    return gamma.sf(kth, 2.0)


@pytest.mark.parametrize("n, fpr", [(16, 0.01), (299, 0.05), (120, 0.1)])
def test_split_conformal_promises_the_rate_on_average_only(n, fpr):
    k = conformal_rank(n, fpr)
    rates = _true_fprs(n, k, seed=n)
    # E[FPR] = (n + 1 - k) / (n + 1) <= target (up to Monte Carlo error: sd of the mean is below 2e-4 here)
    assert rates.mean() == pytest.approx((n + 1 - k) / (n + 1), abs=1e-3)
    assert rates.mean() <= max(fpr, 1 / (n + 1)) + 1e-3
    # ... but a single fit is above the target far more often than "at most" suggests
    exceed = (rates > fpr).mean()
    assert exceed == pytest.approx(exceed_probability(n, k, fpr), abs=0.015)
    assert exceed > 0.3
    if n == 16:
        assert exceed == pytest.approx(0.99 ** 16, abs=0.015)  # 85 %: the number


@pytest.mark.parametrize("n, fpr, confidence", [(230, 0.01, 0.9), (400, 0.05, 0.9), (100, 0.1, 0.95)])
def test_confidence_rule_exceeds_the_target_in_at_most_the_stated_share_of_fits(n, fpr, confidence):
    k = confident_rank(n, fpr, confidence)
    exceed = (_true_fprs(n, k, seed=n + 1) > fpr).mean()
    assert exceed <= (1 - confidence) + 0.006  # 3 sd of a 10 % rate over 20 000 fits
    assert exceed == pytest.approx(exceed_probability(n, k, fpr), abs=0.006)
    # the rank is the smallest that keeps the promise: one lower would break it
    assert k == 1 or exceed_probability(n, k - 1, fpr) > 1 - confidence


def test_confidence_needs_enough_held_out_images_and_says_how_many():
    assert needed_holdout(0.01, 0.9) == 230  # (0.99)^n <= 0.1
    assert 0.99 ** 230 <= 0.1 < 0.99 ** 229
    with pytest.raises(ValueError, match="needs at least 230 held-out good images; there are 229"):
        fit_threshold(np.arange(229.0), np.arange(229.0), np.zeros(229), fpr=0.01, confidence=0.9)
    t = fit_threshold(np.arange(230.0), np.arange(230.0), np.zeros(230), fpr=0.01, confidence=0.9)
    assert t["rank"] == 230 and t["value"] == 229.0 and t["exceed_probability"] <= 0.1
    assert t["confidence"] == 0.9 and "at least 230 held-out" in describe(t) and "1-confidence" in t["promise"]
    plain = fit_threshold(np.arange(16.0), np.arange(16.0), np.zeros(16), fpr=0.01)
    assert plain["exceed_probability"] == pytest.approx(0.99 ** 16) and "on average over fits" in describe(plain)


@pytest.mark.parametrize("bad", [0, 1, -0.1, float("nan"), 1.5, "0.1", True])
def test_bad_rates_and_confidences_are_refused(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        fit_threshold([1.0, 2.0], [1.0, 2.0], [0.0, 0.0], fpr=bad)
    with pytest.raises(ValueError, match="--confidence"):
        fit_threshold([1.0, 2.0], [1.0, 2.0], [0.0, 0.0], fpr=0.1, confidence=bad)
