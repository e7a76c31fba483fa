"""SASS instruction budget of every fused kernel and autotune config, compiled for sm_90a on a machine without a GPU.

``python -m kernels.bench.sass_report [--dtype bf16 fp32] [--jobs 2]`` compiles each kernel variant through Triton's
whole pipeline (TTIR to cubin, no driver), disassembles the cubin with the ``nvdisasm`` that ships in the Triton wheel
and prints, per variant:

* each inner loop's SASS instructions per element: the loop body's static length (from the back-edge's target to the
  back-edge) times the threads of a program, over the elements one iteration handles (BLOCK_M x BLOCK_N score
  elements for attention, BLOCK_N x BLOCK_D parameter elements for the MDN). Both sides of a branch inside the loop
  count, so this is the cost of the full path (the zero-prior shortcut's cheap side included). A single-pass kernel
  (the attention forward for N <= 128) has a "straight" entry instead: all its code outside loops, prologue and
  epilogue included, over the BLOCK_M x BLOCK_N elements of its one tile;
* MUFU (exp2, log2, rcp) per element, the special-function unit that bounds the attention;
* ptxas's registers and spill bytes (stores + loads).

It ends with one line per op: ``anomaly_attention fwd+bwd: N instructions per score element, S spill bytes``, N the
forward (with gradient statistics) plus backward sums for the worst bf16 config the autotuner may pick, and
``mdn_nll fwd+bwd: ...`` with the bandwidth check: the time to issue the loops' instructions against the time to move
their bytes at HBM speed (H100 SXM: 3.35 TB/s; 132 SMs x 128 lanes at 1.83 GHz). Nothing runs, so it says nothing
about latency hiding; it catches a regression in code size, registers or spills without a GPU. ``--budget N`` and
``--no-spills`` turn the bf16 total and any spilling variant into a failing exit status (CI uses both).

``--specialise`` compiles every variant once per goal shape (the kernel modules' ``sass_goal_args``) with the
argument specialisation a real launch gets: integer arguments equal to 1 become constants and multiples of 16 carry
``tt.divisibility=16`` (Triton's own rule, ``native_specialize_impl``), pointers are 16-byte aligned. Without it the
integers are opaque and the count is what any shape gets. ``--triton-venv DIR`` counts under the Triton installed in
another virtual environment of the same Python (the GPU machine's Triton 3.6, say): the report reruns itself with that
Triton first on the path and this environment's torch behind it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ARCH = 90
# H100 SXM: 132 SMs x 4 schedulers x 32 lanes, 1.83 GHz (kernels.md §5), and 3.35 TB/s HBM3.
LANE_INSTR_PER_S = 132 * 128 * 1.83e9
HBM_BYTES_PER_S = 3.35e12
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


@dataclass
class Variant:
    """One compile: a jit kernel with its constexprs, and what its inner loops iterate over."""
    op: str  # "anomaly_attention" or "mdn_nll"
    part: str  # e.g. "fwd", "bwd"; the fwd+bwd total sums one variant of each part
    fn: object
    dtype: str
    consts: dict
    num_warps: int
    num_stages: int
    loops: list  # [(name, elements per iteration)] of the inner loops in code order; None elements: not per element
    stat: set = field(default_factory=set)  # pointer arguments that hold statistics (fp32, fp64 for fp64 inputs)
    floats: set = field(default_factory=set)  # float scalar arguments
    int_ptrs: set = field(default_factory=set)  # pointer arguments to int32 (flags)
    counted: bool = True  # part of the fwd+bwd total (the training path)
    result: dict = field(default_factory=dict)
    ints: dict | None = None  # --specialise: integer argument values at one goal shape, by name
    shape: str = ""  # the goal shape's label
    n_range: tuple = (1, float("inf"))  # the token counts N for which the launcher picks this variant
    straight: int | None = None  # elements a program covers with code outside loops (a single-pass kernel)

    @property
    def config(self):
        # BLOCK_D is the head dim for attention (fixed at 64 here) but a tuned chunk for the MDN.
        skip = ("BLOCK_G", "BLOCK_K") + (("BLOCK_D",) if self.op == "anomaly_attention" else ())
        keep = {k: v for k, v in self.consts.items() if k.startswith("BLOCK_") and k not in skip}
        return " ".join(f"{k[6:]}={v}" for k, v in keep.items()) + f" w={self.num_warps} s={self.num_stages}"

    @property
    def flags(self):
        return " ".join([f"{k}" for k, v in self.consts.items() if v is True] + ([self.shape] if self.shape else []))


def _tool(name):
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: this report needs the ptxas/nvdisasm that ship in the Triton wheel")
    return str(path)


def _signature(v):
    """The kernels' convention: the leading UPPER-case arguments are pointers (of the input dtype, or fp32/fp64 when
    they hold statistics, v.stat), v.floats are float scalars, everything else an i32."""
    stat = "fp64" if v.dtype == "fp64" else "fp32"
    sig, leading = {}, True
    for name in v.fn.arg_names:
        leading = leading and name.isupper()
        if name in v.consts:
            sig[name] = "constexpr"
        elif leading:
            sig[name] = "*i32" if name in v.int_ptrs else "*" + (stat if name in v.stat else v.dtype)
        elif name in v.floats:
            sig[name] = stat
        else:
            sig[name] = "i32"
    return sig


def _specialised(v, sig):
    """(signature, constexprs, attrs) as a launch with the integer arguments v.ints would compile them."""
    consts, attrs = dict(v.consts), {}
    if v.ints is None:
        return sig, consts, attrs
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    sig = dict(sig)
    fixed = {p.name for p in v.fn.params if p.do_not_specialize}
    for i, name in enumerate(v.fn.arg_names):
        if sig[name].startswith("*"):
            attrs[(i,)] = CUDABackend.parse_attr("D")  # torch's allocations are 256-byte aligned
        elif name in v.ints and name not in fixed and sig[name] == "i32":
            kind, key = native_specialize_impl(CUDABackend, int(v.ints[name]), False, True, True)
            if kind == "constexpr":
                sig[name], consts[name] = "constexpr", int(v.ints[name])
            elif key:
                attrs[(i,)] = CUDABackend.parse_attr(key)
    return sig, consts, attrs


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def inner_loops(sass: str):
    """[(start, end, instructions)] of the innermost loops: a branch back to an earlier label closes a loop."""
    labels, instrs = {}, []
    pending = []
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(2).strip()))
    # Code after the last EXIT is out of line (the trap, warp-divergence fallbacks of BRA.DIV that jump back into a
    # loop): its back-edges are not loops and its instructions run only on that cold path.
    last_exit = max((a for a, t in instrs if t.split()[-1:] == ["EXIT"] or t.endswith(" EXIT")), default=None)
    loops = []
    for addr, text in instrs:
        b = _BRANCH.search(text)
        if last_exit is not None and addr > last_exit:
            continue
        if b and labels.get(b.group(1), addr) < addr:
            loops.append((labels[b.group(1)], addr))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    inner.sort()
    straight = [t for a, t in instrs if (last_exit is None or a <= last_exit)
                and not any(s <= a <= e for s, e in loops)]
    return [(s, e, [t for a, t in instrs if s <= a <= e]) for s, e in inner], straight


_TODO: list = []  # filled before the worker processes fork; they compile _TODO[i]


def _compile_one(i: int) -> Variant:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v = _TODO[i]
    t0 = time.time()
    sig, consts, attrs = _specialised(v, _signature(v))
    src = ASTSource(fn=v.fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                            options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        info = subprocess.run([_tool("ptxas"), f"-arch=sm_{ARCH}a", "-v", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    stores = re.search(r"(\d+) bytes spill stores", info)
    loads = re.search(r"(\d+) bytes spill loads", info)
    threads = 32 * v.num_warps
    loops, straight = inner_loops(sass)
    names = v.loops if len(loops) == len(v.loops) else [(f"loop{i}", None) for i in range(len(loops))]
    bodies = [body for _, _, body in loops]
    if v.straight:  # a loop-free kernel: its code outside loops, once per program of v.straight elements
        names, bodies = names + [("straight", v.straight)], bodies + [straight]
    per_loop = []
    for (name, elems), body in zip(names, bodies):
        n, mufu = len(body), sum("MUFU." in t for t in body)
        per_loop.append(dict(name=name, instr=n, per_elem=None if elems is None else n * threads / elems,
                             mufu_per_elem=None if elems is None else mufu * threads / elems,
                             local=sum(" LDL" in " " + t or " STL" in " " + t for t in body),
                             bar=sum(t.startswith("BAR") for t in body)))
    v.result = dict(regs=int(regs.group(1)) if regs else -1,
                    spill=(int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0),
                    loops=per_loop, seconds=time.time() - t0,
                    warning="" if len(loops) == len(v.loops) else f"expected {len(v.loops)} loops, found "
                                                                  f"{len(loops)}")
    v.fn = v.fn.__name__  # picklable on the way back
    return v


def variants(dtypes, specialise=False):
    """Every kernel variant the launchers can pick on a GPU, from the kernel modules' own config lists; with
    ``specialise``, one copy per goal shape carrying that shape's integer arguments."""
    import kernels.anomaly_attention as aa
    import kernels.mdn_nll as mn
    out = []
    for mod in (aa, mn):
        found = [v for dt in dtypes for v in mod.sass_variants(dt, Variant)]
        if not specialise:
            out += found
            continue
        for label, ints in mod.sass_goal_args():
            for v in found:
                if v.n_range[0] <= ints["N"] <= v.n_range[1]:
                    w = copy.copy(v)
                    w.ints, w.shape = ints, label
                    out.append(w)
    return out


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob(f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"))
    if not found or not (found[0] / "triton").is_dir():
        others = sorted(p.parent.name for p in venv.glob("lib/python*/site-packages/triton"))
        raise SystemExit(f"{venv} has no Triton for Python {sys.version_info[0]}.{sys.version_info[1]}"
                         + (f" (it has one for {', '.join(others)}: run this report with that Python)" if others
                            else "; create it with: python3 -m venv DIR && DIR/bin/pip install 'triton==3.6.*'"))
    return found[0]


def _rerun_under(venv: str, argv: list) -> int:
    """Run this report again with the Triton of ``venv`` first on the path (torch and numpy still come from here)."""
    site = _site_packages(Path(venv).resolve())
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(root)] + [p for p in sys.path if p]),
               ADCORE_SASS_TRITON=str(site))
    return subprocess.run([sys.executable, "-m", "kernels.bench.sass_report", *argv], env=env).returncode


