"""Batch runs of the notebooks with papermill: plan them, execute them here or on a Dask cluster, collect them.

One run = one notebook executed with one set of parameters (a parameter file, an optional category and seed). Each
run owns a folder ``<runs_dir>/<notebook>/<key>/`` holding the executed notebook, ``status.json``, the results JSON
(the notebook's ``results_dir`` points there), the saved viewer arrays and the checkpoints (the run's working folder).
The key is ``<notebook>-<params>-<hash>-s<seed>``, the hash covering every injected parameter, so the same request
always lands in the same folder:

* a run whose ``status.json`` says ``ok`` for the current notebook source and thread count is skipped unless
  ``force``;
* a failed run keeps its partial notebook and is reported with the cell that failed; other runs go on;
* an interrupted run never wrote ``ok``, so the next invocation redoes it (and ``fit`` resumes from its checkpoint),
  while finished runs are kept;
* a run executes only under its lock (:mod:`adcore.runlock`): two runners on one runs directory, here or on a
  cluster, never execute the same key at once; a runner finding a key taken waits for it and then skips it.

Each run gets a fixed number of torch threads (``threads``, default 1), whatever ``jobs`` and the core count are, so
its numbers do not depend on how many runs go side by side (:mod:`adcore.provenance`).

Where runs execute is an executor: :class:`LocalExecutor` (``jobs`` papermill processes on this machine, the
default) or ``adcore.batch_dask.DaskExecutor`` (one task per run on a Dask cluster). Both execute the same
:func:`execute_run` and yield statuses as runs finish; :func:`execute_runs` does the rest.

Every parameter file, category and data root is checked before the first kernel starts (``ParameterError`` /
``DataError``, both ``ValueError``).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import provenance, runlock
from .notebook import ParameterError, parse_parameters, validate_parameters
from .utils import atomic_write_json, params_hash

NOTEBOOKS_DIR = Path("notebooks")
DEFAULT_GRID = NOTEBOOKS_DIR / "params" / "grid.yaml"
BUDGET_GRID = NOTEBOOKS_DIR / "params" / "budget.yaml"  # the budget chapter's runs (adcore.budget)
GRID_KEYS = {"notebooks", "params", "categories", "seeds"}
# Parameters the runner fills in itself (when the notebook declares them); a parameter file must not set them.
RUNNER_PARAMS = ("results_dir",)
STATUS = "status.json"
RUNS_MARKER = ".adcore-runs-dir"  # in the runs directory: lets a worker check it sees the same folder as the runner


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

# ---------------------------------------------------------------------------------------------------------------------
# executing


def _read_status(run: Run) -> dict | None:
    path = Path(run.run_dir) / STATUS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_status(run: Run) -> dict | None:
    """The run's ``status.json``; one left at "running" by a holder that is gone (killed, its machine lost, its lock
    lease expired) is rewritten as "interrupted" first, under the run's lock."""
    st = _read_status(run)
    if not st or st.get("status") != "running":
        return st
    found = runlock.read_lock(run.run_dir)
    if found is not None and runlock.holder_alive(*found):
        return st
    with runlock.RunLock(run.run_dir) as lock:
        if not lock.acquired:  # a new holder took it in the meantime
            return _read_status(run)
        st = _read_status(run) or st
        if st.get("status") == "running":
            holder = f" ({runlock.describe(found[0])} is gone)" if found else ""
            st.update(status="interrupted", interrupted=f"its process stopped without finishing{holder}")
            atomic_write_json(st, Path(run.run_dir) / STATUS)
    return st


def is_done(run: Run) -> bool:
    """Finished with status ok, for the current notebook source and thread count, and its executed notebook is
    there."""
    st = _read_status(run)
    return bool(st and st.get("status") == "ok" and st.get("notebook_sha") == run.notebook_sha
                and st.get("threads") == run.threads and Path(run.output).is_file())


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


# papermill in a child that dies with the thread that started it (Linux PR_SET_PDEATHSIG), so that a runner or Dask
# worker killed with SIGKILL leaves no papermill behind; the kernel follows it (ipykernel exits when its parent does).
_PAPERMILL = ("import ctypes, os, runpy, signal, sys\n"
              "if sys.platform.startswith('linux'):\n"
              "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
              "    if os.getppid() != int(os.environ['ADCORE_RUNNER_PID']): sys.exit('the runner is gone')\n"
              "sys.argv[0] = 'papermill'; runpy.run_module('papermill', run_name='__main__')")


def execute_run(run: Run, timeout: float | None = None, separate_process: bool = False, force: bool = False) -> dict:
    """Execute one run with papermill under its lock and write its ``status.json``.

    A failing notebook does not raise: the status says which cell failed and what it raised (read back from the
    partial notebook, or from papermill's last message when the kernel died or timed out).

    Returns:
        The status dict: ``ok``, ``failed``, ``skipped`` (another runner finished it meanwhile) or ``busy`` (another
        live runner holds its lock; nothing was touched).

    Args:
        separate_process: run the papermill command line in a child process (what ``jobs > 1`` and Dask use) instead
            of papermill's Python API in this process (cheaper: papermill is imported once). The kernel is always a
            process of its own.
        force: start over even if an interrupted attempt left checkpoints.
    """
    run_dir = Path(run.run_dir)
    lock = runlock.RunLock(run_dir)
    if not lock.acquire():
        return {**asdict(run), "status": "busy", "holder": runlock.describe(lock.holder)}
    try:
        if not force and is_done(run):  # finished by another runner while this one waited
            return {**_read_status(run), "status": "skipped"}
        return _execute_locked(run, timeout, separate_process, force)
    finally:
        lock.release()


