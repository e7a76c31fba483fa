"""Choosing a training length without the test set: a validation curve on synthetic anomalies in held-out normals.

The reconstruction papers (VT-ADL, ADViT, AnoViT) train a fixed number of epochs, and on fine textures that number
decides which regime a model ends in (a blurry reconstruction in which defects stand out, or a sharp one that
reproduces them). The number must not be read off test curves. This module gives the honest alternative:

1. split a category's *training* images into a fitting part and ``holdout`` held-out normals;
2. paste one DRAEM-style pseudo-anomaly into a copy of every held-out image (:class:`PseudoAnomalySynthesizer`,
   whose foreign textures never come from the test defects' sources) and keep the clean copies as normals;
3. train once on the fitting part and score the held-out set after every epoch in ``epochs`` (one run: the ViT models
   use a constant learning rate, so the model after epoch e of a long run *is* the model of an e-epoch run). A
   multi-stage model (AAND) runs its earlier stages for fixed counts (``fixed_epochs``) and the curve is over its
   last stage, which must have a constant learning rate too;
4. pick the epoch count by a named rule (``RULES``), among those no larger than ``max_epochs``, the most a notebook
   can train within its CPU budget:

   * ``"pixel_auroc"`` (VT-ADL, ADViT, DMAD, AAND): the best mean validation pixel AUROC over categories (ties: fewer
     epochs);
   * ``"loss_converged"`` (AnoViT and its conv AE): the first epoch after which the held-out reconstruction loss (on
     the clean held-out images, each category's loss divided by its value after epoch 1, then averaged) never
     improves by more than ``tol`` (a fraction of its value) in any later epoch up to ``max_epochs``. A flat AUROC
     curve sends the first rule to its shortest setting, which rewards a model that has learnt nothing; this one
     trains until the model stops learning the normal images, whatever the proxy anomalies say.

A model whose map has post-hoc variants (ADViT: the MDN likelihood alone, or weighted by the association discrepancy)
can have each variant scored on the same trained models (``variants``), so the choice between them is made here too.

``python -m adcore.validation vt_adl --params adcore/validation_curves/vt_adl.yaml --out
adcore/validation_curves/vt_adl.json`` writes the curve; the notebooks load it with :func:`stored_curve` and plot it
beside their default. The test split is never opened.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .data import list_categories, load_dataset
from .evaluation import predict_dataset
from .metrics import image_auroc, pixel_auroc
from .registry import create_model
from .training import finished_copy, fit
from .utils import atomic_write_json, seed_everything

__all__ = ["RULES", "SyntheticValidationSet", "choose_epochs", "choose_epochs_by_loss", "epoch_curve", "load_curve",
           "stored_curve"]

#: The epoch-choice rules by name; see the module docstring.
RULES = ("pixel_auroc", "loss_converged")
#: loss_converged's tolerance: later epochs must lower the held-out loss by more than 1 % to count as improvement.
CONVERGED_TOL = 0.01


class SyntheticValidationSet(Dataset):
    """Held-out normal images, each twice: clean (label 0) and with one pasted pseudo-anomaly (label 1).

    Items follow :class:`adcore.data.AnomalyDataset` (image (3, S, S) float, mask (S, S) uint8, label, path, defect).
    The pseudo-anomalies are drawn once, from ``seed``, with the global torch RNG forked so nothing else changes.
    """

    def __init__(self, normals, seed: int = 0):
        from .models.pseudo_anomaly import PseudoAnomalySynthesizer

        images = torch.stack([normals[i]["image"] for i in range(len(normals))])  # (n, 3, S, S), n held out
        self.paths = [normals[i]["path"] for i in range(len(normals))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # the operations the stored curves were made with, so that they stay reproducible to the digit
            anomalous, masks = PseudoAnomalySynthesizer(clean_prob=0.0, operations="validation")(images)
        self.images = torch.cat([images, anomalous])
        self.masks = torch.cat([torch.zeros_like(masks), masks]).to(torch.uint8)
        self.labels = [0] * len(images) + [int(m.any()) for m in masks]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        n = len(self.paths)
        return {"image": self.images[i], "mask": self.masks[i], "label": self.labels[i],
                "path": self.paths[i % n] + ("" if i < n else "#pseudo"), "defect": "good" if i < n else "pseudo"}


def split_train(train, holdout: int, seed: int = 0):
    """``(fitting part, held-out part)`` of a training split, a seeded random ``holdout`` images held out."""
    if not 0 < holdout < len(train):
        raise ValueError(f"holdout must be between 1 and {len(train) - 1} for {len(train)} training images, "
                         f"got {holdout}")
    order = np.random.default_rng(seed).permutation(len(train))
    return Subset(train, sorted(order[holdout:].tolist())), Subset(train, sorted(order[:holdout].tolist()))


def epoch_curve(model_name: str, *, model_params: dict | None = None, dataset: str = "textures", categories=None,
                data_root=None, image_size: int = 64, epochs=(5, 10, 20, 30), lr: float = 1e-3, batch_size: int = 8,
                seed: int = 0, holdout: int = 16, max_epochs: int | None = None, fixed_epochs: dict | None = None,
                rule: str = "pixel_auroc", tol: float = CONVERGED_TOL,
                variants: dict | None = None, device="cpu", progress: bool = True) -> dict:
    """Validation pixel and image AUROC after each epoch in ``epochs``, per category, on synthetic anomalies.

    For a multi-stage model ``fixed_epochs`` gives every stage before the last its epoch count (e.g. AAND's
    ``{"amplify": 4}``); ``epochs`` then count the last stage's epochs. ``rule`` names the epoch choice (``RULES``);
    ``"loss_converged"`` also records the held-out loss after *every* epoch up to the last in ``epochs``, which must
    reach ``max_epochs``. ``variants`` maps a name to model
    attributes set on the finished model before it is scored once more (e.g. ADViT's
    ``{"assoc_position": {"assoc_weight": 1.0, "assoc_norm": "position"}}``): the same weights, another map.

    Returns ``{"model", "params", "epochs", "curves": {category: {epoch: {"pixel_auroc", "image_auroc"}}},
    "mean_pixel_auroc": {epoch: value}, "max_epochs", "rule", "chosen_epochs", "seconds"}``, plus ``"val_loss"``
    ({category: {epoch: loss}}) and ``"mean_rel_loss"`` ({epoch: value}) under ``"loss_converged"``, and
    ``"variants"`` ({name: {"settings", "curves", "mean_pixel_auroc", "mean_image_auroc"}}) when variants are given.
    """
    epochs = sorted({int(e) for e in epochs})
    if not epochs or epochs[0] < 1:
        raise ValueError(f"epochs must be positive ints, got {epochs}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    variants = dict(variants or {})
    for name, settings in variants.items():
        if name == "default" or not isinstance(settings, dict) or not settings:
            raise ValueError(f"variant {name!r} must be a non-empty mapping of model attributes (and not 'default')")
    track_loss = rule == "loss_converged"
    categories = list_categories(dataset, data_root=data_root) if categories is None else list(categories)
    t0 = time.perf_counter()
    curves: dict[str, dict[int, dict]] = {}
    variant_curves = {name: {} for name in variants}
    val_loss: dict[str, dict[int, float]] = {}
    for category in categories:
        train = load_dataset(dataset, category, "train", image_size=image_size, data_root=data_root)
        fitting, held = split_train(train, holdout, seed)
        val = SyntheticValidationSet(held, seed=seed)
        curves[category], val_loss[category] = {}, {}
        for name in variants:
            variant_curves[name][category] = {}

        seed_everything(seed)
        model = create_model(model_name, **(model_params or {}))
        for name, settings in variants.items():
            missing = [k for k in settings if not hasattr(model, k)]
            if missing:
                raise ValueError(f"variant {name!r} sets {missing}, which {model_name!r} does not have")
        last = _curve_stage(model, lr, fixed_epochs)

        def score(model, stage, epoch, _category=category, _val=val, _last=last, _fitting=fitting, _held=held):
            if stage != _last:
                return
            if track_loss:
                val_loss[_category][epoch] = round(heldout_loss(model, _held, stage, batch_size, device), 6)
            if epoch not in epochs:
                return
            # scored as fit would leave it (on_fit_end's statistics from the fitting images), on a copy
            done = finished_copy(model, _fitting, batch_size)
            curves[_category][epoch] = _scores(done, _val, batch_size, device)
            for name, settings in variants.items():
                for key, value in settings.items():
                    setattr(done, key, value)
                variant_curves[name][_category][epoch] = _scores(done, _val, batch_size, device)

        num_epochs = {**fixed_epochs, last: epochs[-1]} if fixed_epochs else epochs[-1]
        fit(model, fitting, num_epochs=num_epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
            progress=progress, epoch_end=score)
    mean = _mean_over(curves, "pixel_auroc", epochs)
    out = {"model": model_name, "params": {"model_params": model_params or {}, "dataset": str(dataset),
                                           "image_size": image_size, "lr": lr, "batch_size": batch_size,
                                           "seed": seed, "holdout": holdout, "fixed_epochs": fixed_epochs},
           "epochs": epochs, "curves": curves, "mean_pixel_auroc": mean, "max_epochs": max_epochs, "rule": rule}
    if track_loss:
        out["params"]["tol"] = tol
        out["val_loss"] = val_loss
        out["mean_rel_loss"] = mean_relative_loss(val_loss)
        out["chosen_epochs"] = choose_epochs_by_loss(out["mean_rel_loss"], max_epochs, tol=tol)
    else:
        out["chosen_epochs"] = choose_epochs(mean, max_epochs)
    if variants:
        out["variants"] = {name: {"settings": variants[name], "curves": variant_curves[name],
                                  "mean_pixel_auroc": _mean_over(variant_curves[name], "pixel_auroc", epochs),
                                  "mean_image_auroc": _mean_over(variant_curves[name], "image_auroc", epochs)}
                           for name in variants}
        out["mean_image_auroc"] = _mean_over(curves, "image_auroc", epochs)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _scores(model, val, batch_size: int, device) -> dict:
    arrays = predict_dataset(model, val, batch_size=batch_size, device=device)
    return {"pixel_auroc": round(float(pixel_auroc(arrays["maps"], arrays["masks"])), 4),
            "image_auroc": round(float(image_auroc(arrays["labels"], arrays["map_scores"])), 4)}


def _mean_over(curves: dict, metric: str, epochs) -> dict:
    return {e: round(float(np.mean([cur[e][metric] for cur in curves.values()])), 4) for e in epochs}


@torch.no_grad()
def heldout_loss(model, held, stage: str, batch_size: int = 8, device="cpu") -> float:
    """The training loss of ``model`` (in eval mode, on a copy) over the held-out clean images, averaged per image."""
    import copy

    done = copy.deepcopy(model).eval()
    loader = torch.utils.data.DataLoader(held, batch_size=batch_size, shuffle=False)
    total, count = 0.0, 0
    for batch in loader:
        images = batch["image"].to(device)
        total += float(done.training_step(images, stage)["loss"]) * len(images)
        count += len(images)
    return total / count


def mean_relative_loss(val_loss: dict) -> dict:
    """{category: {epoch: loss}} → {epoch: mean over categories of loss / that category's loss after its first
    recorded epoch}, so that no category's scale dominates."""
    rel = []
    for category, losses in val_loss.items():
        first = losses[min(losses)]
        if not first > 0:
            raise ValueError(f"{category}: the held-out loss after the first epoch must be > 0, got {first}")
        rel.append({e: v / first for e, v in losses.items()})
    epochs = sorted(set.intersection(*(set(r) for r in rel)))
    return {e: round(float(np.mean([r[e] for r in rel])), 6) for e in epochs}


