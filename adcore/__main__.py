"""Command line: ``python -m adcore run ...`` (batch reruns with papermill) and ``python -m adcore book`` (the book).

Examples::

    python -m adcore run                                   # every notebook, parameters-cell defaults
    python -m adcore run vt_adl aand --params smoke        # two notebooks with notebooks/params/<nb>/smoke.yaml
    python -m adcore run --grid notebooks/params/grid.yaml --jobs 2
    python -m adcore run dmad --params paper --data-root /data/mvtec --categories bottle cable --seeds 0 1 2
    python -m adcore run --params paper+my.yaml --data-root /data/mvtec --set num_epochs=50 dmad.batch_size=16
    python -m adcore run aand --params paper --set dataset=/data/my-parts --dry-run   # a folder in MVTec's layout
    python -m adcore book                                  # the default grid, then the HTML (make book)
    python -m adcore book --params paper --data-root /data/mvtec   # the book of exactly those runs
    python -m adcore book --smoke                          # the CI-sized book
    python -m adcore run --smoke --scheduler tcp://10.0.0.5:8786           # on a running Dask cluster
    python -m adcore run dmad --params paper --cluster slurm --cluster-config cluster.yaml   # via dask-jobqueue
    python -m adcore compare runs runs-reproduced          # do two runs folders' results agree to the digit?
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adcore", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--jobs", "-j", type=int, default=1, help="runs side by side on this machine, each in its "
                        "own process (on 2 cores 1 is usually fastest)")
    common.add_argument("--threads", type=int, default=1, help="torch threads per run, whatever --jobs and the core "
                        "count are; recorded in every results file, since the digits depend on it (default: 1)")
    dist = common.add_argument_group("distributed (Dask); without these, runs are local processes")
    dist.add_argument("--scheduler", metavar="ADDRESS", help="submit each run to the Dask scheduler at ADDRESS "
                      "(tcp://HOST:PORT); its workers must see --runs-dir")
    dist.add_argument("--cluster", choices=["slurm", "pbs", "sge", "lsf"], help="start a Dask cluster of batch "
                      "jobs with dask-jobqueue (options from --cluster-config and the flags below)")
    dist.add_argument("--cluster-config", metavar="YAML", help="cores, memory, gpus, walltime, queue, jobs, and any "
                      "dask-jobqueue option (account, job_script_prologue, ...)")
    dist.add_argument("--cores", type=int, help="cores per batch job")
    dist.add_argument("--memory", help="memory per batch job, e.g. 32GB")
    dist.add_argument("--gpus", type=int, help="GPUs per batch job (runs with device: cuda take one each)")
    dist.add_argument("--walltime", help="per batch job, e.g. 24:00:00")
    dist.add_argument("--queue", help="queue or partition")
    dist.add_argument("--cluster-jobs", type=int, help="batch jobs to start (default 1)")
    common.add_argument("--force", action="store_true", help="rerun runs that already finished")
    common.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    common.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds (default: none)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    select = argparse.ArgumentParser(add_help=False)
    sel = select.add_argument_group(
        "which runs (the same for run and book)",
        "Parameters layer in a fixed order: the notebook's parameters cell, then each --params entry's files in "
        "order, then --set (and --data-root), then --categories and --seeds. Each --params entry is one run; "
        "'paper+my-mvtec.yaml' stacks two files into one. To shorten every notebook at once: --set num_epochs=1 "
        "amplify_epochs=1 distill_epochs=1 conv_ae_epochs=1 (AAND names its two stages' epochs apart, AnoViT's "
        "notebook its conv AE baseline's; a schedule follows its epochs unless set itself).")
    sel.add_argument("notebooks", nargs="*", help="notebook names (vt_adl) or paths; default: all in notebooks/")
    sel.add_argument("--grid", help="a grid YAML (notebooks, params, categories, seeds); flags below override it")
    sel.add_argument("--params", nargs="+", help="parameter entries, one run each: names under notebooks/params/<nb>/ "
                     "(smoke, paper), paths to YAML files, inline YAML ('{num_epochs: 3}'), 'default' (the notebook's "
                     "own values), or layers joined by + (paper+my-mvtec.yaml)")
    sel.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="set a parameter (a YAML value) in "
                     "every selected notebook that has KEY, after the parameter files; NOTEBOOK.KEY=VALUE sets it in "
                     "one notebook only; a KEY no selected notebook has is an error")
    sel.add_argument("--data-root", metavar="DIR", help="shorthand for --set data_root=DIR: the folder holding the "
                     "dataset's categories (MVTec AD, BTAD, VisA); a folder of your own in MVTec AD's layout is "
                     "--set dataset=DIR")
    sel.add_argument("--smoke", action="store_true", help="shorthand for --params smoke (the CI-sized runs)")
    sel.add_argument("--categories", nargs="+", help="run each of these categories separately")
    sel.add_argument("--seeds", nargs="+", type=int, help="run each of these seeds")

    r = sub.add_parser("run", parents=[common, select], help="run notebooks over a grid of parameters with papermill")
    r.add_argument("--dry-run", action="store_true", help="validate and list the runs, execute nothing")

    b = sub.add_parser("book", parents=[common, select], help="run the selected runs (by default the book's grid, "
                       "notebooks/params/grid.yaml) and build the Jupyter Book from exactly those (make book)")
    b.add_argument("--out", default=None, help="output folder; the HTML lands in OUT/_build/html (default: book)")
    b.add_argument("--no-run", action="store_true", help="reuse finished runs only; fail if one is missing")
    b.add_argument("--no-build", action="store_true", help="stage the sources but do not call jupyter-book")
    b.add_argument("--dry-run", action="store_true", help="validate and list the book's runs, execute nothing")
    b.add_argument("--chapters", nargs="+", metavar="CHAPTER", help="only these of the book's own chapters "
                   "(data, comparison, budget, shortcuts, kernels, reproducibility); default: all")
    c = sub.add_parser("compare", help="do the results files two runs folders share agree in every digit (all "
                       "but the timing fields)? exit 0 when at least one is shared and none differs")
    c.add_argument("runs_a", help="a runs folder, e.g. runs")
    c.add_argument("runs_b", help="another, e.g. runs-reproduced (where the appendix's commands write)")
    c.set_defaults(handler=_compare)
    from .deploy.cli import add_commands  # train, predict, export
    add_commands(sub)
    return p


def _executor(args, dry_run: bool = False):
    """None (local processes), or a Dask executor for --scheduler / --cluster; a dry run prints the job script."""
    if args.scheduler and args.cluster:
        raise ValueError("give --scheduler (a running cluster) or --cluster (start one), not both")
    if not (args.scheduler or args.cluster) or (dry_run and args.scheduler):
        return None
    if args.jobs != 1:
        raise ValueError("--jobs is for local runs; on Dask, each worker's --nthreads says how many runs it takes")
    from .runs.dask import DaskExecutor, cluster_options, start_cluster

    cluster = None
    if args.cluster:
        opts = cluster_options(args.cluster, args.cluster_config, cores=args.cores, memory=args.memory,
                               gpus=args.gpus, walltime=args.walltime, queue=args.queue, jobs=args.cluster_jobs)
        cluster = start_cluster(args.cluster, opts, threads=args.threads, scale=not dry_run)
        if dry_run:
            print(f"job script for each of the {opts.get('jobs', 1)} {args.cluster} job(s):\n{cluster.job_script()}")
            cluster.close()
            return None
    return DaskExecutor(scheduler=args.scheduler, cluster=cluster)


def _selection(args, default_grid=None) -> tuple[list[dict], list, bool]:
    """The grids, ``--set`` values and whether the user chose anything, from the selection flags of run and book."""
    from .runs.plan import load_grid, parse_sets

    grid_file = args.grid or default_grid
    grids = load_grid(grid_file) if grid_file else [{"notebooks": "all", "params": ["default"], "categories": [None],
                                                     "seeds": [None]}]
    flags = {"notebooks": args.notebooks, "params": ["smoke"] if args.smoke else None, "categories": args.categories,
             "seeds": args.seeds}
    if args.params:
        flags["params"] = args.params
    grids = [{**g, **{k: v for k, v in flags.items() if v}} for g in grids]
    sets = parse_sets([*args.set, *([f"data_root={args.data_root}"] if args.data_root else [])])
    chosen = bool(args.grid or sets or any(flags.values()))
    return grids, sets, chosen


def _plan_and_list(grids, sets, args) -> list:
    from .runs.execute import run_status
    from .runs.plan import plan_grids

    runs = plan_grids(grids, runs_dir=args.runs_dir, threads=args.threads, sets=sets)
    print(f"{len(runs)} run(s):")
    for run in runs:
        state = (run_status(run) or {}).get("status", "new") if args.dry_run else ""
        print(f"  {run.key}  {state + '  ' if state else ''}{run.params}")
    return runs


def _run(args) -> int:
    from .runs.execute import execute_runs, summarize, write_manifest

    # without --grid, `run` means the notebooks' own defaults (the book's grid is for `book`); flags override every
    # grid of the file
    grids, sets, _ = _selection(args)
    runs = _plan_and_list(grids, sets, args)
    executor = _executor(args, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    try:
        statuses = execute_runs(runs, jobs=args.jobs, executor=executor, force=args.force, timeout=args.timeout,
                                progress=not args.no_progress)
    finally:
        if executor is not None:
            executor.close()
    write_manifest(statuses, Path(args.runs_dir) / "manifest.json")
    ok = summarize(statuses)
    print(f"outputs under {Path(args.runs_dir).resolve()}; manifest {Path(args.runs_dir) / 'manifest.json'}")
    return 0 if ok else 1


def _book(args) -> int:
    from .book.build import build_book
    from .runs.execute import summarize
    from .runs.plan import BUDGET_GRID, DEFAULT_GRID

    t0 = time.time()
    grids, sets, chosen = _selection(args, DEFAULT_GRID if DEFAULT_GRID.is_file() else None)
    if args.dry_run:
        _plan_and_list(grids, sets, args)
        return 0
    executor = _executor(args) if not args.no_run else None
    try:
        # the budget chapter's grid belongs to the default book; a book of chosen runs shows exactly those
        out = build_book(grids=grids, sets=sets, budget_grid=None if chosen else BUDGET_GRID, jobs=args.jobs,
                         executor=executor, threads=args.threads, force=args.force, runs_dir=args.runs_dir,
                         out_dir=args.out, timeout=args.timeout, run=not args.no_run, build=not args.no_build,
                         progress=not args.no_progress, **({"chapters": args.chapters} if args.chapters else {}))
    finally:
        if executor is not None:
            executor.close()
    ok = summarize(out["statuses"])
    if out["html"]:
        print(f"\nThe book is at {out['html']}\nOpen it with: xdg-open {out['html']}  (or file://{out['html']})")
    print(f"total {time.time() - t0:.0f} s")
    return 0 if ok else 1


def _compare(args) -> int:
    from .runs.provenance import TIMING_FIELDS, compare_runs

    found = compare_runs(args.runs_a, args.runs_b)
    for rel, fields in found["differ"].items():
        print(f"DIFFERS {rel}: {', '.join(fields)}")
    shared = len(found["same"]) + len(found["differ"])
    print(f"{len(found['same'])} of {shared} shared results files agree in every field but {', '.join(TIMING_FIELDS)}")
    return 0 if shared and not found["differ"] else 1


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .runs.params import ParameterError

    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        return _run(args) if args.command == "run" else _book(args)
    except (ParameterError, ValueError, RuntimeError) as e:
        # bad parameter files, missing data roots, failed builds: one clear line, no traceback
        print(f"adcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; run the same command again to do the rest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
