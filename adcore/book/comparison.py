"""The comparison chapter's tables: one per (dataset, parameter set), categories down and methods across, as every
paper prints it, with the papers' own per-category numbers beside ours where a paper gives them.

Runs of one notebook and one parameter set are one column whatever the number of runs (one per category, one per
seed); seeds become mean ± sample standard deviation (:func:`adcore.runs.collect.results_over_seeds`).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..data.mvtec import CATEGORIES as MVTEC_CATEGORIES
from ..data.mvtec import OBJECTS as MVTEC_OBJECTS
from ..data.mvtec import TEXTURES as MVTEC_TEXTURES

METRICS = ("image_auroc", "pixel_auroc", "aupro")
SHORT = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "aupro": "AUPRO"}

BASELINES = ("knn", "center_prior")  # the baselines notebook's methods: the columns every other is read against
# Categories of the public benchmarks, for "n of N categories" (a folder of one's own counts what is on disk).
BENCHMARK_CATEGORIES = {"mvtec": len(MVTEC_CATEGORIES), "btad": 3, "visa": 12}

# Per-category MVTec AD numbers the papers or their repositories publish (shared/reference/methods.md), on the scale
# of our metrics (0-1). Each says what it measures, which is not always what its name says.
PUBLISHED = [
    {"method": "vt_adl", "metric": "pixel_auroc",
     "source": "VT-ADL Table III 'PRO' (the official test.py computes pixel ROC AUC), 512 px", "values": {
        "carpet": .773, "grid": .871, "leather": .728, "tile": .796, "wood": .781, "bottle": .949, "cable": .776,
        "capsule": .672, "hazelnut": .897, "metal_nut": .726, "pill": .705, "screw": .928, "toothbrush": .901,
        "transistor": .796, "zipper": .808}},
    {"method": "dmad", "metric": "image_auroc",
     "source": "DMAD default-config rerun (FlappyPeggy/DMAD issue #6), not the paper's table (it gives means only)",
     "values": {
        "carpet": .969, "grid": .968, "leather": 1.0, "tile": .988, "wood": .996, "bottle": 1.0, "cable": .978,
        "capsule": .965, "hazelnut": 1.0, "metal_nut": .999, "pill": .961, "screw": .935, "toothbrush": 1.0,
        "transistor": .989, "zipper": .987}},
    {"method": "aand", "metric": "image_auroc",
     "source": "AAND repository logs, ViT variant (not the paper's WRN-50-2), best test epoch", "values": {
        "carpet": 1.0, "grid": .993, "leather": 1.0, "tile": 1.0, "wood": .981, "bottle": 1.0, "cable": .937,
        "capsule": .951, "hazelnut": 1.0, "metal_nut": 1.0, "pill": .975, "screw": .863, "toothbrush": 1.0,
        "transistor": .885, "zipper": .979}},
    {"method": "aand", "metric": "pixel_auroc", "source": "as above", "values": {
        "carpet": .994, "grid": .975, "leather": .994, "tile": .978, "wood": .968, "bottle": .972, "cable": .961,
        "capsule": .973, "hazelnut": .990, "metal_nut": .921, "pill": .984, "screw": .982, "toothbrush": .975,
        "transistor": .883, "zipper": .986}},
]


def dataset_label(res: dict) -> str:
    """``mvtec``, ``textures``, or a folder's name: what a results dict was measured on."""
    params = res.get("params") or {}
    ds = str(params.get("dataset", res.get("dataset", "?")))
    return Path(ds).name if "/" in ds else ds


def is_mvtec(res: dict) -> bool:
    return dataset_label(res) == "mvtec"


def groups(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Results by (dataset, parameter set), in the order first met."""
    out: dict[tuple[str, str], list[dict]] = {}
    for res in results:
        out.setdefault((dataset_label(res), res.get("params_name") or "default"), []).append(res)
    return out


def coverage(results: list[dict], dataset: str) -> tuple[int, int]:
    """(categories with a result, categories of the dataset): "2 of 15" for two MVTec AD categories."""
    found = {r["category"] for r in results}
    total = BENCHMARK_CATEGORIES.get(dataset)
    if total is None:
        roots = {str((r.get("params") or {}).get("dataset")) for r in results}
        try:
            from ..data import list_categories

            total = max(len(list_categories(root)) for root in roots)
        except (ValueError, OSError):
            total = len(found)
    return len(found), max(total, len(found))


def _text(mean, std, n) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.3f}" if n < 2 or pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def category_table(results: list[dict], metrics=METRICS, published: bool | None = None) -> pd.DataFrame:
    """One group's table: categories down (then ``mean``, and for MVTec AD ``textures`` and ``objects`` means), one
    column per (method, metric), cells ``mean`` or ``mean ± sd`` over seeds; a ``(paper)`` column follows a method's
    metric wherever :data:`PUBLISHED` has it (MVTec AD only, unless ``published`` says otherwise).

    Every mean row averages each seed over the categories first (so a method missing a category shows ``—`` there
    and its mean covers only what it ran: read it with :func:`coverage`).
    """
    from ..runs.collect import results_over_seeds

    if not results:
        return pd.DataFrame()
    mvtec = all(is_mvtec(r) for r in results) if published is None else published
    table = results_over_seeds(results, metrics)
    splits = {}  # MVTec AD's textures and objects means: the "mean" row of each half's own table
    if mvtec:
        splits = {f"{name} mean": results_over_seeds([r for r in results if r["category"] in cats], metrics)
                  for name, cats in (("textures", MVTEC_TEXTURES), ("objects", MVTEC_OBJECTS))}
    methods = list(dict.fromkeys(table.index.get_level_values("method")))
    methods = [m for m in methods if m not in BASELINES] + [m for m in BASELINES if m in methods]  # references last
    categories = [c for c in dict.fromkeys(table.index.get_level_values("category")) if c != "mean"]
    if mvtec:
        categories = sorted(categories, key=lambda c: (c not in MVTEC_TEXTURES, c))
    index = [*categories, "mean", *splits]
    out = {}
    for m in methods:
        for metric in metrics:
            col = []
            for c in index:
                source, cat = (splits[c], "mean") if c in splits else (table, c)
                if (m, cat) in source.index:
                    row = source.loc[(m, cat)]
                    col.append(_text(row[metric], row[f"{metric}_std"], row["n_seeds"]))
                else:
                    col.append("—")
            out[(m, SHORT[metric])] = col
            pub = [p for p in PUBLISHED if p["method"] == m and p["metric"] == metric]
            if mvtec and pub:
                vals = pub[0]["values"]
                texts = [f"{vals[c]:.3f}" if c in vals else "—" for c in categories]
                texts.append(f"{sum(vals.values()) / len(vals):.3f}")
                texts += [f"{sum(vals[c] for c in cats) / len(cats):.3f}" for cats in (MVTEC_TEXTURES, MVTEC_OBJECTS)]
                out[(m, f"{SHORT[metric]} (paper)")] = texts
    frame = pd.DataFrame(out, index=pd.Index(index, name="category"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["method", "metric"])
    return frame


def published_notes(methods) -> list[str]:
    """What each ``(paper)`` column measures, for the methods shown."""
    return [f"{p['method']} {SHORT[p['metric']]} (paper): {p['source']}" for p in PUBLISHED if p["method"] in methods]
