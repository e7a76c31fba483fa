"""Shared plumbing for the kernel benchmarks: device checks, timing, peak memory and the results CSV."""
from __future__ import annotations

import csv
import datetime
import os
import subprocess
import time
from pathlib import Path

import torch

# ADCORE_RESULTS_CSV redirects the rows (gpu_check.sh --dry-run writes to a scratch file, never this one).
RESULTS_CSV = Path(os.environ.get("ADCORE_RESULTS_CSV") or Path(__file__).with_name("results.csv"))
# Long form, one row per (kernel, provider, mode, shape, dtype); the book's kernels chapter plots from it. "check" is
# a correctness row's outcome ("pass", or "FAIL: ..."), blank for timings.
FIELDS = ["kernel", "provider", "mode", "shape", "dtype", "median_ms", "speedup_vs_eager", "speedup_vs_compile",
          "tflops", "bandwidth_gbs", "bandwidth_pct", "peak_mem_mb", "gpu", "triton", "torch", "commit", "date",
          "check"]
# Datasheet HBM bandwidth in GB/s, matched against torch.cuda.get_device_name().
PEAK_BANDWIDTH_GBS = {"H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0,
                      "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dry_run_requested(argv=None) -> bool:
    import sys
    return "--dry-run" in (sys.argv if argv is None else argv)


def require_cuda(dry_run: bool = False) -> torch.device:
    """Refuse clearly unless a CUDA GPU is present and Triton is not being interpreted.

    ``dry_run``: the same code on CPU through Triton's interpreter at tiny shapes (gpu_check.sh --dry-run, run in
    CI): it checks the scripts, not the kernels' speed, and needs TRITON_INTERPRET=1 before the kernels are imported.
    """
    if dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SystemExit("--dry-run runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("these benchmarks need a CUDA GPU; on CPU the kernels only run under Triton's interpreter, "
                         "which measures Python, not the kernels (the tests cover correctness)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET before benchmarking")
    return torch.device("cuda")


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"


def peak_bandwidth_gbs() -> float | None:
    name = gpu_name()
    for key, value in PEAK_BANDWIDTH_GBS.items():
        if key in name:
            return value
    return None


def commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_ms(fn, grad_to_none=None, warmup=25, rep=100) -> float:
    """Median time of fn() in ms. do_bench clears the L2 cache before every repetition, so inputs that fit in the
    50 MB L2 of an H100 are not timed hot."""
    if not torch.cuda.is_available():  # dry run: a wall-clock median of a few calls, for the plumbing only
        fn()
        times = []
        for _ in range(3 if warmup else 1):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    import triton.testing
    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def peak_extra_mb(fn) -> float:
    """Peak memory fn() allocates beyond what was allocated before it (inputs excluded), in MB (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measured_copy_bandwidth_gbs(nbytes: int = 2 ** 30) -> float:
    """Device-to-device copy bandwidth (read + write), the achievable roof next to the datasheet's."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def append_rows(rows: list[dict], path: Path = RESULTS_CSV) -> None:
    """Append rows (dicts over FIELDS; missing fields left blank) to the CSV, writing the header if it is new."""
    stamp = {"gpu": gpu_name(), "triton": _version("triton"), "torch": torch.__version__, "commit": commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in {**stamp, **row}.items()})


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return ""


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v
