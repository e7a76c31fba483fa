"""The ``train``, ``predict`` and ``export`` subcommands of ``python -m adcore`` (registered by ``add_commands``).

Examples::

    python -m adcore train knn --data textures --category brick --out brick.pt
    python -m adcore train dmad --data /data/my_good_parts --out parts.pt --fpr 0.005
    python -m adcore predict brick.pt new_images/ 'more/*.png' --out predictions --masks
    python -m adcore export brick.pt --format onnx --out brick.onnx
    python -m adcore export brick.pt --format openvino --out brick_openvino/
"""
from __future__ import annotations

import argparse
import importlib
import sys

import yaml

# The value only: importing .predict here would pull torch into `python -m adcore --help`.
DEFAULT_MAX_PIXELS = 89_478_485


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _train(args) -> int:
    from .train import train

    train(args.model, args.data, args.out, category=args.category, recipe=args.recipe, overrides=dict(args.set),
          holdout=args.holdout, fpr=args.fpr, confidence=args.confidence, seed=args.seed, device=args.device, fresh=args.fresh,
          progress=not args.no_progress)
    return 0


def _predict(args) -> int:
    from .predict import predict

    path = predict(args.model_file, args.images, args.out, masks=args.masks, batch_size=args.batch_size,
                   device=args.device, progress=not args.no_progress, max_pixels=args.max_pixels, force=args.force,
                   expect_sha256=args.expect_sha256)
    print(f"wrote {path}")
    return 0


def _export(args) -> int:
    from .export import ExportError, export_onnx, export_openvino

    runtime = {"onnx": "onnxruntime", "openvino": "OpenVINO (CPU, f32)"}[args.format]
    try:
        if args.expect_sha256:
            from ..artifact import read

            read(args.model_file, args.expect_sha256)
        result = (export_onnx if args.format == "onnx" else export_openvino)(args.model_file, args.out,
                                                                            check=not args.no_check)
    except ExportError as e:
        print(f"adcore export: error: {e}", file=sys.stderr)
        return 1
    for batch, r in result.items():
        print(f"checked with {runtime} at {batch}: map differs by {r['map_rel']:.1e}, score by {r['score_rel']:.1e}"
              " of their range")
    print(f"wrote {args.out}")
    return 0


def _guarded(handler, messages: dict):
    def run(args) -> int:
        try:
            return handler(args)
        except (FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback (ArtifactError, DataError too)
            print(f"adcore {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\ninterrupted: {messages[args.command]}", file=sys.stderr)
            return 130
    return run


_INTERRUPTED = {"train": "the last finished epoch is checkpointed; run the same command again to resume",
                "predict": "every row written so far is kept; run the same command again to do the rest",
                "export": "nothing was written"}


def _doc(module: str) -> str:
    return importlib.import_module(f".{module}", __package__).__doc__


def add_commands(sub) -> None:
    """Add ``train``, ``predict`` and ``export`` to the ``python -m adcore`` subparsers ``sub``."""
    t = sub.add_parser("train", help="train a model on good images and write a model file with its threshold",
                       description=_doc("train"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("model", help="a registered model: knn, vt_adl, advit, anovit, dmad, aand, ...")
    t.add_argument("--data", required=True, help="a folder of good images, or a dataset (textures, a path to an "
                   "MVTec-layout root, ...) with --category")
    t.add_argument("--category", help="the category whose train/good images to use")
    t.add_argument("--out", required=True, help="the model file to write, e.g. model.pt")
    t.add_argument("--recipe", default="default", help="which of the model's recipes: default (CPU) or paper")
    t.add_argument("--set", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="change one recipe setting (num_epochs, lr, batch_size, image_size) or model parameter; "
                        "repeatable; values are YAML (--set num_epochs=2 --set backbone=wide_resnet50_2)")
    t.add_argument("--holdout", type=float, default=0.2, help="fraction of good images held out to fit the "
                   "threshold (default 0.2)")
    t.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate of the threshold on good "
                   "images (default 0.01)")
    t.add_argument("--confidence", type=float, help="pick the threshold whose false-positive rate exceeds --fpr in "
                   "at most 1 - CONFIDENCE of fits (e.g. 0.9), instead of only on average; needs more held-out images "
                   "(230 for --fpr 0.01 at 0.9): the command says how many")
    t.add_argument("--seed", type=int, default=0, help="seeds the held-out split and training (default 0)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    t.add_argument("--fresh", action="store_true", help="discard an interrupted training instead of resuming it")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=_guarded(_train, _INTERRUPTED))

    p = sub.add_parser("predict", help="score images with a model file: predictions.csv and heat-map overlays",
                       description=_doc("predict"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file", help="a model file written by python -m adcore train (or adcore.save)")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", required=True, help="output folder: predictions.csv, overlays/, masks/")
    p.add_argument("--masks", action="store_true", help="also write a binary mask PNG per image")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="images with more pixels get an error "
                   f"row without being decoded (default {DEFAULT_MAX_PIXELS:,}, Pillow's decompression-bomb limit)")
    p.add_argument("--force", action="store_true", help="start over when --out holds results of another model or "
                   "threshold (the old CSV is kept beside)")
    p.add_argument("--expect-sha256", help="refuse the model file unless its SHA-256 is this (pin the file you tested)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_guarded(_predict, _INTERRUPTED))

    e = sub.add_parser("export", help="export a model file to ONNX (score and anomaly map, post-processing inside)",
                       description=_doc("export"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model_file", help="a model file written by python -m adcore train (or adcore.save)")
    e.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx (one file) or openvino (a folder: model.xml, model.bin, adcore.json)")
    e.add_argument("--out", required=True, help="the file (onnx, e.g. model.onnx) or folder (openvino) to write")
    e.add_argument("--expect-sha256", help="refuse the model file unless its SHA-256 is this")
    e.add_argument("--no-check", action="store_true", help="skip the runtime's check against the torch path")
    e.set_defaults(handler=_guarded(_export, _INTERRUPTED))
