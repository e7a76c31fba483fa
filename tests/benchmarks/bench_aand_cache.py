"""Seconds per AAND Stage-II epoch with the frozen teacher's features cached (``cache_teacher=True``, the default)
and recomputed every step (``False``, the slow twin), side by side in one process, and how far their results drift::

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_aand_cache.py --categories brick grass gravel --distill-epochs 4

Each side trains the notebook's default AAND (recipe "default", 128 px, textures) with the same seed: Stage I for
``--amplify-epochs``, then Stage II for ``--distill-epochs``. Stage II's first epoch fills the cache, so the table
shows it apart from the later epochs (what the budget grid's longer runs mostly spend). ``map_max_abs`` is the largest
difference between the two sides' test anomaly maps (cached features come from another batch composition, so the
last bits may differ); ``image_auroc`` / ``pixel_auroc`` are each side's. Nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import time

import torch


def train_side(category: str, cache: bool, args) -> dict:
    import adcore
    from adcore.data import load_dataset
    from adcore.evaluation import evaluate
    from adcore.utils import seed_everything

    recipe = adcore.get_recipe("aand")
    data = dict(image_size=recipe.image_size, resample=recipe.resample)
    train, test = load_dataset("textures", category, "train", **data), load_dataset("textures", category, "test", **data)
    seed_everything(0)
    model = adcore.create_model("aand", **recipe.model_params, cache_teacher=cache)
    stamps = []

    def epoch_end(_model, stage, epoch):
        stamps.append((stage, epoch, time.perf_counter()))

    t0 = time.perf_counter()
    adcore.fit(model, train, num_epochs={"amplify": args.amplify_epochs, "distill": args.distill_epochs},
               lr=recipe.lr, batch_size=recipe.batch_size, seed=0, progress=False, epoch_end=epoch_end)
    times = [t - prev for (_, _, prev), (_, _, t) in zip([(None, None, t0)] + stamps[:-1], stamps)]
    distill = [dt for (stage, _, _), dt in zip(stamps, times) if stage == "distill"]
    result, arrays = evaluate(model, test, run_name="bench", results_dir=None, batch_size=recipe.batch_size,
                              return_arrays=True)
    return {"first": distill[0], "later": sum(distill[1:]) / max(1, len(distill) - 1), "maps": arrays["maps"],
            "image_auroc": result["image_auroc"], "pixel_auroc": result["pixel_auroc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", nargs="+", default=["brick"])
    p.add_argument("--amplify-epochs", type=int, default=1)
    p.add_argument("--distill-epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.distill_epochs < 2:
        p.error("--distill-epochs must be at least 2 (the first epoch fills the cache)")
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}; Stage I {args.amplify_epochs} epoch(s), Stage II {args.distill_epochs}")
    print(f"{'category':9s} {'cache':6s} {'epoch 1 s':>9s} {'later s/epoch':>13s} {'image_auroc':>11s} "
          f"{'pixel_auroc':>11s}")
    for category in args.categories:
        sides = {cache: train_side(category, cache, args) for cache in (False, True)}
        for cache, s in sides.items():
            print(f"{category:9s} {str(cache):6s} {s['first']:9.2f} {s['later']:13.2f} {s['image_auroc']:11.4f} "
                  f"{s['pixel_auroc']:11.4f}")
        slow, fast = sides[False], sides[True]
        drift = float(abs(torch.as_tensor(slow["maps"]) - torch.as_tensor(fast["maps"])).max())
        print(f"{category:9s} later-epoch speed-up {slow['later'] / fast['later']:.2f}x; map_max_abs {drift:.2e}")


if __name__ == "__main__":
    main()
