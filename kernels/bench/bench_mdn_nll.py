"""Benchmark the fused mixture-density NLL against the eager reference and torch.compile of it.

Run on a CUDA machine: ``python -m kernels.bench.bench_mdn_nll [--dtype fp32 bf16] [--quick]``. Rows go to
kernels/bench/results.csv. Target (H100): at N=6272 (32 images x 196 patches), K=10, D=512 with per-row parameters,
>= 3x eager and >= 70% of the GPU's memory bandwidth.

Achieved bandwidth counts the minimum traffic: the forward reads x, the logits, mu and log_var once and writes the
loss; forward+backward adds a second read of x, mu and log_var and the writes of their gradients (the O(N·K) tables
are counted too). It is reported against the datasheet peak where the GPU is known, and against a measured
device-to-device copy in the printout.
"""
from __future__ import annotations

import argparse

import torch

from kernels.bench import _common
from kernels.reference import mdn_nll_ref

DEVICE = "cuda"  # the benchmarks refuse to run elsewhere (see _common.require_cuda)
SHAPES = [  # N, K, D, shared parameters
    (6272, 10, 512, False),
    (6272, 150, 512, False),  # VT-ADL's paper setting, K = 150
    (512, 10, 512, False),    # VT-ADL: 8 images x 64 patches, launch-bound
    (25088, 10, 512, False),
    (6272, 10, 768, False),
    (6272, 10, 512, True),
]


DRY_SHAPES = [(37, 3, 40, False)]  # --dry-run: interpreter-sized


def make_inputs(N, K, D, shared, dtype, requires_grad):
    x = torch.randn(N, D, device=DEVICE, dtype=dtype)
    logits = torch.randn(*((K,) if shared else (N, K)), device=DEVICE, dtype=dtype)
    mu = torch.randn(*((K, D) if shared else (N, K, D)), device=DEVICE, dtype=dtype)
    log_var = 0.5 * torch.randn(*((K, D) if shared else (N, K, D)), device=DEVICE, dtype=dtype)
    for t in (x, logits, mu, log_var):
        t.requires_grad_(requires_grad)
    return x, logits, mu, log_var


def min_bytes(N, K, D, shared, elem, mode):
    params = 2 * (K * D if shared else N * K * D)
    fwd = (N * D + (K if shared else N * K) + params) * elem + 4 * N + 2 * 4 * N * K  # + loss and the (N, K) tables
    if mode == "fwd":
        return fwd
    return fwd + (N * D + params) * elem + (N * D + params) * elem + 4 * N * K  # reread; gradients; dlogits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(_common.DTYPES))
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    parser.add_argument("--mdn-mode", default="logsumexp", choices=["logsumexp", "vtadl"])
    parser.add_argument("--quick", action="store_true", help="only the first shape")
    parser.add_argument("--goal", action="store_true", help="only the goal shapes (N=6272, D=512, K=10 and 150)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU through the interpreter at a tiny shape, float32, compile with the eager backend")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = _common.require_cuda(args.dry_run).type
    if args.dry_run:
        args.dtype = ["fp32"]
    from adcore import ops

    peak = _common.peak_bandwidth_gbs() if DEVICE == "cuda" else None
    copy_bw = _common.measured_copy_bandwidth_gbs() if DEVICE == "cuda" else float("nan")
    print(f"{_common.gpu_name()}: datasheet {peak} GB/s, measured copy {copy_bw:.0f} GB/s")

    def providers():
        # Per case: a fresh dynamo and dynamic=False, so no case inherits another's compiles or the recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(mdn_nll_ref, dynamic=False, fullgraph=True,
                                 backend="eager" if args.dry_run else "inductor")
        return {
            "triton": lambda *a: ops.mdn_nll(*a, mode=args.mdn_mode, backend="triton"),
            "eager": lambda *a: mdn_nll_ref(*a, mode=args.mdn_mode),
            "compile": lambda *a: compiled(*a, mode=args.mdn_mode),
        }

    torch._logging.set_logs(recompiles=True)
    rows = []
    shapes = DRY_SHAPES if args.dry_run else SHAPES[:1] if args.quick else SHAPES[:2] if args.goal else SHAPES
    for N, K, D, shared in shapes:
        shape = f"N={N},K={K},D={D}" + (",shared" if shared else "")
        for dtype_name in args.dtype:
            dtype = _common.DTYPES[dtype_name]
            for mode in args.mode:
                inputs = make_inputs(N, K, D, shared, dtype, mode == "fwd_bwd")
                nbytes = min_bytes(N, K, D, shared, torch.finfo(dtype).bits // 8, mode)
                upstream = torch.randn(N, device=DEVICE)
                results = {}
                provs = providers()
                want = mdn_nll_ref(*(t.detach().double() for t in inputs), mode=args.mdn_mode)
                for name, fn in provs.items():
                    with torch.no_grad():
                        err = ((fn(*inputs).double() - want).norm() / want.norm()).item()
                    if not err < 1e-2:  # bf16 parameters, float32 statistics
                        raise SystemExit(f"{name}: loss differs from the float64 reference by {err:.2e}")
                    if mode == "fwd":
                        def run(fn=fn, inputs=inputs):
                            with torch.no_grad():
                                fn(*inputs)
                    else:
                        def run(fn=fn, inputs=inputs):
                            fn(*inputs).backward(upstream.to(torch.promote_types(dtype, torch.float32)))
                    try:
                        run()  # compile outside the timed region; a recompile while timing is an error
                        with torch._dynamo.config.patch(error_on_recompile=True):
                            results[name] = (_common.median_ms(run, grad_to_none=list(inputs)),
                                             _common.peak_extra_mb(run))
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        results[name] = (None, None)
                eager_ms, compile_ms = results["eager"][0], results["compile"][0]
                for name, (ms, mem) in results.items():
                    row = dict(kernel=f"mdn_nll_{args.mdn_mode}", provider=name, mode=mode, shape=shape,
                               dtype=dtype_name, median_ms=ms if ms is not None else "oom", peak_mem_mb=mem)
                    if ms is not None:
                        row["bandwidth_gbs"] = nbytes / ms / 1e6
                        row["bandwidth_pct"] = 100 * row["bandwidth_gbs"] / peak if peak else None
                        row["speedup_vs_eager"] = eager_ms / ms if eager_ms else None
                        row["speedup_vs_compile"] = compile_ms / ms if compile_ms else None
                    rows.append(row)
                    bw = row.get("bandwidth_gbs")
                    print(f"{shape:26s} {dtype_name:5s} {mode:8s} {name:8s} "
                          f"{'oom' if ms is None else f'{ms:8.3f} ms'}  "
                          f"{'' if bw is None else f'{bw:7.0f} GB/s ({100 * bw / copy_bw:4.0f}% of copy)'}  "
                          f"x{row.get('speedup_vs_eager') or float('nan'):.2f} eager  "
                          f"x{row.get('speedup_vs_compile') or float('nan'):.2f} compile", flush=True)
                del inputs
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
    if not args.no_csv:
        _common.append_rows(rows)
        print(f"appended {len(rows)} rows to {_common.RESULTS_CSV}")


if __name__ == "__main__":
    main()
