"""Batch reruns of the notebooks with papermill, and the Jupyter Book built from the executed copies.

One run = one notebook executed with one set of parameters (a parameter file, an optional category and seed). Each
run owns a folder ``<runs_dir>/<notebook>/<key>/`` holding the executed notebook, ``status.json``, the results JSON
(the notebook's ``results_dir`` points there), the saved viewer arrays and the checkpoints (the run's working folder).
The key is ``<notebook>-<params>-<hash>-s<seed>``, the hash covering every injected parameter, so the same request
always lands in the same folder:

* a run whose ``status.json`` says ``ok`` for the current notebook source is skipped unless ``force``;
* a failed run keeps its partial notebook and is reported with the cell that failed; other runs go on;
* an interrupted run never wrote ``ok``, so the next invocation redoes it (and ``fit`` resumes from its checkpoint),
  while finished runs are kept.

Every parameter file, category and data root is checked before the first kernel starts (``ParameterError`` /
``DataError``, both ``ValueError``). ``build_book`` runs the grid, executes the book's own chapters over the runs'
results, stages everything with the vendored widget JavaScript and calls ``jupyter-book build -W``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .notebook import ParameterError, parse_parameters, validate_parameters
from .utils import atomic_write_json, params_hash

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = Path("notebooks")
BOOK_DIR = Path("book")
DEFAULT_GRID = NOTEBOOKS_DIR / "params" / "grid.yaml"
GRID_KEYS = {"notebooks", "params", "categories", "seeds"}
# Parameters the runner fills in itself (when the notebook declares them); a parameter file must not set them.
RUNNER_PARAMS = ("results_dir",)
STATUS = "status.json"
BOOK_CHAPTERS = ("data", "comparison", "kernels", "reproducibility")


# ---------------------------------------------------------------------------------------------------------------------
# planning


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
    a path ending in ``.yaml``/``.yml`` → that file; a dict → inline overrides.
    """
    if spec in (None, "default"):
        return "default", {}
    if isinstance(spec, dict):
        return "inline", dict(spec)
    spec = str(spec)
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
    from .data import list_categories

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
              check_data: bool = True) -> list[Run]:
    """Expand notebooks × parameter files × categories × seeds into runs, validating every one up front.

    Args:
        notebooks: notebook paths (see :func:`resolve_notebooks`).
        params: grid entries for :func:`resolve_params`.
        categories: ``None`` (the notebook's choice), a category name, or a list of names, per entry.
        seeds: ``None`` (the notebook's seed) or ints.
        runs_dir: root of the run folders.
        check_data: also check datasets, data roots and categories (needs the data on disk).

    Raises:
        ParameterError: a bad parameter file, unknown/ill-typed names, or a category the dataset lacks.
        DataError: a dataset or data root that does not exist.
    """
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
                    runs.append(Run(notebook=str(nb.resolve()), name=nb.stem, params_name=pname, params=injected,
                                    key=key, run_dir=str(run_dir), output=str(run_dir / f"{nb.stem}.ipynb"),
                                    notebook_sha=_sha(nb)))
    return runs


