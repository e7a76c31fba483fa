"""kernels/bench/gpu_check.sh --dry-run: the GPU lend's script, every step, on CPU through Triton's interpreter.

A GPU is lent for 15 minutes at a time; a script that fails on its own plumbing (an argument, a CSV column, a python
that is not there) wastes the lend. The dry run executes the same steps at tiny shapes and writes a scratch CSV.
"""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels._utils import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "correctness", "bench_attention", "bench_mdn", "train_step"]


@pytest.mark.skipif(not HAS_TRITON or shutil.which("timeout") is None, reason="needs triton and coreutils timeout")
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    committed = (ROOT / "kernels/bench/results.csv").read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADCORE_RESULTS_CSV", "ADCORE_BACKEND")}
    env.update(OUT=str(tmp_path), PY=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "kernels/bench/gpu_check.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    with open(tmp_path / "gpu_check_steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert [s["step"] for s in steps] == STEPS
    assert all(s["rc"] == "0" for s in steps), steps
    assert sum(int(s["limit_s"]) for s in steps) <= 360  # the full check fits 6 minutes
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    checks = [r for r in rows if r["check"]]
    assert checks and all(r["check"] == "pass" for r in checks)
    assert {r["kernel"] for r in rows} >= {"anomaly_attention", "mdn_nll", "mdn_nll_logsumexp", "train_step_vt_adl",
                                           "train_step_advit"}
    assert {r["provider"] for r in rows if r["kernel"] == "anomaly_attention"} >= {"triton", "eager", "compile"}
    assert all(r["gpu"] for r in rows)
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    assert (ROOT / "kernels/bench/results.csv").read_bytes() == committed  # a dry run never writes the real one


def test_gpu_check_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "kernels/bench/gpu_check.sh"), "--fast"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
