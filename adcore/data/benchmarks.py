"""Benchmark names → root folder and layout, and the public ``load_dataset`` / ``list_categories``.

Real benchmarks are read in their published folder layouts, unchanged, from a ``data_root`` the user already has;
nothing is ever downloaded:

- ``mvtec``   MVTec AD: ``<root>/<cat>/train/good``, ``test/<defect>``, ``ground_truth/<defect>/<id>_mask.png``.
- ``btad``    BTAD: ``<root>/{01,02,03}/train/ok``, ``test/{ok,ko}``, ``ground_truth/ko/<id>.png`` (images .bmp/.png).
- ``visa``    VisA: ``<root>/split_csv/1cls.csv`` with columns object,split,label,image,mask (paths relative to root).
- ``mvtec3d`` MVTec 3D-AD, RGB only: ``<root>/<cat>/{train,test}/<defect>/rgb/*.png`` and ``.../<defect>/gt/*.png``.
- any other string is taken as the path of a folder in MVTec layout.

Plus the two embedded benchmarks that need no download: ``textures`` (:mod:`adcore.data.textures`) and ``digits``
(:mod:`adcore.data.digits`).
"""
from __future__ import annotations

import csv
from pathlib import Path

from .folder import (FOLDER_LAYOUT, MVTEC_LAYOUT, AnomalyDataset, DataError, Layout, Sample, category_dir,
                     check_split, decoded_cache_fits, discover_categories, scan_layout)

BTAD_LAYOUT = Layout(good="ok", mask_templates=("ground_truth/{defect}/{stem}.png", "ground_truth/{defect}/{stem}.bmp"))
MVTEC3D_LAYOUT = Layout(image_subdir="rgb", mask_templates=("test/{defect}/gt/{stem}.png",))

#: Real benchmarks read from ``data_root``: name → layout (None: VisA's CSV split).
BENCHMARKS: dict[str, Layout | None] = {"mvtec": MVTEC_LAYOUT, "btad": BTAD_LAYOUT, "visa": None,
                                        "mvtec3d": MVTEC3D_LAYOUT}
EMBEDDED = ("textures", "digits")
VISA_CSV = Path("split_csv") / "1cls.csv"


def _require_root(name: str, data_root) -> Path:
    if data_root is None:
        raise DataError(f"benchmark {name!r} is read from disk and never downloaded: pass data_root=<folder holding "
                        f"its categories>")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data_root {str(root)!r} for {name!r} does not exist or is not a folder")
    return root


