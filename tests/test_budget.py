"""The training-budget grid and chapter: the x<k> parameter files multiply exactly the notebooks' epochs, the grid
reuses the book's own runs as ×1, and the chapter's tables (curves, spread over seeds, extra seeds for the
comparison) and figure are computed right from results files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pytest

from adcore import plots
from adcore.book import budget
from adcore.runs import collect, plan
from adcore.runs.params import parse_parameters

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
ABLATION_SWITCH = {"aand": "run_ablation", "dmad": "run_ablation", "advit": "ablations", "anovit": "ablations",
                   "vt_adl": "ablations"}


@pytest.mark.parametrize("name", sorted(budget.EPOCH_PARAMETERS))
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_budget_files_multiply_exactly_the_notebooks_epochs(name, k):
    import yaml

    defaults = parse_parameters(NOTEBOOKS / f"{name}.ipynb")
    params = yaml.safe_load((NOTEBOOKS / "params" / name / f"x{k}.yaml").read_text())
    for p in budget.EPOCH_PARAMETERS[name]:
        assert params[p] == k * defaults[p], (name, k, p)
    # nothing but the epochs changes, and the ablations (not shown by the chapter) are off
    assert set(params) == {*budget.EPOCH_PARAMETERS[name], ABLATION_SWITCH[name]}
    assert params[ABLATION_SWITCH[name]] is False


def test_every_trained_notebook_is_in_the_budget_chapter_and_its_grid():
    # the baselines notebook (PatchCore, the centre prior) trains nothing, so it has no budget
    trained = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb") if p.stem != "baselines")
    assert sorted(budget.EPOCH_PARAMETERS) == trained
    assert all(sorted(g["notebooks"]) == trained for g in plan.load_grid(plan.BUDGET_GRID))


def test_budget_grid_plans_every_budget_and_reuses_the_books_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    runs = plan.plan_grids(plan.load_grid(plan.BUDGET_GRID), runs_dir=tmp_path, check_data=False)
    by_name = {}
    for r in runs:
        by_name.setdefault(r.name, []).append((budget.multiple(r.params_name), r.params.get("seed")))
    for name in budget.EPOCH_PARAMETERS:
        assert sorted(by_name[name], key=str) == sorted([(1, None), (2, None), (4, None), (8, None), (1, 1), (1, 2)],
                                                       key=str)
    book = plan.plan_grids(plan.load_grid(plan.DEFAULT_GRID), runs_dir=tmp_path, check_data=False)
    trained = {r.key for r in book if r.name != "baselines"}  # the baselines train nothing: no budget
    assert trained and trained <= {r.key for r in runs}  # x1 at the notebooks' seed is the book's own run


def test_multiple_reads_the_parameter_file_name():
    assert budget.multiple("default") == 1
    assert budget.multiple("x8") == 8
    assert budget.multiple("smoke") is None and budget.multiple("paper") is None and budget.multiple("x") is None


def fake_run(runs_dir: Path, name: str, params_name: str, seed: int, values: dict, status="ok") -> dict:
    """A finished run folder with one results file per category: values = {category: (image, pixel, aupro)}."""
    key = f"{name}-{params_name}-s{seed}"
    run_dir = runs_dir / name / key
    (run_dir / "results").mkdir(parents=True)
    k = budget.multiple(params_name) or 1
    for category, (img, px, pro) in values.items():
        res = {"run_name": name, "category": category, "seed": seed, "dataset": "textures", "image_size": 128,
               "image_auroc": img, "pixel_auroc": px, "aupro": pro, "fit_seconds": 10.0 * k,
               "params": {"num_epochs": {"amplify": 4 * k, "distill": 8 * k}, "seed": seed, "data_root": None}}
        (run_dir / "results" / f"{name}-{category}.json").write_text(json.dumps(res))
    return {"key": key, "name": name, "params_name": params_name, "params": {"seed": seed}, "status": status,
            "run_dir": str(run_dir)}


@pytest.fixture
def manifests(tmp_path):
    book_runs = [fake_run(tmp_path, "aand", "default", 0, {"brick": (0.8, 0.9, 0.6), "grass": (0.6, 0.7, 0.4)})]
    planned = [
        book_runs[0],  # the grid lists the book's own run too
        fake_run(tmp_path, "aand", "x2", 0, {"brick": (0.9, 0.9, 0.7), "grass": (0.7, 0.8, 0.5)}),
        fake_run(tmp_path, "aand", "x4", 0, {"brick": (0.95, 0.9, 0.7)}),  # one category only: not a curve point
        fake_run(tmp_path, "aand", "x1", 1, {"brick": (0.6, 0.9, 0.6), "grass": (0.6, 0.7, 0.4)}),
        fake_run(tmp_path, "aand", "x1", 2, {"brick": (0.7, 0.9, 0.6), "grass": (0.5, 0.7, 0.4)}, status="missing"),
        fake_run(tmp_path, "aand", "smoke", 0, {"brick": (0.1, 0.1, 0.1)}),  # no budget: left out
    ]
    return book_runs, planned


def test_budget_results_curves_and_spread(manifests):
    book_runs, planned = manifests
    table = budget.budget_results(book_runs, planned)
    assert sorted(table["run_key"].unique()) == ["aand-default-s0", "aand-x1-s1", "aand-x2-s0", "aand-x4-s0"]
    assert set(table.loc[table["budget"] == 2, "epochs"]) == {"8 + 16"}
    curves = budget.curves(table)
    assert curves["budget"].tolist() == [1, 2]  # x4 lacks a category; seed 1 is not the notebook's seed
    assert curves.loc[curves["budget"] == 2, "image_auroc"].item() == pytest.approx(0.8)
    assert curves.loc[curves["budget"] == 1, "fit_seconds"].item() == pytest.approx(20.0)
    spread = budget.seed_spread(table).set_index("method")
    assert spread.loc["aand", "n_seeds"] == 2  # seed 2 did not finish
    assert spread.loc["aand", "image_auroc_mean"] == pytest.approx((0.7 + 0.6) / 2)
    assert spread.loc["aand", "image_auroc_std"] == pytest.approx(math.sqrt(2) * 0.05)
    assert [r["key"] for r in budget.missing_runs(planned)] == ["aand-x1-s2"]


def test_extra_seeds_feed_the_comparisons_mean_and_spread(manifests):
    book_runs, planned = manifests
    results = collect.collect_results(book_runs)
    extra = budget.extra_seeds(results, planned)
    assert {(r["seed"], r["method"]) for r in extra} == {(1, "aand")}  # not seed 0 twice, not the unfinished seed 2
    table = collect.results_over_seeds(results + extra)
    assert table.loc[("aand", "brick"), "image_auroc"] == pytest.approx(0.7)
    assert table.loc[("aand", "brick"), "image_auroc_std"] == pytest.approx(math.sqrt(2) * 0.1)
    assert table.loc[("aand", "mean"), "image_auroc"] == pytest.approx(0.65)  # (0.7 + 0.6) / 2 per seed, then mean
    assert table.loc[("aand", "mean"), "n_seeds"] == 2
    with pytest.raises(ValueError, match="same method, category and seed"):
        collect.results_over_seeds(results + results)


def test_plot_budget_draws_every_metric_with_the_baseline(manifests):
    table = budget.budget_results(*manifests)
    fig = plots.plot_budget(budget.curves(table), baseline={"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.6},
                            spread=budget.seed_spread(table))
    assert len(fig.axes) == 3
    for ax, value in zip(fig.axes, (0.9, 0.8, 0.6)):
        assert any(list(line.get_ydata()) == [value, value] for line in ax.get_lines())  # the dashed baseline
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["×1", "×2"]
    with pytest.raises(ValueError, match="no finished budget"):
        plots.plot_budget(budget.curves(table).iloc[:0])


def test_paper_epochs_come_from_the_paper_recipes():
    import adcore

    assert budget.paper_epochs("aand") == "100 + 120"  # AAND train.py: Stage I 100, Stage II 120
    assert budget.paper_epochs("dmad") == str(adcore.get_recipe("dmad", "paper").num_epochs)
    assert budget.paper_epochs("no_such_model") == "—"
