"""``fit``: one plain training loop for every model, with atomic checkpoints, resume and a guard against divergence.

A model only says what one step computes (``AnomalyModel.training_step``); this loop owns the order of data, the
optimiser steps, progress, checkpoints and the random state, so that every paper gets the same guarantees:

* a checkpoint ``last.pt`` is written atomically after every epoch;
* ``resume=True`` continues from it and ends with the same weights as an uninterrupted run with the same seed,
  because the data order of epoch e is drawn from a generator seeded by (seed, stage, e) and the global RNG
  states (Python, NumPy, torch) are saved with the weights;
* a NaN or infinite loss stops training with :class:`NonFiniteLossError` naming the stage, epoch and step, and the
  last good checkpoint is left untouched.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .recipes import recipes_of
from .types import AnomalyModel
from .utils import atomic_torch_save, resolve_device, seed_everything

CHECKPOINT_NAME = "last.pt"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names where, and where the last good checkpoint is."""


def _loader(data, batch_size: int, shuffle: bool, seed: int | None = None) -> DataLoader:
    generator = None
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
    # num_workers=0: the embedded benchmarks are cached in memory and CI has 2 cores.
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def _epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % 2**62


def _rng_state() -> dict:
    # NumPy's key array as a tensor, so that checkpoints load with torch.load(weights_only=True) (no pickled arrays)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epochs_per_stage(model: AnomalyModel, num_epochs) -> dict[str, int]:
    if isinstance(num_epochs, dict):
        unknown = set(num_epochs) - set(model.stages)
        missing = set(model.stages) - set(num_epochs)
        if unknown or missing:
            raise ValueError(f"num_epochs per stage must name exactly the model's stages {list(model.stages)}; "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        out = dict(num_epochs)
    else:
        out = {stage: num_epochs for stage in model.stages}
    for stage, n in out.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_epochs for stage {stage!r} must be a non-negative int, got {n!r}")
    return out


def finished_copy(model: AnomalyModel, train_data, batch_size: int = 8) -> AnomalyModel:
    """A copy of ``model`` as ``fit`` would return it if training stopped now: in eval mode, with ``on_fit_end`` run
    on ``train_data`` (the statistics some models score with: ADViT's discrepancy, DMAD's min-max, a memory bank).

    For scoring inside an ``epoch_end`` hook: the model being trained is never touched, so its training goes on
    exactly as without the hook.
    """
    import copy

    done = copy.deepcopy(model)
    done.eval()
    done.on_fit_end(_loader(train_data, batch_size, shuffle=False))
    return done


def _recipe_defaults(model: AnomalyModel, num_epochs, lr, batch_size):
    """Fill the training arguments left as None from the model's default recipe."""
    if num_epochs is not None and lr is not None and batch_size is not None:
        return num_epochs, lr, batch_size
    recipe = recipes_of(model).get("default")
    if recipe is None:
        missing = [k for k, v in (("num_epochs", num_epochs), ("lr", lr), ("batch_size", batch_size)) if v is None]
        raise ValueError(f"{type(model).__name__} declares no default recipe; pass {', '.join(missing)} to fit")
    given = {"num_epochs": num_epochs, "lr": lr, "batch_size": batch_size}
    out = {k: recipe.training_kwargs()[k] if v is None else v for k, v in given.items()}
    # A model built without some stage (e.g. AAND without Stage I) keeps the recipe's epochs for the stages it has.
    if isinstance(out["num_epochs"], dict) and num_epochs is None:
        out["num_epochs"] = {s: out["num_epochs"][s] for s in model.stages if s in out["num_epochs"]}
    return out["num_epochs"], out["lr"], out["batch_size"]


def fit(model: AnomalyModel, train_data, *, num_epochs=None, lr: float | None = None, batch_size: int | None = None,
        seed: int = 0, device="cpu", checkpoint_dir=None, resume: bool = False, progress: bool = True,
        epoch_end=None) -> list[dict]:
    """Train ``model`` on ``train_data`` (normal images only) for a fixed number of epochs.

    Args:
        model: an :class:`AnomalyModel`.
        train_data: a dataset whose items are dicts with an ``"image"`` (3, S, S) tensor.
        num_epochs: epochs per stage, an int for every stage or a dict ``{stage: epochs}``. No checkpoint is ever
            chosen on test data: training simply stops after these epochs. None: the model's default recipe
            (``model.recipes["default"]``, see :mod:`adcore.recipes`), as are ``lr`` and ``batch_size``.
        lr: learning rate passed to ``model.configure_optimizers``.
        batch_size: images per step.
        seed: seeds the weights' initialisation (if the model is created after ``seed_everything``), the data
            order and every random draw inside training steps.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        checkpoint_dir: folder for ``last.pt``; ``None`` disables checkpoints (and resume).
        resume: continue from ``checkpoint_dir/last.pt`` if it exists.
        progress: show a tqdm bar with the running loss.
        epoch_end: optional ``epoch_end(model, stage, epoch)`` called after every finished epoch (``epoch`` counts
            from 1), after its checkpoint; ``adcore.validation`` uses it to score a held-out set. The random state
            is restored after the call, so it cannot change the training that follows. ``on_fit_end`` has not run
            yet at that point: score :func:`finished_copy` of the model, not the model itself.

    Returns:
        The training history: one dict per optimiser step (stage, epoch, step, loss, and the model's other logged
        values). It is also stored on ``model.fit_history``.
    """
    if not isinstance(model, AnomalyModel):
        raise TypeError(f"fit expects an adcore AnomalyModel, got {type(model).__name__}")
    num_epochs, lr, batch_size = _recipe_defaults(model, num_epochs, lr, batch_size)
    if len(train_data) == 0:
        raise ValueError("fit got an empty training set")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    epochs = _epochs_per_stage(model, num_epochs)
    device = resolve_device(device)
    model.to(device)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None

    seed_everything(seed)
    history: list[dict] = []
    start_stage, start_epoch, state = 0, 0, None
    if resume and ckpt_path.exists():
        from .artifact import load_plain  # weights_only: a shared checkpoint must not run code when loaded
        state = load_plain(ckpt_path, "checkpoint")
        if state.get("model_name") != getattr(model, "model_name", None):
            raise ValueError(f"checkpoint {ckpt_path} belongs to model {state.get('model_name')!r}, "
                             f"not {getattr(model, 'model_name', None)!r}")
        start_stage, start_epoch, history = state["stage_index"], state["next_epoch"], state["history"]
        current = model.state_dict()
        stale = sorted(k for k, v in state["model"].items() if k not in current or current[k].shape != v.shape)
        stale += sorted(k for k in current if k not in state["model"])
        if stale:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model (its parameters changed: "
                             f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}); delete {ckpt_path.parent} "
                             "or pass resume=False to start afresh")

    model.on_fit_start(_loader(train_data, batch_size, shuffle=False))
    total_steps = sum(epochs.values()) * math.ceil(len(train_data) / batch_size)
    done_steps = sum(epochs[s] for s in model.stages[:start_stage]) * math.ceil(len(train_data) / batch_size)
    done_steps += start_epoch * math.ceil(len(train_data) / batch_size)
    bar = None
    if progress and total_steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=done_steps, desc=getattr(model, "model_name", "fit"), leave=False)

    try:
        for stage_index, stage in enumerate(model.stages):
            if stage_index < start_stage:
                continue
            resuming = state is not None and stage_index == start_stage
            if resuming:
                # Weights go in before the stage hook (it may derive things from them) and again after it (it may
                # re-initialise modules). The RNG is restored where the uninterrupted run stood: before the hook at
                # a stage boundary, after the optimiser is built in mid-stage.
                model.load_state_dict(state["model"])
                if start_epoch == 0:
                    _set_rng_state(state["rng"])
            model.on_stage_start(stage, _loader(train_data, batch_size, shuffle=False))
            optimizer, scheduler = model.configure_optimizers(stage, lr)
            first_epoch = 0
            if resuming:
                model.load_state_dict(state["model"])
                if start_epoch > 0:
                    optimizer.load_state_dict(state["optimizer"])
                    if scheduler is not None and state["scheduler"] is not None:
                        scheduler.load_state_dict(state["scheduler"])
                    _set_rng_state(state["rng"])
                first_epoch = start_epoch
                state = None
            for epoch in range(first_epoch, epochs[stage]):
                model.train()
                loader = _loader(train_data, batch_size, shuffle=True, seed=_epoch_seed(seed, stage_index, epoch))
                running = None
                for step, batch in enumerate(loader):
                    images = batch["image"].to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    out = model.training_step(images, stage)
                    loss = out["loss"]
                    if not torch.isfinite(loss).all():
                        where = f"stage {stage!r}, epoch {epoch + 1}/{epochs[stage]}, step {step + 1}"
                        kept = (f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path and ckpt_path.exists()
                                else "no checkpoint had been written yet")
                        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}; {kept}. "
                                                 "Lower the learning rate or check the inputs.")
                    loss.backward()
                    optimizer.step()
                    record = {"stage": stage, "epoch": epoch, "step": step}
                    record.update({k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1})
                    history.append(record)
                    running = record["loss"] if running is None else 0.9 * running + 0.1 * record["loss"]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(stage=stage, epoch=epoch + 1, loss=f"{running:.4g}")
                if scheduler is not None:
                    scheduler.step()
                if ckpt_path is not None:
                    last_epoch = epoch + 1 == epochs[stage]
                    next_stage, next_epoch = (stage_index + 1, 0) if last_epoch else (stage_index, epoch + 1)
                    atomic_torch_save({
                        "model_name": getattr(model, "model_name", None), "stage_index": next_stage,
                        "next_epoch": next_epoch, "model": model.state_dict(),
                        "optimizer": None if last_epoch else optimizer.state_dict(),
                        "scheduler": None if (last_epoch or scheduler is None) else scheduler.state_dict(),
                        "rng": _rng_state(), "history": history, "time": time.time(),
                    }, ckpt_path)
                if epoch_end is not None:
                    rng = _rng_state()
                    epoch_end(model, stage, epoch + 1)
                    _set_rng_state(rng)
        if state is not None:  # every stage had finished before the interruption
            model.load_state_dict(state["model"])
            _set_rng_state(state["rng"])
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    model.on_fit_end(_loader(train_data, batch_size, shuffle=False))
    model.fit_history = history
    return history