def _curve_stage(model, lr: float, fixed_epochs: dict | None) -> str:
    """The stage the curve runs over (the last); refuses what one run scored at several epochs cannot stand for."""
    # One run scored at several epochs equals several runs only if that stage has no learning-rate schedule and every
    # earlier stage trains for the same fixed count in all of them.
    last, earlier = model.stages[-1], list(model.stages[:-1])
    _, scheduler = model.configure_optimizers(last, lr)
    if scheduler is not None or set(fixed_epochs or {}) != set(earlier):
        raise ValueError(f"epoch_curve scores one run at several epochs, which needs a single-stage model with a "
                         f"constant learning rate (or a constant rate in the last stage and fixed_epochs for every "
                         f"earlier stage); {model.model_name!r} has stages {list(model.stages)}, fixed_epochs "
                         f"{fixed_epochs} and {'a' if scheduler is not None else 'no'} scheduler in {last!r}")
    return last


def choose_epochs(mean_pixel_auroc: dict, max_epochs: int | None = None) -> int:
    """The epoch count with the highest validation pixel AUROC, the smallest among ties (at 3 decimals), considering
    only counts up to ``max_epochs`` (None: all)."""
    allowed = {int(e): v for e, v in mean_pixel_auroc.items() if max_epochs is None or int(e) <= max_epochs}
    if not allowed:
        raise ValueError(f"no measured epoch count is <= max_epochs={max_epochs}: {sorted(mean_pixel_auroc)}")
    best = max(round(v, 3) for v in allowed.values())
    return min(e for e, v in allowed.items() if round(v, 3) == best)


