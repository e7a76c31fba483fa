"""``textures``: the embedded real-image benchmark, built deterministically from photographs bundled with scikit-image.

Categories are ``brick``, ``grass`` and ``gravel`` (``skimage.data``, 512² grey photographs). Each is written in
MVTec layout to a cache folder on first use::

    <cache>/textures-v<VERSION>/<category>/train/good/000.png ...          80 images
                                           test/good/000.png ...           100 images
                                           test/<family>/000.png ...       15 per defect family (60 anomalous)
                                           ground_truth/<family>/000_mask.png
    <cache>/textures-v<VERSION>/adcore-textures.json                       stamp: version, counts, every window

``<cache>`` is ``$ADCORE_DATA_DIR`` or ``~/.cache/adcore``. Images are 128² grey PNGs: a random square window of
:data:`CROP_SIZES` px, resized with antialiased bilinear, then a random flip and 90° rotation.

Where the windows come from (v4). The photo is cut into 2×2 quadrants of 256 px. Training windows lie in the
top-left and bottom-right quadrants, every test window (good or defective) in the top-right and bottom-left ones,
and each window lies inside one quadrant, so no test image shares a pixel with a training image. Each split
alternates between its two quadrants and places a window uniformly inside one, so both splits have the same
distribution over photo rows and over photo columns (half the windows in the top half, half in the left half, the
same offsets inside a quadrant) and the same scale. Why this design:

- v3 took training windows from the top 60 % of the photo and test windows from the bottom 40 %. Perspective and
  lighting change down a photograph, so good test images were not drawn like training images: a threshold fitted on
  held-out training goods flagged 93 %, 27 % and 47 % of good test images (issue 22), and every AUROC mixed anomaly
  detection with that shift.
- Windows of 192–204 px fit a 2×2 grid of a 512 px photo and no finer one (three cells per side are 170 px), and
  bands (top/bottom or left/right halves) would give each split only one end of the photo's gradients. Diagonal
  quadrants give each split both ends of both axes. What remains unmatched is the joint position: training sees
  (top, left) and (bottom, right), test (top, right) and (bottom, left); a gradient along one axis is balanced, only
  an interaction of the two axes is not.
- Defective images are test images, so their windows come from the test quadrants like the good ones: good and
  defective test images then differ only by the defect, and no defect's surroundings were seen in training.
- 100 good test images (30 in v3) give the false-positive check power: it compares the count of flagged goods with
  the rate a threshold from 16 held-out scores can back (about 1/17). The windows overlap within a quadrant (a
  204 px window has 53 positions per axis), so the images are correlated views of two quadrants, not independent
  draws from the photo; more images sharpen the estimate of *this* benchmark's rate, not of the photo's.
- The 192–204 px scale of v3 is kept (a 256 px quadrant would admit larger windows, but then with no room to move),
  so the only change from v3 is where the windows lie.
- What no layout can fix: training windows overlap each other (in a quadrant every pair shares at least 44 % of its
  area), so a held-out training image shares pixels with the images a model was fitted on, and no test image does.
  A model that memorises patches scores held-out training images lower than new ones, and a threshold fitted on them
  flags more good test images than it backs (:mod:`adcore.data.threshold_check`, shown in the book's data chapter).

Window boxes come from their own random stream (:func:`windows`), and flips, rotations and defects from a second one,
so the layout can be inspected without building. The stamp records every image's box.
Test defects come from :mod:`adcore.data.defects`.

The build writes into a temporary folder next to the target and renames it into place, so an interrupted build
leaves nothing half-written and two processes building at once both end up with one complete copy. Bumping
:data:`VERSION` (whenever the generator changes) builds a new folder and removes older versions.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import defects

VERSION = 4
CATEGORIES = ("brick", "grass", "gravel")
IMAGE_SIZE = 128
PHOTO_SIZE = 512  # every skimage.data texture photo is (512, 512)
CROP_SIZES = (192, 204)  # inclusive; the v3 scale, kept so that only the window positions changed
QUADRANT = PHOTO_SIZE // 2
#: (quadrant row, quadrant col) of each split's quadrants: diagonal pairs, so each split spans both halves of each axis
QUADRANTS = {"train": ((0, 0), (1, 1)), "test": ((0, 1), (1, 0))}
NUM_TRAIN = 80
NUM_TEST_GOOD = 100
NUM_PER_DEFECT = 15
STAMP = "adcore-textures.json"
_STALE_TMP_S = 3600  # a temp folder older than this is a crashed build, not one in progress


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADCORE_DATA_DIR") or "~/.cache/adcore").expanduser()


def folder_name(version: int | None = None) -> str:
    return f"textures-v{VERSION if version is None else version}"


def _expected_counts() -> dict:
    test = {"good": NUM_TEST_GOOD, **{f: NUM_PER_DEFECT for f in defects.DEFECT_FAMILIES}}
    return {c: {"train": {"good": NUM_TRAIN}, "test": dict(test)} for c in CATEGORIES}


def _is_complete(root: Path) -> bool:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("version") == VERSION and stamp.get("counts") == _expected_counts()


def sample_window(rng: np.random.Generator, quadrant: tuple[int, int]) -> tuple[int, int, int]:
    """A random square window (top, left, side) lying inside the 256 px ``quadrant`` (row, col) of the photo."""
    side = int(rng.integers(CROP_SIZES[0], CROP_SIZES[1] + 1))
    if side > QUADRANT:
        raise ValueError(f"a {side}px window does not fit a {QUADRANT}px quadrant")
    top = quadrant[0] * QUADRANT + int(rng.integers(0, QUADRANT - side + 1))
    left = quadrant[1] * QUADRANT + int(rng.integers(0, QUADRANT - side + 1))
    return top, left, side


def windows(category: str) -> dict[str, list[tuple[int, int, int]]]:
    """Every image's window (top, left, side) in its photo, keyed by ``<split>/<defect>`` in build order.

    Each split alternates between its two quadrants; defective images continue the test split's alternation after
    the good ones, so each defect family is also split evenly (up to one image) between the test quadrants.
    """
    if category not in CATEGORIES:
        raise ValueError(f"textures category must be one of {CATEGORIES}, got {category!r}")
    rng = np.random.default_rng([VERSION, CATEGORIES.index(category), 0])
    train, test = QUADRANTS["train"], QUADRANTS["test"]
    out = {"train/good": [sample_window(rng, train[i % 2]) for i in range(NUM_TRAIN)]}
    keys = ["test/good"] * NUM_TEST_GOOD + [f"test/{f}" for f in defects.DEFECT_FAMILIES for _ in range(NUM_PER_DEFECT)]
    for j, key in enumerate(keys):
        out.setdefault(key, []).append(sample_window(rng, test[j % 2]))
    return out


def _crop(photo: np.ndarray, box: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) float in [0, 1]: window → antialiased bilinear resize → flip and 90° rotation."""
    top, left, side = box
    im = Image.fromarray(photo[top:top + side, left:left + side])
    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    arr = np.rot90(np.asarray(im), int(rng.integers(4)))
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr.astype(np.float64) / 255.0


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path, compress_level=1)


