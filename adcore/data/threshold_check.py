"""Are a benchmark's good test images drawn like its training images? The false-positive check of issue 22.

A threshold is fitted exactly as ``python -m adcore train`` fits it (:func:`adcore.deploy.train.train`, its defaults:
20 % of the training images held out, 16 of ``textures``' 80; threshold at the split-conformal rank for a 1 % target,
which with 16 scores is the largest of them). If good test images are exchangeable with the training images, a good
test image scores above that threshold with probability ``achievable_fpr`` = (n_holdout + 1 − rank)/(n_holdout + 1),
1/17 here: the rate the threshold can back. The check counts the good test images it flags and asks whether that
count is consistent with the rate, with two tests:

- ``p_binomial``, the issue's target: a one-sided binomial test (``scipy.stats.binomtest``) of the count against
  n × rate. It treats the fitted threshold as fixed with a false-positive rate of exactly the backed rate.
- ``p_exchangeable``: the exact null distribution when all n_holdout + n good images are exchangeable. The fitted
  threshold is itself random: the probability that a good image scores above the rank-k held-out score is
  Beta(n_holdout + 1 − k, k) distributed (Beta(1, 16) for the largest of 16: its 5–95 % range is 0.3 %–17 %), so the
  flagged count is beta-binomial, much wider than binomial. This p-value does not reject exchangeable data more
  often than its level; the binomial one does: at the 1 % level, with n = 100 and 16 held out, it rejects from 13
  flagged images on, which exchangeable data reach 13 % of the time. Neither test knows that overlapping windows
  make the good test images correlated.

The count can be too high (good test images that are not like the training images: v3 of ``textures`` flagged up to
93 % of them), which is what these one-sided tests detect; too low is not a false-positive problem.

On ``textures`` a second cause makes the count too high whatever the layout: the held-out images are windows of the
same photo quadrants as the fitted ones and overlap them, test images share no pixel with them, and a model that
memorises patches (knn) scores the held-out ones lower. :func:`overlap_check` measures that effect on its own.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np


def threshold_check(dataset: str = "textures", category: str = "brick", *, model: str = "knn", holdout: float = 0.2,
                    fpr: float = 0.01, seed: int = 0, device="cpu", progress: bool = False) -> dict:
    """Fit a threshold as ``python -m adcore train`` does and count the good test images it flags.

    Args:
        dataset: a benchmark name or an MVTec-layout folder, as ``train --data`` takes it (its default data root).
        category: the category; its ``train/good`` images train the model and hold out the threshold's images.
        model, holdout, fpr, seed, device: as ``python -m adcore train`` takes them (its defaults).
        progress: progress bars while training and scoring.

    Returns:
        A plain dict: ``category``, ``model``, ``threshold`` (the model file's threshold value), ``rank``,
        ``achievable_fpr`` (the rate the threshold backs), ``holdout_scores`` (n_holdout,) and ``test_scores`` (n,)
        as lists, ``n_holdout``, ``n``, ``flagged`` (good test images scoring above the threshold), ``p_binomial``
        and ``p_exchangeable`` (module docstring).
    """
    from scipy import stats

    from ..artifact import read
    from ..deploy.postprocess import ScoringGraph
    from ..deploy.train import Part, score_images, train
    from . import load_dataset

    with tempfile.TemporaryDirectory(prefix="adcore-threshold-check-") as tmp:
        out = Path(tmp) / "model.pt"
        with contextlib.redirect_stdout(io.StringIO()):  # train prints its threshold line and the file it wrote
            fitted = train(model, dataset, out, category=category, holdout=holdout, fpr=fpr, seed=seed,
                           device=device, progress=progress)
        meta = read(out)
    size, resample = meta["preprocessing"]["image_size"], meta["preprocessing"]["resample"]
    test = load_dataset(dataset, category, "test", image_size=size, resample=resample, cache_in_memory=True)
    good = Part(test, np.flatnonzero(test.labels == 0).tolist())
    if len(good) == 0:
        raise ValueError(f"{dataset}/{category} has no good test images to check a threshold on")
    graph = ScoringGraph(fitted.eval(), size).eval()
    scores = score_images(graph, good, meta["training"]["batch_size"], device, progress)[0]
    t = meta["threshold"]
    n, m, k = len(scores), t["n_holdout"], t["rank"]
    flagged = int((scores > t["value"]).sum())  # anomalous if score > value (adcore.deploy.threshold)
    return {
        "dataset": str(dataset), "category": category, "model": model, "threshold": t["value"], "rank": k,
        "achievable_fpr": t["achievable_fpr"], "holdout_scores": list(t["holdout_scores"]),
        "test_scores": [float(s) for s in scores], "n_holdout": m, "n": n, "flagged": flagged,
        "p_binomial": float(stats.binomtest(flagged, n, t["achievable_fpr"], alternative="greater").pvalue),
        "p_exchangeable": float(stats.betabinom(n, m + 1 - k, k).sf(flagged - 1)),
    }


def overlap_check(category: str = "brick", *, model: str = "knn", n_holdout: int = 10, seed: int = 0,
                  device="cpu") -> dict:
    """Scores of three kinds of good ``textures`` image under a model fitted on training images of one quadrant only.

    The model (its ``train`` settings) is fitted on the top-left quadrant's training images except ``n_holdout`` of
    them, chosen at random. It then scores those held-out ones (windows overlapping the fitted ones), the
    bottom-right quadrant's training images (drawn as training images are, sharing no pixel with the fitted ones)
    and the good test images (sharing no pixel either). If the first score lower than the other two, held-out
    images that share pixels with the fitted ones are no stand-in for new images.

    Returns:
        ``{"category", "model", "scores": {kind: list of floats}}``.
    """
    import adcore

    from ..deploy.postprocess import ScoringGraph
    from ..deploy.train import Part, resolve_settings, score_images
    from . import load_dataset, textures

    training, params = resolve_settings(model)
    size, batch_size = training["image_size"], training["batch_size"]
    train = load_dataset("textures", category, "train", image_size=size, resample=training["resample"],
                         cache_in_memory=True)
    test = load_dataset("textures", category, "test", image_size=size, resample=training["resample"],
                        cache_in_memory=True)
    boxes = textures.windows(category)["train/good"]  # (top, left, side) of train/good/000.png, 001.png, ...
    top_left = [i for i, (top, left, _) in enumerate(boxes) if top < textures.QUADRANT and left < textures.QUADRANT]
    other = [i for i, (top, _, _) in enumerate(boxes) if top >= textures.QUADRANT]
    held = set(np.random.default_rng(seed).choice(top_left, n_holdout, replace=False).tolist())
    adcore.seed_everything(seed)
    fitted = adcore.create_model(model, **params)
    adcore.fit(fitted, Part(train, [i for i in top_left if i not in held]), num_epochs=training["num_epochs"],
               lr=training["lr"], batch_size=batch_size, seed=seed, device=device, progress=False)
    graph = ScoringGraph(fitted.eval(), size).eval()
    parts = {"held out, same quadrant": Part(train, sorted(held)), "training, other quadrant": Part(train, other),
             "test good": Part(test, np.flatnonzero(test.labels == 0).tolist())}
    scores = {kind: score_images(graph, part, batch_size, device, False)[0].tolist() for kind, part in parts.items()}
    return {"category": category, "model": model, "scores": scores}


def plot_overlap_checks(checks: list[dict]):
    """One panel per :func:`overlap_check`: the empirical CDF of each kind of image's scores."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(checks), figsize=(4.2 * len(checks), 3.0), squeeze=False)
    for ax, c in zip(axes[0], checks):
        for kind, scores in c["scores"].items():
            _ecdf(ax, scores, f"{kind} ({len(scores)})")
        ax.set_title(f"{c['category']}: {c['model']} fitted on one quadrant", fontsize=9)
        ax.set_xlabel(f"{c['model']} image score")
        ax.set_ylabel("fraction of images ≤ score")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _ecdf(ax, scores, label: str) -> None:
    s = np.sort(np.asarray(scores, dtype=np.float64))
    ax.step(np.r_[s[0], s], np.r_[0.0, np.arange(1, len(s) + 1) / len(s)], where="post", label=label)


def plot_threshold_checks(checks: list[dict]):
    """One panel per check: the empirical CDFs of held-out training-good and test-good scores, and the threshold."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(checks), figsize=(4.2 * len(checks), 3.2), squeeze=False)
    for ax, c in zip(axes[0], checks):
        _ecdf(ax, c["holdout_scores"], f"held-out training good ({c['n_holdout']})")
        _ecdf(ax, c["test_scores"], f"test good ({c['n']})")
        ax.axvline(c["threshold"], color="k", ls="--", lw=1, label="threshold")
        ax.set_title(f"{c['category']}: {c['flagged']}/{c['n']} flagged (backs {c['achievable_fpr']:.1%})\n"
                     f"binomial p = {c['p_binomial']:.3g}, exchangeable p = {c['p_exchangeable']:.3g}", fontsize=9)
        ax.set_xlabel(f"{c['model']} image score")
        ax.set_ylabel("fraction of images ≤ score")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
