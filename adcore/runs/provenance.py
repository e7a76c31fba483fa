"""What decides a run's numbers, recorded in every results file: torch threads, library versions, device.

The same parameters give the same digits only under the same thread count (a CPU reduction summed in another order
rounds differently; issue 11 measured DMAD brick image AUROC 0.914 at 1 thread and 0.958 at 2), the same library
versions and the same device. The batch runner fixes the thread count per run (``--threads``, default 1) whatever
``--jobs`` and the machine's core count are, and :func:`numerics` writes all three into every results file.
"""
from __future__ import annotations

import os

THREADS_VAR = "ADCORE_THREADS"  # set by the runner for each run, so a results file can say where its threads came from
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # torch, MKL and OpenBLAS read these
LIBRARIES = ("adcore", "torch", "numpy", "scipy", "scikit-learn")
# Fields of a results file that record when and how long, not what was measured; a rerun differs only in these.
TIMING_FIELDS = ("created", "eval_seconds", "fit_seconds", "fit_timing")


def thread_env(threads: int) -> dict[str, str]:
    """The environment that gives a kernel ``threads`` torch (and BLAS) threads."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    return {**{v: str(threads) for v in THREAD_VARS}, THREADS_VAR: str(threads)}


def _threads_from(n: int) -> str:
    runner = os.environ.get(THREADS_VAR)
    omp = os.environ.get("OMP_NUM_THREADS")
    if runner is not None:
        source = f"adcore run --threads {runner}"
    elif omp is not None:
        source = f"OMP_NUM_THREADS={omp} in the environment"
    else:
        return f"torch's default for this machine ({os.cpu_count()} cores)"
    if str(n) != (runner if runner is not None else omp):
        return f"torch.set_num_threads({n}) in the notebook (over {source})"
    return source


def numerics(device=None) -> dict:
    """``{"torch_threads", "threads_from", "device", "versions"}`` of this process, for a results file."""
    import importlib.metadata as md

    import torch

    n = torch.get_num_threads()
    dev = str(device if device is not None else "cpu")
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev += f" ({torch.cuda.get_device_name(torch.device(dev))})"
    versions = {}
    for pkg in LIBRARIES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"torch_threads": n, "threads_from": _threads_from(n), "device": dev, "versions": versions}


def same_numbers(a: dict, b: dict) -> list[str]:
    """Fields where two results files differ, :data:`TIMING_FIELDS` left out; empty when every digit agrees."""
    import json

    keys = sorted((set(a) | set(b)) - set(TIMING_FIELDS))
    # JSON text of each value: floats as their shortest exact digits, nested keys sorted
    return [k for k in keys if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def compare_runs(runs_a, runs_b) -> dict:
    """Every results file two runs directories share (same ``<notebook>/<run key>/results/<file>``), checked with
    :func:`same_numbers`: ``{"same": [paths], "differ": {path: [fields]}}``, paths relative to the directories."""
    import json
    from pathlib import Path

    runs_a, runs_b = Path(runs_a), Path(runs_b)
    for d in (runs_a, runs_b):
        if not d.is_dir():
            raise ValueError(f"runs directory {str(d)!r} does not exist")
    out = {"same": [], "differ": {}}
    for fa in sorted(runs_a.glob("*/*/results/*.json")):
        rel = fa.relative_to(runs_a)
        fb = runs_b / rel
        if fb.is_file():
            fields = same_numbers(json.loads(fa.read_text()), json.loads(fb.read_text()))
            if fields:
                out["differ"][str(rel)] = fields
            else:
                out["same"].append(str(rel))
    return out

