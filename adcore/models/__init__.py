"""Every registered model lives in one module here; importing this package runs their ``@register_model`` lines.

The paper modules are written in parallel, so a module is imported only if its file exists; an error raised inside
an existing module is never swallowed.
"""
from __future__ import annotations

import importlib
from pathlib import Path

#: The kNN baseline and the centre-prior reference first, then the five papers in the book's order.
MODEL_MODULES = ("knn", "center_prior", "vt_adl", "advit", "anovit", "dmad", "aand")

for _name in MODEL_MODULES:
    if (Path(__file__).parent / f"{_name}.py").is_file():
        importlib.import_module(f"{__name__}.{_name}")