def _fmt(x, width=6):
    return f"{x:{width}.1f}" if x is not None else " " * (width - 1) + "-"


def report(done, out=sys.stdout):
    print(f"SASS for sm_{ARCH}a (Triton's ptxas/nvdisasm); per element = static loop instructions x threads / "
          "elements per iteration", file=out)
    print(f"{'kernel':30s} {'dtype':5s} {'config':26s} {'flags':22s} {'regs':>4s} {'spill':>5s}  loops: "
          "name instr/elem (MUFU/elem) [local ld/st, barriers]", file=out)
    for v in done:
        r = v.result
        loops = "; ".join(f"{lp['name']} {_fmt(lp['per_elem'], 5).strip()} ({_fmt(lp['mufu_per_elem'], 4).strip()})"
                          + (f" [{lp['local']}, {lp['bar']}]" if lp['local'] or lp['bar'] else "")
                          for lp in r["loops"])
        print(f"{v.fn:30s} {v.dtype:5s} {v.config:26s} {v.flags:22s} {r['regs']:4d} {r['spill']:5d}  {loops}"
              + (f"  !{r['warning']}" if r["warning"] else ""), file=out)
    return {op: _summary(op, done, out) for op in ("anomaly_attention", "mdn_nll")}


def _per_elem(v):
    return sum(lp["per_elem"] or 0 for lp in v.result["loops"])