def _generate(out: Path) -> tuple[dict, dict]:
    """Write all categories into ``out``; returns per-image mask coverages and windows for the stamp."""
    from skimage import data

    sources = defects.load_sources()
    coverage, boxes = {}, {}
    for index, category in enumerate(CATEGORIES):
        photo = getattr(data, category)()  # (512, 512) uint8 grey
        if photo.shape != (PHOTO_SIZE, PHOTO_SIZE):
            raise RuntimeError(f"skimage.data.{category} is {photo.shape}, expected {(PHOTO_SIZE, PHOTO_SIZE)}")
        rng = np.random.default_rng([VERSION, index, 1])  # flips, rotations and defects
        cat = out / category
        boxes[category] = windows(category)
        for i, box in enumerate(boxes[category]["train/good"]):
            _save(_crop(photo, box, rng), cat / "train" / "good" / f"{i:03d}.png")
        for i, box in enumerate(boxes[category]["test/good"]):
            _save(_crop(photo, box, rng), cat / "test" / "good" / f"{i:03d}.png")
        for family in defects.DEFECT_FAMILIES:
            coverage[f"{category}/{family}"] = []
            for i, box in enumerate(boxes[category][f"test/{family}"]):
                image, mask = defects.synthesise(family, _crop(photo, box, rng), rng, sources, exclude=category)
                frac = float(mask.mean())
                assert defects.COVERAGE_RANGE[0] <= frac <= defects.COVERAGE_RANGE[1], (category, family, i, frac)
                _save(image, cat / "test" / family / f"{i:03d}.png")
                _save(mask.astype(np.float64), cat / "ground_truth" / family / f"{i:03d}_mask.png")
                coverage[f"{category}/{family}"].append(round(frac, 5))
    return coverage, boxes


def _remove_stale(cache: Path) -> None:
    """Delete temp folders of crashed builds and complete copies of older generator versions."""
    now = time.time()
    for p in cache.iterdir():
        try:
            if p.name.startswith(".textures-v") and ("-tmp-" in p.name or "-old-" in p.name):
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            elif re.fullmatch(r"textures-v\d+", p.name) and int(p.name[10:]) < VERSION and (p / STAMP).is_file():
                shutil.rmtree(p, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            continue


def build(root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build the benchmark if needed and return its root (``<cache>/textures-v<VERSION>``).

    Args:
        root: the cache folder; default ``$ADCORE_DATA_DIR`` or ``~/.cache/adcore``.
        force: rebuild even if a complete copy of this version exists.
    """
    cache = Path(root).expanduser() if root is not None else default_cache_dir()
    final = cache / folder_name()
    if not force and _is_complete(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name()}-tmp-", dir=cache))
    try:
        coverage, boxes = _generate(tmp)
        stamp = {"version": VERSION, "counts": _expected_counts(), "image_size": IMAGE_SIZE,
                 "crop_sizes": list(CROP_SIZES), "quadrants": {k: [list(q) for q in v] for k, v in QUADRANTS.items()},
                 "test_defect_sources": list(defects.TEST_DEFECT_SOURCES), "mask_coverage": coverage,
                 "windows": {c: {k: [list(b) for b in v] for k, v in w.items()} for c, w in boxes.items()}}
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        old = None
        if final.exists() and (force or not _is_complete(final)):  # move a forced-out or broken copy aside
            old = Path(tempfile.mkdtemp(prefix=f".{folder_name()}-old-", dir=cache))
            os.rename(final, old / "x")
        try:
            os.rename(tmp, final)  # atomic; fails if another process renamed its copy in first
        except OSError:
            if not _is_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: its copy is identical
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(cache)
    return final


def describe(root: str | os.PathLike | None = None) -> dict:
    """Per-category image counts by split and defect, counted on disk: ``{category: {split: {defect: n}}}``."""
    bench = build(root)
    out = {}
    for cat in sorted(p for p in bench.iterdir() if p.is_dir()):
        out[cat.name] = {split: {d.name: len(list(d.glob("*.png"))) for d in sorted((cat / split).iterdir())}
                         for split in ("train", "test")}
    return out
