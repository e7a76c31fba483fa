"""Parameter handling for papermill-parameterised notebooks.

A notebook's ``parameters`` cell holds flat literal assignments, one per line with a comment. papermill injects a
cell headed ``# Parameters`` after it. :func:`check_parameters` (called in the cell after that) parses both from the
kernel's input history and fails at the top, before any data is read or any model trained, when an injected name is
unknown or its type does not match the default's. The batch runner uses :func:`parse_parameters` and
:func:`validate_parameters` to reject a bad parameter file before it starts a kernel at all.
"""
from __future__ import annotations

import ast

INJECTED_HEADER = "# Parameters"  # papermill's header on the cell it injects


class ParameterError(ValueError):
    """A parameter file or injected parameter is unknown or of the wrong type."""


def _literal_assignments(source: str) -> dict | None:
    """``{name: value}`` if ``source`` is only literal assignments (comments allowed), else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    out = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            return None
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            return None
    return out if out else None


def parse_parameters(notebook_path) -> dict:
    """The default values of the cell tagged ``parameters`` in ``notebook_path``."""
    import nbformat

    nb = nbformat.read(str(notebook_path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            values = _literal_assignments(cell.source)
            if values is None:
                raise ParameterError(f"{notebook_path}: the 'parameters' cell must hold only literal assignments")
            return values
    raise ParameterError(f"{notebook_path} has no cell tagged 'parameters'")


def _type_ok(default, value) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def validate_parameters(defaults: dict, overrides: dict, source: str = "parameters") -> dict:
    """Check ``overrides`` against ``defaults`` and return the merged values.

    Raises:
        ParameterError: naming every unknown parameter (with the known ones) and every ill-typed one.
    """
    problems = []
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        problems.append(f"unknown parameter(s) {unknown}; this notebook takes {sorted(defaults)}")
    for name, value in overrides.items():
        if name in defaults and not _type_ok(defaults[name], value):
            if value is None:
                problems.append(f"{name} = None, but it needs a {type(defaults[name]).__name__} "
                                f"(default {defaults[name]!r})")
            else:
                problems.append(f"{name} = {value!r} is a {type(value).__name__}, expected "
                                f"{type(defaults[name]).__name__} like the default {defaults[name]!r}")
    if problems:
        raise ParameterError(f"bad {source}: " + "; ".join(problems))
    return {**defaults, **overrides}


def check_parameters(namespace: dict) -> dict:
    """Validate the parameters papermill injected into this kernel; return the final parameter values.

    Call it as ``params = adcore.runs.params.check_parameters(globals())`` in the cell right after the ``parameters``
    cell. Without papermill (an interactive session) it returns the defaults as they stand in ``namespace``.
    """
    history = [s for s in namespace.get("In", []) if s and s.strip()]
    defaults, injected = None, {}
    for source in reversed(history[:-1]):  # the last entry is the calling cell
        values = _literal_assignments(source)
        if values is None:
            continue
        if source.lstrip().startswith(INJECTED_HEADER) and not injected:
            injected = values
            continue
        defaults = values
        break
    if defaults is None and injected:  # a parameters cell that itself starts with "# Parameters", not injected
        defaults, injected = injected, {}
    if defaults is None:
        raise ParameterError("check_parameters found no parameters cell (flat literal assignments) before this cell")
    merged = validate_parameters(defaults, injected, source="injected parameters")
    return {name: namespace.get(name, merged[name]) for name in merged}
