"""``fit``: one plain training loop for every model, with atomic checkpoints, resume and a guard against divergence.

A model only says what one step computes (``AnomalyModel.training_step``); this loop owns the order of data, the
optimiser steps, progress, checkpoints and the random state, so that every paper gets the same guarantees:

* a checkpoint ``last.pt`` is written atomically after every epoch;
* ``resume=True`` continues from it and ends with the same weights as an uninterrupted run with the same seed,
  because the data order of epoch e is drawn from a generator seeded by (seed, stage, e) and the global RNG
  states (Python, NumPy, torch) are saved with the weights;
* a NaN or infinite loss stops training with :class:`NonFiniteLossError` naming the stage, epoch and step, and the
  last good checkpoint is left untouched;
* checkpoints are lean: a frozen pretrained backbone (``adcore.backbones.FeatureBackbone``) is named by its name,
  weights file and the SHA-256 of its tensors instead of stored (WideResNet-50-2's taps are ~0.1 GB per file), and
  resume refuses a model whose frozen weights differ. ``lean_checkpoint=False`` is the slow twin that stores them.

The defaults respect a GPU, each fast path with its slow twin behind one switch: DataLoader workers
(``num_workers``; 0 loads in the main process), pinned memory on CUDA, a decoded-image cache filled once before the
workers start (``AnomalyDataset.cache_in_memory``), and bf16 autocast (``amp``; off by default, as the papers trained
in fp32). None of them changes a CPU result: the data order comes from the sampler, not from the workers, and no
dataset draws random numbers (pseudo-anomalies are drawn inside the models' training steps, in the main process).
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .backbones import FeatureBackbone
from .recipes import recipes_of
from .types import AnomalyModel
from .utils import atomic_torch_save, resolve_device, seed_everything

CHECKPOINT_NAME = "last.pt"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names where, and where the last good checkpoint is."""


MAX_WORKERS = 8  # beyond this a loader of cached images only adds processes


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what a batch scheduler granted, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(device) -> int:
    """``num_workers=None``: the cores available to the run, at most ``MAX_WORKERS``, when training on a GPU; 0 on the
    CPU, whose cores the model's own threads already use (and the book's runs stay as they were measured)."""
    return min(available_cores(), MAX_WORKERS) if torch.device(device).type == "cuda" else 0


def _check_num_workers(num_workers) -> None:
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"num_workers must be None (the default) or a non-negative int, got {num_workers!r}")


def _loader(data, batch_size: int, shuffle: bool, seed: int | None = None, num_workers: int = 0,
            pin_memory: bool = False) -> DataLoader:
    generator = None
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      pin_memory=pin_memory)


class EpochShuffle(torch.utils.data.Sampler):
    """The order ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives, for a ``seed`` set
    before every epoch, so that one loader (and its persistent workers) serves every epoch of a stage.

    A fresh loader first draws its workers' base seed from that generator, then ``RandomSampler`` draws a permutation
    from it; both draws are repeated here, so the order is the one training has always used, workers or not.
    """

    def __init__(self, n: int):
        self.n, self.seed = n, None

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the base-seed draw of DataLoader's iterator
        yield from torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.n


def input_size(model) -> int | None:
    """The image side ``model`` expects: the size it was trained at (``fit`` records it), else its own
    ``image_size`` (the ViTs and the conv AE are built for one), else its default recipe's; None if none says."""
    for size in (getattr(model, "trained_image_size", None), getattr(model, "image_size", None)):
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    recipe = recipes_of(model).get("default")
    return None if recipe is None else recipe.image_size


def at_model_size(data, model):
    """``data`` served at the side ``model`` expects when its size was not asked for (``load_dataset`` with
    ``image_size=None`` keeps each image's own size); a dataset whose size was set is returned unchanged."""
    if getattr(data, "size_given", True) or not hasattr(data, "resized"):
        return data
    size = input_size(model)
    return data if size is None or size == data.image_size else data.resized(size)


# ---------------------------------------------------------------- lean checkpoints


