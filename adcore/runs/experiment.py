"""``run_experiment``: train and evaluate one registered model on every chosen category of a dataset.

This is the loop each paper notebook would otherwise repeat: load the splits, seed, create the model, ``fit`` for a
fixed number of epochs (checkpointed, resumable), ``evaluate`` (results written to ``results_dir``).
"""
from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data import list_categories, load_dataset
from ..evaluation import evaluate, image_scores
from ..recipes import recipes_of
from ..registry import create_model, get_recipe, model_class
from ..training import finished_copy, fit
from ..utils import atomic_write_bytes, params_hash, resolve_device, seed_everything, set_deterministic

METRICS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` returns: results, histories, arrays and models, keyed by category."""

    results: list[dict] = field(default_factory=list)
    histories: dict[str, list[dict]] = field(default_factory=dict)
    arrays: dict[str, dict] = field(default_factory=dict)
    models: dict[str, object] = field(default_factory=dict)

    def table(self, metrics=METRICS):
        """A pandas DataFrame: one row per category plus ``mean``; columns are ``metrics``."""
        import pandas as pd

        df = pd.DataFrame([{"category": r["category"], **{m: r.get(m) for m in metrics}} for r in self.results])
        df = df.set_index("category").astype(float)
        df.loc["mean"] = df.mean(numeric_only=True)
        return df


CURVE_METRICS = ("image_auroc", "image_auroc_map_max", "pixel_auroc", "aupro")


def _test_curve_hook(model, train, test, every: int, ckpt, resume: bool, **kw):
    """(curve list, fit epoch_end hook) that appends test metrics after every ``every``-th epoch of the last stage."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"test_curve_every must be a positive int or None, got {every!r}")
    path = None if ckpt is None else Path(ckpt) / "test_curve.json"
    curve = json.loads(path.read_text()) if resume and path is not None and path.exists() else []
    last_stage = model.stages[-1] if model.stages else None

    def hook(m, stage, epoch):
        if stage != last_stage or epoch % every or any(c["epoch"] == epoch for c in curve):
            return
        r = evaluate(finished_copy(m, train, kw["batch_size"]), test, write=False, **kw)
        curve.append({"stage": stage, "epoch": epoch, **{k: r[k] for k in CURVE_METRICS},
                      **({"code_protocol": r["code_protocol"]} if "code_protocol" in r else {})})
        if path is not None:
            atomic_write_bytes(path, json.dumps(curve).encode())

    return curve, hook


def resolve_image_size(model_name: str, image_size: int | None = None, model_params: dict | None = None) -> int:
    """The side the images of a run are resized to: ``image_size`` if given, else the model's own ``image_size``
    parameter (the ViTs and the conv AE are built for one size), else the model's default recipe's.

    Raises:
        ValueError: ``image_size`` and ``model_params["image_size"]`` disagree, or a bad size.
    """
    own = (model_params or {}).get("image_size")
    if image_size is not None and own is not None and own != image_size:
        raise ValueError(f"image_size={image_size} but model_params builds {model_name} for image_size={own}; set one "
                         "of them, or both alike")
    size = image_size if image_size is not None else own
    if size is None:
        recipe = recipes_of(model_class(model_name)).get("default") or get_recipe(model_name)
        size = recipe.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a positive int or None (the model's), got {size!r}")
    return size


def _takes_image_size(model_name: str) -> bool:
    # through the classes it inherits from: ADViT passes **params on to VT-ADL's image_size
    return any("image_size" in inspect.signature(c.__init__).parameters
               for c in model_class(model_name).__mro__ if "__init__" in vars(c))


def run_experiment(model_name: str, *, model_params: dict | None = None, dataset: str = "textures",
                   categories=None, data_root=None, image_size: int | None = None, num_epochs=None,
                   lr: float | None = None, batch_size: int | None = None, seed: int = 0, device="cpu",
                   run_name: str | None = None,
                   results_dir="results", checkpoint_root="checkpoints", resume: bool = True, progress: bool = True,
                   keep_models: bool = True, keep_arrays: bool = True,
                   test_curve_every: int | None = None, resample: str | None = None, num_workers: int | None = None,
                   cache_in_memory: bool | None = None, amp: bool = False,
                   lean_checkpoint: bool = True, deterministic: bool = True) -> ExperimentResult:
    """Train ``model_name`` from scratch on each category's normal images and evaluate it on the test split.

    ``num_epochs``, ``lr``, ``batch_size`` and ``resample`` (how images are resized) left as None come from the
    model's default recipe (``adcore.get_recipe(model_name)``); the results file records the values used.
    ``image_size=None`` is the model's (:func:`resolve_image_size`: its own ``image_size`` parameter, else its default
    recipe's); a model that takes ``image_size`` is built for the size used, and the results record it.
    ``categories=None`` runs every category found on disk. Checkpoints go to
    ``checkpoint_root/<run>-<dataset>-<category>-<hash>/last.pt`` so a killed run resumes where it stopped when it is
    run again with ``resume=True``; ``checkpoint_root=None`` disables them.

    ``test_curve_every=k`` also scores the test split after every k-th epoch of the last training stage and stores the
    metrics as ``test_curve`` in the results. It is a *measurement* of what the papers' test-set checkpoint choices
    would have reported (``adcore.book.shortcuts``); nothing is chosen from it, and training is bit-identical with or
    without it (``fit`` restores the random state after each call). The curve is kept beside the checkpoint, so a
    resumed run keeps the epochs scored before the interruption. None or 0 (the default): no curve; each curve point
    is a whole test pass, 400 of them per model for DMAD's paper schedule. The notebooks keep ``test_curve_every =
    1`` in their parameters cell (the book's shortcuts chapter reads those curves on the default runs) and every
    ``paper.yaml`` sets it to 0.

    The speed settings (:func:`adcore.fit`) change no CPU result: ``num_workers`` (None: the available cores on a GPU,
    0 on the CPU), ``cache_in_memory`` (None: when the decoded splits fit in a quarter of the available memory, see
    ``adcore.load_dataset``) and ``lean_checkpoint``. ``amp=True`` (bf16 autocast in the training steps) does change
    the numbers and is part of the results' parameters. The results record each setting as used (``runtime``),
    what the model decided while training (``decided``: AAND's foreground rule, the schedules' resolved epochs),
    ``fit_seconds``, summed over every session that resumed the run, and ``fit_timing`` (sessions, and this session's
    seconds waiting for data and in the optimisation steps).

    ``deterministic=True`` (the default, and the book's) makes a CUDA run repeatable to the digit on one GPU and
    software stack (:func:`adcore.utils.set_deterministic`: deterministic algorithms, which the fused attention's
    atomic-free dQ follows; about 1.5x its backward's exp/log work). CPU runs are repeatable at a fixed thread count
    either way, so it changes nothing there.
    """
    model_params = dict(model_params or {})
    if categories is None:
        categories = list_categories(dataset, data_root=data_root)
    elif isinstance(categories, str):
        categories = [categories]
    found = set(list_categories(dataset, data_root=data_root))
    missing = [c for c in categories if c not in found]
    if missing:
        raise ValueError(f"categories {missing} are not in dataset {dataset!r}; found {sorted(found)}")
    epochs_from_recipe = num_epochs is None
    image_size = resolve_image_size(model_name, image_size, model_params)
    if _takes_image_size(model_name):  # the ViTs and the conv AE are built for the size they are fed
        model_params["image_size"] = image_size
    if not isinstance(amp, bool):
        raise ValueError(f"amp must be True or False, got {amp!r}")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True or False, got {deterministic!r}")
    if resolve_device(device).type == "cuda":
        set_deterministic(deterministic)  # before any CUDA matmul: cuBLAS reads its workspace setting once
    if cache_in_memory is not None and not isinstance(cache_in_memory, bool):
        raise ValueError(f"cache_in_memory must be None (decide by memory), True or False, got {cache_in_memory!r}")
    curves = test_curve_every is not None and not (type(test_curve_every) is int and test_curve_every == 0)
    recipe = recipes_of(model_class(model_name)).get("default")
    if resample is None:  # a model without a default recipe gets the loaders' default
        resample = recipe.resample if recipe is not None else "bilinear"
    if num_epochs is None or lr is None or batch_size is None:
        given = (recipe or get_recipe(model_name)).training_kwargs()  # get_recipe raises, naming the model
        num_epochs = given["num_epochs"] if num_epochs is None else num_epochs
        lr = given["lr"] if lr is None else lr
        batch_size = given["batch_size"] if batch_size is None else batch_size
    run = run_name or model_name
    params = {"model": model_name, "model_params": model_params, "dataset": dataset, "data_root": data_root,
              "image_size": image_size, "num_epochs": num_epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
    if resample != "bilinear":  # recorded when it differs from the loaders' default (older run ids stay valid)
        params["resample"] = resample
    if amp:  # recorded when on: it changes the numbers (fp32 run ids stay valid)
        params["amp"] = True
    out = ExperimentResult()
    for category in categories:
        t0 = time.perf_counter()
        data = dict(image_size=image_size, data_root=data_root, resample=resample, cache_in_memory=cache_in_memory)
        train, test = load_dataset(dataset, category, "train", **data), load_dataset(dataset, category, "test", **data)
        load_seconds = time.perf_counter() - t0
        seed_everything(seed)
        model = create_model(model_name, **model_params)
        ckpt = None
        if checkpoint_root is not None:
            ckpt = Path(checkpoint_root) / f"{run}-{Path(str(dataset)).name}-{category}-{params_hash(params)}"
        epochs = num_epochs
        if epochs_from_recipe and isinstance(epochs, dict):  # a variant built without a stage keeps the others'
            epochs = {stage: n for stage, n in epochs.items() if stage in model.stages}
        curve, hook = None, None
        if curves:
            curve, hook = _test_curve_hook(model, train, test, test_curve_every, ckpt, resume and ckpt is not None,
                                           batch_size=batch_size, device=device)
        history = fit(model, train, num_epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                      checkpoint_dir=ckpt, resume=resume and ckpt is not None, progress=progress, epoch_end=hook,
                      num_workers=num_workers, amp=amp, lean_checkpoint=lean_checkpoint)
        timing = model.fit_timing
        fit_seconds = load_seconds + timing["seconds"]
        runtime = {"image_size": image_size, "cache_in_memory": bool(train.cache_in_memory),
                   "num_workers": timing["num_workers"], "pin_memory": timing["pin_memory"], "amp": amp,
                   "lean_checkpoint": lean_checkpoint, "test_curve_every": test_curve_every if curves else None,
                   "deterministic": deterministic}
        # how long, not what: this session's seconds waiting for batches and in the steps, and how many sessions
        fit_timing = {"sessions": timing["sessions"], "data_seconds": round(timing["data_seconds"], 2),
                      "step_seconds": round(timing["step_seconds"], 2), "steps": timing["steps"]}
        decided = model.decided() if hasattr(model, "decided") else {}
        # scores of the normal training images: the threshold behind the honest F1 (no test image involved)
        train_scores = image_scores(model, train, batch_size=batch_size, device=device)
        result, arrays = evaluate(model, test, train_scores=train_scores, run_name=run,
                                  params={**params, "category": category}, results_dir=results_dir,
                                  batch_size=batch_size, device=device, seed=seed, return_arrays=True,
                                  extra={"fit_seconds": round(fit_seconds, 2), "fit_timing": fit_timing,
                                         "runtime": runtime, "decided": decided,
                                         **({"test_curve": curve} if curve is not None else {})})
        out.results.append(result)
        out.histories[category] = history
        if keep_arrays:
            out.arrays[category] = arrays
        if keep_models:
            out.models[category] = model
    return out
