"""adcore.book.shortcuts: each paper's test-set shortcut computed from results dicts, beside the honest number."""
import pytest

from adcore.book import shortcuts


def result(model, category="brick", **kw):
    base = {"model": model, "run_name": model, "category": category, "image_auroc": 0.80, "pixel_auroc": 0.90,
            "aupro": 0.60, "vtadl_pro": 0.90, "image_auroc_map_max": 0.85, "f1_max_oracle": 0.9,
            "f1_train_threshold": 0.7}
    return {**base, **kw}


def curve(*points):
    return [{"stage": "main", "epoch": e, "image_auroc": i, "pixel_auroc": p, "image_auroc_map_max": i, "aupro": 0.5}
            for e, (i, p) in enumerate(points, start=1)]


def test_dmad_takes_the_better_score_and_the_best_evaluation():
    r = result("dmad", test_curve=curve((0.7, 0.9), (0.95, 0.9), (0.8, 0.9)))
    rows = shortcuts.dmad_rows([r, result("knn")])
    assert [(x["honest"], x["shortcut_value"]) for x in rows] == [(0.80, 0.85), (0.80, 0.95)]
    # no gain when the combined score is already the better one
    assert shortcuts.dmad_rows([result("dmad", image_auroc_map_max=0.5)])[0]["shortcut_value"] == 0.80


def test_aand_best_epoch_and_early_stop():
    r = result("aand", image_auroc=0.90, pixel_auroc=0.91,
               test_curve=curve((0.95, 0.80), (0.9995, 0.90), (0.97, 0.95), (0.90, 0.91)))
    rows = shortcuts.aand_rows([r])
    best = {x["metric"]: x["shortcut_value"] for x in rows if x["shortcut"].startswith("epoch with")}
    assert best == {"image AUROC": 0.97, "pixel AUROC": 0.95}  # epoch 3: I + P = 1.92, the largest sum
    stop = [x for x in rows if x["shortcut"].startswith("stop once")]
    assert len(stop) == 1 and stop[0]["shortcut_value"] == 0.9995 and "epoch 2" in stop[0]["shortcut"]
    assert all(x["honest"] == (0.90 if x["metric"] == "image AUROC" else 0.91) for x in rows)
    # never past 0.999: no early-stop row
    assert not [x for x in shortcuts.aand_rows([result("aand", test_curve=curve((0.9, 0.9)))])
                if x["shortcut"].startswith("stop once")]


def test_vtadl_pro_and_f1_rows():
    rows = shortcuts.vtadl_rows([result("vt_adl"), result("aand")])
    assert [(x["honest"], x["shortcut_value"]) for x in rows] == [(0.60, 0.90)]
    f1 = shortcuts.f1_threshold_rows([result("knn"), result("dmad", f1_train_threshold=None)])
    assert [(x["method"], x["honest"], x["shortcut_value"]) for x in f1] == [("knn", 0.7, 0.9)]


def test_table_averages_over_categories_and_states_the_gain():
    results = [result("vt_adl", "brick", aupro=0.5, vtadl_pro=0.9), result("vt_adl", "grass", aupro=0.7,
                                                                           vtadl_pro=0.8)]
    table = shortcuts.shortcut_table(results)
    pro = table[table["paper"] == "VT-ADL"].iloc[0]
    assert pro["categories"] == 2 and pro["honest"] == pytest.approx(0.6)
    assert pro["shortcut_value"] == pytest.approx(0.85) and pro["gain"] == pytest.approx(0.25)
    assert shortcuts.shortcut_table([]).empty


def test_vtadl_score_rows_pair_the_two_scores_of_one_model():
    code = result("vt_adl", "brick", run_name="vt_adl-score-code", image_auroc=0.55, run_key="k")
    paper = result("vt_adl", "brick", run_name="vt_adl-score-paper", image_auroc=0.75, run_key="k")
    lone = result("vt_adl", "grass", run_name="vt_adl-score-code", image_auroc=0.5, run_key="k")
    rows = shortcuts.vtadl_score_rows([code, paper, lone, result("vt_adl")])
    assert [(x["category"], x["honest"], x["shortcut_value"], x["method"]) for x in rows] == \
        [("brick", 0.75, 0.55, "vt_adl")]
    assert len(shortcuts.shortcut_rows([], [code, paper])) == 1
