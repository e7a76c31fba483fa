"""Timing of adcore.metrics on a category-sized test set (not a pytest file).

The target from issue 2: `aupro` over 100 maps of 256x256 in at most 2 s on one core. The maps are smoothed
noise with disc-shaped defects (radius 5-40 px at 256) on half the images, float32 like a model's output. Only
the defect pixels are argsorted by the fast path, so its time grows with their share, which is printed. Each
metric is timed `--repeats` times and the median printed; the `reference=True` twins are timed beside the fast
paths they check.

    python tests/benchmarks/bench_aupro.py                 # 100 x 256 x 256, float32
    python tests/benchmarks/bench_aupro.py --dtype float64 --num-maps 50
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says; set before numpy loads

import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402

from adcore import metrics  # noqa: E402


def make_case(num_maps: int, size: int, dtype: str, seed: int = 0):
    """(N, S, S) maps and masks: discs of radius 5-40 px on the first half of the images, scored a bit higher."""
    rng = np.random.default_rng(seed)
    maps = scipy.ndimage.gaussian_filter(rng.random((num_maps, size, size)), sigma=(0, 4, 4))
    masks = np.zeros(maps.shape, dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(num_maps // 2):
        cy, cx = rng.integers(size // 10, size - size // 10, 2)
        radius = rng.integers(5, 41) * size / 256
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    maps = maps + 0.05 * masks
    return maps.astype(dtype), masks


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall time of `repeats` calls, and the value of the last call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-maps", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    maps, masks = make_case(args.num_maps, args.size, args.dtype)
    print(f"{args.num_maps} maps of {args.size}x{args.size}, {args.dtype}, {masks.mean():.2%} anomalous pixels, "
          f"median of {args.repeats} runs")
    cases = {
        "aupro": lambda: metrics.aupro(maps, masks),
        "aupro (reference=True)": lambda: metrics.aupro(maps, masks, reference=True),
        "pixel_auroc": lambda: metrics.pixel_auroc(maps, masks),
        "pixel_auroc (reference=True, sklearn)": lambda: metrics.pixel_auroc(maps, masks, reference=True),
        "pro_rd4ad": lambda: metrics.pro_rd4ad(maps, masks),
    }
    for name, fn in cases.items():
        seconds, value = median_time(fn, args.repeats)
        print(f"  {name:40s} {seconds:7.3f} s   value {value:.6f}")


if __name__ == "__main__":
    main()
