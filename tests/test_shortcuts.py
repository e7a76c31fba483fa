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


def code(value):
    return {"code_protocol": {"image_auroc_code": value, "image_auroc_code_combined": value, "code_weight": 0.05}}


def test_dmad_rows_measure_the_codes_protocol_at_the_last_and_the_best_evaluation():
    c = curve((0.7, 0.9), (0.95, 0.9), (0.8, 0.9))
    for point, value in zip(c, (0.75, 0.97, 0.86)):
        point.update(code(value))
    r = result("dmad", test_curve=c, **code(0.86))
    rows = shortcuts.dmad_rows([r, result("knn")])
    assert [(x["honest"], x["shortcut_value"], x["epoch"]) for x in rows] == [(0.80, 0.86, None), (0.80, 0.97, 2)]
    # a result measured before code_protocol existed gives no row (no guess from the training-set min-max score)
    assert shortcuts.dmad_rows([result("dmad")]) == []
    assert not hasattr(shortcuts, "DMAD_EVAL_SHARE") and not hasattr(shortcuts, "AAND_EVAL_SHARE")  # dead, gone


def test_dmad_code_protocol_normalises_on_the_test_set_and_takes_the_better_of_two():
    import numpy as np

    from adcore.models import dmad

    labels = np.array([0, 0, 0, 1, 1, 1])
    # the map alone ranks one anomaly below a good image; the deformation term, scaled to [0, 1] on this set, fixes it
    terms = np.array([[1.0, 0.0], [2.0, 0.1], [3.0, 0.0], [2.5, 10.0], [4.0, 5.0], [5.0, 6.0]])
    out = dmad.code_protocol_auroc(labels, terms, weight=0.2)
    assert out["map"] == pytest.approx(8 / 9)
    # normalised: map (0, .25, .5, .375, .75, 1) + 0.2 · deformation (0, .002, 0, .2, .1, .12): 2.5 → .575 > .5
    assert out["combined"] == pytest.approx(1.0) and out["reported"] == pytest.approx(1.0)
    assert dmad.DMAD.code_protocol(labels, terms, "carpet")["code_weight"] == 0.2
    assert dmad.DMAD.code_protocol(labels, terms, "brick")["code_weight"] == 0.05
    # with w = 0.05: .375 + .01 = .385 < .5, so the combined score keeps the error and the map alone is reported
    low = dmad.code_protocol_auroc(labels, terms, weight=0.05)
    assert low["combined"] == pytest.approx(8 / 9) and low["reported"] == pytest.approx(8 / 9)


def test_aand_keeps_the_best_sum_epoch_up_to_its_early_stop():
    r = result("aand", image_auroc=0.90, pixel_auroc=0.91,
               test_curve=curve((0.95, 0.99), (0.9995, 0.90), (0.97, 0.99), (0.90, 0.91)))
    rows = shortcuts.aand_rows([r])
    # stops after epoch 2 (I > 0.999); of epochs 1-2 the best I + P is epoch 1 (1.94 > 1.8995), not the stop epoch
    assert {x["metric"]: (x["shortcut_value"], x["epoch"]) for x in rows} == \
        {"image AUROC": (0.95, 1), "pixel AUROC": (0.99, 1)}
    assert all(x["honest"] == (0.90 if x["metric"] == "image AUROC" else 0.91) for x in rows)
    # never past 0.999: every measured epoch is a candidate (epoch 3: I + P = 1.96)
    never = shortcuts.aand_rows([result("aand", test_curve=curve((0.95, 0.99), (0.9, 0.9), (0.97, 0.99)))])
    assert {x["metric"]: (x["shortcut_value"], x["epoch"]) for x in never} == \
        {"image AUROC": (0.97, 3), "pixel AUROC": (0.99, 3)}


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
