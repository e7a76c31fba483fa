"""Benchmarks for the fused kernels (CUDA only): ``python -m kernels.bench.bench_anomaly_attention`` and
``python -m kernels.bench.bench_mdn_nll`` append rows to ``kernels/bench/results.csv``."""
