"""Seconds per epoch of every paper configuration at the paper's image size, split into data and model time.

For each paper config (the five notebooks' ``paper.yaml`` model settings; DMAD's two models separately) on a fake
MVTec AD tree (:func:`adcore.data.make_fake_mvtec`, 1024-px PNGs: MVTec AD's largest native size), this prints:

- data: seconds to read, decode and resize one image (``cache_in_memory=False``, what every epoch paid before), and
  to serve it from the decoded cache (what every epoch after the first pays now), and their ratio;
- model: seconds per optimisation step (``training_step``, backward, ``optimizer.step``), measured by ``fit`` over
  ``--steps`` steps per stage at the paper's batch size (after a warm-up step on a GPU), averaged over the stages;
- s/epoch: for MVTec AD's mean training split (3629 images / 15 categories = 242), uncached vs cached;
- checkpoint size: ``last.pt`` as ``fit`` writes it with the frozen backbone (before) and lean (after);
- grid hours: 15 categories × 3 seeds × the paper's epochs at the measured times on this device (CPU here; run
  with ``--device cuda`` on a GPU for GPU-hours). Evaluation passes are not included.

WideResNet-50-2 is randomly initialised (``pretrained=False``, the paper-shape tests' switch): the times do not depend
on the weights. Run (a few minutes on 2 cores)::

    .venv/bin/python tests/benchmarks/bench_paper_epoch.py [--device cuda] [--steps 1] [--configs dmad_sp aand]
"""
from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

import adcore
from adcore import fit, load_dataset
from adcore.data import make_fake_mvtec
from adcore.runs.experiment import _takes_image_size
from adcore.training import CHECKPOINT_NAME, frozen_modules
from adcore.utils import seed_everything

ROOT = Path(__file__).resolve().parents[2]
NATIVE = 1024  # MVTec AD's images are 700 to 1024 px; the decode cost is the larger one's
MVTEC_MEAN_TRAIN = 3629 / 15  # MVTec AD: 3629 training images over 15 categories
GRID = 15 * 3  # categories × seeds
# (label, notebook, DMAD mode): the notebooks' main models as paper.yaml configures them
CONFIGS = [("vt_adl", "vt_adl", None), ("advit", "advit", None), ("anovit", "anovit", None),
           ("dmad_sp", "dmad", "sp"), ("dmad_px", "dmad", "px"), ("aand", "aand", None)]


def fake_tree(root: Path, n: int) -> Path:
    """A fake MVTec AD ``cable`` (:func:`adcore.data.make_fake_mvtec`) with ``n`` training images at NATIVE px."""
    return make_fake_mvtec(root / "mvtec", ["cable"], image_size=NATIVE, n_train=n, n_test=1)


def paper_model(notebook: str, mode: str | None):
    """The notebook's main model as paper.yaml builds it, and (epochs per stage, batch size, image size, resample)."""
    values = yaml.safe_load((ROOT / "notebooks" / "params" / notebook / "paper.yaml").read_text())
    recipe = adcore.get_recipe(notebook, "paper")
    params = {k: values[k] for k in recipe.model_params}
    if _takes_image_size(notebook):  # the ViTs are built for one size
        params["image_size"] = values["image_size"]
    if "backbone" in values:
        params |= {"pretrained": False, "weights_path": None}
    if mode:
        params["mode"] = mode
    seed_everything(0)
    model = adcore.create_model(notebook, **params)
    epochs = recipe.num_epochs if isinstance(recipe.num_epochs, dict) else {"main": recipe.num_epochs}
    return model, epochs, values["batch_size"], values["image_size"], recipe.resample


