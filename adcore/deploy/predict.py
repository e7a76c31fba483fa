"""``python -m adcore predict``: score image files with a model file; a CSV row and a heat-map overlay per image.

Inputs are files, folders (searched recursively; every entry in them is tried, so a stray non-image gets a row that
says why it was skipped) or glob patterns; each path is made absolute once, so ``a/x.png`` and ``/abs/a/x.png`` are one
row. Images are read exactly as training read them (``adcore.data.folder.read_image``: grey → RGB, 16-bit scaled by
its bit depth, resized to the model's side with its recipe's filter), scored in batches through
:class:`adcore.deploy.postprocess.ScoringGraph` and written to ``OUT``:

* ``predictions.csv``: path, score, anomalous (yes/no), threshold, overlay, mask, error, model_sha256 (the model
  file's SHA-256). A file that cannot be read (missing, truncated, not an image, too many pixels, a named pipe or
  device: never opened) gets a row with its error and an empty score; the batch goes on. Text cells that a
  spreadsheet would run as a formula (starting with ``= + - @``, tab or CR) are prefixed with ``'`` (OWASP's rule).
* ``overlays/<name>-<hash>.png``: the smoothed anomaly map coloured from the held-out good images' typical map
  minimum (transparent blue) to the pixel threshold (red, and everything above it), over the image, at the image's
  own resolution up to :data:`OVERLAY_MAX_SIDE` (larger images get a proportionally smaller overlay).
* ``masks/<name>-<hash>.png`` with ``--masks``: 255 where the map exceeds the pixel threshold, else 0; same size.

Memory per image is bounded: an image over ``--max-pixels`` (default Pillow's decompression-bomb limit, about 89.5
million) gets an error row before it is decoded, and overlays and masks are built in uint8 / float32 at most
:data:`OVERLAY_MAX_SIDE` a side.

An output folder belongs to one model and threshold: a rerun with another model file (or the same model with another
threshold) refuses unless ``--force`` (the old CSV is kept beside as ``predictions-<old sha256[:12]>.csv``) or a
fresh ``--out``. Two runs on one folder cannot interleave: the second stops at the folder's lock
(``adcore.runs.lock``). Nothing is lost if the run is killed: each row is appended and flushed after its PNGs are
written (atomically), and a rerun skips every path that already has a score; error rows are retried (a file that
was still being copied). Output files get the permissions the umask allows, as any other program's.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.folder import RESAMPLE, DataError, check_image_file, load_8bit, resize_rgb
from ..utils import atomic_write_bytes

COLUMNS = ("path", "score", "anomalous", "threshold", "overlay", "mask", "error", "model_sha256")
CSV_NAME = "predictions.csv"
#: Pillow's own decompression-bomb warning limit (1 GiB of 32-bit pixels / 4 / 3): about 9459 × 9459.
DEFAULT_MAX_PIXELS = 89_478_485
#: Longest side of an overlay or mask; a 2048² RGB overlay is 12 MiB.
OVERLAY_MAX_SIDE = 2048
# OWASP CSV injection: cells starting with these are formulas to Excel, LibreOffice and Google Sheets. Only the text
# columns are escaped: score and threshold are numbers we format, and a negative one must stay a number.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_TEXT_COLUMNS = ("path", "overlay", "mask", "error")


class PredictError(ValueError):
    """The command cannot start (bad output folder, model, threshold, lock held, results of another model)."""


def escape_cell(text: str) -> str:
    """``text`` with a leading ``'`` if a spreadsheet would read it as a formula (OWASP's CSV-injection rule)."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def unescape_cell(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


def _csv_row(row: dict) -> dict:
    return {k: escape_cell(str(row.get(k) or "")) if k in _TEXT_COLUMNS else str(row.get(k) or "") for k in COLUMNS}


