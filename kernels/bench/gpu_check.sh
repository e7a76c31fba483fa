#!/usr/bin/env bash
# One GPU session's checks for the fused kernels, in at most 8 minutes: the GPU tests, then both benchmarks at the
# issue's goal shapes (attention fwd+bwd at B=32,H=8,d=64,N=196/784 and B=4,N=3136; mdn_nll at N=6272,K=10,D=512).
# Rows are appended to kernels/bench/results.csv, each stamped with the device name (kernels/bench/_common.py); with
# $OUT set (the device tool's output folder) the CSV and the log are copied there.
#   usage: bash kernels/bench/gpu_check.sh          (from the repository root, TRITON_INTERPRET unset)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
unset TRITON_INTERPRET
LOG="$(mktemp)"
status=0
step() {  # step SECONDS CMD...: run with a time limit, keep going on failure, remember it
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || exit 2
# 1. Correctness on the device: model-sized shapes, every autotune config, fp64/fp32/bf16 tolerances, then the CPU
#    suite's own cases (they run on CUDA when a GPU is present).
step 200 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernels_tiling.py
# 2. Benchmarks at the goal shapes (each provider checked against the float64 reference before it is timed).
step 190 "$PY" -m kernels.bench.bench_anomaly_attention --goal --dtype bf16 --mode fwd_bwd
step 60 "$PY" -m kernels.bench.bench_mdn_nll --goal --dtype fp32 bf16
if [ -n "${OUT:-}" ]; then
    cp kernels/bench/results.csv "$OUT/" 2>/dev/null
    cp "$LOG" "$OUT/gpu_check.log"
fi
exit $status