def _worst_total(variants):
    """The fwd+bwd total of the worst counted variant of each part (fwd, bwd), and those variants."""
    worst = {}
    for v in variants:
        if v.counted and (v.part not in worst or _per_elem(v) > _per_elem(worst[v.part])):
            worst[v.part] = v
    return sum(_per_elem(v) for v in worst.values()), list(worst.values())


def _summary(op, done, out):
    """Print the fwd+bwd line(s) of one op; return the bf16 (instructions per element, spill bytes) or None.

    The total takes the worst config the autotuner may pick at any N. Where some variants serve only a range of N
    (the attention's single-pass forward for N <= 128), an indented line gives that range's total too."""
    result = None
    for dt in sorted({v.dtype for v in done if v.op == op}):
        mine = [v for v in done if v.op == op and v.dtype == dt]
        total, worst = _worst_total(mine)
        if not worst:
            continue
        spill = max(v.result["spill"] for v in mine)
        regs = max(v.result["regs"] for v in mine)
        unit = "score element" if op == "anomaly_attention" else "parameter element"
        extra = ""
        if op == "mdn_nll":
            # fwd reads mu and log_var; bwd reads them again and writes their gradients: 6 elements moved per (n,k,d).
            bytes_per_elem = 6 * ELEM_BYTES[dt]
            t_issue, t_mem = total / LANE_INSTR_PER_S, bytes_per_elem / HBM_BYTES_PER_S
            extra = (f"; issue {t_issue * 1e12:.2f} ps vs HBM {t_mem * 1e12:.2f} ps per element: "
                     f"{'bandwidth' if t_issue < t_mem else 'ISSUE'}-bound ({t_issue / t_mem:.0%} of the HBM time)")
        line = f"{op} fwd+bwd: {total:.0f} instructions per {unit}, {spill} spill bytes"
        if dt == "bf16":
            print(line + f" (bf16, worst config; max {regs} registers){extra}", file=out)
            result = total, spill
        else:
            print(f"  [{dt}] " + line + f" (max {regs} registers){extra}", file=out)
        for lo, hi in sorted({v.n_range for v in mine} - {(1, float("inf"))}):
            scoped = [v for v in mine if v.n_range[0] <= lo and hi <= v.n_range[1]]
            sub, _ = _worst_total(scoped)
            print(f"  [{dt}, {lo} <= N <= {hi}] {op} fwd+bwd: {sub:.0f} instructions per {unit}, "
                  f"{max(v.result['spill'] for v in scoped)} spill bytes", file=out)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(ELEM_BYTES))
    parser.add_argument("--match", default="", help="only kernels whose name contains this (quick looks)")
    parser.add_argument("--budget", type=float, default=None,
                        help="exit 1 when anomaly_attention's bf16 fwd+bwd instructions per element exceed this")
    parser.add_argument("--no-spills", action="store_true", help="exit 1 when any variant spills")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--fp32-precision", choices=["tf32", "ieee"], default="tf32",
                        help="the float32 attention variants' dots (ieee: counted and reported, outside the budget, "
                             "which covers bf16)")
    parser.add_argument("--specialise", action="store_true",
                        help="compile at the goal shapes with a real launch's argument specialisation")
    parser.add_argument("--triton-venv", metavar="DIR", default=None,
                        help="count under the Triton installed in this virtual environment (same Python)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        raise SystemExit("unset TRITON_INTERPRET: the report compiles for a GPU")
    if args.triton_venv:
        argv = list(sys.argv[1:] if argv is None else argv)
        i = argv.index("--triton-venv") if "--triton-venv" in argv else None
        rest = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--triton-venv=")]
        raise SystemExit(_rerun_under(args.triton_venv, rest))
    import triton
    want = os.environ.get("ADCORE_SASS_TRITON")
    if want and not Path(triton.__file__).resolve().is_relative_to(Path(want).resolve()):
        raise SystemExit(f"asked for the Triton in {want} but imported {triton.__file__}")
    print(f"Triton {triton.__version__} ({Path(triton.__file__).parent}); float32 dots {args.fp32_precision}"
          + (", specialised at the goal shapes" if args.specialise else ""))
    with tempfile.TemporaryDirectory(prefix="adcore-sass-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh compile every run: never a stale cubin
        _TODO[:] = [v for v in variants(args.dtype, args.specialise) if args.match in v.fn.__name__]
        for v in _TODO:
            if v.dtype == "fp32" and v.consts.get("PRECISION") == "tf32":
                v.consts = dict(v.consts, PRECISION=args.fp32_precision)
        t0 = time.time()
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
            done = list(pool.map(_compile_one, range(len(_TODO))))
    totals = report(done)
    print(f"({len(done)} variants compiled in {time.time() - t0:.0f} s with {args.jobs} jobs)")
    spills = [f"{v.fn} {v.dtype} {v.config}" for v in done if v.result["spill"]]
    att = totals.get("anomaly_attention")
    if args.budget is not None and att is not None and att[0] > args.budget:
        raise SystemExit(f"anomaly_attention fwd+bwd: {att[0]:.0f} instructions per score element, over the budget "
                         f"of {args.budget}")
    if args.no_spills and spills:
        raise SystemExit("spilling variants: " + "; ".join(spills))


if __name__ == "__main__":
    main()
