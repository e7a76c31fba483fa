"""The training-budget chapter's numbers: which budget each run trained with, every result as one long table, the
curves (mean over categories per method and budget) and what the budget grid still has to run.

A run's budget is read from its parameter-file name, which the budget grid (``notebooks/params/budget.yaml``) fixes:
``default`` is ×1 (the book's own run), ``x<k>`` is ×k, every training stage at k times the notebook's default
epochs (:data:`EPOCH_PARAMETERS`; ``tests/test_budget.py`` keeps the files at exactly that). Runs of any other
parameter file (``smoke``, ``paper``) belong to no budget and are left out.
"""
from __future__ import annotations

import re

import pandas as pd

from ..runs.collect import collect_results

METRICS = ("image_auroc", "pixel_auroc", "aupro")
#: The parameters that hold each notebook's training epochs: the ones a budget multiplies.
EPOCH_PARAMETERS = {"aand": ("amplify_epochs", "distill_epochs"), "advit": ("num_epochs",),
                    "anovit": ("num_epochs",), "dmad": ("num_epochs",), "vt_adl": ("num_epochs",)}


def multiple(params_name: str | None) -> int | None:
    """``"default"`` → 1, ``"x<k>"`` → k, anything else → None (not a budget run)."""
    if params_name == "default":
        return 1
    found = re.fullmatch(r"x(\d+)", str(params_name or ""))
    return int(found.group(1)) if found else None


def _epochs_text(num_epochs) -> str:
    if isinstance(num_epochs, dict):
        return " + ".join(str(v) for v in num_epochs.values())
    return str(num_epochs)


def paper_epochs(method: str) -> str:
    """The epochs of the model's ``paper`` recipe (:mod:`adcore.recipes`, with its source), per stage; "—" for a
    name without one. The notebooks are named after their models."""
    from ..registry import get_recipe

    try:
        return _epochs_text(get_recipe(method, "paper").num_epochs)
    except (KeyError, ValueError):
        return "—"


def budget_results(*run_lists) -> pd.DataFrame:
    """One row per (run, category) of every budget run in the given manifests' run lists (a run listed twice, as the
    ×1 default run is in the book's and the budget grid's manifests, counts once).

    Columns: method (the notebook), budget (×k), seed, category, epochs (per stage, "4 + 8"), the metrics,
    fit_seconds (training time of that category), run_key, and the setup (dataset, data_root, image_size).
    """
    runs, seen = [], set()
    for run_list in run_lists:
        for r in run_list:
            if r["key"] not in seen and multiple(r.get("params_name")) is not None:
                seen.add(r["key"])
                runs.append(r)
    rows = []
    budgets = {r["key"]: multiple(r["params_name"]) for r in runs}
    for res in collect_results(runs):
        rows.append({"method": res["notebook"], "budget": budgets[res["run_key"]],
                     "seed": res.get("seed", res.get("params", {}).get("seed")), "category": res["category"],
                     "epochs": _epochs_text(res.get("params", {}).get("num_epochs")),
                     **{m: res.get(m) for m in METRICS}, "fit_seconds": res.get("fit_seconds"),
                     "run_key": res["run_key"], "dataset": res.get("dataset"),
                     "data_root": res.get("params", {}).get("data_root"), "image_size": res.get("image_size")})
    columns = ["method", "budget", "seed", "category", "epochs", *METRICS, "fit_seconds", "run_key", "dataset",
               "data_root", "image_size"]
    return pd.DataFrame(rows, columns=columns)


def curves(table: pd.DataFrame, seed=None) -> pd.DataFrame:
    """Mean over categories per (method, budget) at one seed (default: each method's lowest seed, the notebooks'
    own), with the training seconds summed over the categories. Only budgets where every category finished."""
    if table.empty:
        return pd.DataFrame(columns=["method", "budget", "epochs", *METRICS, "fit_seconds"])
    if seed is None:
        lowest = table.groupby("method")["seed"].transform("min")
        table = table[table["seed"] == lowest]
    else:
        table = table[table["seed"] == seed]
    n_categories = table.groupby("method")["category"].transform("nunique")
    counts = table.groupby(["method", "budget"])["category"].transform("nunique")
    table = table[counts == n_categories]
    agg = {**{m: "mean" for m in METRICS}, "fit_seconds": "sum", "epochs": "first"}
    return table.groupby(["method", "budget"], as_index=False).agg(agg)[["method", "budget", "epochs", *METRICS,
                                                                         "fit_seconds"]]


def seed_spread(table: pd.DataFrame, budget: int = 1) -> pd.DataFrame:
    """At one budget: per method, the category-mean of each seed, then their mean, sample standard deviation and the
    number of seeds (methods with one seed get NaN as the deviation)."""
    at = table[table["budget"] == budget]
    if at.empty:
        return pd.DataFrame(columns=["method", "n_seeds", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")]])
    per_seed = at.groupby(["method", "seed"])[list(METRICS)].mean()
    out = per_seed.groupby("method").agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out.insert(0, "n_seeds", per_seed.groupby("method").size())
    return out.reset_index()


def missing_runs(planned: list[dict]) -> list[dict]:
    """The runs of the budget grid's plan that have not finished (status other than ok/skipped)."""
    return [r for r in planned if r.get("status") not in ("ok", "skipped")]


def extra_seeds(results: list[dict], planned: list[dict]) -> list[dict]:
    """The default-budget results (×1) among the budget grid's finished runs at seeds the book's own results lack,
    labelled like the book's runs of the same notebook, for the comparison's mean and spread over seeds."""
    have = {(r["notebook"], r.get("seed")) for r in results}
    label = {r["notebook"]: (r["method"], r.get("params_name")) for r in results}
    at_one = [r for r in planned if multiple(r.get("params_name")) == 1 and r.get("status") in ("ok", "skipped")]
    out = []
    for res in collect_results(at_one):
        if res["notebook"] in label and (res["notebook"], res.get("seed")) not in have:
            method, params_name = label[res["notebook"]]
            out.append({**res, "method": method, "params_name": params_name})
    return out