def choose_epochs_by_loss(loss: dict, max_epochs: int | None = None, *, tol: float = CONVERGED_TOL) -> int:
    """The first epoch e after which the held-out loss stops improving: no later epoch up to ``max_epochs`` (the CPU
    budget; None: the last measured) brings it below (1 − tol)·loss[e]. If it still improves at the cap, the cap.

    ``loss`` must hold every epoch from its first up to the cap. A flat curve stops at its first epoch (training
    longer teaches nothing measurable); a steadily falling one reaches the cap; noise smaller than ``tol`` does not
    count as improvement. The look-ahead runs to the cap, not a few epochs: a reconstruction model can sit on a
    plateau (outputting little more than the mean image) for many epochs before its loss falls again, and stopping on
    that plateau would reward a model that has learnt nothing.
    """
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    loss = {int(e): float(v) for e, v in loss.items()}
    epochs = sorted(loss)
    if not epochs or epochs != list(range(epochs[0], epochs[-1] + 1)):
        raise ValueError(f"loss must hold consecutive epochs, got {epochs}")
    cap = epochs[-1] if max_epochs is None else int(max_epochs)
    if not epochs[0] <= cap <= epochs[-1]:
        raise ValueError(f"max_epochs={max_epochs} must lie within the measured epochs {epochs[0]}..{epochs[-1]} "
                         f"(measure up to the cap)")
    for e in range(epochs[0], cap):
        if min(loss[later] for later in range(e + 1, cap + 1)) >= (1 - tol) * loss[e]:
            return e
    return cap


