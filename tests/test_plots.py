"""adcore.plots: the figures every paper notebook draws, on small synthetic arrays (no model, no data on disk)."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from adcore import plots  # noqa: E402


def fake_arrays(n=8, size=32, seed=0):
    """One category: odd images anomalous with a square defect the map finds, scores rising with the index."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    masks = np.zeros((n, size, size), np.uint8)
    maps = rng.random((n, size, size)).astype(np.float32) * 0.1
    for i in np.flatnonzero(labels):
        masks[i, 8:16, 8:16] = 1
        maps[i, 8:16, 8:16] += 1.0
    return {"images": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), "maps": maps, "masks": masks,
            "labels": labels, "scores": maps.reshape(n, -1).max(1) + np.arange(n) * 1e-3,
            "paths": [f"/d/{i:03d}.png" for i in range(n)], "defects": ["hole" if l else "good" for l in labels]}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_loss_curves_one_panel_per_stage_and_a_line_per_category():
    hist = [{"stage": s, "epoch": e, "step": i, "loss": 1.0 / (i + 1)} for s in ("one", "two") for e in range(2)
            for i in range(3)]
    fig = plots.plot_loss_curves({"a": hist, "b": hist}, title="t")
    used = [ax for ax in fig.axes if ax.lines]
    assert len(used) == 2
    assert {ax.get_title() for ax in used} == {"loss · stage one", "loss · stage two"}
    # per category: the step curve and the epoch-mean dots
    assert len(used[0].lines) == 4
    assert fig._suptitle.get_text() == "t"


def test_loss_curves_accept_a_list_and_say_when_nothing_was_logged():
    fig = plots.plot_loss_curves([{"stage": "main", "epoch": 0, "step": 0, "loss": 2.0}])
    assert len([ax for ax in fig.axes if ax.lines]) == 1
    empty = plots.plot_loss_curves({"brick": []})
    assert "no training steps" in empty.axes[0].texts[0].get_text()
    with pytest.raises(ValueError, match="histories"):
        plots.plot_loss_curves("loss")


def test_compare_table_puts_paper_numbers_beside_ours_as_fractions():
    ours = pd.DataFrame({"image_auroc": [0.9, 0.8], "pixel_auroc": [0.95, 0.85]}, index=["a", "mean"])
    styler = plots.compare_table(ours, {"mean": {"pixel_auroc": 97.9, "aupro": 0.5}, "a": {"image_auroc": None}},
                                 "pixel AUROC at 256², test-selected epoch")
    df = styler.data
    assert list(df.index) == ["a", "mean"]
    assert df.loc["mean", ("pixel AUROC", "paper")] == pytest.approx(0.979)  # percent → fraction
    assert df.loc["mean", ("pixel AUROC", "ours")] == pytest.approx(0.85)
    assert np.isnan(df.loc["a", ("image AUROC", "paper")])
    assert np.isnan(df.loc["mean", ("AUPRO", "ours")]) and df.loc["mean", ("AUPRO", "paper")] == 0.5
    assert styler.caption == "pixel AUROC at 256², test-selected epoch"
    assert "0.979" in styler.to_html()


def test_compare_table_mean_only_dict_and_bad_input():
    ours = pd.DataFrame({"pixel_auroc": [0.7]}, index=["mean"])
    assert plots.compare_table(ours, {"pixel_auroc": 0.8}, "n").data.loc["mean", ("pixel AUROC", "paper")] == 0.8
    with pytest.raises(ValueError, match="protocol_note"):
        plots.compare_table(ours, {}, "  ")
    with pytest.raises(ValueError, match="DataFrame"):
        plots.compare_table({"pixel_auroc": 0.7}, {}, "n")
    with pytest.raises(ValueError, match="paper"):
        plots.compare_table(ours, [0.8], "n")


def test_rank_quality_best_is_the_top_scored_anomaly_and_the_lowest_scored_good_image():
    arr = fake_arrays()
    q = plots._rank_quality(arr)
    # scores rise with the index and every anomaly outscores every good image: the top-scored anomaly (7) and the
    # lowest-scored good image (0) are handled best, the lowest anomaly (1) and the highest good image (6) worst
    assert q[7] == q[0] == 1.0
    assert q[1] == q[6] == pytest.approx(q.min()) == pytest.approx(4 / 7)


