"""Benchmark the fused anomaly attention against the eager reference, torch.compile of it, and SDPA for out alone.

Run on a CUDA machine: ``python -m kernels.bench.bench_anomaly_attention [--dtype bf16 fp32] [--quick]``. Rows go to
kernels/bench/results.csv. Targets (H100, forward+backward): >= 5x eager and >= 2x torch.compile at B=32, H=8, d=64,
N=196 and 784, and B=4, N=3136; peak memory at N=3136 at most a tenth of eager's.

FLOP/s use the FlashAttention count, 4·B·H·N²·d for the forward and 2.5 times that for the backward, which ignores
the discrepancy's elementwise work (the op is bound by exp/log throughput, not by the tensor cores).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kernels.bench import _common
from kernels.reference import anomaly_attention_ref

DEVICE = "cuda"  # the benchmarks refuse to run elsewhere (see _common.require_cuda)
SHAPES = [  # B, H, grid, d
    (32, 8, (14, 14), 64),
    (32, 8, (28, 28), 64),
    (4, 8, (56, 56), 64),
    (1, 8, (14, 14), 64),  # latency
]


def make_inputs(B, H, grid, d, dtype, requires_grad):
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, N, d, device=DEVICE, dtype=dtype) for _ in range(3))
    # Thuml's sigma transform of a standard-normal projection: 3**(sigmoid(5r) + 1e-5) - 1, in (1e-5, 2).
    sigma = (3 ** (torch.sigmoid(5 * torch.randn(B, H, N, device=DEVICE)) + 1e-5) - 1).to(dtype)
    for t in (q, k, v, sigma):
        t.requires_grad_(requires_grad)
    return q, k, v, sigma


def providers(grid):
    from adcore import ops

    def triton_fn(q, k, v, sigma):
        return ops.anomaly_attention(q, k, v, sigma, grid, backend="triton")

    def eager_fn(q, k, v, sigma):
        return anomaly_attention_ref(q, k, v, sigma, grid)

    compiled = torch.compile(anomaly_attention_ref)

    def compile_fn(q, k, v, sigma):
        return compiled(q, k, v, sigma, grid)

    def sdpa_fn(q, k, v, sigma):
        return (F.scaled_dot_product_attention(q, k, v),)

    return {"triton": triton_fn, "eager": eager_fn, "compile": compile_fn, "sdpa_out_only": sdpa_fn}


def bench_one(name, fn, inputs, mode):
    """Time one provider: 'fwd' in inference mode, 'fwd_bwd' one forward and one backward of every output."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        grads = None
    else:
        with torch.no_grad():
            outs = fn(*inputs)
        upstream = [torch.randn_like(o) for o in outs]

        def run():
            res = fn(*inputs)
            torch.autograd.backward(res, upstream)
        grads = list(inputs)
    try:
        ms = _common.median_ms(run, grad_to_none=grads)
        mem = _common.peak_extra_mb(run)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return ms, mem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(_common.DTYPES))
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    parser.add_argument("--quick", action="store_true", help="only the first shape")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    _common.require_cuda()

    rows = []
    for B, H, grid, d in SHAPES[:1] if args.quick else SHAPES:
        N = grid[0] * grid[1]
        shape = f"B={B},H={H},N={N},d={d}"
        provs = providers(grid)
        for dtype_name in args.dtype:
            for mode in args.mode:
                inputs = make_inputs(B, H, grid, d, _common.DTYPES[dtype_name], mode == "fwd_bwd")
                flops = 4 * B * H * N * N * d * (3.5 if mode == "fwd_bwd" else 1.0)
                results = {name: bench_one(name, fn, inputs, mode) for name, fn in provs.items()}
                eager_ms, compile_ms = results["eager"][0], results["compile"][0]
                for name, (ms, mem) in results.items():
                    row = dict(kernel="anomaly_attention", provider=name, mode=mode, shape=shape, dtype=dtype_name,
                               median_ms=ms if ms is not None else "oom", peak_mem_mb=mem)
                    if ms is not None:
                        row["tflops"] = flops / ms / 1e9
                        row["speedup_vs_eager"] = eager_ms / ms if eager_ms else None
                        row["speedup_vs_compile"] = compile_ms / ms if compile_ms else None
                    rows.append(row)
                    print(f"{shape:28s} {dtype_name:5s} {mode:8s} {name:14s} "
                          f"{'oom' if ms is None else f'{ms:9.3f} ms'}  "
                          f"{'' if mem is None else f'{mem:10.1f} MB'}  "
                          f"x{row.get('speedup_vs_eager') or float('nan'):.2f} eager  "
                          f"x{row.get('speedup_vs_compile') or float('nan'):.2f} compile", flush=True)
                del inputs
                torch.cuda.empty_cache()
    if not args.no_csv:
        _common.append_rows(rows)
        print(f"appended {len(rows)} rows to {_common.RESULTS_CSV}")


if __name__ == "__main__":
    main()
