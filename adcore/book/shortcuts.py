"""What each paper's evaluation shortcuts are worth: the honest number beside the one its own protocol would report.

Every function reads results dicts (``evaluate``'s JSON, with ``test_curve`` where ``run_experiment`` measured one)
and returns rows ``{paper, shortcut, category, honest, shortcut_value, epoch}``. The shortcuts, from each paper's code
(``methods.md`` in the project's reference notes):

* DMAD (``test.py: evaluation``, ``Train_mvtec.py``) min-max normalises the map and deformation maxima over the
  *test set*, weights the deformation term per class (0.2 for screw, carpet and metal_nut, 0.05 for the others), and
  returns the better of two test AUROCs, ``max(AUROC(map' + w·deformation'), AUROC(map))``. Its training loop runs
  that evaluation every 10 of its 400 epochs, so the number it reports can be the best of those evaluations. The
  rows measure exactly that (``DMAD.code_protocol``, stored per result and per curve point as ``code_protocol``):
  the full protocol at the last epoch, then the best of it over the measured epochs.
* AAND (``train.py``, Stage II) evaluates on the test set every 5 epochs, keeps the epoch with the best test
  I-AUROC + P-AUROC, and stops training once the test I-AUROC passes 0.999. What it reports is the kept epoch, not
  the one it stopped at: the rows take the best I + P epoch among those up to the stop.
* VT-ADL (``test.py``) reports a pixel ROC-AUC under the name "PRO", and its image score adds SSIM where it meant
  1 − SSIM (the VT-ADL notebook scores its trained models both ways, as ``<run>-score-code`` and
  ``<run>-score-paper`` results).
* Everyone who prints an F1 (anomalib's ``F1Max``, AAND's best-F1 threshold) picks the threshold on the test set.

The honest number is always the fixed last epoch with the project's one protocol. The test curves behind the
epoch shortcuts were *measured* after each epoch; nothing in this project is chosen from them. At the book's short
budgets every measured epoch is a candidate (the papers' intervals, 10 of 400 and 5 of 120 epochs, are less than
one epoch there), so the epoch gains are the most those intervals could buy.
"""
from __future__ import annotations

AAND_EARLY_STOP = 0.999


def _row(paper, shortcut, result, honest, value, metric, epoch=None) -> dict:
    """One row; ``epoch`` is the epoch the shortcut picked (None: the last, the honest run's own)."""
    return {"paper": paper, "shortcut": shortcut, "metric": metric, "method": result.get("run_name", result["model"]),
            "category": result["category"], "honest": honest, "shortcut_value": value, "epoch": epoch}


def f1_threshold_rows(results) -> list[dict]:
    """F1 at the oracle threshold (chosen on the test set) against F1 at the largest normal training score."""
    return [_row("every method", "F1 at the best threshold on the test set", r, r["f1_train_threshold"],
                 r["f1_max_oracle"], "image F1")
            for r in results if r.get("f1_train_threshold") is not None and r.get("f1_max_oracle") is not None]


def dmad_rows(results) -> list[dict]:
    """DMAD: its code's image protocol (test-set min-max, class weight, better of two) at the last epoch, and the
    same protocol at the best of its test evaluations. Results without ``code_protocol`` give no row."""
    rows = []
    for r in results:
        if r["model"] != "dmad" or "code_protocol" not in r:
            continue
        last = r["code_protocol"]["image_auroc_code"]
        rows.append(_row("DMAD", "test-set min-max, class weight, better of two scores", r, r["image_auroc"], last,
                         "image AUROC"))
        curve = [c for c in r.get("test_curve") or [] if "code_protocol" in c]
        if curve:
            best = max(curve, key=lambda c: c["code_protocol"]["image_auroc_code"])  # first of equals
            value, epoch = best["code_protocol"]["image_auroc_code"], best["epoch"]
            if last > value:  # the last epoch is an evaluation too
                value, epoch = last, None
            rows.append(_row("DMAD", "the same, at the best of its test evaluations", r, r["image_auroc"], value,
                             "image AUROC", epoch))
    return rows


def aand_rows(results, early_stop: float = AAND_EARLY_STOP) -> list[dict]:
    """AAND: the Stage-II epoch with the best test I+P AUROC among the epochs up to its early stop (the first with a
    test I-AUROC above ``early_stop``; none: every measured epoch), for image and pixel AUROC."""
    rows = []
    for r in results:
        curve = r.get("test_curve") or []
        if r["model"] != "aand" or not curve:
            continue
        stop = next((i for i, c in enumerate(curve) if c["image_auroc"] > early_stop), len(curve) - 1)
        best = max(curve[:stop + 1], key=lambda c: c["image_auroc"] + (c["pixel_auroc"] or 0.0))  # first of equals
        for metric in ("image_auroc", "pixel_auroc"):
            label = "image AUROC" if metric == "image_auroc" else "pixel AUROC"
            rows.append(_row("AAND", f"best test I-AUROC + P-AUROC epoch, stopping once the test I-AUROC passes "
                                     f"{early_stop}", r, r[metric], best[metric], label, best["epoch"]))
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
    out = (df.groupby(keys, sort=False)
           .agg(categories=("category", "nunique"), honest=("honest", "mean"),
                shortcut_value=("shortcut_value", "mean"))
           .reset_index())
    out["gain"] = out["shortcut_value"] - out["honest"]
    return out