def test_heatmaps_two_rows_per_category_and_input_checks():
    fig = plots.plot_heatmaps({"a": fake_arrays(), "b": fake_arrays(seed=1)}, n_best=2, n_worst=1)
    assert len(fig.axes) == 2 * 2 * 3
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert sum(t.startswith("best") for t in titles) == 4 and sum(t.startswith("worst") for t in titles) == 2
    single = plots.plot_heatmaps(fake_arrays(), n_best=1, n_worst=0)
    assert len(single.axes) == 2
    with pytest.raises(ValueError, match="lacks"):
        plots.plot_heatmaps({"a": {"images": np.zeros((1, 4, 4, 3))}})
    with pytest.raises(ValueError, match="n_best"):
        plots.plot_heatmaps(fake_arrays(), n_best=0, n_worst=0)
    bad = fake_arrays()
    bad["maps"] = bad["maps"][:3]
    with pytest.raises(ValueError, match=r"\['maps'\] has 3 entries"):
        plots.plot_heatmaps(bad)


def test_ablation_bars_per_variant_and_category():
    t1 = pd.DataFrame({"pixel_auroc": [0.9, 0.8, 0.85]}, index=["a", "b", "mean"])
    t2 = pd.DataFrame({"pixel_auroc": [0.7, 0.6]}, index=["a", "mean"])
    fig = plots.plot_ablation({"full": t1, "no noise": t2})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "mean"]
    assert len(ax.patches) == 6
    assert np.isnan(ax.patches[4].get_height())  # "no noise" has no category b
    with pytest.raises(ValueError, match="no column 'aupro'"):
        plots.plot_ablation({"full": t1}, metric="aupro")


def test_validation_curve_plots_categories_mean_and_both_epoch_marks():
    curve = {"model": "m", "chosen_epochs": 10, "mean_pixel_auroc": {5: 0.7, 10: 0.8},
             "curves": {"a": {5: {"pixel_auroc": 0.6}, 10: {"pixel_auroc": 0.9}},
                        "b": {5: {"pixel_auroc": 0.8}, 10: {"pixel_auroc": 0.7}}}}
    ax = plots.plot_validation_curve(curve, used_epochs=5).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["mean"].get_ydata()) == [0.7, 0.8]
    assert list(lines["a"].get_xdata()) == [5, 10]
    assert list(lines["best on validation (10)"].get_xdata()) == [10, 10]
    assert list(lines["this run (5)"].get_xdata()) == [5, 5]
    assert "this run (10)" not in {line.get_label() for line in
                                   plots.plot_validation_curve(curve, used_epochs=10).axes[0].get_lines()}
    with pytest.raises(ValueError, match="validation curve"):
        plots.plot_validation_curve({"curves": {}})


def test_benchmark_plot_one_panel_per_kernel():
    bench = pd.DataFrame({"kernel": ["attn", "attn", "mdn"], "shape": ["64", "256", "1k"], "mode": ["fwd"] * 3,
                          "dtype": ["fp16"] * 3, "median_ms": [1.0, 2.0, 3.0], "speedup": [2.0, 3.0, 1.5],
                          "gpu": ["H100"] * 3, "commit": ["abc"] * 3})
    fig = plots.plot_benchmark(bench)
    assert [ax.get_title() for ax in fig.axes] == ["attn", "mdn"]
    assert [p.get_height() for p in fig.axes[0].patches] == [2.0, 3.0]
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_benchmark(pd.DataFrame())


def test_image_helpers():
    maps = np.array([[[1.0, 3.0]], [[5.0, 5.0]]])
    norm = plots.normalise_maps(maps)
    assert norm.min() == 0 and norm.max() == 1 and norm[0, 0, 1] == pytest.approx(0.5)
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 1
    out = plots.draw_contour(image, mask, (255, 0, 0))
    assert (out[2, 2] == [255, 0, 0]).all() and (out[3, 3] == 0).all() and (out[0, 0] == 0).all()
    # a mask at another resolution is resized to the image
    small = np.zeros((4, 4), np.uint8)
    small[1:3, 1:3] = 1
    assert (plots.draw_contour(image, small)[2, 2] == 255).all()
    ov = plots.overlay(image, np.ones((4, 4)))
    assert ov.shape == (8, 8, 3) and ov[..., 0].max() > 0  # jet's top colour is red


def test_plot_shortcuts_draws_one_line_per_shortcut():
    from adcore.book import shortcuts

    results = [{"model": "vt_adl", "run_name": "vt_adl", "category": c, "aupro": 0.5, "vtadl_pro": 0.8,
                "image_auroc": 0.7, "f1_max_oracle": 0.9, "f1_train_threshold": 0.6} for c in ("brick", "grass")]
    table = shortcuts.shortcut_table(results)
    fig = plots.plot_shortcuts(table)
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == len(table) == 2
    assert len([c for c in ax.get_children() if type(c).__name__ == "Annotation"]) == 2
    with pytest.raises(ValueError, match="no shortcut rows"):
        plots.plot_shortcuts(table.iloc[:0])
    with pytest.raises(ValueError, match="columns"):
        plots.plot_shortcuts(results)
