"""``digits``: scikit-learn's bundled handwritten digits as a one-class, image-level benchmark.

This is the protocol VT-ADL reports on MNIST (one digit is normal, all others anomalous), on the 1797 8×8 UCI digits
that ship inside scikit-learn, so it runs with no download. Per category ``"d"``: 70 % of the images of digit d
(a fixed permutation) train; the test split is the other 30 % plus an equal number (at most
:data:`MAX_ANOMALIES`) of other digits drawn by a fixed generator. There are no pixel masks (``has_masks=False``,
masks all zero), so only image-level metrics are meaningful.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .folder import AnomalyDataset, DataError, Sample, check_resample, check_split

CATEGORIES = tuple(str(d) for d in range(10))
NATIVE_SIZE = 32  # 8x8 upsampled 4x: large enough for a patch-16 ViT to see a 2x2 token grid
TRAIN_FRACTION = 0.7
MAX_ANOMALIES = 200
SEED = 0


@functools.lru_cache(maxsize=4)
def _images(size: int, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (N, size, size, 3) uint8 and their (N,) targets; 8×8 → size with ``resample``."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8), values 0..16
    x = F.interpolate(x, size=(size, size), mode=check_resample(resample), align_corners=False, antialias=size < 8)
    x = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)[:, 0].numpy()
    return np.repeat(x[..., None], 3, axis=-1), bunch.target.astype(np.int64)


def split_indices(digit: int, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (train normal, test normal, test anomalous) indices into the 1797 digits."""
    rng = np.random.default_rng([SEED, digit])
    normal = rng.permutation(np.flatnonzero(targets == digit))
    n_train = int(round(TRAIN_FRACTION * len(normal)))
    train, test_normal = np.sort(normal[:n_train]), np.sort(normal[n_train:])
    others = np.flatnonzero(targets != digit)
    anomalous = np.sort(rng.choice(others, size=min(len(test_normal), MAX_ANOMALIES), replace=False))
    return train, test_normal, anomalous


def load(category: str, split: str, *, image_size: int | None = None, mask_size: int | None = None,
         resample: str = "bilinear") -> AnomalyDataset:
    """One split of ``digits``; ``category`` is the normal digit, ``"0"`` to ``"9"``."""
    split = check_split(split)
    if str(category) not in CATEGORIES:
        raise DataError(f"digits category {category!r} not found; found: {', '.join(CATEGORIES)}")
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size <= 0):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}")
    size = NATIVE_SIZE if image_size is None else int(image_size)
    images, targets = _images(size, resample)
    train, test_normal, anomalous = split_indices(int(category), targets)
    index = train if split == "train" else np.concatenate([test_normal, anomalous])
    samples = [Sample(f"sklearn-digits/{i}", int(targets[i] != int(category)),
                      "good" if targets[i] == int(category) else f"digit_{targets[i]}") for i in index]
    return AnomalyDataset("digits", str(category), split, samples, image_size=size, mask_size=mask_size,
                          has_masks=False, cache_in_memory=True, arrays=images[index], resample=resample)