def stored_curve(model_name: str) -> dict:
    """The curve shipped with adcore for ``model_name`` (``adcore/validation_curves/<model>.json``)."""
    path = Path(__file__).with_name("validation_curves") / f"{model_name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no stored validation curve {model_name!r}: run the command at the top of "
                                f"{path.with_suffix('.yaml')}, which writes {path}")
    return load_curve(path)


def load_curve(path) -> dict:
    """A curve written by :func:`main`, with its epoch keys back as ints."""
    data = json.loads(Path(path).read_text())
    data["curves"] = {c: {int(e): v for e, v in cur.items()} for c, cur in data["curves"].items()}
    for key in ("mean_pixel_auroc", "mean_image_auroc", "mean_rel_loss"):
        if key in data:
            data[key] = {int(e): v for e, v in data[key].items()}
    if "val_loss" in data:
        data["val_loss"] = {c: {int(e): v for e, v in cur.items()} for c, cur in data["val_loss"].items()}
    for variant in data.get("variants", {}).values():
        variant["curves"] = {c: {int(e): v for e, v in cur.items()} for c, cur in variant["curves"].items()}
        for key in ("mean_pixel_auroc", "mean_image_auroc"):
            variant[key] = {int(e): v for e, v in variant[key].items()}
    return data


def main(argv=None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="python -m adcore.validation", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="registered model name, e.g. vt_adl")
    parser.add_argument("--params", help="YAML of model_params and the training settings (image_size, lr, ...)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 10, 20, 30])
    parser.add_argument("--holdout", type=int, default=16, help="training images held out per category")
    parser.add_argument("--max-epochs", type=int, help="largest epoch count the choice may take (the CPU budget)")
    parser.add_argument("--rule", choices=RULES, default="pixel_auroc", help="how the epoch count is chosen")
    parser.add_argument("--tol", type=float, default=CONVERGED_TOL, help="loss_converged: least relative improvement")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    settings = yaml.safe_load(Path(args.params).read_text()) if args.params else {}
    known = {"model_params", "dataset", "categories", "data_root", "image_size", "lr", "batch_size", "seed", "device",
             "fixed_epochs", "variants"}
    if not isinstance(settings, dict) or set(settings) - known:
        parser.error(f"{args.params} must map some of {sorted(known)}; got "
                     f"{sorted(settings) if isinstance(settings, dict) else type(settings).__name__}")
    curve = epoch_curve(args.model, epochs=args.epochs, holdout=args.holdout, max_epochs=args.max_epochs,
                        rule=args.rule, tol=args.tol, **settings)
    atomic_write_json(curve, args.out)
    summary = {k: curve[k] for k in ("mean_pixel_auroc", "mean_rel_loss", "chosen_epochs", "seconds") if k in curve}
    summary.update({f"{name}: mean_pixel_auroc": v["mean_pixel_auroc"] for name, v in curve.get("variants", {}).items()})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
