"""Planning: notebooks × parameter layers × categories × seeds → :class:`Run` s, every one validated up front.

Every parameter file, category and data root is checked before the first kernel starts (``ParameterError`` /
``DataError``, both ``ValueError``).
"""
from __future__ import annotations

import hashlib
import json
import re
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
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
    sets: list = field(default_factory=list)  # the --set KEY=VALUE items that reached it (see reproduce_command)
    resolved: dict = field(default_factory=dict)  # every parameter after every layer: what the book groups by


def _sha(path: Path) -> str:
    """What decides a notebook's results: its cells' types and sources, each stripped of trailing whitespace. Outputs,
    execution counts and metadata are left out, so opening and saving a notebook in JupyterLab does not make its
    finished runs stale."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [[c.cell_type, "\n".join(line.rstrip() for line in c.source.strip().splitlines())] for c in nb.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()[:16]


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


def _one_layer(notebook: Path, spec) -> tuple[str, dict, str]:
    """One parameter layer → ``(name, overrides, spec text)``; the text names a file by its absolute path, so that a
    reproduce command works from any folder."""
    if spec in (None, "default"):
        return "default", {}, "default"
    if isinstance(spec, dict):
        return "inline", dict(spec), json.dumps(spec)
    spec = str(spec)
    if spec.lstrip().startswith("{"):
        try:
            inline = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise ParameterError(f"inline parameters {spec!r} are not valid YAML: {e}") from None
        if not isinstance(inline, dict):
            raise ParameterError(f"inline parameters {spec!r} must be a mapping of name: value")
        return "inline", inline, spec
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec).expanduser()
        text = str(path.resolve())
    else:
        path = notebook.parent / "params" / notebook.stem / f"{spec}.yaml"
        text = spec
    if not path.is_file():
        raise ParameterError(f"parameter file {str(path)!r} for notebook {notebook.stem!r} does not exist")
    return path.stem, _read_yaml_mapping(path, "parameter file"), text


def params_layers(spec) -> list:
    """A ``params`` entry → its layers, applied in order: ``"paper+my-mvtec.yaml"`` and ``[paper, my-mvtec.yaml]``
    (a nested list in a grid) stack; any other entry is one layer. Inline YAML (``'{lr: 1e+3}'``) is never split."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ParameterError("an empty list is not a parameter entry; use 'default' for the notebook's own values")
        return list(spec)
    if isinstance(spec, str) and "+" in spec and not spec.lstrip().startswith("{"):
        parts = spec.split("+")
        if any(not p.strip() for p in parts):
            raise ParameterError(f"parameter entry {spec!r} has an empty layer (two '+' in a row, or one at an end)")
        return [p.strip() for p in parts]
    return [spec]


def resolve_params(notebook: Path, spec) -> tuple[str, dict, str]:
    """A ``params`` grid entry → ``(name, overrides, spec text)``, its layers merged in order (a later layer wins).

    A layer is ``None``/``"default"`` (the notebook's own defaults), a name
    (``notebooks/params/<notebook>/<name>.yaml``),
    a path ending in ``.yaml``/``.yml``, or a dict or its YAML/JSON text (``'{"seed": 1}'``, inline overrides). The
    name joins the layers' names with ``+``; the spec text is what ``--params`` takes to plan the same run again.
    """
    names, merged, texts = [], {}, []
    for layer in params_layers(spec):
        name, values, text = _one_layer(notebook, layer)
        names.append(name)
        texts.append(text)
        merged.update(values)
    if len(names) > 1:
        names = [n for n in names if n != "default"] or ["default"]
    return "+".join(names), merged, "+".join(texts)


def parse_sets(items) -> list[tuple[str | None, str, object]]:
    """``--set`` items (``KEY=VALUE``, ``NOTEBOOK.KEY=VALUE``; YAML values) → ``(notebook or None, key, value)``."""
    out = []
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParameterError(f"--set {item!r}: expected KEY=VALUE or NOTEBOOK.KEY=VALUE (a YAML value)")
        target, _, name = key.rpartition(".")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ParameterError(f"--set {item!r}: the value is not valid YAML: {e}") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        out.append((target or None, name, value))
    return out


def _sets_for(notebook: str, defaults: dict, sets) -> dict:
    """The ``--set`` values that apply to one notebook: every untargeted key it has, and every key aimed at it."""
    out = {}
    for target, key, value in sets:
        if target == notebook:
            if key not in defaults:
                raise ParameterError(f"--set {target}.{key}: {target} has no parameter {key!r}; it takes "
                                     f"{sorted(defaults)}")
            out[key] = value
        elif target is None and key in defaults:
            out[key] = value
    return out