def _writable(folder: Path) -> bool:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def check_writable_dir(out_dir: Path, what: str = "--out") -> None:
    """PredictError unless ``out_dir`` is a folder (or can be made one) that this user may write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictError(f"{what} {str(out_dir)!r} is a file, not a folder; name a folder for the results")
    if not _writable(out_dir):
        raise PredictError(f"{what} {str(out_dir)!r} cannot be written by this user")


def check_writable_file(out: Path, what: str = "--out") -> None:
    """PredictError unless ``out`` can be written as a file: not a folder, in a folder this user may write."""
    if out.is_dir():
        raise PredictError(f"{what} {str(out)!r} is a folder; name the file to write, e.g. {str(out / 'model.pt')!r}")
    if not _writable(out.parent):
        raise PredictError(f"{what} {str(out)!r} cannot be written: its folder is not writable by this user")


def _candidates(path: Path) -> list[str]:
    if path.is_dir():  # every entry but folders: FIFOs, devices and sockets get a "skipped" row, not silence
        return sorted(str(p) for p in path.rglob("*") if not p.is_dir() and not p.name.startswith("."))
    return [str(path)]


def expand_inputs(inputs, exclude=None) -> list[str]:
    """Files, folders (recursive) and glob patterns → unique absolute paths, sorted within each argument.

    Raises:
        FileNotFoundError: an argument that is no file or folder and matches no file.
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    out, seen = [], set()
    for arg in inputs:
        path = Path(arg)
        if path.exists() or path.is_symlink():
            found = _candidates(path)
        else:
            found = [f for match in sorted(glob.glob(str(arg), recursive=True)) for f in _candidates(Path(match))]
            if not found:
                raise FileNotFoundError(f"{arg!r} is no file or folder and matches no file")
        for p in found:
            p = os.path.abspath(p)  # once, here: the CSV's key, the overlay's name and what is read all use it
            resolved = Path(p).resolve()
            if exclude is not None and (resolved == exclude or exclude in resolved.parents):
                continue  # never score our own output
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def output_name(path: str) -> str:
    """``<stem>-<8 hex of the absolute path>.png``: readable, and distinct for equal names in different folders."""
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}.png"


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _map_at(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(S, S) map resized bilinearly to (h, w), float32."""
    h, w = hw
    return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def overlay(native: np.ndarray, amap: np.ndarray, low: float, high: float, alpha: float = 0.5) -> Image.Image:
    """The map (S, S), resized bilinearly to the image (H, W, 3) uint8, coloured with matplotlib's ``jet`` between
    ``low`` and ``high`` and blended over the image; float32 and uint8 throughout."""
    import matplotlib

    big = _map_at(amap, native.shape[:2])
    norm = np.clip((big - np.float32(low)) / np.float32(max(high - low, 1e-12)), 0, 1)
    heat = matplotlib.colormaps["jet"](norm, bytes=True)[..., :3]  # (H, W, 3) uint8
    return Image.blend(Image.fromarray(native), Image.fromarray(heat), alpha)


def mask_image(native_hw: tuple[int, int], amap: np.ndarray, pixel_threshold: float) -> Image.Image:
    """255 where the map, resized bilinearly to (H, W), is above the pixel threshold."""
    return Image.fromarray(((_map_at(amap, native_hw) > pixel_threshold) * 255).astype(np.uint8))


def preview_size(w: int, h: int, max_side: int = OVERLAY_MAX_SIDE) -> tuple[int, int]:
    """(w, h) scaled down proportionally so that neither side exceeds ``max_side``."""
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _read(path: str, size: int, resample: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(preview RGB (H', W', 3) uint8 at most OVERLAY_MAX_SIDE a side, model input (S, S, 3) uint8), read as
    training read it. The full-size image lives only inside this call.

    Raises:
        DataError: not a regular file, more than ``max_pixels`` pixels, unreadable, truncated, or unsupported pixels.
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # ours is the limit, checked below from the header; Pillow's would raise at 2x its own
    try:
        w, h = check_image_file(path)  # regular file first; then catches truncation a lazy decoder might pad over
        if w * h > max_pixels:
            raise DataError(f"image {path!r} is {w}x{h} = {w * h:,} pixels, over --max-pixels {max_pixels:,}; it was "
                            "not decoded (raise --max-pixels if the memory allows: about 4 bytes a pixel)")
        im = load_8bit(path)  # the one full-size copy, "L" or "RGB", freed when this call returns
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    # read_image(path, size, resample) is load_8bit and this same resize: one decode serves both outputs
    small = resize_rgb(im, (size, size), RESAMPLE[resample])
    preview = resize_rgb(im, preview_size(w, h), Image.Resampling.BILINEAR)
    return preview, small


def _read_rows(csv_path: Path) -> list[dict]:
    """The complete rows of an existing CSV (cells unescaped); a torn last line (killed mid-write) is cut off."""
    if not csv_path.exists():
        return []
    data = csv_path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(csv_path, "r+b") as f:
            f.truncate(len(data))
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    if reader.fieldnames is not None and list(reader.fieldnames) != list(COLUMNS):
        raise PredictError(f"{csv_path} has columns {list(reader.fieldnames)}, not this adcore's {list(COLUMNS)}; use "
                           "another --out folder")
    return [{k: unescape_cell(v or "") if k in _TEXT_COLUMNS else (v or "") for k, v in r.items()} for r in reader]


def _write_rows(csv_path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow(_csv_row(r))
    atomic_write_bytes(csv_path, buf.getvalue().encode("utf-8"))


def _check_threshold(threshold, model_path) -> dict:
    if threshold is None:
        raise PredictError(f"model file {str(model_path)!r} has no decision threshold; python -m adcore train fits one")
    for key in ("value", "pixel_value", "map_floor"):
        v = threshold.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PredictError(f"model file {str(model_path)!r} has no finite threshold {key} (got {v!r}); retrain it")
    return threshold


def _claim(csv_path: Path, sha: str, threshold: str, force: bool) -> tuple[set[str], int]:
    """(paths already scored, error rows dropped for a retry); refuses results of another model or threshold."""
    rows = _read_rows(csv_path)
    other = next((r for r in rows if (r["model_sha256"], r["threshold"]) != (sha, threshold)), None)
    if other is not None:
        if not force:
            raise PredictError(
                f"{csv_path} holds results of another model or threshold (model_sha256 {other['model_sha256'][:12]}, "
                f"threshold {other['threshold']}; this run: {sha[:12]}, {threshold}). Pass a fresh --out, or --force "
                f"to start over (the old CSV is kept as predictions-{other['model_sha256'][:12]}.csv)")
        os.replace(csv_path, csv_path.with_name(f"predictions-{other['model_sha256'][:12]}.csv"))
        print(f"--force: the previous results were moved to predictions-{other['model_sha256'][:12]}.csv")
        return set(), 0
    kept = [r for r in rows if not r["error"]]
    if len(kept) < len(rows):  # drop error rows so that the retry's row is the only one for its path
        _write_rows(csv_path, kept)
    return {r["path"] for r in kept}, len(rows) - len(kept)


def predict(model_path, inputs, out_dir, *, masks: bool = False, batch_size: int = 8, device="cpu",
            progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS, force: bool = False,
            expect_sha256: str | None = None) -> Path:
    """Everything ``python -m adcore predict`` does (see the module docstring); returns the CSV's path.

    Raises:
        PredictError: a bad ``out_dir`` (a file, not writable), a model without a finite threshold, another process
            writing to ``out_dir``, or ``out_dir`` holding another model's results (without ``force``); all before
            any image is read.
        FileNotFoundError: an input that matches nothing.
        adcore.artifact.ArtifactError: the model file is refused.
    """
    from tqdm.auto import tqdm

    from ..artifact import load
    from ..runs.lock import RunLock, describe
    from ..utils import resolve_device
    from .postprocess import ScoringGraph

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {batch_size!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"--max-pixels must be a positive int, got {max_pixels!r}")
    out_dir = Path(out_dir)
    check_writable_dir(out_dir)
    todo_all = expand_inputs(inputs, exclude=out_dir)
    device = resolve_device(device)
    model = load(model_path, device=device, expect_sha256=expect_sha256)
    meta = model.artifact
    sha = meta["file_sha256"]
    size, sigma = meta["preprocessing"]["image_size"], meta["preprocessing"]["sigma"]
    resample = meta["preprocessing"]["resample"]
    threshold = _check_threshold(meta.get("threshold"), model_path)
    threshold_text = f"{threshold['value']:.9g}"
    graph = ScoringGraph(model, size, sigma).to(device).eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir)
    if not lock.acquire():
        raise PredictError(f"another predict ({describe(lock.holder)}) is writing to {str(out_dir)!r}; wait for it, or "
                           "use another --out")
    try:
        csv_path = out_dir / CSV_NAME
        done, retried = _claim(csv_path, sha, threshold_text, force)
        todo = [p for p in todo_all if p not in done]
        if done:
            print(f"{len(done)} image(s) already in {csv_path}: skipped")
        if retried:
            print(f"{retried} error row(s) from the last run: retried")
        for sub in ["overlays"] + (["masks"] if masks else []):
            (out_dir / sub).mkdir(exist_ok=True)
        _score(graph, todo, out_dir, csv_path, threshold, threshold_text, sha, masks=masks, batch_size=batch_size,
               device=device, resample=resample, size=size, max_pixels=max_pixels,
               bar=tqdm(total=len(todo), desc="predict", disable=not progress))
    finally:
        lock.release()
    return csv_path


def _score(graph, todo, out_dir, csv_path, threshold, threshold_text, sha, *, masks, batch_size, device, resample,
           size, max_pixels, bar) -> None:
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for start in range(0, len(todo), batch_size):
            rows, previews, inputs_ = [], [], []
            for path in todo[start:start + batch_size]:
                try:
                    preview, small = _read(path, size, resample, max_pixels)
                except Exception as e:  # one bad file must not stop the batch; its row says why
                    rows.append({"path": path, "error": f"{type(e).__name__}: {e}"})
                    continue
                rows.append({"path": path})
                previews.append(preview)
                inputs_.append(torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))).float().div_(255.0))
            if inputs_:
                with torch.no_grad():
                    scores, maps = graph(torch.stack(inputs_).to(device))
                scores, maps = scores.cpu().numpy(), maps.cpu().numpy()
            k = 0
            for row in rows:
                if "error" not in row:
                    name = output_name(row["path"])
                    atomic_write_bytes(out_dir / "overlays" / name, _png_bytes(
                        overlay(previews[k], maps[k], threshold["map_floor"], threshold["pixel_value"])))
                    row.update(score=f"{scores[k]:.9g}", overlay=f"overlays/{name}",
                               anomalous="yes" if scores[k] > threshold["value"] else "no")
                    if masks:
                        atomic_write_bytes(out_dir / "masks" / name, _png_bytes(
                            mask_image(previews[k].shape[:2], maps[k], threshold["pixel_value"])))
                        row["mask"] = f"masks/{name}"
                    k += 1
                row.update(threshold=threshold_text, model_sha256=sha)
                writer.writerow(_csv_row(row))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(rows))
        bar.close()