def frozen_modules(model) -> dict[str, FeatureBackbone]:
    """``{state-dict prefix: backbone}`` of the frozen feature extractors inside ``model`` (outermost only)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FeatureBackbone) and not any(name.startswith(p + ".") for p in out):
            out[name] = module
    return out


def tensors_sha256(state: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _frozen_record(model) -> dict:
    """What a lean checkpoint keeps of each frozen backbone instead of its weights."""
    return {prefix: {"name": m.name, "pretrained": m.pretrained, "weights_path": m.weights_path,
                     "sha256": tensors_sha256(m.state_dict())}
            for prefix, m in frozen_modules(model).items()}


def _is_frozen_key(key: str, record: dict) -> bool:
    return any(key.startswith(prefix + ".") or not prefix for prefix in record)


def _check_frozen(record: dict, model, ckpt_path) -> None:
    current = _frozen_record(model) if record else {}
    for prefix, saved in record.items():
        now = current.get(prefix)
        if now is None or now["sha256"] != saved["sha256"]:
            got = "no such module" if now is None else f"{now['name']} from {now['weights_path']}"
            raise ValueError(f"checkpoint {ckpt_path} was trained on the frozen backbone {prefix!r} = {saved['name']} "
                             f"from {saved['weights_path']} (tensors SHA-256 {saved['sha256'][:12]}...), but this "
                             f"model's is {got}, with other weights; build the model with the same weights, or "
                             f"delete {ckpt_path.parent} / pass resume=False to start afresh")


def _load_weights(model, state: dict) -> None:
    """Load a checkpoint's weights; the frozen backbone's (left out of a lean checkpoint) stay as built."""
    model.load_state_dict({**model.state_dict(), **state["model"]})


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
        epoch_end=None, num_workers: int | None = None, amp: bool = False, lean_checkpoint: bool = True) -> list[dict]:
    """Train ``model`` on ``train_data`` (normal images only) for a fixed number of epochs.

    Args:
        model: an :class:`AnomalyModel`.
        train_data: a dataset whose items are dicts with an ``"image"`` (3, S, S) tensor. An ``AnomalyDataset`` whose
            size was not asked for (``load_dataset(..., image_size=None)``) is served at :func:`input_size` of the
            model; the side trained at is kept as ``model.trained_image_size``.
        num_epochs: epochs per stage, an int for every stage or a dict ``{stage: epochs}``. No checkpoint is ever
            chosen on test data: training simply stops after these epochs. None: the model's default recipe
            (``model.recipes["default"]``, see :mod:`adcore.recipes`), as are ``lr`` and ``batch_size``. Before
            training, ``model.planned_epochs`` is set to ``{stage: epochs}``, for schedules that follow the epochs
            (DMAD's cosine period, AAND's milestones).
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
        num_workers: DataLoader worker processes; None: :func:`default_num_workers` (the available cores on a GPU, 0
            on the CPU); 0 loads in the main process (the slow twin). One loader serves every epoch, its workers
            persistent; a dataset with ``cache_in_memory`` is decoded once, in threads, before they start. Memory is
            pinned when training on CUDA. The result does not depend on it.
        amp: run ``training_step`` under bf16 autocast (mixed precision; CUDA, or CPU for tests); the backward pass
            and the optimiser stay in fp32. False (the default, as every paper trained) is plain fp32.
        lean_checkpoint: leave frozen backbones out of ``last.pt`` (named by their weights' SHA-256, checked on
            resume); False stores every tensor.

    Returns:
        The training history: one dict per optimiser step (stage, epoch, step, loss, and the model's other logged
        values). It is also stored on ``model.fit_history``, and ``model.fit_timing`` holds ``seconds`` (training
        time summed over every session that resumed this run, from the checkpoint), ``data_seconds`` and
        ``step_seconds`` (this session's time waiting for batches and in the steps), ``steps``, ``sessions``,
        ``num_workers``, ``pin_memory`` and ``amp``.
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
    _check_num_workers(num_workers)
    if not isinstance(amp, bool):
        raise ValueError(f"amp must be True or False, got {amp!r}")
    epochs = _epochs_per_stage(model, num_epochs)
    device = resolve_device(device)
    model.to(device)
    model.planned_epochs = dict(epochs)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    workers = default_num_workers(device) if num_workers is None else num_workers
    pin = device.type == "cuda"
    train_data = at_model_size(train_data, model)
    if hasattr(train_data, "fill_cache"):
        train_data.fill_cache(threads=max(workers, 1))
    started = time.perf_counter()
    frozen = _frozen_record(model) if (lean_checkpoint and ckpt_path is not None) else {}

    seed_everything(seed)
    history: list[dict] = []
    start_stage, start_epoch, state, elapsed_before, sessions = 0, 0, None, 0.0, 1
    if resume and ckpt_path.exists():
        from .artifact import load_plain  # weights_only: a shared checkpoint must not run code when loaded
        state = load_plain(ckpt_path, "checkpoint")
        if state.get("model_name") != getattr(model, "model_name", None):
            raise ValueError(f"checkpoint {ckpt_path} belongs to model {state.get('model_name')!r}, "
                             f"not {getattr(model, 'model_name', None)!r}")
        start_stage, start_epoch, history = state["stage_index"], state["next_epoch"], state["history"]
        elapsed_before, sessions = state.get("elapsed_seconds", 0.0), state.get("sessions", 1) + 1
        saved_frozen = state.get("frozen") or {}
        _check_frozen(saved_frozen, model, ckpt_path)
        current = model.state_dict()
        stale = sorted(k for k, v in state["model"].items() if k not in current or current[k].shape != v.shape)
        stale += sorted(k for k in current if k not in state["model"] and not _is_frozen_key(k, saved_frozen))
        if stale:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model (its parameters changed: "
                             f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}); delete {ckpt_path.parent} "
                             "or pass resume=False to start afresh")

    model.on_fit_start(_loader(train_data, batch_size, shuffle=False, num_workers=workers, pin_memory=pin))
    total_steps = sum(epochs.values()) * math.ceil(len(train_data) / batch_size)
    done_steps = sum(epochs[s] for s in model.stages[:start_stage]) * math.ceil(len(train_data) / batch_size)
    done_steps += start_epoch * math.ceil(len(train_data) / batch_size)
    bar = None
    if progress and total_steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=done_steps, desc=getattr(model, "model_name", "fit"), leave=False)

    # One loader for every epoch: EpochShuffle reseeds its order per epoch, so the workers can persist. Its own
    # generator only seeds the workers; the global RNG is not drawn from, as with the per-epoch loaders before.
    order = EpochShuffle(len(train_data))
    train_loader = DataLoader(train_data, batch_size=batch_size, sampler=order, generator=torch.Generator(),
                              num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    data_seconds = step_seconds = 0.0
    steps = 0
    try:
        for stage_index, stage in enumerate(model.stages):
            if stage_index < start_stage:
                continue
            resuming = state is not None and stage_index == start_stage
            if resuming:
                # Weights go in before the stage hook (it may derive things from them) and again after it (it may
                # re-initialise modules). The RNG is restored where the uninterrupted run stood: before the hook at
                # a stage boundary, after the optimiser is built in mid-stage.
                _load_weights(model, state)
                if start_epoch == 0:
                    _set_rng_state(state["rng"])
            model.on_stage_start(stage, _loader(train_data, batch_size, shuffle=False, num_workers=workers,
                                                pin_memory=pin))
            optimizer, scheduler = model.configure_optimizers(stage, lr)
            first_epoch = 0
            if resuming:
                _load_weights(model, state)
                if start_epoch > 0:
                    optimizer.load_state_dict(state["optimizer"])
                    if scheduler is not None and state["scheduler"] is not None:
                        scheduler.load_state_dict(state["scheduler"])
                    _set_rng_state(state["rng"])
                first_epoch = start_epoch
                state = None
            for epoch in range(first_epoch, epochs[stage]):
                model.train()
                order.set_seed(_epoch_seed(seed, stage_index, epoch))
                running = None
                waited = time.perf_counter()
                for step, batch in enumerate(train_loader):
                    images = batch["image"].to(device, non_blocking=True)
                    stepped = time.perf_counter()
                    data_seconds += stepped - waited
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
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
                    record.update({k: float(v.detach()) for k, v in out.items()
                                   if torch.is_tensor(v) and v.numel() == 1})
                    history.append(record)
                    waited = time.perf_counter()  # float() above waited for the device: the step is done
                    step_seconds += waited - stepped
                    steps += 1
                    running = record["loss"] if running is None else 0.9 * running + 0.1 * record["loss"]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(stage=stage, epoch=epoch + 1, loss=f"{running:.4g}")
                if scheduler is not None:
                    scheduler.step()
                if ckpt_path is not None:
                    last_epoch = epoch + 1 == epochs[stage]
                    next_stage, next_epoch = (stage_index + 1, 0) if last_epoch else (stage_index, epoch + 1)
                    weights = {k: v for k, v in model.state_dict().items() if not _is_frozen_key(k, frozen)}
                    atomic_torch_save({
                        "model_name": getattr(model, "model_name", None), "stage_index": next_stage,
                        "next_epoch": next_epoch, "model": weights, "frozen": frozen,
                        "optimizer": None if last_epoch else optimizer.state_dict(),
                        "scheduler": None if (last_epoch or scheduler is None) else scheduler.state_dict(),
                        "rng": _rng_state(), "history": history, "time": time.time(),
                        "elapsed_seconds": elapsed_before + time.perf_counter() - started, "sessions": sessions,
                    }, ckpt_path)
                if epoch_end is not None:
                    rng = _rng_state()
                    epoch_end(model, stage, epoch + 1)
                    _set_rng_state(rng)
        if state is not None:  # every stage had finished before the interruption
            _load_weights(model, state)
            _set_rng_state(state["rng"])
    finally:
        if bar is not None:
            bar.close()
        del train_loader  # its persistent workers exit with it
    model.eval()
    model.on_fit_end(_loader(train_data, batch_size, shuffle=False, num_workers=workers, pin_memory=pin))
    model.trained_image_size = getattr(train_data, "image_size", None)
    model.fit_history = history
    model.fit_timing = {"seconds": elapsed_before + time.perf_counter() - started, "data_seconds": data_seconds,
                        "step_seconds": step_seconds, "steps": steps, "sessions": sessions, "num_workers": workers,
                        "pin_memory": pin, "amp": amp}
    return history
