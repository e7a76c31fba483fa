"""The MVTec-layout reader that every real benchmark goes through, and the dataset class all loaders return.

A benchmark on disk is turned into a list of :class:`Sample` records (image path, mask path, label, defect name) by a
:class:`Layout`-driven scan; :class:`AnomalyDataset` then checks every file once, cheaply, at construction and reads,
resizes and binarises lazily in ``__getitem__``. Conventions follow the MVTec AD evaluation code and anomalib
(``ecosystem.md`` §1.2): ``good`` means label 0, every other test folder label 1; good images get an all-zero mask;
masks are binarised with ``> 0`` and resized with nearest neighbour.
"""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset on disk (or a request for one) is not what the loader expects; the message names the path."""


@dataclass(frozen=True)
class Sample:
    """One test or train image.

    Attributes:
        path: image file, or a pseudo path such as ``sklearn-digits/17`` for in-memory data.
        label: 0 good, 1 anomalous.
        defect: folder name of the defect type (``"good"`` for normal images).
        mask_path: ground-truth mask file, None for good images (all-zero mask) or image-level benchmarks.
    """

    path: str
    label: int
    defect: str
    mask_path: str | None = None


@dataclass(frozen=True)
class Layout:
    """How one benchmark arranges ``<root>/<category>``.

    Attributes:
        good: folder name of the defect-free images (MVTec ``good``, BTAD ``ok``).
        image_subdir: sub-folder of each defect folder that holds the images (MVTec 3D-AD: ``rgb``).
        mask_templates: candidate mask paths relative to the category folder, tried in order; ``{defect}`` and
            ``{stem}`` (image file name without extension) are filled in.
    """

    good: str = "good"
    image_subdir: str = ""
    mask_templates: tuple[str, ...] = ("ground_truth/{defect}/{stem}_mask.png",)


MVTEC_LAYOUT = Layout()
# Any folder "in MVTec layout": also accept masks named like their image (many home-made datasets do that).
FOLDER_LAYOUT = Layout(mask_templates=("ground_truth/{defect}/{stem}_mask.png", "ground_truth/{defect}/{stem}.png"))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return split


def discover_categories(root: str | os.PathLike) -> list[str]:
    """Category folders of an MVTec-layout root: sub-folders holding a ``train`` or ``test`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {str(root)!r} does not exist or is not a folder")
    return [p.name for p in _subdirs(root) if (p / "train").is_dir() or (p / "test").is_dir()]


def category_dir(root: str | os.PathLike, category: str, categories: list[str] | None = None) -> Path:
    """``<root>/<category>``, or a DataError listing the categories that are there."""
    root = Path(root)
    found = discover_categories(root) if categories is None else categories
    if category not in found:
        hint = "" if found else f" (a category is a folder {str(root)!r}/<category> holding train/ and test/)"
        raise DataError(f"category {category!r} not found under {str(root)!r}; found: {', '.join(found) or 'none'}"
                        f"{hint}")
    return root / category


def scan_layout(root: str | os.PathLike, category: str, split: str, layout: Layout = MVTEC_LAYOUT) -> list[Sample]:
    """List the samples of ``<root>/<category>/<split>`` in ``layout``, pairing each anomalous image with its mask.

    Raises:
        DataError: missing root/category/split folder, an empty split, or a test image without its mask.
    """
    split = check_split(split)
    cat_dir = category_dir(root, category)
    split_dir = cat_dir / split
    if not split_dir.is_dir():
        raise DataError(f"{str(split_dir)!r} is missing; expected <root>/<category>/{split}/<defect>/ image folders")
    defects = [layout.good] if split == "train" else [d.name for d in _subdirs(split_dir)]
    samples = []
    for defect in defects:
        folder = split_dir / defect / layout.image_subdir if layout.image_subdir else split_dir / defect
        if not folder.is_dir():
            if split == "train":
                raise DataError(f"{str(folder)!r} is missing; training images must be in {split}/{layout.good}/")
            continue
        for path in _image_files(folder):
            if defect == layout.good:
                samples.append(Sample(str(path), 0, "good"))
                continue
            candidates = [cat_dir / t.format(defect=defect, stem=path.stem) for t in layout.mask_templates]
            mask = next((c for c in candidates if c.is_file()), None)
            if mask is None:
                raise DataError(f"test image {str(path)!r} has no mask; expected {str(candidates[0])!r}")
            samples.append(Sample(str(path), 1, defect, str(mask)))
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(split_dir)!r}")
    return samples


# ---------------------------------------------------------------- reading single files


def _bmp_is_truncated(path: str) -> bool:
    # PIL's verify() does nothing for BMP; an uncompressed BMP's size is fixed by its header.
    with open(path, "rb") as f:
        head = f.read(34)
    if len(head) < 34:
        return True
    offset = struct.unpack("<I", head[10:14])[0]
    width, height = struct.unpack("<ii", head[18:26])
    bits, compression = struct.unpack("<HI", head[28:34])
    if compression != 0:  # RLE / bitfields: leave it to the decoder on read
        return False
    stride = ((bits * width + 31) // 32) * 4
    return os.path.getsize(path) < offset + stride * abs(height)


class NotRegularFile(DataError):
    """A path that is a named pipe, device or socket: opening it could block forever, so it is never read."""


def check_regular_file(path: str) -> None:
    """Raises NotRegularFile for a FIFO, device or socket (reading one can hang or never end), DataError if missing."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"image file {path!r} is unreadable ({type(e).__name__}: {e})") from e
    if not stat.S_ISREG(mode):
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode) else
                "not a regular file")
        raise NotRegularFile(f"skipped {path!r}: it is {kind}, not a regular file")


def check_image_file(path: str) -> tuple[int, int]:
    """Cheap validity check (regular file + header + PIL ``verify`` + BMP size check); returns (width, height).

    Raises:
        NotRegularFile: a named pipe, device or socket (never opened).
        DataError: the file is missing, not an image, or truncated.
    """
    check_regular_file(path)
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # PNG: walks all chunks and CRCs; JPEG: markers up to EOI
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise DataError(f"image file {path!r} is unreadable or truncated ({type(e).__name__}: {e})") from e
    if path.lower().endswith(".bmp") and _bmp_is_truncated(path):
        raise DataError(f"image file {path!r} is truncated: smaller than its BMP header says")
    return size


def _load(path: str) -> Image.Image:
    check_regular_file(path)
    im = None
    try:
        im = Image.open(path)
        im.load()  # a single-frame file opened by name is closed once loaded, so no copy is needed
        if getattr(im, "n_frames", 1) > 1:  # multi-frame files keep their file open: copy the first frame, close
            first = im.copy()
            im.close()
            return first
        return im
    except (OSError, SyntaxError, ValueError) as e:
        if im is not None:
            im.close()
        raise DataError(f"image file {path!r} is unreadable or truncated ({type(e).__name__}: {e})") from e


# PIL filters for resizing images; "bilinear" is the project's default, "bicubic" what AAND's code uses.
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def check_resample(resample: str) -> str:
    if resample not in RESAMPLE:
        raise DataError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    return resample


def decoded_cache_fits(num_bytes: int, fraction: float = 0.25) -> bool:
    """Whether a decoded cache of ``num_bytes`` (:meth:`AnomalyDataset.decoded_bytes`) takes at most ``fraction`` of the
    memory available now (``psutil.virtual_memory().available``): the default of ``cache_in_memory`` for the real
    benchmarks. A quarter leaves room for the test split's cache, the model and DataLoader workers.

    MVTec AD's largest split (hazelnut train, 391 images) is 0.1 GB at 256 px and 1.6 GB at its native 1024 px.
    """
    import psutil

    return num_bytes <= fraction * psutil.virtual_memory().available


# Pillow's modes for 16-bit grey (PNG, TIFF, PGM); 48-bit RGB PNGs are opened as 8-bit "RGB" already (high byte).
_GREY16 = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(im: Image.Image, path: str = "image") -> Image.Image:
    """8-bit grey ("L") or RGB as a camera wrote it: 16-bit grey is scaled by its bit depth (v · 255 / 65535,
    rounded), never by the image's own content, so two images differ after reading exactly as they differed on disk.
    Grey stays one channel (resizing it before repeating it to RGB gives the same pixels for a third of the memory).

    Raises:
        DataError: 32-bit integer or floating-point images (TIFF modes I and F): their range is not defined by a bit
            depth, so any scaling would be a guess.
    """
    if im.mode in _GREY16:
        arr = np.asarray(im).astype(np.uint32)  # (H, W); uint32 so that v * 255 cannot overflow
        return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        kind = "floating-point" if im.mode == "F" else "32-bit integer" if im.mode == "I" else f"{im.mode}"
        raise DataError(f"image file {path!r} holds {kind} pixels (mode {im.mode}); adcore reads 8-bit and 16-bit "
                        "images only, because such values have no fixed range to scale by. Convert it to 8- or 16-bit "
                        "with the scaling you mean")
    return im if im.mode in ("L", "RGB") else im.convert("RGB")


def load_8bit(path: str) -> Image.Image:
    """The file as an 8-bit "L" or "RGB" PIL image at its own size (:func:`to_8bit`); one decoded copy."""
    return to_8bit(_load(path), path)


def resize_rgb(im: Image.Image, size: tuple[int, int], resample) -> np.ndarray:
    """(h, w, 3) uint8: an "L" or "RGB" image resized to ``size`` = (w, h) with PIL's ``resample``, then made RGB."""
    if im.size != size:
        im = im.resize(size, resample)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path: str, size: int | None, resample: str = "bilinear") -> np.ndarray:
    """(S, S, 3) uint8; grey and palette images are repeated/expanded to RGB, 16-bit grey scaled by its bit depth
    (:func:`to_8bit`), resized with antialiased ``resample`` (PIL widens the filter's support when downscaling).

    Raises:
        DataError: unreadable, truncated, not a regular file, or float / 32-bit integer pixels.
    """
    im = load_8bit(path)
    return resize_rgb(im, im.size if size is None else (size, size), RESAMPLE[check_resample(resample)])


def read_mask(path: str, image_size: tuple[int, int], size: int | None) -> np.ndarray:
    """(S, S) uint8 in {0, 1}: any non-zero value (in any channel) is defect; resized with nearest neighbour."""
    im = _load(path)
    if im.size != image_size:
        raise DataError(f"mask {path!r} is {im.size[0]}x{im.size[1]} but its image is {image_size[0]}x{image_size[1]}")
    arr = np.asarray(im)
    binary = (arr.reshape(arr.shape[0], arr.shape[1], -1) > 0).any(axis=-1).astype(np.uint8)
    if size is not None and binary.shape != (size, size):
        binary = np.asarray(Image.fromarray(binary).resize((size, size), Image.Resampling.NEAREST))
    return binary


# ---------------------------------------------------------------- the dataset


class AnomalyDataset(Dataset):
    """An anomaly-detection split: lazily read images, masks and labels.

    Items are ``dict(image=(3, S, S) float32 in [0, 1], mask=(S, S) uint8 {0, 1}, label=int, path=str,
    defect=str)`` with S = ``image_size`` for the image and ``mask_size`` for the mask.

    Args:
        name: benchmark name (``"mvtec"``, ``"textures"``, ...) recorded in results.
        category: category name.
        split: ``"train"`` or ``"test"``.
        samples: the records to serve, in order.
        image_size: side of the square output image; None keeps the native size (all images must then be square and
            share one size).
        mask_size: side of the output mask; None means ``image_size``.
        has_masks: False for image-level benchmarks (masks are then all zero).
        cache_in_memory: keep decoded, resized uint8 arrays after the first read (:meth:`fill_cache` reads them all at
            once, in threads): each image is then decoded and resized once per run, not once per epoch. False is the
            slow twin that reads every file on every access. See :func:`decoded_cache_fits` for the default.
        root: the category folder (informational).
        arrays: for in-memory benchmarks, (N, H, W, 3) uint8 images indexed like ``samples``; no files are read.
        check_files: verify every image and mask header at construction (cheap) so that bad files fail early.

    Raises:
        DataError: an unreadable/truncated file, a mask whose size differs from its image, or mixed native sizes with
            ``image_size=None``.
    """

    def __init__(self, name: str, category: str, split: str, samples: list[Sample], *, image_size: int | None = None,
                 mask_size: int | None = None, has_masks: bool = True, cache_in_memory: bool = False,
                 root: str | None = None, arrays: np.ndarray | None = None, check_files: bool = True,
                 resample: str = "bilinear"):
        self.name, self.category, self.split = name, category, check_split(split)
        self.resample = check_resample(resample)
        if not samples:
            raise DataError(f"{name}/{category}/{split}: no samples")
        for arg, value in (("image_size", image_size), ("mask_size", mask_size)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
                raise DataError(f"{arg} must be a positive int or None, got {value!r}")
        self.samples = list(samples)
        self.root = root
        self.has_masks = has_masks
        self.cache_in_memory = cache_in_memory
        self._arrays = arrays
        self._native: list[tuple[int, int]] = []
        if arrays is not None:
            self._native = [(arrays.shape[2], arrays.shape[1])] * len(self.samples)
        elif check_files:
            for s in self.samples:
                size = check_image_file(s.path)
                if s.mask_path is not None:
                    mask_size_native = check_image_file(s.mask_path)
                    if mask_size_native != size:
                        raise DataError(f"mask {s.mask_path!r} is {mask_size_native[0]}x{mask_size_native[1]} but "
                                        f"its image {s.path!r} is {size[0]}x{size[1]}; expected equal sizes")
                self._native.append(size)
        native_size = image_size is None
        if image_size is None:
            sizes = set(self._native) if self._native else {check_image_file(self.samples[0].path)}
            if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
                shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:5])
                raise DataError(f"{name}/{category}/{split}: native image sizes are {shown}; image_size=None needs "
                                f"one square size for all images, pass image_size=<int> to resize")
            image_size = next(iter(sizes))[0]
        # False: the size is the images' own, not asked for, so ``fit`` may resize to the model's (``resized``).
        self.size_given = not native_size
        self.image_size = int(image_size)
        self.mask_size = int(mask_size) if mask_size is not None else self.image_size
        self._mask_size_given = mask_size is not None
        self.paths = [s.path for s in self.samples]
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        self.defects = [s.defect for s in self.samples]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[index]
        if self._arrays is not None:
            image = self._arrays[index]
            if image.shape[0] != self.image_size:
                image = np.asarray(Image.fromarray(image).resize((self.image_size,) * 2, RESAMPLE[self.resample]))
            return image, np.zeros((self.mask_size, self.mask_size), np.uint8)
        image = read_image(s.path, self.image_size, self.resample)
        if s.mask_path is None:
            mask = np.zeros((self.mask_size, self.mask_size), np.uint8)
        else:
            native = self._native[index] if self._native else check_image_file(s.path)
            mask = read_mask(s.mask_path, native, self.mask_size)
        return image, mask

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = index % len(self)
        if index in self._cache:
            image, mask = self._cache[index]
        else:
            image, mask = self._read(index)
            if self.cache_in_memory:
                self._cache[index] = (image, mask)
        s = self.samples[index]
        return dict(image=torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
                    mask=torch.from_numpy(mask.copy()), label=int(s.label), path=s.path, defect=s.defect)

    def decoded_bytes(self) -> int:
        """Memory the decoded cache takes when full: N × S² × 3 for the images plus N × M² for the masks (uint8)."""
        return len(self) * (3 * self.image_size**2 + self.mask_size**2)

    def fill_cache(self, threads: int = 1) -> None:
        """Decode and resize every image and mask now, ``threads`` at a time (PIL releases the GIL while it decodes);
        a no-op when ``cache_in_memory`` is off or the cache is full.

        ``fit`` calls it before DataLoader workers start, so that they inherit one filled cache (fork shares its
        pages) instead of each worker filling a copy of its own.
        """
        todo = [i for i in range(len(self)) if i not in self._cache] if self.cache_in_memory else []
        if not todo:
            return
        if threads <= 1:
            decoded = map(self._read, todo)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                decoded = list(pool.map(self._read, todo))
        for i, pair in zip(todo, decoded):
            self._cache[i] = pair

    def resized(self, image_size: int) -> "AnomalyDataset":
        """The same samples served at side ``image_size`` (and the masks too, unless their size was given); the
        decoded cache is not shared (its arrays have the old size)."""
        import copy

        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
            raise DataError(f"image_size must be a positive int, got {image_size!r}")
        out = copy.copy(self)
        out.image_size, out.size_given = int(image_size), True
        out.mask_size = self.mask_size if self._mask_size_given else out.image_size
        out._cache = {}
        return out

    def __repr__(self) -> str:
        good = int((self.labels == 0).sum())
        return (f"AnomalyDataset(name={self.name!r}, category={self.category!r}, split={self.split!r}, n={len(self)} "
                f"({good} good, {len(self) - good} anomalous), image_size={self.image_size}, "
                f"mask_size={self.mask_size}, has_masks={self.has_masks})")
