"""Each model's recipes are the one source of its settings: notebooks and paper.yaml files must repeat them exactly."""
from pathlib import Path

import pytest
import yaml

import adcore
from adcore.runs.params import parse_parameters
from adcore.recipes import TRAINING_KEYS, Recipe, recipes_of
from adcore.registry import model_class

ROOT = Path(__file__).resolve().parents[1]
# The model each paper notebook trains first (its "main" run); ablation variants are built from the same recipe.
NOTEBOOK_MODEL = {"vt_adl": "vt_adl", "advit": "advit", "anovit": "anovit", "dmad": "dmad", "aand": "aand"}


def _epoch_keys(recipe: Recipe) -> set[str]:
    if isinstance(recipe.num_epochs, dict):
        return {f"{stage}_epochs" for stage in recipe.num_epochs}
    return {"num_epochs"}


def _compare(values: dict, recipe: Recipe, where: str) -> set[str]:
    """Assert that every key ``values`` shares with the recipe agrees; return the keys checked."""
    flat = recipe.flat()
    shared = set(values) & set(flat)
    wrong = {k: (values[k], flat[k]) for k in shared if values[k] != flat[k]
             and not (isinstance(flat[k], tuple) and list(flat[k]) == values[k])}
    assert not wrong, f"{where} disagrees with the recipe (value there, recipe value): {wrong}"
    required = (set(TRAINING_KEYS) - {"num_epochs"}) | _epoch_keys(recipe)
    if recipe.resample != "bilinear":  # the loaders' default: a recipe that differs must say so where it is run
        required.add("resample")
    missing = required - set(values)
    assert not missing, f"{where} does not state the recipe's training settings {sorted(missing)}"
    return shared


def test_every_registered_model_declares_a_default_recipe():
    names = adcore.list_models()
    lacking = [n for n in names if "default" not in recipes_of(model_class(n))]
    assert not lacking, f"models without a default recipe: {lacking}"


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_MODEL))
def test_notebook_parameters_repeat_the_default_recipe(notebook):
    from adcore.runs.experiment import resolve_image_size

    recipe = adcore.get_recipe(NOTEBOOK_MODEL[notebook], "default")
    values = parse_parameters(ROOT / "notebooks" / f"{notebook}.ipynb")
    # image_size = None is "the model's": the size the notebook's run_experiment cell resolves it to is compared
    assert values["image_size"] is None, f"{notebook}.ipynb should leave image_size to the model's recipe"
    values["image_size"] = resolve_image_size(NOTEBOOK_MODEL[notebook], values["image_size"])
    checked = _compare(values, recipe, f"{notebook}.ipynb")
    assert checked >= set(TRAINING_KEYS) - {"num_epochs"}


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_MODEL))
def test_paper_yaml_repeats_the_paper_recipe(notebook):
    recipe = adcore.get_recipe(NOTEBOOK_MODEL[notebook], "paper")
    path = ROOT / "notebooks" / "params" / notebook / "paper.yaml"
    values = yaml.safe_load(path.read_text())
    _compare(values, recipe, str(path.relative_to(ROOT)))
    # Every model parameter the paper recipe sets must reach the notebook through paper.yaml.
    missing = set(recipe.model_params) - set(values)
    assert not missing, f"{path.name} leaves out the paper recipe's model parameters {sorted(missing)}"


def test_compare_catches_a_drifted_value():
    recipe = Recipe(num_epochs={"a": 2, "b": 3}, lr=0.1, batch_size=4, image_size=32, model_params={"width": 8})
    good = {"a_epochs": 2, "b_epochs": 3, "lr": 0.1, "batch_size": 4, "image_size": 32, "width": 8}
    assert _compare(good, recipe, "x") == set(good)
    bicubic = Recipe(num_epochs=1, lr=0.1, batch_size=4, image_size=32, resample="bicubic")
    with pytest.raises(AssertionError, match="resample"):
        _compare({"num_epochs": 1, "lr": 0.1, "batch_size": 4, "image_size": 32}, bicubic, "x")
    with pytest.raises(AssertionError, match="width"):
        _compare({**good, "width": 16}, recipe, "x")
    with pytest.raises(AssertionError, match="b_epochs"):
        _compare({k: v for k, v in good.items() if k != "b_epochs"}, recipe, "x")


def test_recipe_refuses_bad_values_and_unknown_recipes():
    with pytest.raises(ValueError, match="num_epochs"):
        Recipe(num_epochs=-1, lr=0.1, batch_size=4, image_size=32)
    with pytest.raises(ValueError, match="resample"):
        Recipe(num_epochs=1, lr=0.1, batch_size=4, image_size=32, resample="nearest")
    with pytest.raises(ValueError, match="training keys"):
        Recipe(num_epochs=1, lr=0.1, batch_size=4, image_size=32, model_params={"lr": 1})
    with pytest.raises(ValueError, match="no 'nightly' recipe"):
        adcore.get_recipe("knn", "nightly")
    with pytest.raises(ValueError, match="unknown model"):
        adcore.get_recipe("no_such_model")
