"""adcore: five image anomaly-detection papers (VT-ADL, ADViT, AnoViT, DMAD, AAND) re-implemented on one core.

The public surface::

    ds = adcore.load_dataset("textures", "brick", "train", image_size=128)
    model = adcore.create_model("knn")
    adcore.fit(model, ds, num_epochs=0)
    result = adcore.evaluate(model, adcore.load_dataset("textures", "brick", "test", image_size=128))
"""
from __future__ import annotations

from . import metrics
from .artifact import load, save
from .data import list_categories, load_dataset
from .evaluation import evaluate
from .runs.experiment import ExperimentResult, run_experiment
from .recipes import Recipe
from .registry import create_model, get_recipe, list_models, register_model
from .training import NonFiniteLossError, fit
from .types import AnomalyModel, AnomalyOutput
from .utils import seed_everything

__version__ = "0.1.0"


def __getattr__(name):
    # The widget and plotting modules pull in ipywidgets and matplotlib: import them on first use only.
    if name in ("viewer", "plots", "ops", "backbones"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'adcore' has no attribute {name!r}")

__all__ = [
    "AnomalyModel", "AnomalyOutput", "ExperimentResult", "NonFiniteLossError", "Recipe", "create_model", "evaluate",
    "fit", "get_recipe",
    "list_categories", "list_models", "load", "load_dataset", "register_model", "run_experiment", "save",
    "seed_everything",
]