def per_image_seconds(data, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        data[i]
    return (time.perf_counter() - t) / n


def bench(label, notebook, mode, root: Path, steps: int, device: str) -> dict:
    model, epochs, batch, size, resample = paper_model(notebook, mode)
    n_images = batch * steps
    uncached = load_dataset("mvtec", "cable", "train", data_root=root, image_size=size, resample=resample,
                            cache_in_memory=False)
    cached = load_dataset("mvtec", "cable", "train", data_root=root, image_size=size, resample=resample,
                          cache_in_memory=True)
    n_data = min(len(uncached), 8)
    data_uncached = per_image_seconds(uncached, n_data)
    cached.fill_cache()
    data_cached = per_image_seconds(cached, n_data)

    train = torch.utils.data.Subset(cached, range(n_images))
    ckpt = Path(tempfile.mkdtemp(prefix=f"bench-{label}-"))
    if device != "cpu":  # a warm-up step per stage (allocator, cuDNN autotuning) in a throw-away fit
        fit(model, torch.utils.data.Subset(cached, range(batch)), num_epochs={s: 1 for s in model.stages}, lr=1e-4,
            batch_size=batch, device=device, progress=False, num_workers=0)
        model, *_ = paper_model(notebook, mode)
    fit(model, train, num_epochs={s: 1 for s in model.stages}, lr=1e-4, batch_size=batch, device=device,
        progress=False, num_workers=0, checkpoint_dir=ckpt)
    timing = model.fit_timing
    step = timing["step_seconds"] / timing["steps"]
    lean_bytes = (ckpt / CHECKPOINT_NAME).stat().st_size
    frozen_bytes = 0
    for backbone in frozen_modules(model).values():
        buf = io.BytesIO()
        torch.save(backbone.state_dict(), buf)
        frozen_bytes += buf.getbuffer().nbytes

    steps_per_epoch = math.ceil(MVTEC_MEAN_TRAIN / batch)
    model_epoch = steps_per_epoch * step  # the mean step over the stages (AAND's two differ)
    epoch_uncached = model_epoch + MVTEC_MEAN_TRAIN * data_uncached
    epoch_cached = model_epoch + MVTEC_MEAN_TRAIN * data_cached
    total_epochs = sum(epochs.values())
    # the first epoch decodes; every later one reads the cache
    grid_cached = GRID * (total_epochs * epoch_cached + MVTEC_MEAN_TRAIN * (data_uncached - data_cached)) / 3600
    grid_uncached = GRID * total_epochs * epoch_uncached / 3600
    return {"config": label, "size": size, "batch": batch, "epochs": "+".join(str(e) for e in epochs.values()),
            "data_s/img": data_uncached, "cached_s/img": data_cached, "cache_x": data_uncached / data_cached,
            "step_s": step, "epoch_s": epoch_uncached, "epoch_s_cached": epoch_cached,
            "model_share": model_epoch / epoch_cached, "ckpt_before_MB": (lean_bytes + frozen_bytes) / 1e6,
            "ckpt_after_MB": lean_bytes / 1e6, "grid_h": grid_uncached, "grid_h_cached": grid_cached}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1, help="measured optimisation steps per stage")
    parser.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], choices=[c[0] for c in CONFIGS])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")
    largest = max(yaml.safe_load((ROOT / "notebooks" / "params" / nb / "paper.yaml").read_text())["batch_size"]
                  for _, nb, _ in CONFIGS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = fake_tree(Path(tmp), largest * args.steps)
        for label, notebook, mode in CONFIGS:
            if label in args.configs:
                rows.append(bench(label, notebook, mode, root, args.steps, args.device))
                print(f"  measured {label}", flush=True)
    print(f"\ndevice {args.device}, torch threads {torch.get_num_threads()}, {args.steps} measured step(s) per stage; "
          f"epoch = MVTec AD's mean {MVTEC_MEAN_TRAIN:.0f} training images; grid = 15 categories x 3 seeds x the "
          "paper's epochs (no evaluation passes)")
    head = ("config", "size", "batch", "epochs", "data s/img", "cached s/img", "cache x", "step s", "s/epoch",
            "s/epoch cached", "model share", "ckpt MB before", "ckpt MB after", "grid h", "grid h cached")
    fmt = ("{config}", "{size}", "{batch}", "{epochs}", "{data_s/img:.4f}", "{cached_s/img:.5f}", "{cache_x:.0f}",
           "{step_s:.2f}", "{epoch_s:.0f}", "{epoch_s_cached:.0f}", "{model_share:.0%}", "{ckpt_before_MB:.0f}",
           "{ckpt_after_MB:.0f}", "{grid_h:.0f}", "{grid_h_cached:.0f}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f.format(**r) for f in fmt) + " |")


if __name__ == "__main__":
    main()
