"""What each paper's evaluation shortcuts are worth: the honest number beside the one its own protocol would report.

Every function reads results dicts (``evaluate``'s JSON, with ``test_curve`` where ``run_experiment`` measured one)
and returns rows ``{paper, shortcut, category, honest, shortcut_value}``. The shortcuts, from each paper's code
(``methods.md`` in the project's reference notes):

* DMAD (``test.py: evaluation``) returns the better of two image scores on the test set,
  ``max(AUROC(map + w·deformation), AUROC(map))``, and its training loop evaluates on the test set every 10 of its
  400 epochs, so the reported number can be the best of those evaluations.
* AAND (``train.py``) keeps the Stage-II epoch with the best test I-AUROC + P-AUROC, and stops as soon as the test
  I-AUROC passes 0.999.
* VT-ADL (``test.py``) reports a pixel ROC-AUC under the name "PRO", and its image score adds SSIM where it meant
  1 − SSIM (the VT-ADL notebook scores its trained models both ways, as ``<run>-score-code`` and
  ``<run>-score-paper`` results).
* Everyone who prints an F1 (anomalib's ``F1Max``, AAND's best-F1 threshold) picks the threshold on the test set.

The honest number is always the fixed last epoch with the project's one protocol. The test curves behind the
epoch shortcuts were *measured* after each epoch; nothing in this project is chosen from them.
"""
from __future__ import annotations

# Epochs between the papers' test evaluations, in their own schedules: DMAD every 10 of 400, AAND every 5 of 120.
# At a shorter budget the same share of the schedule is less than one epoch, so every measured epoch is a candidate.
DMAD_EVAL_SHARE = 10 / 400
AAND_EVAL_SHARE = 5 / 120
AAND_EARLY_STOP = 0.999


def _row(paper, shortcut, result, honest, value, metric) -> dict:
    return {"paper": paper, "shortcut": shortcut, "metric": metric, "method": result.get("run_name", result["model"]),
            "category": result["category"], "honest": honest, "shortcut_value": value}


def f1_threshold_rows(results) -> list[dict]:
    """F1 at the oracle threshold (chosen on the test set) against F1 at the largest normal training score."""
    return [_row("every method", "F1 at the best threshold on the test set", r, r["f1_train_threshold"],
                 r["f1_max_oracle"], "image F1")
            for r in results if r.get("f1_train_threshold") is not None and r.get("f1_max_oracle") is not None]


def dmad_rows(results) -> list[dict]:
    """DMAD: the better of its two image scores, and the best of its test evaluations."""
    rows = []
    for r in results:
        if r["model"] != "dmad":
            continue
        both = [v for v in (r["image_auroc"], r.get("image_auroc_map_max")) if v is not None]
        rows.append(_row("DMAD", "better of two image scores, chosen on the test set", r, r["image_auroc"],
                         max(both), "image AUROC"))
        curve = r.get("test_curve") or []
        if curve:
            best = max([c["image_auroc"] for c in curve] + [r["image_auroc"]])
            rows.append(_row("DMAD", "best of its test evaluations during training", r, r["image_auroc"], best,
                             "image AUROC"))
    return rows


def aand_rows(results, early_stop: float = AAND_EARLY_STOP) -> list[dict]:
    """AAND: the Stage-II epoch with the best test I+P AUROC, and early stop on the test I-AUROC."""
    rows = []
    for r in results:
        curve = r.get("test_curve") or []
        if r["model"] != "aand" or not curve:
            continue
        best = max(curve, key=lambda c: c["image_auroc"] + (c["pixel_auroc"] or 0.0))
        for metric in ("image_auroc", "pixel_auroc"):
            label = "image AUROC" if metric == "image_auroc" else "pixel AUROC"
            rows.append(_row("AAND", "epoch with the best test I-AUROC + P-AUROC", r, r[metric], best[metric], label))
        stopped = next((c for c in curve if c["image_auroc"] > early_stop), None)
        if stopped is not None:
            rows.append(_row("AAND", f"stop once the test I-AUROC passes {early_stop} (epoch {stopped['epoch']})", r,
                             r["image_auroc"], stopped["image_auroc"], "image AUROC"))
    return rows


def vtadl_rows(results) -> list[dict]:
    """VT-ADL: its "PRO" (a pixel ROC-AUC) against the MVTec AUPRO."""
    return [_row("VT-ADL", "pixel ROC-AUC reported as \"PRO\"", r, r["aupro"], r["vtadl_pro"], "PRO")
            for r in results if r["model"] == "vt_adl" and r.get("aupro") is not None
            and r.get("vtadl_pro") is not None]


def vtadl_score_rows(variants) -> list[dict]:
    """VT-ADL's image score as its code computes it (+SSIM) against the same score with the sign fixed (+1 − SSIM).

    Args:
        variants: results that include the ``<run>-score-code`` and ``<run>-score-paper`` evaluations of the same
            trained models (paired by run key, when present, and category).
    """
    by_key = {}
    for r in variants:
        name = r.get("run_name", "")
        for kind in ("code", "paper"):
            if r["model"] == "vt_adl" and name.endswith(f"-score-{kind}"):
                by_key.setdefault((r.get("run_key"), r["category"], name[: -len(f"-score-{kind}")]), {})[kind] = r
    rows = []
    for (_, _, run), pair in sorted(by_key.items(), key=str):
        if set(pair) == {"code", "paper"}:
            row = _row("VT-ADL", "image score with the code's SSIM sign (MSE + SSIM + max NLL)", pair["code"],
                       pair["paper"]["image_auroc"], pair["code"]["image_auroc"], "image AUROC")
            rows.append({**row, "method": run})
    return rows


def shortcut_rows(results, variants=()) -> list[dict]:
    """Every shortcut row, paper by paper: ``results`` are the runs' main results, ``variants`` any further
    evaluations (VT-ADL's two image scores)."""
    results = list(results)
    return (dmad_rows(results) + aand_rows(results) + vtadl_rows(results) + vtadl_score_rows(variants)
            + f1_threshold_rows(results))


def shortcut_table(results, variants=()):
    """A pandas DataFrame of :func:`shortcut_rows` averaged over categories, with the gain each shortcut buys."""
    import pandas as pd

    rows = shortcut_rows(results, variants)
    if not rows:
        return pd.DataFrame(columns=["paper", "shortcut", "method", "metric", "categories", "honest",
                                     "shortcut_value", "gain"])
    df = pd.DataFrame(rows)
    keys = ["paper", "shortcut", "method", "metric"]
    # the early-stop label names its epoch, which differs per category: group on the shortcut's kind
    df["shortcut"] = df["shortcut"].str.replace(r" \(epoch \d+\)$", "", regex=True)
    out = (df.groupby(keys, sort=False)
           .agg(categories=("category", "nunique"), honest=("honest", "mean"),
                shortcut_value=("shortcut_value", "mean"))
           .reset_index())
    out["gain"] = out["shortcut_value"] - out["honest"]
    return out
