"""Executing runs: one run under its lock (:func:`execute_run`), many with an executor (:func:`execute_runs`).

A run whose ``status.json`` says ``ok`` for the current notebook source and thread count is skipped unless ``force``;
a failed run keeps its partial notebook; an interrupted one is redone (``fit`` resumes from its checkpoint).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..utils import atomic_write_json
from . import lock as runlock
from . import provenance
from .plan import Run

STATUS = "status.json"
RUNS_MARKER = ".adcore-runs-dir"  # in the runs directory: lets a worker check it sees the same folder as the runner
# Seconds a notebook's default run takes when no earlier run of it has finished: `make book` on a fresh clone, 2 cores,
# JOBS=2, one torch thread per run, measured at e731229 (the build log's "finished in" lines; issue 22: ADViT's
# minimax-off run moved to a validation curve, AnoViT and its conv AE train 25 epochs each). Only the order runs start
# in depends on them.
EXPECTED_SECONDS = {"vt_adl": 730, "dmad": 479, "anovit": 430, "advit": 265, "aand": 204, "baselines": 39}
DEFAULT_EXPECTED_SECONDS = 60  # a notebook not in the table (a user's own)


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


def expected_seconds(run: Run) -> tuple[float, str]:
    """(seconds, where the figure comes from): the wall time the run's last successful attempt recorded in its
    ``status.json`` (whatever the notebook's source then: an edit seldom changes the cost much), else the notebook's
    entry in :data:`EXPECTED_SECONDS`. The whole papermill run counts, not only the ``fit_seconds`` its results
    carry: evaluation and figures take their share of a worker too."""
    st = _read_status(run)
    if st and st.get("status") == "ok" and isinstance(st.get("seconds"), (int, float)):
        return float(st["seconds"]), "last run"
    if run.name in EXPECTED_SECONDS:
        return float(EXPECTED_SECONDS[run.name]), "estimate"
    return float(DEFAULT_EXPECTED_SECONDS), "default estimate"


def start_order(runs: list[Run]) -> list[int]:
    """Indices into ``runs``, longest expected first (ties in planned order): with several workers the longest run
    then never starts last and leaves the others idle at the end."""
    seconds = [expected_seconds(run)[0] for run in runs]
    return sorted(range(len(runs)), key=lambda i: (-seconds[i], i))


def finished_line(run: Run, status: dict) -> str:
    """One build-log line for a run that has just finished: status, wall seconds, notebook, parameter set, --set
    items and categories (when the run has them)."""
    what = f"{run.name} [{run.params_name}]"
    if run.sets:
        what += " " + " ".join(run.sets)
    cats = run.resolved.get("categories", run.resolved.get("category"))
    if cats:
        what += " " + ",".join([cats] if isinstance(cats, str) else map(str, cats))
    return f"  finished in {status.get('seconds', 0):7.1f} s: {what} ({status['status']})"


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
    processes), started longest expected first (:func:`start_order`); each run logs one line when it finishes
    (:func:`finished_line`).

    Returns one status dict per run, in order: ``status`` is ``ok``, ``skipped`` (finished earlier, or by another
    runner meanwhile) or ``failed``. A run another runner holds is waited for (polled every ``poll`` seconds). A
    ``KeyboardInterrupt`` reaches the papermill processes too; finished runs keep their ``ok`` status.
    """
    from tqdm.auto import tqdm

    executor = executor or LocalExecutor(jobs)
    results: dict[int, dict] = {}
    todo = []
    for i in start_order(runs):
        run_status(runs[i])  # a run left "running" by a killed runner now reads "interrupted"
        if not force and is_done(runs[i]):
            results[i] = {**_read_status(runs[i]), "status": "skipped"}
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
                with bar.external_write_mode():  # the line above the bar, not inside it
                    log(finished_line(runs[i], st))
                bar.update(1)
                bar.set_postfix({s: sum(r["status"] == s for r in results.values())
                                 for s in ("ok", "failed", "skipped")})
                if st["status"] == "failed":
                    log(f"\n  FAILED {runs[i].key}: {_describe_error(st)}")
            todo = [i for i in todo if i in busy]  # still longest first
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
    keep = ("key", "name", "notebook", "params_name", "params_spec", "sets", "params", "resolved", "threads", "gpu",
            "status", "run_dir",
            "output", "seconds", "notebook_sha", "error", "stale")
    rows = [{k: s.get(k) for k in keep} for s in statuses]
    return atomic_write_json({"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "argv": sys.argv, "runs": rows}, path)


