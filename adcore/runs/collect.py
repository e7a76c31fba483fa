"""Reading runs back: manifests, results files, the tables the comparison chapter prints, reproduce commands."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from . import provenance


def load_manifest(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"run manifest {str(path)!r} does not exist; run `python -m adcore run` or `book` first")
    return json.loads(path.read_text())["runs"]


def collect_results(manifest_or_runs, main_only: bool = True) -> list[dict]:
    """The results JSON files written by the (successful) runs of a manifest.

    Each result gets ``run_key``, ``notebook``, ``params_name`` (the run's parameter set) and ``method``: the
    notebook's name, so that runs of one notebook (one per category, one per seed) make one column.

    Args:
        manifest_or_runs: a manifest path or its list of runs.
        main_only: keep only each run's main results, those whose ``run_name`` is the run's ``run_name`` parameter
            or, by the notebooks' convention, the notebook's name; ablation variants a notebook evaluates beside it
            (``vt_adl-no-noise``) stay in that notebook's chapter. A run with no such result (the baselines
            notebook's ``knn`` and ``center_prior``) keeps all of them, each named by its ``run_name``. DMAD's
            ``mode: both`` trains a pixel model beside its image model (``<run>-px``); as DMAD's code reports them,
            the pixel metrics come from that model (``pixel_from`` says so).
    """
    runs = load_manifest(manifest_or_runs) if not isinstance(manifest_or_runs, list) else manifest_or_runs
    runs = [r for r in runs if r.get("status") in ("ok", "skipped")]
    out = []
    for r in runs:
        found = [json.loads(p.read_text()) for p in sorted((Path(r["run_dir"]) / "results").glob("*.json"))]
        main = (r.get("params") or {}).get("run_name") or r["name"]
        named = any(res.get("run_name") == main for res in found)
        if main_only and named:
            pixel = {res["category"]: res for res in found if res.get("run_name") == f"{main}-px"}
            found = [res for res in found if res.get("run_name") == main]
            for res in found:
                px = pixel.get(res["category"])
                if px is not None and res.get("params", {}).get("model_params", {}).get("mode") != "px":
                    res.update(pixel_auroc=px.get("pixel_auroc"), aupro=px.get("aupro"), pixel_from=f"{main}-px")
        for res in found:
            res.update(run_key=r["key"], notebook=r["name"], params_name=r.get("params_name") or "default",
                       method=r["name"] if named else res.get("run_name") or r["name"])
            if not main_only and named and res.get("run_name") not in (None, main):
                res["method"] += f" / {res['run_name']}"
            out.append(res)
    return out


def results_table(results: list[dict], metrics=("image_auroc", "pixel_auroc", "aupro")):
    """Long results → DataFrame indexed by (method, category) with a ``mean`` row per method.

    Raises:
        ValueError: two results for the same method and category (the table would hide one).
    """
    import pandas as pd

    if not results:
        return pd.DataFrame(columns=["method", "category", *metrics]).set_index(["method", "category"])
    df = pd.DataFrame([{"method": r.get("method") or r.get("notebook") or r.get("model"), "category": r["category"],
                        **{m: r.get(m) for m in metrics}} for r in results])
    dup = df[df.duplicated(["method", "category"], keep=False)]
    if len(dup):
        raise ValueError(f"several results for the same method and category: {dup[['method', 'category']].values[:5]}"
                         "; give the runs distinct method names")
    df[list(metrics)] = df[list(metrics)].astype(float)
    means = df.groupby("method", sort=False)[list(metrics)].mean().reset_index().assign(category="mean")
    return pd.concat([df, means]).set_index(["method", "category"])


def results_over_seeds(results: list[dict], metrics=("image_auroc", "pixel_auroc", "aupro")):
    """Long results, several seeds per method allowed → DataFrame indexed by (method, category): each metric's mean
    over seeds, ``<metric>_std`` (sample standard deviation over seeds; NaN with one seed) and ``n_seeds``. The
    ``mean`` row of a method is the category-mean of each seed, then the mean and deviation of those.

    Raises:
        ValueError: two results for the same method, category and seed.
    """
    import pandas as pd

    cols = [*metrics, *[f"{m}_std" for m in metrics], "n_seeds"]
    if not results:
        return pd.DataFrame(columns=["method", "category", *cols]).set_index(["method", "category"])
    df = pd.DataFrame([{"method": r.get("method") or r.get("notebook") or r.get("model"), "category": r["category"],
                        "seed": r.get("seed"), **{m: r.get(m) for m in metrics}} for r in results])
    df["seed"] = df["seed"].fillna(-1)  # a model without a seed (knn) is one "seed"
    dup = df[df.duplicated(["method", "category", "seed"], keep=False)]
    if len(dup):
        raise ValueError(f"several results for the same method, category and seed: "
                         f"{dup[['method', 'category', 'seed']].values[:5]}")
    df[list(metrics)] = df[list(metrics)].astype(float)
    per_seed_mean = df.groupby(["method", "seed"], sort=False)[list(metrics)].mean().reset_index()
    per_seed_mean["category"] = "mean"
    out = []
    for frame in (df, per_seed_mean):
        g = frame.groupby(["method", "category"], sort=False)[list(metrics)]
        stats = g.mean().join(g.std(ddof=1).add_suffix("_std"))
        stats["n_seeds"] = g.size()
        out.append(stats)
    table = pd.concat(out)[cols]
    order = [(m, c) for m in dict.fromkeys(df["method"]) for c in [*dict.fromkeys(df["category"]), "mean"]
             if (m, c) in table.index]
    return table.loc[order]


def _rel(p, repo_root=None) -> str:
    root = Path(repo_root or Path.cwd()).resolve()
    p = Path(p)
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def reproduce_command(run: dict, repo_root=None, runs_dir="runs-reproduced") -> str:
    """The ``python -m adcore run`` command that reruns one run of a manifest and gives the same digits in every
    results file (all but :data:`adcore.runs.provenance.TIMING_FIELDS`), at any ``--jobs`` and on any core count, with
    the same library versions and device. It plans the same run key (the same layers, ``--set`` values, user's
    ``data_root`` and parameter files as absolute paths), in ``runs_dir`` so that it does not find the original
    finished."""
    injected = {k: v for k, v in run["params"].items() if k != "results_dir"}
    spec = run.get("params_spec") or "default"
    args = ["python", "-m", "adcore", "run", _rel(run["notebook"], repo_root)]
    args += ["--params", spec] if spec != "default" else []
    sets = list(run.get("sets") or [])
    cats = injected.get("categories")
    if cats is not None and len(cats) == 1:
        args += ["--categories", cats[0]]
    elif cats is not None and not any(s.startswith("categories=") for s in sets):
        sets.append(f"categories={json.dumps(cats)}")  # a grid's list entry: one run over several categories
    args += ["--set", *sets] if sets else []
    args += ["--seeds", str(injected["seed"])] if "seed" in injected else []
    args += ["--threads", str(run.get("threads") or 1), "--runs-dir", runs_dir]
    return shlex.join(args)


def papermill_command(run: dict, repo_root=None) -> str:
    """The plain papermill command equivalent to one run of a manifest (``results_dir`` left to the notebook), with
    the run's thread count in the environment."""
    values = {k: v for k, v in run["params"].items() if k != "results_dir"}
    threads = " ".join(f"{k}={v}" for k, v in provenance.thread_env(run.get("threads") or 1).items())
    cmd = f"{threads} papermill {_rel(run['notebook'], repo_root)} {_rel(run['output'], repo_root)} -k python3"
    if values:
        cmd += " -y '" + json.dumps(values) + "'"  # JSON is YAML, and keeps lists and None intact
    return cmd
