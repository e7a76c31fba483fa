"""The deploy path's numbers: ONNX agreement and threshold false-positive rate on ``textures``, and CPU throughput
(torch, onnxruntime, OpenVINO).

Two reports, each a printed table (CPU, threads as given; nothing here is a pass/fail test)::

    # train each model with `python -m adcore train`'s code on <category>/train/good (default recipe; --set overrides),
    # export it, run torch and onnxruntime over the whole test split, and measure the threshold on its good images
    python tests/benchmarks/bench_deploy.py agreement --models knn vt_adl anovit advit dmad aand --categories brick

    # images/s of the scoring graph (model + upsample + Gaussian + max) in torch, onnxruntime and OpenVINO (CPU
    # plugin, f32, converted from the same ONNX file); the default recipes' model parameters, ViTs with patch side
    # S/16 (the recipe's 8 px at 128 px), kNN's bank built on textures brick
    python tests/benchmarks/bench_deploy.py throughput --sizes 128 256 --batches 1 8 --threads 1

Agreement columns: ``map_rel`` = max |map_onnx − map_torch| over the split / range of the torch maps over the split;
``map_rel_img`` = the worst image's max difference / that image's own map range; ``decisions`` = images whose
anomalous/good call differs between the runtimes (out of the split); ``fpr`` = good test images above the threshold
(target ``--fpr``, fitted on held-out *training* images only), ``tpr`` = anomalous test images above it.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ("knn", "vt_adl", "anovit", "advit", "dmad", "aand")


def _parse_set(items):
    import yaml

    return {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in items or [])}


def agreement(args) -> None:
    import adcore
    from adcore.deploy.export import agreement as compare, export_onnx, onnx_session
    from adcore.deploy.postprocess import ScoringGraph
    from adcore.deploy.train import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for category in args.categories:
                path = Path(tmp) / f"{name}-{category}.pt"
                t0 = time.perf_counter()
                train(name, args.data, path, category=category, overrides=_parse_set(args.set), fpr=args.fpr,
                      progress=False)
                fit_s = time.perf_counter() - t0
                try:
                    export_onnx(path, path.with_suffix(".onnx"))
                except Exception as e:  # report it and go on with the other models
                    rows.append((name, category, f"export failed: {str(e)[:200]}"))
                    print(rows[-1])
                    continue
                model = adcore.load(path)
                size, t = model.artifact["preprocessing"]["image_size"], model.artifact["threshold"]
                graph, session = ScoringGraph(model, size).eval(), onnx_session(path.with_suffix(".onnx"))
                test = adcore.load_dataset(args.data, category, "test", image_size=size)
                loader = torch.utils.data.DataLoader(test, batch_size=8, shuffle=False)
                st, so, mt, diff = [], [], [], []
                for batch in loader:
                    r = compare(graph, session, batch["image"])
                    st.append(r["score_torch"])
                    so.append(r["score_onnx"])
                    mt.append(r["map_torch"])
                    diff.append(np.abs(r["map_onnx"] - r["map_torch"]))
                st, so, mt, diff = map(np.concatenate, (st, so, mt, diff))
                per_img = (diff.reshape(len(diff), -1).max(1)
                           / np.maximum(np.ptp(mt.reshape(len(mt), -1), axis=1), 1e-12)).max()
                good = test.labels == 0
                dt, do = st > t["value"], so > t["value"]
                rows.append((name, category, {
                    "map_rel": float(diff.max() / np.ptp(mt)), "map_rel_img": float(per_img),
                    "decisions": f"{int((dt != do).sum())}/{len(dt)}",
                    "fpr": f"{int(dt[good].sum())}/{int(good.sum())} = {dt[good].mean():.1%}",
                    "target": f"{t['target_fpr']:.0%} (backed: {t['achievable_fpr']:.1%}, n={t['n_holdout']})",
                    "tpr": f"{dt[~good].mean():.1%}", "train_s": round(fit_s)}))
                print(rows[-1], flush=True)
    print("\n| model | category | map diff / range (split) | worst image | decisions differing | FPR on good test "
          "| target (backed by held-out) | TPR | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, category, r in rows:
        if isinstance(r, str):
            print(f"| {name} | {category} | {r} | | | | | | |")
        else:
            print(f"| {name} | {category} | {r['map_rel']:.1e} | {r['map_rel_img']:.1e} | {r['decisions']} | "
                  f"{r['fpr']} | {r['target']} | {r['tpr']} | {r['train_s']} |")


def _rate(fn, batch: int, min_seconds: float) -> float:
    fn()  # warm-up (allocations, ORT's first-run planning)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and n >= 3:
            return n * batch / elapsed


def throughput(args) -> None:
    import onnxruntime as ort
    import openvino as ov

    import adcore
    from adcore.deploy.export import _torch_backend, export_model, openvino_core
    from adcore.deploy.postprocess import ScoringGraph
    from adcore.deploy.train import _takes_image_size, resolve_settings

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for size in args.sizes:
                overrides = {"image_size": size}
                if _takes_image_size(name):  # the ViTs: a 16 x 16 patch grid at every size (their latent_dim needs it)
                    overrides["patch_size"] = size // 16
                _, params = resolve_settings(name, overrides=overrides)
                torch.manual_seed(0)
                model = adcore.create_model(name, **params)
                if name == "knn":  # its speed depends on the bank: build it on the textures training set
                    adcore.fit(model, adcore.load_dataset("textures", "brick", "train", image_size=size),
                               num_epochs=0, progress=False)
                model.eval()
                meta = {"model_name": name, "preprocessing": {"image_size": size, "sigma": 4.0}}
                onnx_path = Path(tmp) / f"{name}-{size}.onnx"
                export_model(model, onnx_path, meta)
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
                session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
                # the ONNX file through OpenVINO's own converter, f32 as `export --format openvino` checks it
                compiled = openvino_core().compile_model(ov.convert_model(str(onnx_path)), "CPU", {
                    "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads})
                graph = ScoringGraph(model, size).eval()
                for batch in args.batches:
                    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
                    xn = x.numpy()

                    def run_torch():
                        with torch.no_grad(), _torch_backend():
                            graph(x)

                    t = _rate(run_torch, batch, args.min_seconds)
                    o = _rate(lambda: session.run(None, {"images": xn}), batch, args.min_seconds)
                    v = _rate(lambda: compiled(xn), batch, args.min_seconds)
                    rows.append((name, size, batch, t, o, v))
                    print(f"{name:7s} {size:4d} px  batch {batch}: torch {t:8.2f} img/s   onnxruntime {o:8.2f} img/s"
                          f"   openvino {v:8.2f} img/s", flush=True)
    print(f"\nCPU, {args.threads} thread(s) each (torch.set_num_threads / intra_op_num_threads / "
          "INFERENCE_NUM_THREADS), images/s:")
    print("| model | px | batch | torch | onnxruntime | OpenVINO | onnxruntime / torch | OpenVINO / torch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, batch, t, o, v in rows:
        print(f"| {name} | {size} | {batch} | {t:.2f} | {o:.2f} | {v:.2f} | {o / t:.2f} | {v / t:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("--models", nargs="+", default=list(MODELS))
    a.add_argument("--data", default="textures")
    a.add_argument("--categories", nargs="+", default=["brick"])
    a.add_argument("--set", nargs="*", help="KEY=VALUE recipe or model overrides, as in python -m adcore train")
    a.add_argument("--fpr", type=float, default=0.01)
    t = sub.add_parser("throughput")
    t.add_argument("--models", nargs="+", default=list(MODELS))
    t.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    t.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--min-seconds", type=float, default=2.0, help="time each setting at least this long")
    args = p.parse_args()
    os.environ.setdefault("ADCORE_BACKEND", "torch")  # the reference ops, as exported
    agreement(args) if args.what == "agreement" else throughput(args)


if __name__ == "__main__":
    main()
