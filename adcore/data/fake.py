"""A fake MVTec AD and a fake WideResNet-50-2 weights file, so that the paper path can be run offline and in tests.

:func:`make_fake_mvtec` writes a tree in MVTec AD's exact layout, with its real category and defect-type names, grey
where MVTec AD is grey (:data:`adcore.data.mvtec.GREY`), at any size from 8 px::

    <root>/<category>/train/good/000.png ...                  n_train images
                      test/good/000.png ...                   n_test images
                      test/<defect>/000.png ...               n_test images per defect type
                      ground_truth/<defect>/000_mask.png ...  8-bit grey, 0 or 255, the size of its image

Textures are oriented sinusoidal stripes over the whole image; objects are an ellipse (a centred disk for bottle and
cable, as AAND's foreground rule assumes) on a plain background, bright on dark except capsule, screw and zipper,
which are dark on light. Every image differs by a small phase shift and pixel noise. A defect is an ellipse that
covers about 1-6 % of the image (inside the object for objects; at least 3 px across, so more at 8-16 px), painted
as a flat stain of the opposite extreme or a 2-px black-and-white checker (alternating by defect type), so it is
plainly visible and exactly where its mask is.
Everything is drawn from ``numpy.random.default_rng([seed, i])``, i the category's index in MVTec AD, so a category's
images do not depend on which other categories are written.

:func:`make_fake_weights` writes a randomly initialised torchvision ``wide_resnet50_2`` state dict: a real file for
``weights_path=`` (and any check that the weights exist) where the ImageNet checkpoint cannot be had. Its features
are meaningless; it proves only that the code runs.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from . import mvtec
from .folder import DataError

MIN_IMAGE_SIZE = 8
# Objects drawn dark on a light background; the rest are bright on dark (AAND's "dark" and "bright" foreground rules).
_DARK_OBJECTS = ("capsule", "screw", "zipper")
_DISK_OBJECTS = ("bottle", "cable")
_NOISE_SD = 0.02


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_categories(categories) -> tuple[str, ...]:
    if isinstance(categories, str):
        categories = (categories,)
    if not isinstance(categories, Iterable):
        raise DataError(f"categories must be MVTec AD category names, got {categories!r}")
    chosen = tuple(categories)
    unknown = [c for c in chosen if c not in mvtec.CATEGORIES]
    if unknown:
        raise DataError(f"unknown MVTec AD categories {unknown}; expected some of {', '.join(mvtec.CATEGORIES)}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise DataError(f"categories must name each MVTec AD category at most once, and at least one; got {chosen!r}")
    return chosen


class _Category:
    """The drawing rules of one category: its stripes, its object (if any) and its random stream."""

    def __init__(self, category: str, size: int, seed: int):
        self.size = size
        self.rng = np.random.default_rng([seed, mvtec.CATEGORIES.index(category)])
        self.channels = 1 if category in mvtec.GREY else 3
        self.tint = self.rng.uniform(0.5, 1.0, self.channels)  # (C,) per-channel gain: the category's colour
        self.cycles = self.rng.uniform(2.0, 5.0)  # stripes per image side
        self.angle = self.rng.uniform(0.0, np.pi)
        self.is_object = category in mvtec.OBJECTS
        self.dark = category in _DARK_OBJECTS
        disk = category in _DISK_OBJECTS
        self.axes = (0.32, 0.32) if disk else tuple(self.rng.uniform(0.22, 0.38, 2))  # semi-axes / size
        self.yy, self.xx = (np.mgrid[:size, :size] + 0.5) / size  # (S, S) each: pixel centres in (0, 1)

    def _ellipse(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0

    def good(self) -> tuple[np.ndarray, np.ndarray]:
        """A defect-free image (S, S, C) float in [0, 1] and where a defect may go (S, S) bool."""
        rng = self.rng
        phase = rng.uniform(0.0, 0.6)
        t = self.xx * np.cos(self.angle) + self.yy * np.sin(self.angle)
        stripes = 0.5 + 0.25 * np.sin(2 * np.pi * self.cycles * t + phase)  # (S, S) in [0.25, 0.75]
        if not self.is_object:
            image = stripes[..., None] * self.tint * 1.3
            cy = cx = 0.5
            inside = self._ellipse(cy, cx, 0.35, 0.35)  # keep defects off the border
        else:
            cy, cx = 0.5 + rng.uniform(-0.03, 0.03, 2)
            obj = self._ellipse(cy, cx, *self.axes)
            fill = (0.1 + 0.5 * stripes) if self.dark else (0.35 + 0.8 * stripes)
            background = 0.88 if self.dark else 0.1
            image = np.where(obj[..., None], fill[..., None] * self.tint, background)
            inside = self._ellipse(cy, cx, 0.55 * self.axes[0], 0.55 * self.axes[1])
        inside[min(int(cy * self.size), self.size - 1), min(int(cx * self.size), self.size - 1)] = True  # never empty
        image = image + _NOISE_SD * rng.standard_normal((self.size, self.size, self.channels))
        return np.clip(image, 0.0, 1.0), inside

    def defective(self, kind: int) -> tuple[np.ndarray, np.ndarray]:
        """An image with one defect, (S, S, C) float, and its mask (S, S) bool, never empty."""
        image, inside = self.good()
        rng = self.rng
        ys, xs = np.nonzero(inside)
        pick = rng.integers(len(ys))
        cy, cx = (ys[pick] + 0.5) / self.size, (xs[pick] + 0.5) / self.size  # a pixel centre: the mask holds it
        radius = np.maximum(rng.uniform(0.06, 0.13, 2), 1.5 / self.size)  # at least 1.5 px at 8 px
        mask = self._ellipse(cy, cx, *radius)
        if kind % 2 == 0:  # a flat stain at the extreme away from the local mean
            value = 0.05 if image[mask].mean() > 0.5 else 0.95
            image[mask] = value
        else:  # a 2-px black-and-white checker
            checker = ((np.indices((self.size, self.size)) // 2).sum(0) % 2).astype(np.float64)
            image[mask] = checker[mask][:, None]
        return image, mask


def _save(array: np.ndarray, path: Path) -> None:
    pixels = np.round(array * 255.0).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(
        path, compress_level=1)  # fast to write; MVTec AD's own PNGs are compressed harder


def make_fake_mvtec(root: str | os.PathLike, categories: str | Iterable[str] = ("bottle", "carpet"), *,
                    image_size: int = 64, n_train: int = 4, n_test: int = 2, n_defect_types: int = 1,
                    seed: int = 0) -> Path:
    """Write a small synthetic dataset in MVTec AD's exact layout, for tests and for trying the paper path offline.

    Real category names, real defect-type folder names (the first ``n_defect_types`` of each category's, fewer where
    MVTec AD has fewer: toothbrush has one), grey PNGs for grid, screw and zipper, RGB for the rest, and masks that
    mark exactly the pixels a defect changed. ``load_dataset("mvtec", category, split, data_root=root)`` reads it.

    Args:
        root: folder to write into (created if missing); each category folder in it must not exist yet.
        categories: MVTec AD category names (one name or several), e.g. ``("bottle", "carpet")``.
        image_size: side of every (square) image and mask, >= 8.
        n_train: images in ``train/good``.
        n_test: images in ``test/good`` and in each ``test/<defect>``.
        n_defect_types: defect types per category.
        seed: images are a deterministic function of (seed, category, the other arguments).

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: (a ValueError) an unknown or repeated category, a count or size out of range, or a category
            folder that already exists under ``root``.
    """
    chosen = _check_categories(categories)
    size = _check_count("image_size", image_size, MIN_IMAGE_SIZE)
    n_train = _check_count("n_train", n_train, 1)
    n_test = _check_count("n_test", n_test, 1)
    n_defect_types = _check_count("n_defect_types", n_defect_types, 1)
    seed = _check_count("seed", seed, 0)
    root = Path(root)
    taken = [c for c in chosen if (root / c).exists()]
    if taken:
        raise DataError(f"{', '.join(str(root / c) for c in taken)} already exist; make_fake_mvtec writes new "
                        f"category folders only, so that no stale image is mixed in")
    for category in chosen:
        draw = _Category(category, size, seed)
        cat = root / category
        folders = {"train/good": n_train, "test/good": n_test}
        for folder, n in folders.items():
            (cat / folder).mkdir(parents=True)
            for i in range(n):
                _save(draw.good()[0], cat / folder / f"{i:03d}.png")
        for kind, defect in enumerate(mvtec.DEFECT_TYPES[category][:n_defect_types]):
            (cat / "test" / defect).mkdir(parents=True)
            (cat / "ground_truth" / defect).mkdir(parents=True)
            for i in range(n_test):
                image, mask = draw.defective(kind)
                _save(image, cat / "test" / defect / f"{i:03d}.png")
                _save(mask.astype(np.float64), cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


#: Architectures :func:`make_fake_weights` can write (efficientnet_lite0's real weights ship with a pip package).
FAKE_WEIGHTS_ARCHS = ("wide_resnet50_2",)


def make_fake_weights(path: str | os.PathLike, arch: str = "wide_resnet50_2", seed: int = 0) -> Path:
    """Write a randomly initialised torchvision ``arch`` state dict to ``path`` (about 270 MB for WideResNet-50-2).

    For tests and offline trials of the DMAD and AAND paper settings: pass the file as ``weights_path=`` wherever
    the ImageNet checkpoint (``wide_resnet50_2-95faca4d.pth``) would go. It loads like the real file, so every check
    that a weights file exists and fits passes, but the features are random: results with it mean nothing.
    The file is written aside and renamed into place, so a reader never sees half of it; its bytes are the same for
    the same (arch, seed, file name).

    Raises:
        ValueError: an ``arch`` other than ``"wide_resnet50_2"``, or a negative seed.
    """
    if arch not in FAKE_WEIGHTS_ARCHS:
        raise ValueError(f"make_fake_weights writes {', '.join(FAKE_WEIGHTS_ARCHS)}, got arch={arch!r}")
    seed = _check_count("seed", seed, 0)
    import torch
    import torchvision

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG where it was
        torch.manual_seed(seed)
        state = getattr(torchvision.models, arch)(weights=None).state_dict()
    # torch.save names the archive inside the file after the file, so the temporary file keeps the final name (in a
    # folder of its own): the bytes then depend only on (arch, seed, file name).
    partial = path.parent / f".{path.name}.{os.getpid()}.tmp"
    partial.mkdir()
    try:
        torch.save(state, partial / path.name)
        os.replace(partial / path.name, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


__all__ = ["FAKE_WEIGHTS_ARCHS", "MIN_IMAGE_SIZE", "make_fake_mvtec", "make_fake_weights"]
