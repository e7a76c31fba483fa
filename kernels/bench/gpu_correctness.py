"""The fused ops against the float64 reference at the goal shapes, before anything is timed.

``python -m kernels.bench.gpu_correctness [--quick] [--dry-run]``: anomaly attention at B=32, H=8, d=64, N=196 and
784 and B=4, N=3136 (``--quick``: N=196 only), in bfloat16 and float32 (TF32 dots), forward and forward+backward,
with the atomic and the deterministic dQ; mdn_nll at N=6272, D=512, K=10 and 150. Each case appends a row to the
results CSV with ``check`` = "pass" or "FAIL: ..." and the run goes on after a failure; the exit status is 1 if any
case failed. The reference runs on the first batch element only (float64 N x N tensors at N=3136 would take tens of
GB); the fused op runs the whole batch, whose elements are independent. ``--dry-run``: float32 at interpreter-sized
shapes on CPU (TRITON_INTERPRET=1; the interpreter's bfloat16 dots are wrong, triton#11584).
"""
from __future__ import annotations

import argparse
import contextlib
import time
import traceback

import torch

from kernels.bench import _common

# Relative-norm tolerances against float64: TF32 dots carry 10-bit mantissas (about 1e-3 relative in the scores);
# bfloat16 rounds inputs and stored outputs to 8 bits. The gradients pass through one more rounded dot.
TOLERANCE = {"fp32": (5e-3, 1e-2), "bf16": (3e-2, 5e-2)}  # (outputs, gradients)
GOAL_ATTENTION = [(32, 8, (14, 14), 64), (32, 8, (28, 28), 64), (4, 8, (56, 56), 64)]
GOAL_MDN = [(6272, 10, 512), (6272, 150, 512)]
DRY_ATTENTION = [(2, 2, (4, 4), 16), (1, 2, (12, 12), 16)]  # the single-pass and the two-sweep forward
DRY_MDN = [(37, 3, 40)]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def _deterministic(flag):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def attention_case(dev, B, H, grid, d, dtype_name, mode, deterministic):
    """Largest relative error of the fused op's outputs (and input gradients) against the float64 reference."""
    from adcore import ops
    from adcore.models.vit import prior_sigma
    dtype = _common.DTYPES[dtype_name]
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, N, d, device=dev, dtype=dtype) for _ in range(3))
    sigma = prior_sigma(torch.randn(B, H, N, device=dev), max(1.0, max(grid) / 8))  # float32, as the models pass it
    grad = mode == "fwd_bwd"
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v, sigma)]
    upstream = [torch.randn(B, H, N, d, device=dev), torch.randn(B, H, N, device=dev) / N,
                torch.randn(B, H, N, device=dev) / N]
    with _deterministic(deterministic), torch.set_grad_enabled(grad):
        outs = ops.anomaly_attention(*leaves, grid, backend="triton")
        if grad:
            torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    got = [o.detach()[:1] for o in outs] + ([t.grad[:1] for t in leaves] if grad else [])
    ref = [t.detach()[:1].double().requires_grad_(grad) for t in (q, k, v, sigma)]
    with torch.set_grad_enabled(grad):
        want = ops.anomaly_attention(*ref, grid, backend="torch")
        if grad:
            torch.autograd.backward(want, [u[:1].double() for u in upstream])
    want = [w.detach() for w in want] + ([t.grad for t in ref] if grad else [])
    errs = [_rel_err(g, w) for g, w in zip(got, want)]
    bad = [i for i, g in enumerate(got) if not torch.isfinite(g).all()]
    tol_out, tol_grad = TOLERANCE[dtype_name]
    worst = max(e / (tol_out if i < 3 else tol_grad) for i, e in enumerate(errs))
    return worst, errs, bad


def mdn_case(dev, N, K, D, dtype_name, mode):
    from adcore import ops
    dtype = _common.DTYPES[dtype_name]
    x, logits = torch.randn(N, D, device=dev), torch.randn(N, K, device=dev)
    mu, log_var = torch.randn(N, K, D, device=dev), 0.5 * torch.randn(N, K, D, device=dev)
    w = torch.randn(N, device=dev)
    inputs = [t.to(dtype) for t in (x, logits, mu, log_var)]
    results = []
    for backend, cast in (("triton", None), ("torch", torch.float64)):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_(mode == "fwd_bwd") for t in inputs]
        with torch.set_grad_enabled(mode == "fwd_bwd"):
            loss = ops.mdn_nll(*leaves, mode="vtadl" if K > 10 else "logsumexp", backend=backend)
            if mode == "fwd_bwd":
                (loss * w.to(loss.dtype)).sum().backward()
        results.append([loss.detach()] + ([t.grad for t in leaves] if mode == "fwd_bwd" else []))
    errs = [_rel_err(g, r) for g, r in zip(*results)]
    bad = [i for i, g in enumerate(results[0]) if not torch.isfinite(g).all()]
    tol_out, tol_grad = (1e-5, 1e-4) if dtype_name == "fp32" else (1e-2, 2e-2)
    worst = max(e / (tol_out if i == 0 else tol_grad) for i, e in enumerate(errs))
    return worst, errs, bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bfloat16 at N=196 and the K=10 MDN only")
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes (CI)")
    args = parser.parse_args(argv)
    dev = _common.require_cuda(args.dry_run)
    dtypes = ["fp32"] if args.dry_run else ["bf16"] if args.quick else ["bf16", "fp32"]
    att = DRY_ATTENTION if args.dry_run else GOAL_ATTENTION[:1] if args.quick else GOAL_ATTENTION
    mdn = DRY_MDN if args.dry_run else GOAL_MDN[:1] if args.quick else GOAL_MDN
    cases = [("anomaly_attention", f"B={B},H={H},N={g[0] * g[1]},d={d}", dt, mode, det,
              (lambda B=B, H=H, g=g, d=d, dt=dt, mode=mode, det=det: attention_case(dev, B, H, g, d, dt, mode, det)))
             for B, H, g, d in att for dt in dtypes for mode, det in (("fwd", False), ("fwd_bwd", False),
                                                                       ("fwd_bwd", True))]
    cases += [("mdn_nll", f"N={N},K={K},D={D}", dt, mode, False,
               (lambda N=N, K=K, D=D, dt=dt, mode=mode: mdn_case(dev, N, K, D, dt, mode)))
              for N, K, D in mdn for dt in dtypes for mode in ("fwd", "fwd_bwd")]
    failed = 0
    for kernel, shape, dt, mode, det, run in cases:
        label = mode + ("_deterministic" if det else "")
        t0 = time.time()
        try:
            worst, errs, bad = run()
            check = ("pass" if worst <= 1 and not bad else
                     f"FAIL: error {worst:.2f}x tolerance" + (f", non-finite outputs {bad}" if bad else ""))
            detail = " ".join(f"{e:.1e}" for e in errs)
        except Exception as exc:  # recorded, and the next case runs
            check, detail = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", ""
            traceback.print_exc()
        failed += check != "pass"
        print(f"{kernel:18s} {shape:24s} {dt:5s} {label:22s} {check}  [{detail}] {time.time() - t0:.1f}s", flush=True)
        _common.append_rows([dict(kernel=kernel, provider="triton", mode=label, shape=shape, dtype=dt, check=check)])
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{len(cases) - failed}/{len(cases)} correctness cases passed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
