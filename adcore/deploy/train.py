"""``python -m adcore train``: train a model on good images with its recipe, fit a threshold, write the model file.

1. The good images: one category of a benchmark or MVTec-layout root (``--data ROOT --category CAT``: its
   ``train/good``), or a plain folder of good images (``--data DIR``, searched recursively). No test split is read.
2. A seeded random part of them (``--holdout``, default 20 %) is set aside; the model trains on the rest with its
   recipe (``model.recipes["default"]``, or ``--recipe paper``; ``--set key=value`` changes one setting), with a
   progress bar and a checkpoint after every epoch in ``<out>.train/``. Run the same command again after an
   interruption and it resumes; training ends with the same weights as an uninterrupted run.
3. The held-out images are scored and the decision threshold is placed at the split-conformal quantile for the
   target false-positive rate (``--fpr``, default 1 %; a rate met on average over fits), or, with ``--confidence
   0.9``, at the order statistic whose rate exceeds the target in at most 10 % of fits (:mod:`adcore.deploy.threshold`
   says exactly what each promises). No anomalous image is used. ``--fpr``, ``--confidence`` and ``--out`` are
   checked before any training.
4. ``adcore.save`` writes the model file; the checkpoint folder is then removed.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..artifact import save
from ..data.folder import IMAGE_EXTENSIONS, AnomalyDataset, DataError, Sample
from .threshold import check_confidence, check_fpr, describe, fit_threshold, needed_holdout

SETTINGS_NAME = "settings.json"


class Part(torch.utils.data.Subset):
    """A ``Subset`` that still answers ``category``, ``name``, ``image_size`` ... like the dataset it is cut from (a
    model may read them in ``on_fit_start``, e.g. AAND's foreground rule by category)."""

    def __getattr__(self, name):
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def good_images(data: str, category: str | None, image_size: int, resample: str = "bilinear") -> AnomalyDataset:
    """The training images: ``<data>/<category>/train/good`` (any benchmark name or MVTec-layout root) or, without a
    category, every image file under the folder ``data``."""
    from ..data import load_dataset

    if category is not None:
        return load_dataset(data, category, "train", image_size=image_size, cache_in_memory=True, resample=resample)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data!r} is not a folder (a folder of good images, or a dataset root with "
                        "--category)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}; for a dataset in MVTec "
                        "layout pass --category")
    if any("test" in p.relative_to(root).parts for p in files):
        raise DataError(f"{str(root)!r} holds a 'test' folder: for a dataset in MVTec layout pass --category CAT "
                        "(its train/good images are used); a plain folder must hold good images only")
    return AnomalyDataset("folder", root.resolve().name, "train", [Sample(str(p), 0, "good") for p in files],
                          image_size=image_size, cache_in_memory=True, root=str(root), resample=resample)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), a seeded random split; at least one image on each side."""
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout must be a fraction in (0, 1), got {fraction!r}")
    n_hold = int(round(fraction * n))
    if n < 2 or not 1 <= n_hold <= n - 1:
        raise DataError(f"{n} good image(s) cannot be split into training and a held-out {fraction:.0%} for the "
                        "threshold; add images or change --holdout")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_hold:].tolist()), sorted(perm[:n_hold].tolist())


def _takes_image_size(name: str) -> bool:
    from ..registry import model_class

    return any("image_size" in inspect.signature(c.__init__).parameters
               for c in model_class(name).__mro__ if "__init__" in vars(c))


def resolve_settings(name: str, which: str = "default", overrides: dict | None = None) -> tuple[dict, dict]:
    """(training settings: num_epochs, lr, batch_size, image_size, resample; model_params) from the model's recipe
    ``which``, with ``overrides`` (recipe keys or model parameters) applied."""
    from ..recipes import TRAINING_KEYS
    from ..registry import get_recipe

    recipe = get_recipe(name, which)
    keys = (*TRAINING_KEYS, "resample")
    training = {k: v for k, v in dataclasses.asdict(recipe).items() if k in keys}
    params = dict(recipe.model_params)
    for key, value in (overrides or {}).items():
        (training if key in keys else params)[key] = value
    if _takes_image_size(name):
        params["image_size"] = training["image_size"]
    return training, params


@torch.no_grad()
def score_images(graph, data, batch_size: int, device, progress: bool = True) -> tuple[np.ndarray, ...]:
    """(image scores, map maxima, map minima), each (N,), of a dataset through the shared scoring graph."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for batch in tqdm(loader, desc="held-out", leave=False, disable=not progress):
        score, amap = graph(batch["image"].to(device))
        out.append(torch.stack([score, amap.flatten(1).amax(1), amap.flatten(1).amin(1)], 1).cpu().numpy())
    return tuple(np.concatenate(out).T)


