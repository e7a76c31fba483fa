"""Measurements of the fused kernels.

* ``python -m kernels.bench.sass_report``: SASS instructions per element per loop, registers and spills of every
  kernel and autotune config, compiled for sm_90a on a CPU-only machine (CI runs it with a budget).
* ``python -m kernels.bench.bench_anomaly_attention`` and ``python -m kernels.bench.bench_mdn_nll`` (CUDA only):
  timings against eager and ``torch.compile``, appended to ``kernels/bench/results.csv``.
* ``bash kernels/bench/gpu_check.sh``: one GPU session's tests and goal-shape benchmarks in at most 8 minutes.
"""
