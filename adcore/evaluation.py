"""``evaluate``: the one post-processing step and metric set shared by every method, written to a results file.

Protocol (the same for all five papers and the baseline, so the comparison is fair):

1. the model's anomaly map is upsampled bilinearly to the mask resolution;
2. smoothed with a Gaussian of σ = 4 pixels (``scipy.ndimage.gaussian_filter``), as every paper's code does;
3. the image score is the max of the smoothed map, unless the model declares a score of its own
   (``own_image_score``; the result says which);
4. image AUROC, pixel AUROC over all test pixels, AUPRO to FPR 0.3 (the MVTec AD definition), F1-max (an oracle
   threshold, labelled as such), and the papers' own protocols under their own names.

No threshold or checkpoint is chosen here: the model arrives trained for a fixed number of epochs.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from . import metrics
from .runs import provenance
from .types import AnomalyModel, AnomalyOutput
from .utils import atomic_write_bytes, params_hash, resolve_device

PROTOCOL = "adcore-v1: bilinear upsample to mask size, Gaussian sigma=4, AUPRO (MVTec AD definition) to FPR 0.3"


def _postprocess(anomaly_map: torch.Tensor, size: tuple[int, int], sigma: float) -> np.ndarray:
    """(B, h, w) raw map → (B, H, W) float32 smoothed map at mask resolution."""
    if anomaly_map.ndim != 3:
        raise ValueError(f"anomaly_map must be (B, h, w), got shape {tuple(anomaly_map.shape)}")
    amap = anomaly_map.detach().float()
    if tuple(amap.shape[-2:]) != tuple(size):
        amap = F.interpolate(amap[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    amap = amap.cpu().numpy()
    if sigma > 0:
        amap = np.stack([gaussian_filter(m, sigma=sigma) for m in amap])
    return amap.astype(np.float32)


@torch.no_grad()
def predict_dataset(model: AnomalyModel, test_data, *, batch_size: int = 8, sigma: float = 4.0, device="cpu",
                    progress: bool = False) -> dict:
    """Run ``model`` over ``test_data`` and apply the shared post-processing.

    Returns a dict of arrays: images (N, S, S, 3) uint8, maps (N, H, W) float32 (smoothed, mask resolution),
    raw_scores (N,) the model's ``pred_score``, map_scores (N,) max of each smoothed map, masks (N, H, W) uint8,
    labels (N,), paths, defects.

    A dataset whose size was not asked for is served at the model's (``adcore.training.at_model_size``). Loading
    follows ``fit``: workers and pinned memory on a GPU, in the main process on the CPU; prediction stays in fp32
    (bf16 maps would tie many pixels and move the pixel metrics).
    """
    from .training import at_model_size, default_num_workers

    device = resolve_device(device)
    model.to(device).eval()
    test_data = at_model_size(test_data, model)
    workers = default_num_workers(device)
    if hasattr(test_data, "fill_cache"):
        test_data.fill_cache(threads=max(workers, 1))
    loader = torch.utils.data.DataLoader(test_data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    if progress:
        from tqdm.auto import tqdm
        loader = tqdm(loader, desc="evaluate", leave=False)
    images, maps, raw_scores, masks, labels, paths, defects, terms = [], [], [], [], [], [], [], []
    for batch in loader:
        out = model.predict(batch["image"].to(device))
        if not isinstance(out, AnomalyOutput):
            raise TypeError(f"{type(model).__name__}.predict must return an AnomalyOutput, got {type(out).__name__}")
        b = batch["image"].shape[0]
        if out.pred_score.shape != (b,) or out.anomaly_map.ndim != 3 or out.anomaly_map.shape[0] != b:
            raise ValueError(f"{type(model).__name__}.predict broke the output contract: pred_score "
                             f"{tuple(out.pred_score.shape)} (want ({b},)), anomaly_map {tuple(out.anomaly_map.shape)}"
                             f" (want ({b}, h, w))")
        mask = batch["mask"]
        amap = _postprocess(out.anomaly_map, tuple(mask.shape[-2:]), sigma)
        if not np.isfinite(amap).all() or not torch.isfinite(out.pred_score).all():
            raise ValueError(f"{type(model).__name__} produced non-finite scores on {batch['path'][0]!r} (batch)")
        maps.append(amap)
        raw_scores.append(out.pred_score.detach().float().cpu().numpy())
        if out.score_terms is not None:
            terms.append(out.score_terms.detach().double().cpu().numpy())
        masks.append(mask.numpy().astype(np.uint8))
        labels.append(np.asarray(batch["label"]))
        images.append((batch["image"].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
        paths += list(batch["path"])
        defects += list(batch.get("defect", [""] * b))
    maps = np.concatenate(maps)
    out = {"images": np.concatenate(images), "maps": maps, "raw_scores": np.concatenate(raw_scores),
           "map_scores": maps.reshape(len(maps), -1).max(axis=1), "masks": np.concatenate(masks),
           "labels": np.concatenate(labels).astype(np.int64), "paths": paths, "defects": defects}
    if terms and len(terms) == len(raw_scores):
        out["score_terms"] = np.concatenate(terms)  # (N, K): the model's own score's raw terms
    return out


@torch.no_grad()
def image_scores(model: AnomalyModel, data, *, batch_size: int = 8, sigma: float = 4.0, device="cpu") -> np.ndarray:
    """(N,) image scores of ``data`` exactly as :func:`evaluate` scores test images (own score, or max of the
    smoothed map at the images' own mask resolution); for the normal training images behind a fixed threshold."""
    arrays = predict_dataset(model, data, batch_size=batch_size, sigma=sigma, device=device)
    return arrays["raw_scores"] if getattr(model, "own_image_score", False) else arrays["map_scores"]


BORDER_MARGIN = 8  # pixels at mask resolution: the band border_max_fraction counts as "at the border"


def border_max_fraction(maps, labels, margin: int = BORDER_MARGIN) -> float | None:
    """Share of the good images (label 0) whose map maximum lies within ``margin`` pixels of the image border.

    A diagnostic, not a score: a detector whose good images peak at the border is scoring its own padding rather than
    the content (``knn``'s 3×3 mean that did not count the zero padding did so for 83–100 % of good ``textures``
    images). Ties go to the first maximum in row-major order.

    Args:
        maps: (N, H, W) smoothed maps at mask resolution.
        labels: (N,) 0 for good, 1 for anomalous.
        margin: width of the border band in pixels.

    Returns:
        The share in [0, 1], or None when there is no good image.
    """
    maps, labels = np.asarray(maps), np.asarray(labels)
    if maps.ndim != 3 or labels.shape != (maps.shape[0],):
        raise ValueError(f"maps must be (N, H, W) and labels (N,), got {maps.shape} and {labels.shape}")
    good = maps[labels == 0]
    if len(good) == 0:
        return None
    h, w = good.shape[-2:]
    rows, cols = np.unravel_index(good.reshape(len(good), -1).argmax(axis=1), (h, w))
    near = (rows < margin) | (rows >= h - margin) | (cols < margin) | (cols >= w - margin)
    return float(near.mean())


def _pro_rd4ad_or_none(maps, masks):
    # The papers' 200-threshold protocol is undefined on degenerate maps (e.g. constant); record None, not a crash.
    try:
        return metrics.pro_rd4ad(maps, masks)
    except ValueError:
        return None


def _results_path(results_dir: Path, run_id: str) -> Path:
    return results_dir / f"{run_id}.json"


def _write_new(results_dir: Path, run_id: str, payload: bytes) -> Path:
    """Write ``payload`` to ``<run_id>.json``, or ``<run_id>-2.json``, ... — never over another run's file."""
    results_dir.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = _results_path(results_dir, run_id if n == 1 else f"{run_id}-{n}")
        tmp = atomic_write_bytes(results_dir / f".{path.name}.partial-{os.getpid()}", payload)
        try:
            os.link(tmp, path)  # fails if the name is taken, even by a concurrent writer
            return path
        except FileExistsError:
            n += 1
        finally:
            tmp.unlink()


def evaluate(model: AnomalyModel, test_data, *, run_name: str | None = None, params: dict | None = None,
             results_dir="results", batch_size: int = 8, sigma: float = 4.0, device="cpu", seed: int | None = None,
             return_arrays: bool = False, progress: bool = False, write: bool = True, extra: dict | None = None,
             train_scores=None):
    """Score ``test_data`` with ``model`` under the shared protocol and write ``results_dir/<run_id>.json``.

    Args:
        model: a trained :class:`AnomalyModel`.
        test_data: a test split from ``adcore.load_dataset``.
        run_name: names the run in the results file (default: the model's registered name).
        params: every parameter of the run (model and training); stored in the results and hashed into the run id.
        results_dir: folder for the results JSON (``None`` or ``write=False`` writes nothing).
        sigma: Gaussian smoothing of the map, in pixels at mask resolution.
        return_arrays: also return the arrays of :func:`predict_dataset` (for plots and the viewer).
        extra: more fields to store in the results (e.g. training time).
        train_scores: (M,) image scores of the normal training images, computed like the test scores
            (:func:`image_scores`). Their maximum is a threshold fixed without any test or anomalous image; the
            results then hold ``f1_train_threshold`` and ``fpr_train_threshold`` beside the oracle ``f1_max_oracle``.

    Returns:
        The results dict (and the arrays dict when ``return_arrays``). Keys: image_auroc, pixel_auroc, aupro,
        f1_max_oracle, pro_rd4ad, vtadl_pro, border_max_fraction (a diagnostic: :func:`border_max_fraction`),
        image_score, model, dataset, category, protocol, resolution, ...; ``code_protocol`` for a model that defines
        one (DMAD: its repository's test-set protocol, measured for the shortcuts chapter, never our number).
        Pixel metrics are ``None`` for image-level benchmarks (``digits``).
    """
    from .training import at_model_size

    t0 = time.perf_counter()
    test_data = at_model_size(test_data, model)
    arrays = predict_dataset(model, test_data, batch_size=batch_size, sigma=sigma, device=device, progress=progress)
    labels = arrays["labels"]
    if labels.min() == labels.max():
        raise ValueError(f"the test set of {getattr(test_data, 'category', '?')!r} has only "
                         f"{'anomalous' if labels[0] else 'good'} images; AUROC needs both")
    own = bool(getattr(model, "own_image_score", False))
    scores = arrays["raw_scores"] if own else arrays["map_scores"]
    arrays["scores"] = scores
    has_masks = bool(getattr(test_data, "has_masks", True)) and arrays["masks"].any()
    h, w = arrays["maps"].shape[-2:]
    name = getattr(model, "model_name", type(model).__name__)
    params = dict(params or {})
    result = {
        "model": name,
        "run_name": run_name or name,
        "dataset": getattr(test_data, "name", "?"),
        "category": getattr(test_data, "category", "?"),
        "protocol": PROTOCOL,
        "resolution": f"{h}x{w}",
        "image_size": getattr(test_data, "image_size", None),
        "image_score": "model-defined score (pred_score)" if own else "max of smoothed map",
        "sigma": sigma,
        "n_test": int(len(labels)),
        "n_anomalous": int(labels.sum()),
        "image_auroc": metrics.image_auroc(labels, scores),
        "image_auroc_map_max": metrics.image_auroc(labels, arrays["map_scores"]),
        "f1_max_oracle": metrics.f1_max(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(arrays["maps"], arrays["masks"]) if has_masks else None,
        "aupro": metrics.aupro(arrays["maps"], arrays["masks"]) if has_masks else None,
        "pro_rd4ad": _pro_rd4ad_or_none(arrays["maps"], arrays["masks"]) if has_masks else None,
        "vtadl_pro": metrics.vtadl_pro(arrays["maps"], arrays["masks"]) if has_masks else None,
        "border_max_fraction": border_max_fraction(arrays["maps"], labels),
        "params": params,
        "model_params": getattr(model, "model_params", {}),
        "seed": seed if seed is not None else params.get("seed"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "eval_seconds": round(time.perf_counter() - t0, 3),
        # what decides the digits beside the parameters: torch threads, library versions, device
        "reproducibility": provenance.numerics(resolve_device(device)),
    }
    code_protocol = getattr(model, "code_protocol", None)
    if code_protocol is not None and "score_terms" in arrays:
        # the paper's own test protocol, measured for the shortcuts chapter (adcore.book.shortcuts); not our result
        result["code_protocol"] = code_protocol(labels, arrays["score_terms"], result["category"])
    if train_scores is not None:
        train_scores = np.asarray(train_scores, dtype=np.float64)
        if train_scores.ndim != 1 or not len(train_scores) or not np.isfinite(train_scores).all():
            raise ValueError(f"train_scores must be a non-empty (M,) array of finite scores, got {train_scores.shape}")
        threshold = float(train_scores.max())
        result.update(threshold_train_max=threshold, n_train_scored=int(len(train_scores)),
                      f1_train_threshold=metrics.f1_at_threshold(labels, scores, threshold),
                      fpr_train_threshold=float((scores[labels == 0] > threshold).mean()))
    result.update(extra or {})
    if write and results_dir is not None:
        run_id = "-".join([result["run_name"], str(result["dataset"]), str(result["category"]),
                           params_hash({**params, "model_params": result["model_params"]})])
        import json
        from .utils import _json_default
        payload = (json.dumps(result, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
        result["results_file"] = str(_write_new(Path(results_dir), run_id.replace(os.sep, "_"), payload))
    return (result, arrays) if return_arrays else result