def _set_text(key: str, value) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def check_sets(sets, stems: dict[str, dict]) -> None:
    """Every ``--set`` key must reach a selected notebook (``stems``: name → its parameters cell): a typo would
    otherwise be a silent no-op."""
    for target, key, value in sets:
        if target is not None and target not in stems:
            raise ParameterError(f"--set {target}.{key}: notebook {target!r} is not selected; selected: "
                                 f"{sorted(stems)}")
        if target is None and not any(key in d for d in stems.values()):
            raise ParameterError(f"--set {key}: no selected notebook has a parameter {key!r} (selected: "
                                 f"{sorted(stems)}); NOTEBOOK.{key}=... aims at one notebook")


def _check_data(merged: dict, source: str) -> None:
    """Fail now, not inside a kernel, when the dataset, its data root or a category does not exist."""
    if "dataset" not in merged:
        return
    from ..data import DataError, list_categories
    from ..data.benchmarks import BENCHMARKS

    try:
        found = list_categories(merged["dataset"], data_root=merged.get("data_root"))
    except DataError as e:
        if merged.get("data_root") is None and merged["dataset"] in BENCHMARKS:
            raise DataError(f"bad {source}: {e}; on the command line: --data-root /path/to/it (or --set "
                            "data_root=...)") from None
        raise
    cats = merged.get("categories", merged.get("category"))
    if cats is None:
        return
    cats = [cats] if isinstance(cats, str) else list(cats)
    missing = [c for c in cats if c not in found]
    if missing:
        raise ParameterError(f"bad {source}: categories {missing} are not in dataset {merged['dataset']!r}; "
                             f"it has {found}")


_SHA_CACHE: dict = {}  # (path, size, mtime) -> SHA-256: a 270 MB file is hashed once per process


def _weights_sha(merged: dict, source: str, cache: dict = _SHA_CACHE) -> str | None:
    """SHA-256 of the pretrained weights file the run's backbone will load; found (or, online, downloaded) now, not
    hours into a job. None for a notebook without a pretrained backbone."""
    if not merged.get("backbone"):
        return None
    from ..backbones import BackboneWeightsMissing, weights_file

    try:
        path = weights_file(merged["backbone"], merged.get("weights_path"))
    except BackboneWeightsMissing as e:
        raise ParameterError(f"bad {source}: {e} (on the command line: --set weights_path=/path/to/file)") from None
    stat = path.stat()
    ident = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if ident not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        cache[ident] = h.hexdigest()
    return cache[ident]


def _absolute_paths(values: dict) -> dict:
    """``data_root``/``weights_path``/a path ``dataset`` as absolute paths: one key and one folder from any cwd."""
    out = dict(values)
    for k in ("data_root", "weights_path"):
        if isinstance(out.get(k), str):
            out[k] = str(Path(out[k]).expanduser().resolve())
    ds = out.get("dataset")
    if isinstance(ds, str) and ("/" in ds or ds.startswith(".")):
        out["dataset"] = str(Path(ds).expanduser().resolve())
    return out


