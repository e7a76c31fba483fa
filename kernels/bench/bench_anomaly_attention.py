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
from adcore.models.vit import prior_sigma
from kernels.reference import anomaly_attention_ref

DEVICE = "cuda"  # the benchmarks refuse to run elsewhere (see _common.require_cuda)
SHAPES = [  # B, H, grid, d
    (32, 8, (14, 14), 64),
    (32, 8, (28, 28), 64),
    (4, 8, (56, 56), 64),
    (1, 8, (14, 14), 64),  # latency
]


# Relative-norm tolerance of each provider against the float64 reference (fp32 runs TF32 dots in the kernel).
TOLERANCE = {"bf16": 3e-2, "fp16": 1e-2, "fp32": 5e-3}


def make_inputs(B, H, grid, d, dtype, requires_grad):
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, N, d, device=DEVICE, dtype=dtype) for _ in range(3))
    # The model's own sigma (adcore.models.vit.AnomalyAttention): its transform, at the grid's scale, of a freshly
    # initialised sigma projection applied to unit-variance tokens. Wide priors: the zero-prior shortcut rarely fires.
    with torch.no_grad():
        raw = torch.nn.Linear(H * d, H, device=DEVICE)(torch.randn(B, N, H * d, device=DEVICE)).transpose(1, 2)
        sigma = prior_sigma(raw, max(grid) / 8).to(dtype).contiguous()
    for t in (q, k, v, sigma):
        t.requires_grad_(requires_grad)
    return q, k, v, sigma


DRY_SHAPES = [(1, 2, (4, 4), 16)]  # --dry-run: interpreter-sized


def providers(grid, compile_backend="inductor"):
    """Fresh providers for one case. torch.compile gets a reset dynamo and dynamic=False per case: one compiled
    function reused across shapes, dtypes and grad modes passes dynamo's recompile limit (8) and silently falls back
    to eager, which inflated "x compile" at N = 3136."""
    from adcore import ops

    torch._dynamo.reset()
    compiled = torch.compile(anomaly_attention_ref, dynamic=False, fullgraph=True, backend=compile_backend)
    return {
        "triton": lambda q, k, v, sigma: ops.anomaly_attention(q, k, v, sigma, grid, backend="triton"),
        "eager": lambda q, k, v, sigma: anomaly_attention_ref(q, k, v, sigma, grid),
        "compile": lambda q, k, v, sigma: compiled(q, k, v, sigma, grid),
        "sdpa_out_only": lambda q, k, v, sigma: (F.scaled_dot_product_attention(q, k, v),),
    }


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_against_reference(name, fn, inputs, mode, upstream, want, tol):
    """Before timing: the provider's outputs (and, for fwd_bwd, input gradients) against the float64 reference."""
    leaves = [t.detach().clone().requires_grad_(mode == "fwd_bwd") for t in inputs]
    with torch.set_grad_enabled(mode == "fwd_bwd"):
        outs = fn(*leaves)
    got = [o.detach() for o in outs]
    if mode == "fwd_bwd":
        torch.autograd.backward(outs, upstream[:len(outs)])
        got += [t.grad for t in leaves] if len(outs) == 3 else [t.grad for t in leaves[:3]]
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None:
            continue
        err = _rel_err(g, w)
        if not err < tol:
            raise SystemExit(f"{name}: output {i} differs from the float64 reference by {err:.2e} (> {tol}); "
                             "not timing a wrong result")


def reference_results(inputs, grid, mode, upstream):
    leaves = [t.detach().double().requires_grad_(mode == "fwd_bwd") for t in inputs]
    with torch.set_grad_enabled(mode == "fwd_bwd"):
        outs = anomaly_attention_ref(*leaves, grid)
    res = [o.detach() for o in outs]
    if mode == "fwd_bwd":
        torch.autograd.backward(outs, [u.double() for u in upstream])
        res += [t.grad for t in leaves]
    return res


def bench_one(name, fn, inputs, mode, upstream):
    """Time one provider: 'fwd' in inference mode, 'fwd_bwd' one forward and one backward of every output."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        grads = None
    else:
        def run():
            res = fn(*inputs)
            torch.autograd.backward(res, upstream[:len(res)])
        grads = list(inputs)
    try:
        run()  # compile outside the timed region; then any recompile is an error, never a silent eager fallback
        with torch._dynamo.config.patch(error_on_recompile=True):
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
    parser.add_argument("--goal", action="store_true", help="only the issue's goal shapes (the first three)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU through the interpreter at a tiny shape, float32, compile with the eager backend")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = _common.require_cuda(args.dry_run).type
    if args.dry_run:
        args.dtype = ["fp32"]  # the interpreter's bfloat16 dots are wrong (triton#11584)

    torch._logging.set_logs(recompiles=True)  # any recompile is printed (and raises while timing)
    rows = []
    shapes = DRY_SHAPES if args.dry_run else SHAPES[:1] if args.quick else SHAPES[:3] if args.goal else SHAPES
    for B, H, grid, d in shapes:
        N = grid[0] * grid[1]
        shape = f"B={B},H={H},N={N},d={d}"
        for dtype_name in args.dtype:
            tol = TOLERANCE[dtype_name]
            for mode in args.mode:
                inputs = make_inputs(B, H, grid, d, _common.DTYPES[dtype_name], mode == "fwd_bwd")
                upstream = [torch.randn(B, H, N, d, device=DEVICE, dtype=inputs[0].dtype),
                            torch.randn(B, H, N, device=DEVICE) / N, torch.randn(B, H, N, device=DEVICE) / N]
                # The check runs on the first batch element (the float64 reference at B=4, N=3136 needs ~20 GB).
                one = [t[:1].detach().requires_grad_(t.requires_grad) for t in inputs]
                up_one = [u[:1] for u in upstream]
                want = reference_results(one, grid, mode, up_one)
                flops = 4 * B * H * N * N * d * (3.5 if mode == "fwd_bwd" else 1.0)
                provs = providers(grid, "eager" if args.dry_run else "inductor")  # per case: a fresh dynamo, one compile per shape, dtype and mode
                results = {}
                for name, fn in provs.items():
                    if name != "sdpa_out_only":
                        check_against_reference(name, fn, one, mode, up_one, want, tol)
                    results[name] = bench_one(name, fn, inputs, mode, upstream)
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
                del inputs, want, one
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
    if not args.no_csv:
        _common.append_rows(rows)
        print(f"appended {len(rows)} rows to {_common.RESULTS_CSV}")


if __name__ == "__main__":
    main()
