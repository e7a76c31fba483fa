"""``python -m adcore predict``: score image files with a model file; a CSV row and a heat-map overlay per image.

Inputs are files, folders (searched recursively; every file in them is tried, so a stray non-image gets a row that
says why it was skipped) or glob patterns. Images are read exactly as training read them
(``adcore.data.folder.read_image``: grey → RGB, 16-bit scaled, resized to the model's side with its recipe's
filter), scored in batches
through :class:`adcore.deploy.postprocess.ScoringGraph` and written to ``OUT``:

* ``predictions.csv``: path, score, anomalous (yes/no), threshold, overlay, mask, error. A file that cannot be read
  (missing, truncated, not an image) gets a row with its error and an empty score; the batch goes on.
* ``overlays/<name>-<hash>.png``: the smoothed anomaly map at the image's own resolution, coloured from the
  held-out good images' typical map minimum (transparent blue) to the pixel threshold (red, and everything above it),
  over the image.
* ``masks/<name>-<hash>.png`` with ``--masks``: 255 where the map exceeds the pixel threshold, else 0.

Nothing is lost if the run is killed: each row is appended and flushed after its PNGs are written (atomically), and
a rerun skips every path that already has a row.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.folder import RESAMPLE, check_image_file, read_image
from ..utils import atomic_write_bytes

COLUMNS = ("path", "score", "anomalous", "threshold", "overlay", "mask", "error")
CSV_NAME = "predictions.csv"


def expand_inputs(inputs, exclude=None) -> list[str]:
    """Files, folders (recursive) and glob patterns → sorted unique file paths, in argument order.

    Raises:
        FileNotFoundError: an argument that is no file or folder and matches no file.
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    out, seen = [], set()
    def files(path: Path) -> list[str]:
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [str(path)]

    for arg in inputs:
        path = Path(arg)
        if path.exists():
            found = files(path)
        else:
            found = [f for match in sorted(glob.glob(str(arg), recursive=True)) for f in files(Path(match))]
            if not found:
                raise FileNotFoundError(f"{arg!r} is no file or folder and matches no file")
        for p in found:
            resolved = Path(p).resolve()
            if exclude is not None and (resolved == exclude or exclude in resolved.parents):
                continue  # never score our own output
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def output_name(path: str) -> str:
    """``<stem>-<8 hex of the absolute path>.png``: readable, and distinct for equal names in different folders."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}.png"


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def overlay(native: np.ndarray, amap: np.ndarray, low: float, high: float, alpha: float = 0.5) -> Image.Image:
    """The map (S, S), resized bilinearly to the image (H, W, 3) uint8, coloured with matplotlib's ``jet`` between
    ``low`` and ``high`` and blended over the image."""
    import matplotlib

    h, w = native.shape[:2]
    big = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
    norm = np.clip((big - low) / max(high - low, 1e-12), 0, 1)
    heat = (matplotlib.colormaps["jet"](norm)[..., :3] * 255).round().astype(np.uint8)
    return Image.blend(Image.fromarray(native), Image.fromarray(heat), alpha)


def mask_image(native_hw: tuple[int, int], amap: np.ndarray, pixel_threshold: float) -> Image.Image:
    """255 where the map, resized bilinearly to the image (H, W), is above the pixel threshold."""
    h, w = native_hw
    big = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
    return Image.fromarray(((big > pixel_threshold) * 255).astype(np.uint8))


def _read(path: str, size: int, resample: str) -> tuple[np.ndarray, np.ndarray]:
    """(native RGB (H, W, 3) uint8, model input (S, S, 3) uint8), read as training read it."""
    check_image_file(path)  # catches truncation that a lazy decoder might pad over
    native = read_image(path, None)
    if native.shape[:2] == (size, size):
        return native, native
    # read_image(path, size, resample) converts, then resizes with this same call: one decode serves both outputs
    return native, np.asarray(Image.fromarray(native).resize((size, size), RESAMPLE[resample]))


def _done_paths(csv_path: Path) -> set[str]:
    """Paths that already have a complete row; a torn last line (killed mid-write) is cut off."""
    if not csv_path.exists():
        return set()
    data = csv_path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(csv_path, "r+b") as f:
            f.truncate(len(data))
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    if rows and list(rows[0].keys()) != list(COLUMNS):
        raise ValueError(f"{csv_path} has columns {list(rows[0].keys())}, not adcore's {list(COLUMNS)}; use another "
                         "--out folder")
    return {r["path"] for r in rows}


def predict(model_path, inputs, out_dir, *, masks: bool = False, batch_size: int = 8, device="cpu",
            progress: bool = True) -> Path:
    """Everything ``python -m adcore predict`` does (see the module docstring); returns the CSV's path."""
    from tqdm.auto import tqdm

    from ..artifact import load
    from ..utils import resolve_device
    from .postprocess import ScoringGraph

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {batch_size!r}")
    device = resolve_device(device)
    model = load(model_path, device=device)
    meta = model.artifact
    size, sigma = meta["preprocessing"]["image_size"], meta["preprocessing"]["sigma"]
    resample = meta["preprocessing"]["resample"]
    threshold = meta.get("threshold")
    if threshold is None:
        raise ValueError(f"{model_path} has no decision threshold; python -m adcore train fits one")
    graph = ScoringGraph(model, size, sigma).to(device).eval()

    out_dir = Path(out_dir)
    for sub in ["overlays"] + (["masks"] if masks else []):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / CSV_NAME
    done = _done_paths(csv_path)
    todo = [p for p in expand_inputs(inputs, exclude=out_dir) if p not in done]
    if done:
        print(f"{len(done)} image(s) already in {csv_path}: skipped")
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        bar = tqdm(total=len(todo), desc="predict", disable=not progress)
        for start in range(0, len(todo), batch_size):
            rows, natives, inputs_ = [], [], []
            for path in todo[start:start + batch_size]:
                try:
                    native, small = _read(path, size, resample)
                except Exception as e:  # one bad file must not stop the batch; its row says why
                    rows.append({"path": path, "error": f"{type(e).__name__}: {e}"})
                    continue
                rows.append({"path": path})
                natives.append(native)
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
                        overlay(natives[k], maps[k], threshold["map_floor"], threshold["pixel_value"])))
                    row.update(score=f"{scores[k]:.9g}", overlay=f"overlays/{name}",
                               anomalous="yes" if scores[k] > threshold["value"] else "no")
                    if masks:
                        atomic_write_bytes(out_dir / "masks" / name, _png_bytes(
                            mask_image(natives[k].shape[:2], maps[k], threshold["pixel_value"])))
                        row["mask"] = f"masks/{name}"
                    k += 1
                row["threshold"] = f"{threshold['value']:.9g}"
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(rows))
        bar.close()
    return csv_path