def _execute_locked(run: Run, timeout, separate_process: bool, force: bool) -> dict:
    run_dir = Path(run.run_dir)
    previous = _read_status(run)
    # an interrupted or failed attempt of the same notebook resumes from its checkpoints; anything else starts over
    fresh = (force or previous is None or previous.get("notebook_sha") != run.notebook_sha
             or previous.get("threads") != run.threads)
    _reset_run_dir(run, fresh=fresh)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    status = {**asdict(run), "status": "running", "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "python": sys.executable, "host": socket.gethostname(), "pid": os.getpid(),
              "resumed_from": sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("checkpoints/**/*.pt"))}
    atomic_write_json(status, run_dir / STATUS)
    # The viewer pre-renders its frames (the static book has no kernel) and saves its arrays for the comparison.
    env = {"ADCORE_VIEWER": "static", "ADCORE_ARRAYS_DIR": str(run_dir),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline", **provenance.thread_env(run.threads), **run.env}
    try:
        if separate_process:
            cmd = [sys.executable, "-c", _PAPERMILL, run.notebook, run.output, "-k", "python3", "--cwd",
                   str(run_dir), "--no-progress-bar", "-y", json.dumps(run.params)]
            if timeout:
                cmd += ["--execution-timeout", str(int(timeout))]
            with open(run_dir / "papermill.log", "w") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **env, "ADCORE_RUNNER_PID": str(os.getpid())})
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


def mark_runs_dir(runs_dir) -> str:
    """Create the runs directory and its marker (a random id, kept once written); return the id."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    marker = runs_dir / RUNS_MARKER
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(8))
    except FileExistsError:
        pass
    for _ in range(50):  # a concurrent runner may be writing it
        text = marker.read_text().strip()
        if text:
            return text
        time.sleep(0.1)
    raise RuntimeError(f"the runs directory marker {str(marker)!r} stays empty")


def check_runs_dir(runs_dir, marker: str, notebooks=()) -> str | None:
    """None if this process sees the runner's runs directory (same marker) and notebooks, else what is wrong."""
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    path = Path(runs_dir) / RUNS_MARKER
    try:
        seen = path.read_text().strip()
    except OSError:
        seen = None
    if seen != marker:
        what = "does not exist" if seen is None else "is another folder of the same name"
        return (f"{where}: the runs directory {str(runs_dir)!r} {what} here; runs, results and checkpoints must "
                "live on a filesystem every worker sees (pass --runs-dir on shared storage)")
    missing = [nb for nb in notebooks if not Path(nb).is_file()]
    if missing:
        return f"{where}: cannot see the notebook(s) {missing}; start the workers from the same checkout"
    return None