def load_grid(path) -> dict:
    """Read a grid file: ``notebooks`` (list or ``all``), ``params``, ``categories``, ``seeds`` (lists)."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"grid file {str(path)!r} does not exist")
    grid = _read_yaml_mapping(path, "grid file")
    unknown = sorted(set(grid) - GRID_KEYS)
    if unknown:
        raise ParameterError(f"grid file {str(path)!r}: unknown key(s) {unknown}; expected {sorted(GRID_KEYS)}")
    out = {"notebooks": grid.get("notebooks", "all"), "params": grid.get("params", ["default"]),
           "categories": grid.get("categories", [None]), "seeds": grid.get("seeds", [None])}
    for k in ("params", "categories", "seeds"):
        if not isinstance(out[k], list) or not out[k]:
            raise ParameterError(f"grid file {str(path)!r}: {k!r} must be a non-empty list, got {out[k]!r}")
    if any(s is not None and (not isinstance(s, int) or isinstance(s, bool)) for s in out["seeds"]):
        raise ParameterError(f"grid file {str(path)!r}: seeds must be integers or null, got {out['seeds']!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# executing


def _status(run: Run) -> dict | None:
    path = Path(run.run_dir) / STATUS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(run: Run) -> bool:
    """Finished with status ok, for the current notebook source, and its executed notebook is there."""
    st = _status(run)
    return bool(st and st.get("status") == "ok" and st.get("notebook_sha") == run.notebook_sha
                and Path(run.output).is_file())


def _failed_cell(output: Path) -> dict | None:
    """The first cell of an executed notebook that holds an error output: where it is and what it raised."""
    import nbformat

    try:
        nb = nbformat.read(str(output), as_version=4)
    except Exception:  # no notebook written, or cut off mid-write
        return None
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                return {"type": out.get("ename"), "message": str(out.get("evalue", ""))[:500],
                        "cell_index": index, "exec_count": cell.get("execution_count"),
                        "source": cell.source[:300]}
    return None


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reset_run_dir(run: Run, fresh: bool) -> None:
    """Clear what a new attempt must not inherit: always the old results (a rerun would add a second file per
    category), and the checkpoints too when the attempt is ``fresh`` (forced, or the notebook changed since)."""
    run_dir = Path(run.run_dir)
    shutil.rmtree(run_dir / "results", ignore_errors=True)
    (run_dir / "arrays.npz").unlink(missing_ok=True)
    if fresh:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def execute_run(run: Run, timeout: float | None = None, threads: int | None = None,
                separate_process: bool = False, force: bool = False) -> dict:
    """Execute one run with papermill and write its ``status.json``.

    A failing notebook does not raise: the status says which cell failed and what it raised (read back from the
    partial notebook, or from papermill's last message when the kernel died or timed out).

    Args:
        separate_process: run the papermill command line in a child process (what ``jobs > 1`` uses) instead of
            papermill's Python API in this process (cheaper: papermill is imported once). The kernel is always a
            process of its own.
        force: start over even if an interrupted attempt left checkpoints.
    """
    run_dir = Path(run.run_dir)
    previous = _status(run)
    # an interrupted or failed attempt of the same notebook resumes from its checkpoints; anything else starts over
    _reset_run_dir(run, fresh=force or previous is None or previous.get("notebook_sha") != run.notebook_sha)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    status = {**asdict(run), "status": "running", "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "python": sys.executable}
    atomic_write_json(status, run_dir / STATUS)
    # The viewer pre-renders its frames (the static book has no kernel) and saves its arrays for the comparison.
    env = {"ADCORE_VIEWER": "static", "ADCORE_ARRAYS_DIR": str(run_dir),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline", **run.env}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        if separate_process:
            cmd = [sys.executable, "-m", "papermill", run.notebook, run.output, "-k", "python3", "--cwd",
                   str(run_dir), "--no-progress-bar", "-y", json.dumps(run.params)]
            if timeout:
                cmd += ["--execution-timeout", str(int(timeout))]
            with open(run_dir / "papermill.log", "w") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
            lines = (run_dir / "papermill.log").read_text().strip().splitlines()
            failure = None if proc.returncode == 0 else f"papermill exited {proc.returncode}: {(lines or [''])[-1]}"
        else:
            import papermill as pm

            failure = None
            try:
                with _environ(env):
                    pm.execute_notebook(run.notebook, run.output, parameters=run.params, kernel_name="python3",
                                        cwd=str(run_dir), progress_bar=False, log_output=False,
                                        execution_timeout=timeout, request_save_on_cell_execute=True)
            except Exception as exc:  # a failing notebook must not stop the other runs
                failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        if failure is None:
            status.update(status="ok")
        else:
            status.update(status="failed", error=_failed_cell(Path(run.output)) or {"type": "papermill",
                                                                                     "message": failure[:500]})
    except KeyboardInterrupt:
        status.update(status="interrupted")
        raise
    finally:
        status.update(seconds=round(time.time() - started, 1),
                      finished=_dt.datetime.now(_dt.timezone.utc).isoformat())
        atomic_write_json(status, run_dir / STATUS)
    return status


def execute_runs(runs: list[Run], *, jobs: int = 1, force: bool = False, timeout: float | None = None,
                 progress: bool = True, log=print) -> list[dict]:
    """Execute ``runs`` (skipping finished ones unless ``force``), each in its own process, ``jobs`` at a time.

    Returns one status dict per run, in order: ``status`` is ``ok``, ``skipped`` (finished earlier) or ``failed``.
    A ``KeyboardInterrupt`` reaches the papermill processes too; finished runs keep their ``ok`` status.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    results: dict[int, dict] = {}
    todo = []
    for i, run in enumerate(runs):
        if not force and is_done(run):
            results[i] = {**_status(run), "status": "skipped"}
        else:
            todo.append(i)
    # side by side, the runs share the cores instead of each starting one thread per core
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    bar = tqdm(total=len(runs), desc="runs", unit="run", disable=not progress, initial=len(runs) - len(todo))

    def done(i, st):
        results[i] = st
        bar.update(1)
        bar.set_postfix({s: sum(r["status"] == s for r in results.values()) for s in ("ok", "failed", "skipped")})
        if st["status"] == "failed":
            log(f"\n  FAILED {runs[i].key}: {_describe_error(st)}")

    try:
        if jobs == 1:
            for i in todo:  # in this thread, so that Ctrl-C stops the run at once
                bar.set_description(f"runs ({runs[i].key})")
                done(i, execute_run(runs[i], timeout, force=force))
        else:
            # the threads only wait: each run is a papermill process (and a kernel process) of its own
            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                futures = {pool.submit(execute_run, runs[i], timeout, threads, True, force): i for i in todo}
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
            finally:
                # on Ctrl-C the papermill children got the signal too; start nothing new
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return [results[i] for i in sorted(results)]


def _describe_error(st: dict) -> str:
    err = st.get("error") or {}
    where = ""
    if err.get("exec_count") is not None or err.get("cell_index") is not None:
        where = f"cell In[{err.get('exec_count')}] (cell #{err.get('cell_index')}) "
    src = (err.get("source") or "").strip().splitlines()
    code = f" — `{src[0][:80]}`" if src else ""
    return f"{where}raised {err.get('type')}: {err.get('message')}{code}; partial notebook: {st.get('output')}"


def summarize(statuses: list[dict], log=print) -> bool:
    """Print one line per run and the failures with their cells; return True when nothing failed."""
    failed = [s for s in statuses if s["status"] == "failed"]
    for s in statuses:
        secs = f"{s.get('seconds', 0):7.1f}s" if s["status"] != "skipped" else "   done "
        log(f"  {s['status']:8s} {secs}  {s['key']}")
    if failed:
        log(f"{len(failed)} of {len(statuses)} runs failed:")
        for s in failed:
            log(f"  {s['key']}: {_describe_error(s)}")
    return not failed


def write_manifest(statuses: list[dict], path) -> Path:
    """The list of runs (key, notebook, parameters, status, folders) the book's chapters read."""
    keep = ("key", "name", "notebook", "params_name", "params", "status", "run_dir", "output", "seconds",
            "notebook_sha", "error")
    rows = [{k: s.get(k) for k in keep} for s in statuses]
    return atomic_write_json({"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "argv": sys.argv, "runs": rows}, path)


# ---------------------------------------------------------------------------------------------------------------------
# reading results back (the comparison and reproducibility chapters)


def load_manifest(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"run manifest {str(path)!r} does not exist; run `python -m adcore run` or `book` first")
    return json.loads(path.read_text())["runs"]


def collect_results(manifest_or_runs, main_only: bool = True) -> list[dict]:
    """The results JSON files written by the (successful) runs of a manifest.

    Each result gets ``run_key``, ``notebook`` and ``method``: the notebook's name, or ``<notebook> (<run key>)`` when
    the manifest holds several runs of one notebook (seeds, parameter files).

    Args:
        manifest_or_runs: a manifest path or its list of runs.
        main_only: keep only each run's main results, those whose ``run_name`` is the run's ``run_name`` parameter
            or, by the notebooks' convention, the notebook's name; ablation variants a notebook evaluates beside it
            (``vt_adl-no-noise``) stay in that notebook's chapter. A run with no such result keeps all of them.
    """
    runs = load_manifest(manifest_or_runs) if not isinstance(manifest_or_runs, list) else manifest_or_runs
    runs = [r for r in runs if r.get("status") in ("ok", "skipped")]
    per_notebook = {}
    for r in runs:
        per_notebook[r["name"]] = per_notebook.get(r["name"], 0) + 1
    out = []
    for r in runs:
        found = [json.loads(p.read_text()) for p in sorted((Path(r["run_dir"]) / "results").glob("*.json"))]
        main = (r.get("params") or {}).get("run_name") or r["name"]
        if main_only and any(res.get("run_name") == main for res in found):
            found = [res for res in found if res.get("run_name") == main]
        for res in found:
            res.update(run_key=r["key"], notebook=r["name"],
                       method=r["name"] if per_notebook[r["name"]] == 1 else f"{r['name']} ({r['key']})")
            if not main_only and res.get("run_name") not in (None, main):
                res["method"] += f" / {res['run_name']}"
            out.append(res)
    return out


def results_table(results: list[dict], metrics=("image_auroc", "pixel_auroc", "aupro")):
    """Long results → DataFrame indexed by (method, category) with a ``mean`` row per method.

    Raises:
        ValueError: two results for the same method and category (the table would hide one).
    """
    import pandas as pd

    if not results:
        return pd.DataFrame(columns=["method", "category", *metrics]).set_index(["method", "category"])
    df = pd.DataFrame([{"method": r.get("method") or r.get("notebook") or r.get("model"), "category": r["category"],
                        **{m: r.get(m) for m in metrics}} for r in results])
    dup = df[df.duplicated(["method", "category"], keep=False)]
    if len(dup):
        raise ValueError(f"several results for the same method and category: {dup[['method', 'category']].values[:5]}"
                         "; give the runs distinct method names")
    df[list(metrics)] = df[list(metrics)].astype(float)
    means = df.groupby("method", sort=False)[list(metrics)].mean().reset_index().assign(category="mean")
    return pd.concat([df, means]).set_index(["method", "category"])


# ---------------------------------------------------------------------------------------------------------------------
# the book


def fetch_widget_js(dest, script=None) -> Path:
    """Vendor the ipywidgets HTML manager, RequireJS and MathJax from npm (``book/fetch_widget_js.sh``) unless
    already there."""
    dest = Path(dest)
    if all((dest / f).is_file() for f in ("require.js", "html-manager/embed-amd.js", "mathjax/tex-mml-chtml.js")):
        return dest
    script = Path(script or REPO / BOOK_DIR / "fetch_widget_js.sh")
    proc = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not vendor the widget JavaScript with {script}: {proc.stderr.strip()}\n"
                           "The book's viewers need it to work offline; run the script where npm can reach "
                           "registry.npmjs.org.")
    return dest


def _place_widget_fonts(html_dir: Path, manager_dir: Path) -> None:
    """Copy the widget manager's icon fonts where its CSS looks for them.

    embed-amd.js has an empty webpack public path, so its CSS asks for ``@jupyter-widgets/html-manager/dist/<font>``
    relative to each page; without the copies an offline reader's console shows failed loads (the viewer uses no
    icons, so nothing visible depends on them).
    """
    fonts = [p for p in manager_dir.iterdir() if p.suffix in (".woff2", ".woff", ".ttf", ".eot", ".svg")]
    for page_dir in {p.parent for p in html_dir.rglob("*.html") if "widget-state+json" in p.read_text()}:
        dest = page_dir / "@jupyter-widgets" / "html-manager" / "dist"
        dest.mkdir(parents=True, exist_ok=True)
        for f in fonts:
            shutil.copy2(f, dest / f.name)


# [text](../adcore/models/vt_adl.py): a link from a notebook to a repository file, which the book cannot serve
_REPO_LINK = re.compile(r"\[([^\]]+)\]\(((?:\.\./)+)([^)\s]+)\)")


def _stage_notebook(src: Path, dest: Path) -> None:
    """Copy an executed notebook into the book, turning links to repository files (``../adcore/x.py``), which point
    outside the book and would fail the build as missing targets, into the file's path in code type."""
    import nbformat

    nb = nbformat.read(str(src), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = _REPO_LINK.sub(lambda m: f"{m.group(1)} (`{m.group(3)}`)"
                                         if m.group(1).strip("`") != m.group(3) else f"`{m.group(3)}`", cell.source)
    nbformat.write(nb, str(dest))


def _stage_toc(toc: dict, available: set[str]) -> tuple[dict, list[str]]:
    """Fit the TOC to what was produced: drop entries without an executed notebook (a paper notebook not written
    yet) and add produced ``papers/<name>`` pages the TOC does not list after its last paper. Returns the TOC and the
    dropped entries."""
    dropped, listed = [], set()

    def keep(entries):
        out = []
        for e in entries:
            if "file" in e:
                listed.add(e["file"])
                if e["file"] not in available:
                    dropped.append(e["file"])
                    continue
            if "sections" in e:
                e = {**e, "sections": keep(e["sections"])}
            out.append(e)
        return out

    toc = dict(toc)
    parts = toc.get("parts") or [{"chapters": toc.get("chapters", [])}]
    parts = [{**p, "chapters": keep(p.get("chapters", []))} for p in parts]
    extra = [{"file": f} for f in sorted(available - listed) if f.startswith("papers/")]
    if extra:
        home = next((p for p in parts if any(c.get("file", "").startswith("papers/") for c in p["chapters"])), None)
        if home is None:
            home = {"caption": "The papers", "chapters": []}
            parts.insert(min(1, len(parts)), home)
        home["chapters"].extend(extra)
    parts = [p for p in parts if p["chapters"]]
    if "parts" in toc:
        toc["parts"] = parts
    else:
        toc["chapters"] = parts[0]["chapters"] if parts else []
    return toc, dropped


def build_book(*, grid=None, smoke: bool = False, notebooks=None, jobs: int = 1, force: bool = False,
               runs_dir="runs", book_dir=BOOK_DIR, out_dir=None, timeout: float | None = None, run: bool = True,
               build: bool = True, chapters=BOOK_CHAPTERS, progress: bool = True, log=print) -> dict:
    """Run the grid, execute the book's chapters over its results, and build the HTML with Jupyter Book.

    Args:
        grid: grid file (default ``notebooks/params/grid.yaml``, else every notebook with its defaults).
        smoke: every notebook with its ``smoke`` parameter file instead (the CI-sized book).
        notebooks: restrict to these notebooks.
        runs_dir: where runs live (finished ones are reused).
        book_dir: the book's sources (``_config.yml``, ``_toc.yml``, ``intro.md``, ``chapters/*.ipynb``).
        out_dir: where ``_build/src`` (staged sources) and ``_build/html`` go; default ``book_dir``.
        run: execute the paper notebooks (False: only reuse finished runs).
        build: call ``jupyter-book build``.
        chapters: which of the book's own chapters to include (a smaller book for tests).

    Returns:
        dict(html=index.html path, statuses=[...], failed=[...], seconds=...).
    """
    t0 = time.time()
    book_dir = Path(book_dir)
    out_dir = Path(out_dir or book_dir)
    stage = out_dir / "_build" / "src"
    nb_dir = Path(notebooks[0]).parent if notebooks and str(notebooks[0]).endswith(".ipynb") else NOTEBOOKS_DIR
    if smoke:
        spec = {"notebooks": notebooks or "all", "params": ["smoke"], "categories": [None], "seeds": [None]}
    elif grid is not None or DEFAULT_GRID.is_file():
        spec = load_grid(grid or DEFAULT_GRID)
        if notebooks:
            spec["notebooks"] = notebooks
    else:
        spec = {"notebooks": notebooks or "all", "params": ["default"], "categories": [None], "seeds": [None]}
    nbs = resolve_notebooks(spec["notebooks"], nb_dir)
    runs = plan_runs(nbs, spec["params"], spec["categories"], spec["seeds"], runs_dir=runs_dir)
    unknown = [c for c in chapters if c not in BOOK_CHAPTERS]
    if unknown:
        raise ValueError(f"unknown chapter(s) {unknown}; the book's chapters are {list(BOOK_CHAPTERS)}")
    chapter_src = {c: book_dir / "chapters" / f"{c}.ipynb" for c in chapters}
    chapter_src = {c: p for c, p in chapter_src.items() if p.is_file()}
    for c, p in chapter_src.items():
        parse_parameters(p)  # a chapter without a parameters cell fails here, before any run
    for name in ("_config.yml", "_toc.yml"):
        if not (book_dir / name).is_file():
            raise ValueError(f"book sources {str(book_dir)!r} lack {name}")
    if build:
        fetch_widget_js(book_dir / "_static" / "vendor")  # needs npm: fail before the runs, not after
    log(f"{len(runs)} notebook run(s) planned: {', '.join(r.key for r in runs)}")

    if run:
        statuses = execute_runs(runs, jobs=jobs, force=force, timeout=timeout, progress=progress, log=log)
    else:
        # rebuild from what finished, even where the notebook has changed since (said so, not hidden)
        statuses = []
        for r in runs:
            st = _status(r) or asdict(r)
            ok = st.get("status") == "ok" and Path(r.output).is_file()
            if ok and not is_done(r):
                log(f"  {r.key}: the notebook changed since this run finished; using the older run (--no-run)")
            statuses.append({**st, "status": "skipped" if ok else "missing"})
        missing = [s["key"] for s in statuses if s["status"] == "missing"]
        if missing:
            raise RuntimeError(f"--no-run, but these runs have not finished: {missing}")

    # stage the sources: config, intro, vendored JS, the first run of each notebook, then the chapters
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for name in ("_config.yml", "intro.md", "references.bib", "logo.png"):
        if (book_dir / name).is_file():
            shutil.copy2(book_dir / name, stage / name)
    if (book_dir / "_static").is_dir() and any(p.name != "vendor" for p in (book_dir / "_static").iterdir()):
        shutil.copytree(book_dir / "_static", stage / "_static", ignore=shutil.ignore_patterns("vendor"))
    # Through html_extra_path (see _config.yml), not html_static_path: Jupyter Book adds every .js file found in the
    # static paths to every page, which would load the widget manager twice (three viewers on screen) and on pages
    # without widgets. myst-nb's nb_ipywidgets_js adds it where a page has widgets.
    if (book_dir / "_static" / "vendor").is_dir():
        shutil.copytree(book_dir / "_static" / "vendor", stage / "_vendor" / "_static" / "vendor-js")
    (stage / "papers").mkdir()
    produced = {"intro"}
    seen = set()
    for st in statuses:
        if st["name"] in seen or not Path(st["output"]).is_file():
            continue
        seen.add(st["name"])
        _stage_notebook(Path(st["output"]), stage / "papers" / f"{st['name']}.ipynb")
        produced.add(f"papers/{st['name']}")
    manifest = write_manifest(statuses, stage / "runs.json")

    (stage / "chapters").mkdir()
    chapter_runs = []
    for c, p in chapter_src.items():
        defaults = parse_parameters(p)
        injected = {k: v for k, v in {"manifest": str(manifest.resolve()), "repo_root": str(REPO)}.items()
                    if k in defaults}
        chapter_runs.append(Run(notebook=str(p.resolve()), name=c, params_name="chapter", params=injected,
                                key=f"chapter-{c}", run_dir=str((out_dir / "_build" / "chapter-runs" / c).resolve()),
                                output=str((stage / "chapters" / f"{c}.ipynb").resolve()), notebook_sha=_sha(p)))
    chapter_statuses = execute_runs(chapter_runs, jobs=1, force=True, timeout=timeout, progress=progress, log=log)
    for c, st in zip(chapter_src, chapter_statuses):
        if Path(st["output"]).is_file():
            produced.add(f"chapters/{c}")

    toc, dropped = _stage_toc(yaml.safe_load((book_dir / "_toc.yml").read_text()), produced)
    if dropped:
        log(f"not in this book (no executed notebook): {', '.join(dropped)}")
        # links to the left-out pages become plain text (a missing target is a warning, and warnings fail the build)
        for md_file in stage.glob("*.md"):
            text = re.sub(r"\[([^\]]+)\]\(((?:chapters|papers)/\w+)\)",
                          lambda m: m.group(0) if m.group(2) in produced else m.group(1), md_file.read_text())
            md_file.write_text(text)
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))

    html = None
    if build:
        cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())", "build",
               str(stage), "--path-output", str(out_dir), "-W", "-n", "--keep-going"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).splitlines()
            problems = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln or "Error" in ln] or lines[-30:]
            raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}), warnings are errors:\n"
                               + "\n".join(problems[:40]))
        html = (out_dir / "_build" / "html" / "index.html").resolve()
        _place_widget_fonts(html.parent, stage / "_vendor" / "_static" / "vendor-js" / "html-manager")
    all_statuses = statuses + chapter_statuses
    failed = [s for s in all_statuses if s["status"] == "failed"]
    return {"html": html, "statuses": all_statuses, "failed": failed, "seconds": round(time.time() - t0, 1),
            "stage": stage}