def plan_runs(notebooks, params=("default",), categories=(None,), seeds=(None,), runs_dir="runs",
              check_data: bool = True, threads: int = 1, sets=(), check_weights: bool = True) -> list[Run]:
    """Expand notebooks × parameter entries × categories × seeds into runs, validating every one up front.

    A run's parameters are layered in a fixed order: the notebook's ``parameters`` cell, then the entry's layers in
    order (:func:`resolve_params`), then ``sets`` (``--set``), then the run's category and seed. Its key hashes the
    resolved settings after every layer, the SHA-256 of the weights file its backbone loads and, on ``textures``, the
    generator's ``VERSION``, so the same request always lands in the same folder and a changed default, weights file
    or rebuilt benchmark is a new run.

    Args:
        notebooks: notebook paths (see :func:`resolve_notebooks`).
        params: grid entries for :func:`resolve_params` (each one run per entry; ``a+b`` or ``[a, b]`` stack).
        categories: ``None`` (the notebook's choice), a category name, or a list of names, per entry.
        seeds: ``None`` (the notebook's seed) or ints; a notebook without a ``seed`` parameter (the baselines, which
            draw no random number) runs once whatever the seeds.
        runs_dir: root of the run folders.
        check_data: also check datasets, data roots and categories (needs the data on disk).
        threads: torch threads per run, whatever runs side by side (a notebook's own ``num_threads`` wins).
        sets: ``(notebook or None, key, value)`` from :func:`parse_sets`, applied after the parameter files.
        check_weights: find the pretrained weights each run needs now (and hash them into its key).

    Raises:
        ParameterError: a bad parameter file, unknown/ill-typed names, a ``--set`` key no notebook has, a category
            the dataset lacks, or missing backbone weights.
        DataError: a dataset or data root that does not exist.
    """
    provenance.thread_env(threads)  # a bad value fails here, before any run
    runs_dir = Path(runs_dir).resolve()
    notebooks = [Path(nb) for nb in notebooks]
    sets = list(sets or ())
    cells = {nb: parse_parameters(nb) for nb in notebooks}  # each notebook read once, whatever the grid's size
    check_sets(sets, {nb.stem: d for nb, d in cells.items()})
    if any(s is not None for s in seeds) and not any("seed" in d for d in cells.values()):
        raise ParameterError(f"{', '.join(nb.stem for nb in notebooks)}: no 'seed' parameter, so the grid cannot set "
                             "seeds")
    runs, keys = [], set()
    checked = set()
    for nb in notebooks:
        defaults, notebook_sha = cells[nb], _sha(nb)
        set_values = _sets_for(nb.stem, defaults, sets)
        for spec in params:
            pname, overrides, spec_text = resolve_params(nb, spec)
            source = f"parameter file {pname!r} for {nb.stem}"
            taken = [k for k in RUNNER_PARAMS if k in {**overrides, **set_values}]
            if taken:
                raise ParameterError(f"bad {source}: {taken} are set by the runner for each run; remove them")
            for cat in categories:
                for seed in seeds:
                    injected = {**overrides, **set_values}
                    if cat is not None:
                        if "categories" not in defaults:
                            raise ParameterError(f"{nb.stem} has no 'categories' parameter, so the grid cannot set "
                                                 f"categories={cat!r}")
                        injected["categories"] = [cat] if isinstance(cat, str) else list(cat)
                    if seed is not None and "seed" in defaults:  # a notebook without one draws nothing: one run
                        injected["seed"] = int(seed)
                    injected = _absolute_paths(injected)
                    merged = validate_parameters(defaults, injected, source=source)
                    if check_data:
                        data_key = json.dumps([merged.get(k) for k in ("dataset", "data_root", "categories")],
                                              default=str)
                        if data_key not in checked:
                            _check_data(merged, source)
                            checked.add(data_key)
                    resolved = {k: v for k, v in merged.items() if k not in RUNNER_PARAMS}
                    if check_weights:
                        resolved["weights_sha256"] = _weights_sha(merged, source)
                    if merged.get("dataset") == "textures":
                        # a rebuilt generator (a new VERSION) changes every image, so it must change the key too
                        from ..data import textures
                        resolved["textures_version"] = textures.VERSION
                    key = f"{nb.stem}-{pname}-{params_hash(resolved, 8)}-s{merged.get('seed', 'x')}"
                    if key in keys:
                        continue  # the same request twice in the grid
                    keys.add(key)
                    run_dir = runs_dir / nb.stem / key
                    if "results_dir" in defaults:
                        injected["results_dir"] = str(run_dir / "results")
                    runs.append(Run(notebook=str(nb.resolve()), name=nb.stem, params_name=pname, params=injected,
                                    key=key, run_dir=str(run_dir), output=str(run_dir / f"{nb.stem}.ipynb"),
                                    notebook_sha=notebook_sha, params_spec=spec_text, threads=threads,
                                    gpu=str(merged.get("device", "cpu")).startswith("cuda"),
                                    sets=[_set_text(k, v) for k, v in _absolute_paths(set_values).items()],
                                    resolved=merged))
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
               threads: int = 1, sets=(), check_weights: bool = True) -> list[Run]:
    """:func:`plan_runs` over every grid of :func:`load_grid`, in order; a run two grids both ask for is planned
    once. ``sets`` (``--set``) apply to every grid."""
    runs, keys = [], set()
    for g in grids:
        for run in plan_runs(resolve_notebooks(g["notebooks"], notebooks_dir), g["params"], g["categories"],
                             g["seeds"], runs_dir=runs_dir, check_data=check_data, threads=threads, sets=sets,
                             check_weights=check_weights):
            if run.key not in keys:
                keys.add(run.key)
                runs.append(run)
    return runs