class LocalExecutor:
    """Runs on this machine, ``jobs`` at a time: in this process when ``jobs == 1`` (so that Ctrl-C stops the run at
    once), else each in a papermill process of its own, started by a waiting thread."""

    def __init__(self, jobs: int = 1):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {jobs!r}")
        self.jobs = jobs

    def describe(self) -> str:
        return f"{self.jobs} local process(es)"

    def map(self, runs: list[Run], *, timeout=None, force=False, log=print):
        """Yield ``(index into runs, status)`` as each run finishes."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        if self.jobs == 1:
            for i, run in enumerate(runs):
                yield i, execute_run(run, timeout, False, force)
            return
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = {pool.submit(execute_run, run, timeout, True, force): i for i, run in enumerate(runs)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            # on Ctrl-C the papermill children got the signal too; start nothing new
            pool.shutdown(wait=True, cancel_futures=True)


def execute_runs(runs: list[Run], *, jobs: int = 1, executor=None, force: bool = False,
                 timeout: float | None = None, progress: bool = True, log=print, poll: float = 2.0) -> list[dict]:
    """Execute ``runs`` (skipping finished ones unless ``force``) with ``executor`` (default: ``jobs`` local
    processes).

    Returns one status dict per run, in order: ``status`` is ``ok``, ``skipped`` (finished earlier, or by another
    runner meanwhile) or ``failed``. A run another runner holds is waited for (polled every ``poll`` seconds). A
    ``KeyboardInterrupt`` reaches the papermill processes too; finished runs keep their ``ok`` status.
    """
    from tqdm.auto import tqdm

    executor = executor or LocalExecutor(jobs)
    results: dict[int, dict] = {}
    todo = []
    for i, run in enumerate(runs):
        run_status(run)  # a run left "running" by a killed runner now reads "interrupted"
        if not force and is_done(run):
            results[i] = {**_read_status(run), "status": "skipped"}
        else:
            todo.append(i)
    bar = tqdm(total=len(runs), desc="runs", unit="run", disable=not progress, initial=len(runs) - len(todo))
    told = set()
    try:
        while todo:
            busy = []
            for j, st in executor.map([runs[i] for i in todo], timeout=timeout, force=force, log=log):
                i = todo[j]
                if st["status"] == "busy":
                    busy.append(i)
                    if i not in told:
                        log(f"\n  {runs[i].key} is being run by {st['holder']}; waiting for it")
                        told.add(i)
                    continue
                results[i] = st
                bar.update(1)
                bar.set_postfix({s: sum(r["status"] == s for r in results.values())
                                 for s in ("ok", "failed", "skipped")})
                if st["status"] == "failed":
                    log(f"\n  FAILED {runs[i].key}: {_describe_error(st)}")
            todo = sorted(busy)
            if todo:
                time.sleep(poll)
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
    keep = ("key", "name", "notebook", "params_name", "params_spec", "params", "threads", "gpu", "status", "run_dir",
            "output", "seconds", "notebook_sha", "error", "stale")
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


def results_over_seeds(results: list[dict], metrics=("image_auroc", "pixel_auroc", "aupro")):
    """Long results, several seeds per method allowed → DataFrame indexed by (method, category): each metric's mean
    over seeds, ``<metric>_std`` (sample standard deviation over seeds; NaN with one seed) and ``n_seeds``. The
    ``mean`` row of a method is the category-mean of each seed, then the mean and deviation of those.

    Raises:
        ValueError: two results for the same method, category and seed.
    """
    import pandas as pd

    cols = [*metrics, *[f"{m}_std" for m in metrics], "n_seeds"]
    if not results:
        return pd.DataFrame(columns=["method", "category", *cols]).set_index(["method", "category"])
    df = pd.DataFrame([{"method": r.get("method") or r.get("notebook") or r.get("model"), "category": r["category"],
                        "seed": r.get("seed"), **{m: r.get(m) for m in metrics}} for r in results])
    df["seed"] = df["seed"].fillna(-1)  # a model without a seed (knn) is one "seed"
    dup = df[df.duplicated(["method", "category", "seed"], keep=False)]
    if len(dup):
        raise ValueError(f"several results for the same method, category and seed: "
                         f"{dup[['method', 'category', 'seed']].values[:5]}")
    df[list(metrics)] = df[list(metrics)].astype(float)
    per_seed_mean = df.groupby(["method", "seed"], sort=False)[list(metrics)].mean().reset_index()
    per_seed_mean["category"] = "mean"
    out = []
    for frame in (df, per_seed_mean):
        g = frame.groupby(["method", "category"], sort=False)[list(metrics)]
        stats = g.mean().join(g.std(ddof=1).add_suffix("_std"))
        stats["n_seeds"] = g.size()
        out.append(stats)
    table = pd.concat(out)[cols]
    order = [(m, c) for m in dict.fromkeys(df["method"]) for c in [*dict.fromkeys(df["category"]), "mean"]
             if (m, c) in table.index]
    return table.loc[order]


def _rel(p, repo_root=None) -> str:
    root = Path(repo_root or Path.cwd()).resolve()
    p = Path(p)
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def reproduce_command(run: dict, repo_root=None, runs_dir="runs-reproduced") -> str:
    """The ``python -m adcore run`` command that reruns one run of a manifest and gives the same digits in every
    results file (all but :data:`adcore.provenance.TIMING_FIELDS`), at any ``--jobs`` and on any core count, with
    the same library versions and device. It plans the same run key, in ``runs_dir`` so that it does not find the
    original finished."""
    injected = {k: v for k, v in run["params"].items() if k != "results_dir"}
    spec = run.get("params_spec") or "default"
    args = ["python", "-m", "adcore", "run", _rel(run["notebook"], repo_root)]
    cats = injected.get("categories")
    if cats is not None and len(cats) != 1:
        # several categories in one run: a grid's list entry, which the flags cannot say; the same parameters inline
        args += ["--params", json.dumps(injected)]
    else:
        args += ["--params", spec] if spec != "default" else []
        args += ["--categories", cats[0]] if cats is not None else []
        args += ["--seeds", str(injected["seed"])] if "seed" in injected else []
    args += ["--threads", str(run.get("threads") or 1), "--runs-dir", runs_dir]
    return shlex.join(args)


def papermill_command(run: dict, repo_root=None) -> str:
    """The plain papermill command equivalent to one run of a manifest (``results_dir`` left to the notebook), with
    the run's thread count in the environment."""
    values = {k: v for k, v in run["params"].items() if k != "results_dir"}
    threads = " ".join(f"{k}={v}" for k, v in provenance.thread_env(run.get("threads") or 1).items())
    cmd = f"{threads} papermill {_rel(run['notebook'], repo_root)} {_rel(run['output'], repo_root)} -k python3"
    if values:
        cmd += " -y '" + json.dumps(values) + "'"  # JSON is YAML, and keeps lists and None intact
    return cmd