def train(model_name: str, data: str, out, *, category: str | None = None, recipe: str = "default",
          overrides: dict | None = None, holdout: float = 0.2, fpr: float = 0.01, confidence: float | None = None,
          seed: int = 0, device="cpu", fresh: bool = False, progress: bool = True):
    """Everything ``python -m adcore train`` does (see the module docstring); returns the trained model.

    Raises:
        ValueError: a bad ``fpr``/``confidence``, too few held-out images for ``confidence``, or an ``out`` that is a
            folder or in a folder that cannot be written: all checked before any training.
    """
    from ..registry import create_model, get_recipe
    from ..training import fit
    from ..utils import atomic_write_json, resolve_device, seed_everything
    from .postprocess import ScoringGraph

    from .predict import check_writable_file

    out = Path(out)
    fpr, confidence = check_fpr(fpr), check_confidence(confidence)
    check_writable_file(out, "--out")
    training, params = resolve_settings(model_name, recipe, overrides)
    size = training["image_size"]
    images = good_images(data, category, size, training["resample"])
    train_idx, hold_idx = split_holdout(len(images), holdout, seed)
    if confidence is not None:
        need = needed_holdout(fpr, confidence)
        print(f"a false-positive rate of {fpr:.3g} with confidence {confidence:.3g} needs at least {need} held-out "
              f"good images; {len(hold_idx)} are held out")
        if len(hold_idx) < need:
            raise ValueError(f"--fpr {fpr:.3g} --confidence {confidence:.3g} needs at least {need} held-out good images "
                             f"but {len(hold_idx)} of {len(images)} are held out (--holdout {holdout:g}): add good "
                             "images, raise --holdout or --fpr, or drop --confidence")
    ckpt = out.parent / f"{out.name}.train"
    settings = {"model": model_name, "model_params": params, "training": training, "data": str(data),
                "category": category, "images": images.paths, "holdout": holdout, "seed": seed}
    settings = json.loads(json.dumps(settings, default=str))
    if ckpt.exists() and fresh:
        shutil.rmtree(ckpt)
    if (ckpt / SETTINGS_NAME).exists():
        before = json.loads((ckpt / SETTINGS_NAME).read_text())
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(f"{ckpt} holds an interrupted training with other settings ({', '.join(changed)} "
                             "differ); pass --fresh to discard it, or rerun with the same settings to resume")
        print(f"resuming the interrupted training in {ckpt}")
    atomic_write_json(settings, ckpt / SETTINGS_NAME)

    device = resolve_device(device)
    seed_everything(seed)
    model = create_model(model_name, **params)
    num_epochs = training["num_epochs"]
    if isinstance(num_epochs, dict):  # a variant built without a stage keeps the others' epochs
        num_epochs = {stage: n for stage, n in num_epochs.items() if stage in model.stages}
    t0 = time.perf_counter()
    fit(model, Part(images, train_idx), num_epochs=num_epochs, lr=training["lr"], batch_size=training["batch_size"],
        seed=seed, device=device, checkpoint_dir=ckpt, resume=True, progress=progress)
    fit_seconds = time.perf_counter() - t0

    graph = ScoringGraph(model.eval(), size).eval()
    threshold = fit_threshold(*score_images(graph, Part(images, hold_idx), training["batch_size"], device, progress),
                              fpr=fpr, confidence=confidence)
    print(describe(threshold))
    recipe_record = {**dataclasses.asdict(get_recipe(model_name, recipe)), "which": recipe,
                     "overrides": dict(overrides or {})}
    facts = {"data": str(data), "category": category, "n_images": len(images), "n_train": len(train_idx),
             "n_holdout": len(hold_idx), "holdout_fraction": holdout, "seed": seed, "device": str(device),
             "fit_seconds": round(fit_seconds, 2), "holdout_paths": [images.paths[i] for i in hold_idx], **training}
    save(model, out, image_size=size, resample=training["resample"], recipe=recipe_record,
         threshold=threshold, training=facts)
    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"wrote {out}")
    return model
