"""A timm-style model registry: ``@register_model("name")`` on a class, ``create_model(name, **params)``."""
from __future__ import annotations

import importlib
import inspect

_MODELS: dict[str, type] = {}


def register_model(name: str):
    def wrap(cls):
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name].__module__}")
        _MODELS[name] = cls
        cls.model_name = name
        return cls

    return wrap


def _load_all() -> None:
    # adcore.models imports every paper module so that their decorators run.
    importlib.import_module("adcore.models")


def list_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def model_class(name: str) -> type:
    """The class registered as ``name``.

    Raises:
        ValueError: unknown name.
    """
    _load_all()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(name: str, **params):
    """Instantiate the model registered as ``name`` with keyword ``params``.

    Raises:
        ValueError: unknown name, or a parameter the model's constructor does not take.
    """
    _load_all()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
    cls = _MODELS[name]
    sig = inspect.signature(cls.__init__)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in params if k not in sig.parameters or k == "self"]
    if unknown and not takes_kwargs:
        known = [k for k in sig.parameters if k != "self"]
        raise ValueError(f"model {name!r} got unknown parameter(s) {unknown}; it takes {known}")
    model = cls(**params)
    model.model_params = dict(params)
    return model


def get_recipe(name: str, which: str = "default"):
    """The :class:`adcore.recipes.Recipe` ``which`` (``"default"`` or ``"paper"``) of the model registered as ``name``.

    Raises:
        ValueError: unknown model, or a recipe the model does not declare.
    """
    from .recipes import recipes_of

    recipes = recipes_of(model_class(name))
    if which not in recipes:
        have = ", ".join(sorted(recipes)) or "none"
        raise ValueError(f"model {name!r} has no {which!r} recipe (it declares: {have})")
    return recipes[which]