def environment_info(repo_root=".") -> dict:
    """Versions, hardware and the git commit, for the reproducibility appendix."""
    import importlib.metadata as md
    import platform

    info = {"python": platform.python_version(), "platform": platform.platform(), "CPU cores": os.cpu_count()}
    try:
        import torch

        info["GPU"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    except ImportError:
        info["GPU"] = "unknown (torch not importable)"
    for pkg in ("adcore", "torch", "torchvision", "triton", "timm", "numpy", "scipy", "scikit-learn", "scikit-image",
                "pandas", "matplotlib", "papermill", "jupyter-book", "myst-nb", "ipywidgets"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    git = ["git", "-C", str(repo_root)]
    head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    info["git commit"] = head.stdout.strip() if head.returncode == 0 else "none (no commit yet)"
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    if head.returncode == 0 and dirty.returncode == 0:
        info["git commit"] += " (with uncommitted changes)" if dirty.stdout.strip() else ""
    versions = Path(repo_root) / BOOK_DIR / "_static" / "vendor" / "VERSIONS"
    if versions.is_file():
        info["widget JavaScript"] = ", ".join(versions.read_text().split("\n")).strip(", ")
    return info


def papermill_command(run: dict, repo_root=None) -> str:
    """The plain papermill command equivalent to one run of a manifest (``results_dir`` left to the notebook)."""
    root = Path(repo_root or Path.cwd()).resolve()

    def rel(p):
        p = Path(p)
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    values = {k: v for k, v in run["params"].items() if k != "results_dir"}
    cmd = f"papermill {rel(run['notebook'])} {rel(run['output'])} -k python3"
    if values:
        cmd += " -y '" + json.dumps(values) + "'"  # JSON is YAML, and keeps lists and None intact
    return cmd
