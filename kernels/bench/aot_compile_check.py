"""Compile every kernel variant for a GPU target ahead of time, on a machine without a GPU.

``python -m kernels.bench.aot_compile_check [--arch 90] [--dtype bf16 fp32] [--all-configs]`` runs Triton's full
pipeline (TTIR, TTGIR, LLVM, PTX, ptxas to cubin) for sm_<arch> with no driver, so a CPU-only machine can catch what
the interpreter cannot: unsupported constructs, type errors in constexpr branches, dot shape limits. It also prints
ptxas's register and spill counts for each variant. Nothing is run, so it says nothing about speed or numerics.
Slow on a small CPU: each variant is a full compile (5 to 90 s).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# Pointer arguments of each kernel; those in _STAT hold float32 statistics (float64 for float64 inputs).
_POINTERS = {
    "_anomaly_attention_fwd_kernel": {"Q", "K", "V", "SIGMA", "OUT", "LSE", "LOGZ", "DIS", "GSER", "DSIG"},
    "_anomaly_attention_bwd_dkdv_kernel": {"Q", "K", "V", "SIGMA", "DO", "LSE", "LOGZ", "DELTA", "WS", "DK", "DV"},
    "_anomaly_attention_bwd_dq_kernel": {"Q", "K", "V", "SIGMA", "DO", "LSE", "LOGZ", "DELTA", "WS", "DQ"},
    "_mdn_nll_fwd_kernel": {"X", "LOGITS", "MU", "LV", "LOSS", "COEF", "DLOGIT"},
    "_mdn_nll_bwd_kernel": {"X", "MU", "LV", "COEF", "W", "DX", "DMU", "DLV"},
}
_STAT = {"LSE", "LOGZ", "DIS", "GSER", "DSIG", "DELTA", "WS", "LOSS", "COEF", "DLOGIT", "W"}
_TRITON_TYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "fp64": "fp64"}


def _signature(fn, ptr_dtype, floats, consts, stat_ptrs):
    sig = {}
    pointers = _POINTERS[fn.__name__]
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + (("fp64" if ptr_dtype == "fp64" else "fp32") if name in stat_ptrs else ptr_dtype)
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(fn, ptr_dtype, floats, consts, arch, num_warps, stat_ptrs=_STAT):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=_signature(fn, ptr_dtype, floats, consts, stat_ptrs), constexprs=consts)
    t0 = time.time()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                               "num_stages": 2})
    info = _ptxas_info(kernel.asm.get("ptx"), arch)
    print(f"ok  {fn.__name__:38s} {ptr_dtype:5s} warps={num_warps} {consts}  {time.time() - t0:5.1f}s  {info}",
          flush=True)


def _ptxas_info(ptx, arch):
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if ptx is None or not ptxas.exists():
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        suffix = "a" if arch == 90 else ""
        res = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(path), "-o", os.devnull],
                             capture_output=True, text=True)
    lines = [ln.split(":", 1)[-1].strip() for ln in res.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return " | ".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100, 80 for A100")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(_TRITON_TYPES))
    parser.add_argument("--all-configs", action="store_true", help="every autotuning config, not just the first")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the check compiles for a GPU")
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="adcore-aot-"))
    import kernels.anomaly_attention as aa
    import kernels.mdn_nll as mn

    att_configs = aa._fwd_configs() if args.all_configs else aa._fwd_configs()[:1]
    bwd_configs = aa._bwd_configs() if args.all_configs else aa._bwd_configs()[:1]
    for dt in args.dtype:
        fp64 = dt == "fp64"
        prec = "ieee" if dt in ("fp32", "fp64") else "tf32"
        for cfg in att_configs:
            for stats in (False, True):
                _compile(aa._anomaly_attention_fwd_kernel, dt, {"qk_scale", "eps", "log_eps"},
                         dict(cfg.kwargs, BLOCK_D=64, BLOCK_G=64, STATS=stats, IS_FP64=fp64, PRECISION=prec),
                         args.arch, cfg.num_warps)
        for cfg in bwd_configs:
            for has_do, has_ws in ((True, True), (True, False), (False, True)):
                for fn in (aa._anomaly_attention_bwd_dkdv_kernel, aa._anomaly_attention_bwd_dq_kernel):
                    _compile(fn, dt, {"qk_scale", "scale", "eps", "log_eps"},
                             dict(cfg.kwargs, BLOCK_D=64, HAS_DO=has_do, HAS_WS=has_ws, IS_FP64=fp64,
                                  PRECISION=prec), args.arch, cfg.num_warps)
        mdn_fwd = mn._fwd_configs() if args.all_configs else mn._fwd_configs()[:1]
        mdn_bwd = mn._bwd_configs() if args.all_configs else mn._bwd_configs()[:1]
        for cfg in mdn_fwd:
            for lse in (True, False):
                _compile(mn._mdn_nll_fwd_kernel, dt, {"log_2pi", "d_log_2pi"},
                         dict(cfg.kwargs, BLOCK_K=16, MODE_LSE=lse, IS_FP64=fp64), args.arch, cfg.num_warps)
        for cfg in mdn_bwd:
            for shared in (False, True):
                stat_ptrs = _STAT | ({"DMU", "DLV"} if shared else set())
                _compile(mn._mdn_nll_bwd_kernel, dt, set(),
                         dict(cfg.kwargs, MU_SHARED=shared, LV_SHARED=shared, IS_FP64=fp64), args.arch,
                         cfg.num_warps, stat_ptrs)
    print("all variants compiled")
    cache = os.environ["TRITON_CACHE_DIR"]
    if "adcore-aot-" in cache:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
