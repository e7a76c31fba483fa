"""The ``textures`` benchmark's good test images against a threshold fitted as ``python -m adcore train`` fits it.

knn at its ``train`` defaults (EfficientNet-Lite0, whose weights ship with a pip package: nothing is downloaded),
about 2 s per category on one thread once the benchmark is built.
"""
import math

import numpy as np
import pytest
from scipy import stats

from adcore.data import textures
from adcore.data.threshold_check import overlap_check, threshold_check

LEVEL = 0.01  # the one-sided tests' level (issue 22)


@pytest.fixture(scope="module")
def checks():
    return {c: threshold_check("textures", c) for c in textures.CATEGORIES}


@pytest.mark.parametrize("category", textures.CATEGORIES)
def test_the_check_fits_as_train_does_and_counts_what_it_flags(checks, category):
    c = checks[category]
    assert c["n"] == textures.NUM_TEST_GOOD == 100 and c["n_holdout"] == 16 == len(c["holdout_scores"])
    assert c["rank"] == 16 and c["threshold"] == max(c["holdout_scores"])  # 16 scores: the largest (1 % unreachable)
    assert c["achievable_fpr"] == pytest.approx(1 / 17)
    assert c["flagged"] == int((np.array(c["test_scores"]) > c["threshold"]).sum())
    assert c["p_binomial"] == pytest.approx(stats.binomtest(c["flagged"], 100, 1 / 17, alternative="greater").pvalue)
    # the largest of m exchangeable scores: P(K >= k) = C(n, k) / C(n + m, k) for K of n new scores above it
    k = c["flagged"]
    assert c["p_exchangeable"] == pytest.approx(math.comb(100, k) / math.comb(116, k), rel=1e-9)


@pytest.mark.xfail(strict=True, reason=(
    "issue 22's target is not met by textures v4: held-out training images share pixels with the 64 fitted ones "
    "(every window of a quadrant overlaps every other by >= 44 %), test images do not, so knn scores held-out goods "
    "lower than test goods whatever the test windows' positions; see adcore/data/threshold_check.py"))
@pytest.mark.parametrize("category", textures.CATEGORIES)
def test_the_threshold_flags_good_test_images_at_the_rate_it_backs(checks, category):
    assert checks[category]["p_binomial"] > LEVEL, checks[category]["flagged"]


@pytest.mark.parametrize("category", textures.CATEGORIES)
def test_held_out_images_sharing_pixels_with_the_fitted_ones_score_lower_than_new_images(category):
    # why the target above fails: the data chapter's second figure
    scores = overlap_check(category)["scores"]
    held, other, test = (np.array(scores[k]) for k in ("held out, same quadrant", "training, other quadrant",
                                                        "test good"))
    assert (len(held), len(other), len(test)) == (10, 40, 100)
    assert np.median(held) < min(np.median(other), np.median(test)) - 2