def _visa_rows(root: Path) -> list[dict]:
    path = root / VISA_CSV
    if not path.is_file():
        raise DataError(f"VisA split file {str(path)!r} is missing; expected the official split_csv/1cls.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"object", "split", "label", "image", "mask"} - set(rows[0] if rows else {})
    if missing:
        raise DataError(f"{str(path)!r} lacks columns {sorted(missing)}; expected object,split,label,image,mask")
    return rows


def _visa_samples(root: Path, category: str, split: str) -> list[Sample]:
    rows = _visa_rows(root)
    found = sorted({r["object"] for r in rows})
    if category not in found:
        raise DataError(f"category {category!r} not found in {str(root / VISA_CSV)!r}; found: {', '.join(found)}")
    samples = []
    for r in rows:
        if r["object"] != category or r["split"] != split:
            continue
        if r["label"] not in ("normal", "anomaly"):
            raise DataError(f"{str(root / VISA_CSV)!r}: label {r['label']!r} for {r['image']!r}; expected "
                            f"'normal' or 'anomaly'")
        image = root / r["image"]
        if not image.is_file():
            raise DataError(f"VisA image {str(image)!r} listed in {VISA_CSV} is missing")
        if r["label"] == "normal":
            samples.append(Sample(str(image), 0, "good"))
            continue
        mask = root / r["mask"] if r["mask"] else None
        if mask is None or not mask.is_file():
            raise DataError(f"test image {str(image)!r} has no mask; expected {str(mask or 'a mask column entry')!r}")
        samples.append(Sample(str(image), 1, "anomaly", str(mask)))
    if not samples:
        raise DataError(f"no {split} rows for {category!r} in {str(root / VISA_CSV)!r}")
    return samples


def list_categories(name_or_root: str, data_root=None) -> list[str]:
    """Categories of a benchmark, discovered from disk (``textures`` is built on first use).

    Args:
        name_or_root: a benchmark name (``textures``, ``digits``, ``mvtec``, ``btad``, ``visa``, ``mvtec3d``) or the
            path of a folder in MVTec layout.
        data_root: the benchmark's folder (required for the real benchmarks; for ``textures``, the cache folder).
    """
    name = str(name_or_root)
    if name == "textures":
        from . import textures
        return discover_categories(textures.build(data_root))
    if name == "digits":
        from . import digits
        return list(digits.CATEGORIES)
    if name == "visa":
        return sorted({r["object"] for r in _visa_rows(_require_root(name, data_root))})
    if name in BENCHMARKS:
        return discover_categories(_require_root(name, data_root))
    return discover_categories(_as_folder_root(name))


def _as_folder_root(name: str) -> Path:
    root = Path(name).expanduser()
    if not root.is_dir():
        raise DataError(f"{name!r} is neither a benchmark name ({', '.join(EMBEDDED + tuple(BENCHMARKS))}) nor an "
                        f"existing folder in MVTec layout")
    return root


def load_dataset(name_or_root: str, category: str, split: str, *, image_size: int | None = None,
                 mask_size: int | None = None, data_root=None, cache_in_memory: bool | None = None,
                 resample: str = "bilinear") -> AnomalyDataset:
    """Load one split of one category as an :class:`AnomalyDataset`.

    Args:
        name_or_root: ``"textures"`` (embedded, the default benchmark), ``"digits"`` (embedded, image-level),
            ``"mvtec"``, ``"btad"``, ``"visa"``, ``"mvtec3d"`` (need ``data_root``), or a path to any MVTec-layout root.
        category: a category of that benchmark (see :func:`list_categories`).
        split: ``"train"`` or ``"test"``.
        image_size: output side S; None keeps the native size (all images of the category must share one square
            size) and leaves the choice to the model: ``adcore.fit`` and ``adcore.evaluate`` then serve the images at
            the side the model expects (its own ``image_size``, or its default recipe's). Images are resized with
            antialiased ``resample`` (``"bilinear"``, or ``"bicubic"`` as AAND's code does).
        mask_size: output mask side; None means ``image_size``. Masks are resized with nearest neighbour.
        data_root: the benchmark's root folder; for ``textures`` the cache folder (default ``$ADCORE_DATA_DIR`` or
            ``~/.cache/adcore``).
        cache_in_memory: keep decoded, resized images after the first read, so that each is decoded once per run
            and not once per epoch. None: True for the embedded benchmarks; for the real ones True when the decoded
            split (N × S² × 3 bytes plus its masks) takes at most a quarter of the memory available now
            (:func:`adcore.data.folder.decoded_cache_fits`). False re-reads every file on every access.

    Raises:
        DataError: (a ValueError) for a missing root or category, a bad split, a test image without its mask, an
            unreadable or truncated file, or a mask whose size differs from its image.
    """
    name = str(name_or_root)
    split = check_split(split)
    embedded = name in EMBEDDED
    if name == "digits":
        from . import digits
        return digits.load(category, split, image_size=image_size, mask_size=mask_size, resample=resample)
    if name == "textures":
        from . import textures
        root = textures.build(data_root)
        samples = scan_layout(root, category, split, MVTEC_LAYOUT)
    elif name == "visa":
        root = _require_root(name, data_root)
        samples = _visa_samples(root, category, split)
    elif name in BENCHMARKS:
        root = _require_root(name, data_root)
        samples = scan_layout(root, category, split, BENCHMARKS[name])
    else:
        root = _as_folder_root(name)
        samples = scan_layout(root, category, split, FOLDER_LAYOUT)
        name = root.resolve().name
    cat_root = str(root / category) if name != "visa" else str(root)
    data = AnomalyDataset(name, category, split, samples, image_size=image_size, mask_size=mask_size,
                          has_masks=True, cache_in_memory=bool(cache_in_memory), root=cat_root, resample=resample)
    if cache_in_memory is None:
        data.cache_in_memory = embedded or decoded_cache_fits(data.decoded_bytes())
    return data


__all__ = ["BENCHMARKS", "category_dir", "list_categories", "load_dataset"]
