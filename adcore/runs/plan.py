"""Planning: notebooks × parameter layers × categories × seeds → :class:`Run` s, every one validated up front.

Every parameter file, category and data root is checked before the first kernel starts (``ParameterError`` /
``DataError``, both ``ValueError``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..utils import params_hash
from . import provenance
from .params import ParameterError, parse_parameters, validate_parameters

NOTEBOOKS_DIR = Path("notebooks")
DEFAULT_GRID = NOTEBOOKS_DIR / "params" / "grid.yaml"
BUDGET_GRID = NOTEBOOKS_DIR / "params" / "budget.yaml"  # the budget chapter's runs (adcore.book.budget)
GRID_KEYS = {"notebooks", "params", "categories", "seeds"}
# Parameters the runner fills in itself (when the notebook declares them); a parameter file must not set them.
RUNNER_PARAMS = ("results_dir",)


@dataclass
class Run:
    """One notebook execution: what to run, with which parameters, and where its files go."""

    notebook: str  # path of the source notebook
    name: str  # the notebook's stem, e.g. "vt_adl"
    params_name: str  # "default", a parameter-file stem, or "chapter"
    params: dict  # what papermill injects
    key: str
    run_dir: str  # working folder; holds status.json and results/
    output: str  # executed notebook
    notebook_sha: str = ""
    env: dict = field(default_factory=dict)
    params_spec: str = "default"  # what `--params` takes to plan this run again (see reproduce_command)
    threads: int = 1  # torch threads of the run's kernel: part of what decides its numbers
    gpu: bool = False  # its parameters say device: cuda (a Dask task then asks for a GPU resource)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def resolve_notebooks(names, notebooks_dir=NOTEBOOKS_DIR) -> list[Path]:
    """``None``/``"all"`` → every ``*.ipynb`` in ``notebooks_dir``; otherwise names (``vt_adl``) or paths."""
    notebooks_dir = Path(notebooks_dir)
    if names in (None, "all") or names == ["all"]:
        found = sorted(p for p in notebooks_dir.glob("*.ipynb") if not p.name.startswith("."))
        if not found:
            raise ValueError(f"no notebooks (*.ipynb) found in {str(notebooks_dir)!r}")
        return found
    if isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        p = Path(n)
        if p.suffix != ".ipynb":
            p = notebooks_dir / f"{n}.ipynb"
        if not p.is_file():
            raise ValueError(f"notebook {str(n)!r} not found (looked for {str(p)!r})")
        out.append(p)
    return out


def _read_yaml_mapping(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParameterError(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParameterError(f"{what} {str(path)!r} must hold a mapping of name: value, got {type(data).__name__}")
    return data


def resolve_params(notebook: Path, spec) -> tuple[str, dict]:
    """A ``params`` grid entry → ``(name, overrides)``.

    ``None``/``"default"`` → the notebook's own defaults; a name → ``notebooks/params/<notebook>/<name>.yaml``;
    a path ending in ``.yaml``/``.yml`` → that file; a dict, or its YAML/JSON text (``'{"seed": 1}'``) → inline
    overrides.
    """
    if spec in (None, "default"):
        return "default", {}
    if isinstance(spec, dict):
        return "inline", dict(spec)
    spec = str(spec)
    if spec.lstrip().startswith("{"):
        try:
            inline = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise ParameterError(f"inline parameters {spec!r} are not valid YAML: {e}") from None
        if not isinstance(inline, dict):
            raise ParameterError(f"inline parameters {spec!r} must be a mapping of name: value")
        return "inline", inline
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec)
    else:
        path = notebook.parent / "params" / notebook.stem / f"{spec}.yaml"
    if not path.is_file():
        raise ParameterError(f"parameter file {str(path)!r} for notebook {notebook.stem!r} does not exist")
    return path.stem, _read_yaml_mapping(path, "parameter file")


def _check_data(merged: dict, source: str) -> None:
    """Fail now, not inside a kernel, when the dataset, its data root or a category does not exist."""
    if "dataset" not in merged:
        return
    from ..data import list_categories

    found = list_categories(merged["dataset"], data_root=merged.get("data_root"))
    cats = merged.get("categories", merged.get("category"))
    if cats is None:
        return
    cats = [cats] if isinstance(cats, str) else list(cats)
    missing = [c for c in cats if c not in found]
    if missing:
        raise ParameterError(f"bad {source}: categories {missing} are not in dataset {merged['dataset']!r}; "
                             f"it has {found}")


def plan_runs(notebooks, params=("default",), categories=(None,), seeds=(None,), runs_dir="runs",
              check_data: bool = True, threads: int = 1) -> list[Run]:
    """Expand notebooks × parameter files × categories × seeds into runs, validating every one up front.

    Args:
        notebooks: notebook paths (see :func:`resolve_notebooks`).
        params: grid entries for :func:`resolve_params`.
        categories: ``None`` (the notebook's choice), a category name, or a list of names, per entry.
        seeds: ``None`` (the notebook's seed) or ints.
        runs_dir: root of the run folders.
        check_data: also check datasets, data roots and categories (needs the data on disk).
        threads: torch threads per run, whatever runs side by side (a notebook's own ``num_threads`` wins).

    Raises:
        ParameterError: a bad parameter file, unknown/ill-typed names, or a category the dataset lacks.
        DataError: a dataset or data root that does not exist.
    """
    provenance.thread_env(threads)  # a bad value fails here, before any run
    runs_dir = Path(runs_dir).resolve()
    runs, keys = [], set()
    checked = set()
    for nb in notebooks:
        nb = Path(nb)
        defaults = parse_parameters(nb)
        for spec in params:
            pname, overrides = resolve_params(nb, spec)
            source = f"parameter file {pname!r} for {nb.stem}"
            taken = [k for k in RUNNER_PARAMS if k in overrides]
            if taken:
                raise ParameterError(f"bad {source}: {taken} are set by the runner for each run; remove them")
            for cat in categories:
                for seed in seeds:
                    injected = dict(overrides)
                    if cat is not None:
                        if "categories" not in defaults:
                            raise ParameterError(f"{nb.stem} has no 'categories' parameter, so the grid cannot set "
                                                 f"categories={cat!r}")
                        injected["categories"] = [cat] if isinstance(cat, str) else list(cat)
                    if seed is not None:
                        if "seed" not in defaults:
                            raise ParameterError(f"{nb.stem} has no 'seed' parameter, so the grid cannot set seeds")
                        injected["seed"] = int(seed)
                    merged = validate_parameters(defaults, injected, source=source)
                    if check_data:
                        data_key = json.dumps([merged.get(k) for k in ("dataset", "data_root", "categories")],
                                              default=str)
                        if data_key not in checked:
                            _check_data(merged, source)
                            checked.add(data_key)
                    seed_txt = merged.get("seed", "x")
                    key = f"{nb.stem}-{pname}-{params_hash(injected, 8)}-s{seed_txt}"
                    if key in keys:
                        continue  # the same request twice in the grid
                    keys.add(key)
                    run_dir = runs_dir / nb.stem / key
                    if "results_dir" in defaults:
                        injected["results_dir"] = str(run_dir / "results")
                    spec_text = json.dumps(spec) if isinstance(spec, dict) else str(spec or "default")
                    runs.append(Run(notebook=str(nb.resolve()), name=nb.stem, params_name=pname, params=injected,
                                    key=key, run_dir=str(run_dir), output=str(run_dir / f"{nb.stem}.ipynb"),
                                    notebook_sha=_sha(nb), params_spec=spec_text, threads=threads,
                                    gpu=str(merged.get("device", "cpu")).startswith("cuda")))
    return runs


def load_grid(path) -> list[dict]:
    """Read a grid file: one grid (``notebooks`` (list or ``all``), ``params``, ``categories``, ``seeds``: lists), or
    ``grids:`` a list of such grids whose runs add up (the budget grid: every budget, plus more seeds at one).

    Returns:
        One dict per grid, every key filled in.
    """
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"grid file {str(path)!r} does not exist")
    data = _read_yaml_mapping(path, "grid file")
    if "grids" in data:
        if set(data) != {"grids"} or not isinstance(data["grids"], list) or not data["grids"]:
            raise ParameterError(f"grid file {str(path)!r}: 'grids' must be a non-empty list of grids and the only "
                                 "key")
        if not all(isinstance(g, dict) for g in data["grids"]):
            raise ParameterError(f"grid file {str(path)!r}: every entry of 'grids' must be a mapping")
        return [_check_grid(g, f"{path} (grid {i + 1})") for i, g in enumerate(data["grids"])]
    return [_check_grid(data, str(path))]


def _check_grid(grid: dict, where: str) -> dict:
    unknown = sorted(set(grid) - GRID_KEYS)
    if unknown:
        raise ParameterError(f"grid file {where!r}: unknown key(s) {unknown}; expected {sorted(GRID_KEYS)}")
    out = {"notebooks": grid.get("notebooks", "all"), "params": grid.get("params", ["default"]),
           "categories": grid.get("categories", [None]), "seeds": grid.get("seeds", [None])}
    for k in ("params", "categories", "seeds"):
        if not isinstance(out[k], list) or not out[k]:
            raise ParameterError(f"grid file {where!r}: {k!r} must be a non-empty list, got {out[k]!r}")
    if any(s is not None and (not isinstance(s, int) or isinstance(s, bool)) for s in out["seeds"]):
        raise ParameterError(f"grid file {where!r}: seeds must be integers or null, got {out['seeds']!r}")
    return out


def plan_grids(grids: list[dict], runs_dir="runs", notebooks_dir=NOTEBOOKS_DIR, check_data: bool = True,
               threads: int = 1) -> list[Run]:
    """:func:`plan_runs` over every grid of :func:`load_grid`, in order; a run two grids both ask for is planned
    once."""
    runs, keys = [], set()
    for g in grids:
        for run in plan_runs(resolve_notebooks(g["notebooks"], notebooks_dir), g["params"], g["categories"],
                             g["seeds"], runs_dir=runs_dir, check_data=check_data, threads=threads):
            if run.key not in keys:
                keys.add(run.key)
                runs.append(run)
    return runs

