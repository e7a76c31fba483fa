"""``textures``: the embedded real-image benchmark, built deterministically from photographs bundled with scikit-image.

Categories are ``brick``, ``grass`` and ``gravel`` (``skimage.data``, 512² grey photographs). Each is written in
MVTec layout to a cache folder on first use::

    <cache>/textures-v<VERSION>/<category>/train/good/000.png ...          80 images
                                           test/good/000.png ...           30 images
                                           test/<family>/000.png ...       15 per defect family (60 anomalous)
                                           ground_truth/<family>/000_mask.png
    <cache>/textures-v<VERSION>/adcore-textures.json                       stamp: version and counts

``<cache>`` is ``$ADCORE_DATA_DIR`` or ``~/.cache/adcore``. Images are 128² grey PNGs: a random square window of
:data:`CROP_SIZES` px, resized with antialiased bilinear, then a random flip and 90° rotation. Training windows come
from the top 60 % of the photograph and test windows from the bottom 40 %, so test images are unseen pixels. The
issue's 192–256 px windows do not fit the 205-row bottom 40 % of a 512-row photo, so both splits use 192–204 px
windows (the same scale distribution for train and test matters more than the wider jitter). Test defects come from
:mod:`adcore.data.defects`.

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

VERSION = 3
CATEGORIES = ("brick", "grass", "gravel")
IMAGE_SIZE = 128
CROP_SIZES = (192, 204)  # inclusive; the bottom 40 % of a 512-row photo has 205 rows
TRAIN_ROWS = 0.6  # train windows lie in the top 60 % of the photo, test windows in the rest
NUM_TRAIN = 80
NUM_TEST_GOOD = 30
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


def sample_window(rng: np.random.Generator, rows: tuple[int, int], width: int) -> tuple[int, int, int]:
    """A random square window (top, left, side) lying inside photo rows ``[rows[0], rows[1])``."""
    side = int(rng.integers(CROP_SIZES[0], CROP_SIZES[1] + 1))
    if rows[1] - rows[0] < side:
        raise ValueError(f"a {side}px window does not fit rows {rows}")
    top = int(rng.integers(rows[0], rows[1] - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left, side


def _crop(photo: np.ndarray, rng: np.random.Generator, rows: tuple[int, int]) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) float in [0, 1]: window → antialiased bilinear resize → flip and 90° rotation."""
    top, left, side = sample_window(rng, rows, photo.shape[1])
    im = Image.fromarray(photo[top:top + side, left:left + side])
    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    arr = np.rot90(np.asarray(im), int(rng.integers(4)))
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr.astype(np.float64) / 255.0


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path, compress_level=1)


def _generate(out: Path) -> dict:
    """Write all categories into ``out``; returns per-image mask coverages for the stamp."""
    from skimage import data

    sources = defects.load_sources()
    coverage = {}
    for index, category in enumerate(CATEGORIES):
        photo = getattr(data, category)()  # (512, 512) uint8 grey
        split_row = int(round(TRAIN_ROWS * photo.shape[0]))
        rng = np.random.default_rng([VERSION, index])
        cat = out / category
        for i in range(NUM_TRAIN):
            _save(_crop(photo, rng, (0, split_row)), cat / "train" / "good" / f"{i:03d}.png")
        test_rows = (split_row, photo.shape[0])
        for i in range(NUM_TEST_GOOD):
            _save(_crop(photo, rng, test_rows), cat / "test" / "good" / f"{i:03d}.png")
        for family in defects.DEFECT_FAMILIES:
            coverage[f"{category}/{family}"] = []
            for i in range(NUM_PER_DEFECT):
                image, mask = defects.synthesise(family, _crop(photo, rng, test_rows), rng, sources, exclude=category)
                frac = float(mask.mean())
                assert defects.COVERAGE_RANGE[0] <= frac <= defects.COVERAGE_RANGE[1], (category, family, i, frac)
                _save(image, cat / "test" / family / f"{i:03d}.png")
                _save(mask.astype(np.float64), cat / "ground_truth" / family / f"{i:03d}_mask.png")
                coverage[f"{category}/{family}"].append(round(frac, 5))
    return coverage


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
        coverage = _generate(tmp)
        stamp = {"version": VERSION, "counts": _expected_counts(), "image_size": IMAGE_SIZE,
                 "crop_sizes": list(CROP_SIZES), "train_rows": TRAIN_ROWS,
                 "test_defect_sources": list(defects.TEST_DEFECT_SOURCES), "mask_coverage": coverage}
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
