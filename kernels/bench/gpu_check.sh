#!/usr/bin/env bash
# One GPU lend's checks for the fused kernels, in at most 6 minutes from a cold Triton cache (a lend is 15 minutes of
# device time, start-up included, and a second run starts cold again):
#   1. correctness first, at the goal shapes: anomaly attention at B=32, H=8, d=64, N=196/784 and B=4, N=3136 in bf16
#      and fp32 (TF32), forward and backward, atomic and deterministic dQ; mdn_nll at N=6272, D=512, K=10/150;
#   2. benchmarks: eager, torch.compile (warmed; recompiles logged and fatal while timing) and the fused op;
#   3. one training step of VT-ADL and ADViT at the paper's shapes, fused ops against reference ops.
# Every step has its own time limit; a failing or timed-out step is recorded and the next one runs. Rows are appended
# to the results CSV as they are measured (each stamped with the device name), and the CSV, the step table and the
# log are copied to $OUT (the device tool's output folder) after every step, so a timeout loses nothing measured.
#   usage: bash kernels/bench/gpu_check.sh [--quick] [--dry-run]      (from anywhere; TRITON_INTERPRET is unset)
#   --quick    the <= 3-minute rerun after a fix: bf16 at N=196, one benchmark of each op, no training step
#   --dry-run  the same steps on CPU through Triton's interpreter at tiny shapes, writing to a scratch CSV (CI runs
#              it: tests/test_gpu_check_script.py)
set -uo pipefail
cd "$(dirname "$0")/../.."
QUICK=0; DRY=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        *) echo "unknown argument: $arg (use --quick, --dry-run)" >&2; exit 2 ;;
    esac
done
# The GPU machine may only have python3; a local .venv wins where there is one.
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python
    elif command -v python3 >/dev/null 2>&1; then PY=python3
    else PY=python; fi
fi
WORK="$(mktemp -d)"
LOG="$WORK/gpu_check.log"
STEPS="$WORK/gpu_check_steps.csv"
echo "step,rc,seconds,limit_s" > "$STEPS"
if [ "$DRY" -eq 1 ]; then
    export TRITON_INTERPRET=1 ADCORE_RESULTS_CSV="$WORK/results.csv"
    FLAG=(--dry-run)  # the same limits as on the GPU: a dry run must fit them too
else
    unset TRITON_INTERPRET
    FLAG=()
fi
CSV="${ADCORE_RESULTS_CSV:-kernels/bench/results.csv}"
status=0
T0=$SECONDS

save() {  # copy what exists so far to $OUT
    [ -n "${OUT:-}" ] || return 0
    cp "$CSV" "$OUT/results.csv" 2>/dev/null
    cp "$STEPS" "$OUT/gpu_check_steps.csv" 2>/dev/null
    cp "$LOG" "$OUT/gpu_check.log" 2>/dev/null
    return 0
}

step() {  # step NAME SECONDS CMD...: run under a time limit, record the outcome, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "== [$((SECONDS - T0))s] $name: $* (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0))s$( [ "$rc" -eq 124 ] && echo ' (TIMED OUT)')" | tee -a "$LOG"
    echo "$name,$rc,$((SECONDS - t0)),$limit" >> "$STEPS"
    [ "$rc" -eq 0 ] || status=1
    save
}

if [ "$DRY" -eq 0 ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA device" | tee -a "$LOG"; save; exit 2; }
fi
ENV_INFO="import sys, torch, triton, numpy as np; print(sys.version.split()[0], 'torch', torch.__version__, 'triton',
triton.__version__, 'numpy', np.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
step environment 30 "$PY" -c "$ENV_INFO"
if [ "$QUICK" -eq 1 ]; then
    # <= 3 minutes: 15 + 75 + 45 + 30 = 165 s of limits.
    step correctness 75 "$PY" -m kernels.bench.gpu_correctness --quick "${FLAG[@]}"
    step bench_attention 45 "$PY" -m kernels.bench.bench_anomaly_attention --quick --dtype bf16 --mode fwd_bwd "${FLAG[@]}"
    step bench_mdn 30 "$PY" -m kernels.bench.bench_mdn_nll --quick --dtype bf16 --mode fwd_bwd "${FLAG[@]}"
else
    # <= 6 minutes: 30 + 110 + 110 + 50 + 60 = 360 s of limits, the environment step included.
    step correctness 110 "$PY" -m kernels.bench.gpu_correctness "${FLAG[@]}"
    step bench_attention 110 "$PY" -m kernels.bench.bench_anomaly_attention --goal --dtype bf16 --mode fwd_bwd "${FLAG[@]}"
    step bench_mdn 50 "$PY" -m kernels.bench.bench_mdn_nll --goal --dtype fp32 --mode fwd_bwd "${FLAG[@]}"
    step train_step 60 "$PY" -m kernels.bench.bench_train_step "${FLAG[@]}"
fi
echo "== done in $((SECONDS - T0))s; steps:" | tee -a "$LOG"
column -s, -t < "$STEPS" 2>/dev/null | tee -a "$LOG" || cat "$STEPS" | tee -a "$LOG"
save
rm -rf "$WORK"
exit $status
