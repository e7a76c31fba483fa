"""Training recipes: the one place a model's settings live, beside the model that uses them.

Each registered model class carries ``recipes = {"default": Recipe(...), "paper": Recipe(...)}``:

* ``"default"`` is what the notebooks run on a CPU (their ``parameters`` cells repeat it, for papermill);
* ``"paper"`` is the paper's or its code's own setting (``notebooks/params/<nb>/paper.yaml`` repeats it).

``tests/test_recipes.py`` checks both copies against this one source, key by key, so they cannot drift apart.
``adcore.fit(model, data)`` with no training arguments trains with ``model.recipes["default"]``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

#: The keys of a recipe that drive ``fit`` and the data loader rather than the model's constructor.
TRAINING_KEYS = ("num_epochs", "lr", "batch_size", "image_size")


@dataclass(frozen=True)
class Recipe:
    """How one model is trained.

    Attributes:
        num_epochs: epochs per stage: an int for every stage, or ``{stage: epochs}``.
        lr: learning rate passed to ``model.configure_optimizers`` (the schedule itself is a model parameter).
        batch_size: images per optimiser step.
        image_size: side of the square input in pixels.
        model_params: keyword arguments for ``create_model(name, **model_params)``.
        resample: how images are resized to ``image_size`` (``adcore.load_dataset``'s ``resample``).
        source: provenance: the paper or code file these values come from, or the rule that chose them without test
            data.
    """

    num_epochs: int | dict
    lr: float
    batch_size: int
    image_size: int
    model_params: dict = field(default_factory=dict)
    source: str = ""
    resample: str = "bilinear"

    def __post_init__(self):
        epochs = self.num_epochs.values() if isinstance(self.num_epochs, dict) else [self.num_epochs]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in epochs):
            raise ValueError(f"num_epochs must be a non-negative int or a {{stage: int}} dict, got {self.num_epochs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("batch_size", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.resample not in ("bilinear", "bicubic"):
            raise ValueError(f"resample must be 'bilinear' or 'bicubic', got {self.resample!r}")
        clash = set(self.model_params) & {*TRAINING_KEYS, "resample"}
        if clash:
            raise ValueError(f"model_params must not repeat the training keys {sorted(clash)}")

    def training_kwargs(self) -> dict:
        """The keyword arguments ``adcore.fit`` takes from a recipe."""
        return {"num_epochs": copy.deepcopy(self.num_epochs), "lr": self.lr, "batch_size": self.batch_size}

    def flat(self) -> dict:
        """Every setting under the name a notebook parameter or a ``paper.yaml`` key uses for it.

        A per-stage ``num_epochs={"amplify": 100, "distill": 120}`` also appears as ``amplify_epochs`` and
        ``distill_epochs``.
        """
        out = copy.deepcopy(self.model_params)
        out.update(num_epochs=copy.deepcopy(self.num_epochs), lr=self.lr, batch_size=self.batch_size,
                   image_size=self.image_size, resample=self.resample)
        if isinstance(self.num_epochs, dict):
            out.update({f"{stage}_epochs": n for stage, n in self.num_epochs.items()})
        return out


def recipes_of(model_or_class) -> dict[str, Recipe]:
    """The ``{which: Recipe}`` a model instance or class declares (empty if it declares none)."""
    recipes = getattr(model_or_class, "recipes", None) or {}
    bad = [k for k, v in recipes.items() if not isinstance(v, Recipe)]
    if bad:
        raise TypeError(f"{getattr(model_or_class, '__name__', type(model_or_class).__name__)}.recipes[{bad[0]!r}] "
                        "is not an adcore.recipes.Recipe")
    return dict(recipes)
