"""adcore.runs and ``python -m adcore run``: planning, up-front validation, skipping, failures, parallel runs, locks;
adcore.book.build's staging.

The notebooks here are tiny stand-ins written into tmp_path (no torch import), so each papermill run costs only a
kernel start.
"""
import json
import os

import nbformat
import pytest

from adcore.book import build as book
from adcore.runs import collect, execute, plan
from adcore.__main__ import main
from adcore.data import DataError
from adcore.runs.params import ParameterError

pytestmark = pytest.mark.notebook


def write_notebook(path, params_src, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# stand-in"),
                nbformat.v4.new_code_cell(params_src, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, str(path))
    return path


OK_PARAMS = 'x = 1  # a number\nseed = 0  # seed\ncategories = None  # which\nresults_dir = "results"  # where'
OK_CELLS = [
    "import json, os\nos.makedirs(results_dir, exist_ok=True)",
    # the kernel's parent is the process that ran papermill: tells the jobs test which process ran it
    "json.dump({'x': x, 'seed': seed, 'categories': categories, 'runner_pid': os.getppid(), 'cwd': os.getcwd(),\n"
    "           'viewer': os.environ.get('ADCORE_VIEWER')}, open(os.path.join(results_dir, 'r.json'), 'w'))",
]


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    (d / "params" / "ok").mkdir(parents=True)
    write_notebook(d / "ok.ipynb", OK_PARAMS, OK_CELLS)
    write_notebook(d / "bad.ipynb", "x = 1  # a number", ["y = 2", "raise ValueError('boom on purpose')", "z = 3"])
    (d / "params" / "ok" / "five.yaml").write_text("x: 5  # five\n")
    return d


def write_yaml(path, text):
    path.write_text(text)
    return path


def result_of(run):
    return json.loads((execute.Path(run.run_dir) / "results" / "r.json").read_text())


def test_plan_keys_by_notebook_params_and_seed(nbdir, tmp_path):
    nb = nbdir / "ok.ipynb"
    runs = plan.plan_runs([nb], ["default", "five"], [None], [0, 1], runs_dir=tmp_path / "runs")
    keys = [r.key for r in runs]
    assert len(set(keys)) == 4 and all(k.startswith("ok-") for k in keys)
    assert keys[0].startswith("ok-default-") and keys[0].endswith("-s0") and keys[3].startswith("ok-five-")
    again = plan.plan_runs([nb], ["default", "five"], [None], [0, 1], runs_dir=tmp_path / "runs")
    assert [r.key for r in again] == keys  # stable across invocations
    assert runs[3].params["x"] == 5 and runs[3].params["seed"] == 1
    assert runs[0].params["results_dir"] == os.path.join(runs[0].run_dir, "results")


def test_bad_parameter_files_fail_before_any_run(nbdir, tmp_path):
    nb = nbdir / "ok.ipynb"
    bad = nbdir / "params" / "ok"
    (bad / "typo.yaml").write_text("xx: 5\n")
    (bad / "typed.yaml").write_text("x: five\n")
    (bad / "broken.yaml").write_text("x: [1\n")
    (bad / "list.yaml").write_text("- x\n")
    (bad / "runner.yaml").write_text("results_dir: elsewhere\n")
    for name, match in [("typo", r"unknown parameter\(s\) \['xx'\]"), ("typed", "x = 'five' is a str"),
                        ("broken", "not valid YAML"), ("list", "must hold a mapping"),
                        ("runner", "set by the runner"), ("missing", "does not exist")]:
        with pytest.raises(ParameterError, match=match):
            plan.plan_runs([nb], ["default", name], runs_dir=tmp_path / "runs")
    with pytest.raises(ParameterError, match="no 'seed' parameter"):
        plan.plan_runs([nbdir / "bad.ipynb"], seeds=[1], runs_dir=tmp_path / "runs")
    # the CLI turns it into one clear line and exit status 2, and nothing ran
    assert main(["run", str(nb), "--params", "typo", "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert not (tmp_path / "runs").exists()


def test_missing_data_root_or_category_fails_up_front(tmp_path):
    nb = write_notebook(tmp_path / "data.ipynb", 'dataset = "textures"  # d\ndata_root = None  # r\n'
                        'categories = None  # c', ["1"])
    with pytest.raises(DataError, match="nor an existing folder"):
        plan.plan_runs([nb], [{"dataset": str(tmp_path / "nowhere")}], runs_dir=tmp_path / "runs")
    with pytest.raises(DataError, match="never downloaded"):
        plan.plan_runs([nb], [{"dataset": "mvtec"}], runs_dir=tmp_path / "runs")
    with pytest.raises(DataError, match="does not exist"):
        plan.plan_runs([nb], [{"dataset": "mvtec", "data_root": str(tmp_path / "absent")}],
                         runs_dir=tmp_path / "runs")
    assert main(["run", str(nb), "--params", str(write_yaml(tmp_path / "p.yaml", "dataset: mvtec\n")),
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_unknown_category_fails_up_front(tmp_path, monkeypatch):
    nb = write_notebook(tmp_path / "data.ipynb", 'dataset = "textures"  # d\ndata_root = None  # r\n'
                        'categories = None  # c', ["1"])
    monkeypatch.setattr("adcore.data.list_categories", lambda name, data_root=None: ["brick", "grass"])
    with pytest.raises(ParameterError, match=r"categories \['carpet'\] are not in dataset"):
        plan.plan_runs([nb], categories=["carpet"], runs_dir=tmp_path / "runs")
    assert plan.plan_runs([nb], categories=["brick"], runs_dir=tmp_path / "runs")[0].params["categories"] == \
        ["brick"]


def test_failures_are_reported_with_their_cell_and_do_not_stop_the_batch(nbdir, tmp_path):
    runs = plan.plan_runs([nbdir / "bad.ipynb", nbdir / "ok.ipynb"], runs_dir=tmp_path / "runs")
    log = []
    statuses = execute.execute_runs(runs, progress=False, log=log.append)
    assert [s["status"] for s in statuses] == ["failed", "ok"]
    err = statuses[0]["error"]
    assert err["type"] == "ValueError" and "boom on purpose" in err["message"]
    assert "raise ValueError" in err["source"]
    partial = nbformat.read(statuses[0]["output"], as_version=4)
    code = [c for c in partial.cells if c.cell_type == "code"]
    assert code[-1].execution_count is None  # the cell after the failure never ran
    assert any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert any("boom on purpose" in line and "cell In[" in line for line in log)
    assert result_of(runs[1])["viewer"] == "static"  # the viewer pre-renders under the runner
    assert result_of(runs[1])["cwd"] == runs[1].run_dir
    lines = []
    assert execute.summarize(statuses, log=lines.append) is False
    assert any("1 of 2 runs failed" in line for line in lines)


def test_finished_runs_are_skipped_unless_forced_or_stale(nbdir, tmp_path):
    nb = nbdir / "ok.ipynb"
    runs = plan.plan_runs([nb], seeds=[3], runs_dir=tmp_path / "runs")
    assert execute.execute_runs(runs, progress=False)[0]["status"] == "ok"
    stamp = os.stat(runs[0].output).st_mtime_ns
    assert execute.execute_runs(runs, progress=False)[0]["status"] == "skipped"
    assert os.stat(runs[0].output).st_mtime_ns == stamp
    # an interrupted run (status never reached ok) is redone, resuming from its checkpoints but not keeping the
    # results of the interrupted attempt (a second file per category)
    run_dir = execute.Path(runs[0].run_dir)
    status_path = run_dir / execute.STATUS
    status = json.loads(status_path.read_text())
    status_path.write_text(json.dumps({**status, "status": "running"}))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "results" / "stale.json").write_text("{}")
    assert execute.execute_runs(runs, progress=False)[0]["status"] == "ok"
    assert (run_dir / "checkpoints").is_dir() and not (run_dir / "results" / "stale.json").exists()
    # forced: starts over, checkpoints included
    assert execute.execute_runs(runs, force=True, progress=False)[0]["status"] == "ok"
    assert not (run_dir / "checkpoints").exists()
    # the notebook changed since it finished: stale, so rerun
    write_notebook(nb, OK_PARAMS, OK_CELLS + ["print('new cell')"])
    runs = plan.plan_runs([nb], seeds=[3], runs_dir=tmp_path / "runs")
    assert execute.execute_runs(runs, progress=False)[0]["status"] == "ok"
    assert result_of(runs[0])["seed"] == 3


def test_jobs_run_in_separate_processes_and_the_cli_writes_a_manifest(nbdir, tmp_path, capsys):
    rd = tmp_path / "runs"
    rc = main(["run", str(nbdir / "ok.ipynb"), "--seeds", "0", "1", "--jobs", "2", "--runs-dir", str(rd),
               "--no-progress"])
    assert rc == 0
    manifest = collect.load_manifest(rd / "manifest.json")
    assert [r["status"] for r in manifest] == ["ok", "ok"]
    pids = {json.loads((execute.Path(r["run_dir"]) / "results" / "r.json").read_text())["runner_pid"]
            for r in manifest}
    assert len(pids) == 2 and os.getpid() not in pids
    assert [r["results_dir"] if False else r["params"]["seed"] for r in manifest] == [0, 1]
    # a dry run only lists the (finished) runs
    assert main(["run", str(nbdir / "ok.ipynb"), "--seeds", "0", "--dry-run", "--runs-dir", str(rd)]) == 0
    assert "ok-default-" in capsys.readouterr().out
    cmd = collect.papermill_command(manifest[0], repo_root=tmp_path)
    assert cmd.startswith("OMP_NUM_THREADS=1 ") and " papermill notebooks/ok.ipynb runs/ok/" in cmd
    assert '"seed": 0' in cmd


def test_grid_file_validation(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("notebooks: all\nparams: [default, smoke]\nseeds: [0, 1]\n")
    assert plan.load_grid(grid) == [{"notebooks": "all", "params": ["default", "smoke"], "categories": [None],
                                       "seeds": [0, 1]}]
    grid.write_text("notebook: all\n")
    with pytest.raises(ParameterError, match=r"unknown key\(s\) \['notebook'\]"):
        plan.load_grid(grid)
    grid.write_text("seeds: [zero]\n")
    with pytest.raises(ParameterError, match="seeds must be integers"):
        plan.load_grid(grid)
    # several grids add up; each is checked, and 'grids' must stand alone
    grid.write_text("grids:\n- params: [a]\n- params: [b]\n  seeds: [1, 2]\n")
    assert [g["params"] for g in plan.load_grid(grid)] == [["a"], ["b"]]
    assert plan.load_grid(grid)[1]["seeds"] == [1, 2] and plan.load_grid(grid)[0]["seeds"] == [None]
    grid.write_text("grids:\n- params: [a]\n- seeds: [x]\n")
    with pytest.raises(ParameterError, match=r"grid 2.*seeds must be integers"):
        plan.load_grid(grid)
    grid.write_text("grids: [{params: [a]}]\nseeds: [1]\n")
    with pytest.raises(ParameterError, match="'grids' must be a non-empty list of grids and the only key"):
        plan.load_grid(grid)
    with pytest.raises(ValueError, match="not found"):
        plan.resolve_notebooks(["nope"], tmp_path)


def test_results_are_collected_from_the_manifest(tmp_path):
    run_dir = tmp_path / "runs" / "m" / "k"
    (run_dir / "results").mkdir(parents=True)
    for cat, v in [("a", 0.5), ("b", 0.7)]:
        (run_dir / "results" / f"{cat}.json").write_text(json.dumps(
            {"model": "m", "category": cat, "image_auroc": v, "pixel_auroc": v, "aupro": None}))
    runs = [{"key": "k", "name": "m", "status": "ok", "run_dir": str(run_dir)},
            {"key": "f", "name": "f", "status": "failed", "run_dir": str(tmp_path / "nowhere")}]
    results = collect.collect_results(runs)
    assert [r["category"] for r in results] == ["a", "b"] and results[0]["run_key"] == "k"
    table = collect.results_table(results)
    assert table.loc[("m", "mean"), "image_auroc"] == pytest.approx(0.6)
    assert table.loc[("m", "a"), "aupro"] != table.loc[("m", "a"), "aupro"]  # NaN


def test_interrupting_a_batch_keeps_finished_runs(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during the second run; rerunning redoes only it."""
    import signal
    import subprocess
    import sys
    import time

    nb = write_notebook(tmp_path / "slow.ipynb", "seed = 0  # s",
                        ["import os, time\ntime.sleep(float(os.environ.get('TEST_SLEEP', '0')) * seed)"])
    rd = tmp_path / "runs"
    # A job started in the background by a non-interactive shell (as CI harnesses may start the suite) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt: give the runner a terminal's default.
    proc = subprocess.Popen([sys.executable, "-m", "adcore", "run", str(nb), "--seeds", "0", "1", "--runs-dir",
                             str(rd), "--no-progress"], env={**os.environ, "TEST_SLEEP": "300"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = plan.plan_runs([nb], seeds=[0, 1], runs_dir=rd)
    deadline = time.time() + 120
    while time.time() < deadline and (execute._read_status(runs[1]) or {}).get("status") != "running":
        time.sleep(0.3)
    time.sleep(3)  # let the kernel start the sleeping cell
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "finished runs are kept" in out
    assert execute._read_status(runs[0])["status"] == "ok" and execute._read_status(runs[1])["status"] == "interrupted"
    assert [s["status"] for s in execute.execute_runs(runs, progress=False)] == ["skipped", "ok"]


def test_staging_fits_the_toc_and_repository_links_to_what_the_book_holds(tmp_path):
    toc = {"format": "jb-book", "root": "intro", "parts": [
        {"caption": "Data", "chapters": [{"file": "chapters/data"}]},
        {"caption": "Papers", "chapters": [{"file": "papers/vt_adl"}, {"file": "papers/aand"}]},
        {"caption": "Appendix", "chapters": [{"file": "chapters/reproducibility"}]}]}
    staged, dropped = book._stage_toc(toc, {"intro", "chapters/data", "papers/aand", "papers/new"})
    assert dropped == ["papers/vt_adl", "chapters/reproducibility"]
    assert [p["caption"] for p in staged["parts"]] == ["Data", "Papers"]
    assert staged["parts"][1]["chapters"] == [{"file": "papers/aand"}, {"file": "papers/new"}]

    src = write_notebook(tmp_path / "p.ipynb", "x = 1  # x", [])
    nb = nbformat.read(str(src), as_version=4)
    nb.cells[0].source = "See [the model](../adcore/models/vt_adl.py), [`kernels/x.py`](../../kernels/x.py), " \
                         "[the data](chapters/data) and [web](https://example.org/a)."
    nbformat.write(nb, str(src))
    book._stage_notebook(src, tmp_path / "out.ipynb")
    text = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4).cells[0].source
    assert text == "See the model (`adcore/models/vt_adl.py`), `kernels/x.py`, [the data](chapters/data) and " \
                   "[web](https://example.org/a)."


def _wait_for(predicate, timeout=120, what="condition"):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_killed_runner_leaves_no_process_and_its_run_reads_interrupted(tmp_path, jobs):
    """kill -9 of the runner: its papermill process and kernel go too, the run's status.json stops saying "running"
    (the lock's holder is gone), and the next runner takes the run over at once."""
    import signal
    import subprocess
    import sys

    nb = write_notebook(tmp_path / "slow.ipynb", "seed = 0  # s", [
        "import json, os, time\njson.dump({'kernel': os.getpid(), 'parent': os.getppid()}, open('pids.json', 'w'))\n"
        "time.sleep(float(os.environ.get('TEST_SLEEP', '0')))"])
    rd = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "adcore", "run", str(nb), "--seeds", "0", "1", "--jobs", str(jobs),
                             "--runs-dir", str(rd), "--no-progress"], env={**os.environ, "TEST_SLEEP": "300"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = plan.plan_runs([nb], seeds=[0], runs_dir=rd)[0]
    pids_file = execute.Path(run.run_dir) / "pids.json"
    _wait_for(lambda: pids_file.is_file() and pids_file.read_text().endswith("}"), what="the kernel to start")
    pids = json.loads(pids_file.read_text())
    assert execute._read_status(run)["status"] == "running" and execute.run_status(run)["status"] == "running"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_for(lambda: not _alive(pids["kernel"]) and not _alive(pids["parent"]), timeout=30,
              what="the orphaned kernel and papermill to exit")
    st = execute.run_status(run)
    assert st["status"] == "interrupted" and f":{proc.pid} is gone" in st["interrupted"]
    assert json.loads((execute.Path(run.run_dir) / execute.STATUS).read_text())["status"] == "interrupted"
    os.environ["TEST_SLEEP"] = "0"
    try:
        assert execute.execute_runs([run], progress=False)[0]["status"] == "ok"  # no waiting for a lease to expire
    finally:
        del os.environ["TEST_SLEEP"]


def test_two_runners_on_one_runs_dir_never_run_a_key_twice(tmp_path):
    """Two `adcore run` processes started at once on the same grid and runs directory: every run executes once,
    both finish, and each reports the runs the other did as skipped."""
    import subprocess
    import sys

    nb = write_notebook(tmp_path / "slow.ipynb", "seed = 0  # s", [
        "import os, time\nlog = os.environ['TEST_LOG']\nopen(log, 'a').write(f'{seed} start {time.time()}\\n')\n"
        "time.sleep(1.5)\nopen(log, 'a').write(f'{seed} end {time.time()}\\n')"])
    rd, log = tmp_path / "runs", tmp_path / "executions.log"
    cmd = [sys.executable, "-m", "adcore", "run", str(nb), "--seeds", "0", "1", "2", "3", "--runs-dir", str(rd),
           "--no-progress"]
    env = {**os.environ, "TEST_LOG": str(log)}
    procs = [subprocess.Popen(cmd + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for extra in ([], ["--jobs", "2"])]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    events = [line.split() for line in log.read_text().splitlines()]
    starts = sorted(int(seed) for seed, what, _ in events if what == "start")
    assert starts == [0, 1, 2, 3], events  # each key executed exactly once
    runs = plan.plan_runs([nb], seeds=[0, 1, 2, 3], runs_dir=rd)
    assert all(execute._read_status(r)["status"] == "ok" for r in runs)
    assert not any((execute.Path(r.run_dir) / ".lock").exists() for r in runs)
    # each runner says ok for the runs it did and skipped for the others'
    done_by = [{line.split()[-1] for line in out.splitlines() if line.strip().startswith("ok ")} for out in outs]
    assert done_by[0] | done_by[1] == {r.key for r in runs} and not done_by[0] & done_by[1], outs


def test_threads_per_run_do_not_depend_on_jobs(nbdir, tmp_path):
    """Every run's kernel gets --threads torch threads (default 1) at any --jobs; it is in status.json and the
    manifest, and a finished run asked for at another thread count is rerun, not reused."""
    nb = write_notebook(tmp_path / "threads.ipynb", OK_PARAMS, [
        "import json, os\nos.makedirs(results_dir, exist_ok=True)\n"
        "json.dump({k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'ADCORE_THREADS')},\n"
        "          open(os.path.join(results_dir, 'r.json'), 'w'))"])
    seen = {}
    for jobs in (1, 2):
        rd = tmp_path / f"runs{jobs}"
        assert main(["run", str(nb), "--seeds", "0", "1", "--jobs", str(jobs), "--runs-dir", str(rd),
                     "--no-progress"]) == 0
        manifest = collect.load_manifest(rd / "manifest.json")
        seen[jobs] = [json.loads((execute.Path(r["run_dir"]) / "results" / "r.json").read_text()) for r in manifest]
        assert [r["threads"] for r in manifest] == [1, 1]
    assert seen[1] == seen[2] == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ADCORE_THREADS": "1"}] * 2
    runs = plan.plan_runs([nb], seeds=[0], runs_dir=tmp_path / "runs1", threads=3)
    assert not execute.is_done(runs[0])
    assert execute.execute_runs(runs, progress=False)[0]["threads"] == 3
    assert result_of(runs[0])["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="threads must be a positive int"):
        plan.plan_runs([nb], threads=0, runs_dir=tmp_path / "runs1")


def test_reproduce_command_plans_the_same_run(nbdir, tmp_path):
    nb = nbdir / "ok.ipynb"
    grid = plan.plan_runs([nb], ["five", {"x": 7}], ["a", ["a", "b"]], [2], runs_dir=tmp_path / "runs",
                           check_data=False)
    for run in grid:
        row = {**execute.asdict(run), "status": "ok"}
        cmd = collect.reproduce_command(row, repo_root=tmp_path)
        assert cmd.startswith("python -m adcore run notebooks/ok.ipynb --params ") and "--threads 1" in cmd
        args = collect.shlex.split(cmd)[4:]
        from adcore.__main__ import _parser
        parsed = _parser().parse_args(["run", *args])
        again = plan.plan_runs([tmp_path / parsed.notebooks[0]], parsed.params, parsed.categories or [None],
                                parsed.seeds or [None], runs_dir=tmp_path / "runs", check_data=False,
                                sets=plan.parse_sets(parsed.set))
        drop = lambda params: {k: v for k, v in params.items() if k != "results_dir"}  # noqa: E731
        assert len(again) == 1 and drop(again[0].params) == drop(run.params)
        assert again[0].key == run.key  # the same folder name, so the same files (several categories: --set)


def test_a_lock_from_another_host_holds_until_its_lease_expires(nbdir, tmp_path):
    """A holder on another machine cannot be checked by pid: its lock holds while its heartbeat is fresh, and is taken
    over once the file is older than the lease."""
    import time

    run = plan.plan_runs([nbdir / "ok.ipynb"], runs_dir=tmp_path / "runs")[0]
    run_dir = execute.Path(run.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / execute.STATUS).write_text(json.dumps({**execute.asdict(run), "status": "running"}))
    lock = run_dir / ".lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "pid_started": 0.0, "token": "t"}))
    assert execute.run_status(run)["status"] == "running"
    busy = execute.execute_run(run)
    assert busy["status"] == "busy" and busy["holder"] == "elsewhere:1" and lock.exists()
    old = time.time() - execute.runlock.LEASE_S - 5
    os.utime(lock, (old, old))
    assert execute.run_status(run)["status"] == "interrupted"
    assert execute.execute_run(run)["status"] == "ok" and not lock.exists()


def test_compare_checks_every_digit_of_the_shared_results_files(tmp_path, capsys):
    res = {"image_auroc": 0.9012345678901234, "created": "then", "fit_seconds": 1.0, "params": {"seed": 0}}
    for d in ("a", "b"):
        path = tmp_path / d / "nb" / "nb-default-x-s0" / "results" / "r.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({**res, "created": d, "fit_seconds": len(d) + (d == "b")}))  # timing differs
    (tmp_path / "a" / "nb" / "nb-default-x-s0" / "results" / "only_a.json").write_text("{}")  # not shared: ignored
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "1 of 1 shared results files agree" in capsys.readouterr().out
    b = tmp_path / "b" / "nb" / "nb-default-x-s0" / "results" / "r.json"
    b.write_text(json.dumps({**res, "image_auroc": 0.9012345678901235}))  # one digit in the 16th place
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "DIFFERS nb/nb-default-x-s0/results/r.json: image_auroc" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert main(["compare", str(tmp_path / "a"), str(tmp_path)]) == 1  # nothing shared is not a pass


def test_saving_a_notebook_with_outputs_and_metadata_keeps_its_runs_finished(nbdir, tmp_path):
    """A run is stale when its notebook's sources change, not when a front end saves outputs, counts or metadata."""
    import nbformat

    nb_path = nbdir / "ok.ipynb"
    before = plan.plan_runs([nb_path], runs_dir=tmp_path / "runs", check_data=False)[0]
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.metadata["kernelspec"] = {"name": "adcore", "display_name": "adcore (.venv)", "language": "python"}
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count = 7
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
            cell.metadata["collapsed"] = True
    nbformat.write(nb, str(nb_path))
    same = plan.plan_runs([nb_path], runs_dir=tmp_path / "runs", check_data=False)[0]
    assert same.notebook_sha == before.notebook_sha and same.key == before.key
    nb.cells[-1].source += "\nprint('changed')"
    nbformat.write(nb, str(nb_path))
    changed = plan.plan_runs([nb_path], runs_dir=tmp_path / "runs", check_data=False)[0]
    assert changed.notebook_sha != before.notebook_sha


def test_two_book_builds_at_once_fetch_the_widget_javascript_once(tmp_path):
    """Two builds (two test workers, two users of one checkout) starting together used to race on vendor.partial."""
    import threading

    script = tmp_path / "fetch.sh"
    script.write_text('sleep 1; echo run >> "$1.count"; mkdir -p "$1/html-manager" "$1/mathjax"; '
                      'touch "$1/require.js" "$1/html-manager/embed-amd.js" "$1/mathjax/tex-mml-chtml.js"\n')
    dest = tmp_path / "vendor"
    threads = [threading.Thread(target=book.fetch_widget_js, args=(dest, script)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "vendor.count").read_text().splitlines() == ["run"]
    assert (dest / "require.js").is_file()


def _fake_run(tmp_path, name, params_name="default", categories=None, sets=()):
    run_dir = tmp_path / "runs" / name / f"{name}-{params_name}"
    return plan.Run(notebook=f"{name}.ipynb", name=name, params_name=params_name, params={},
                    key=f"{name}-{params_name}-{categories}", run_dir=str(run_dir), output=str(run_dir / "out.ipynb"),
                    sets=list(sets), resolved={"categories": categories} if categories else {})


class _RecordingExecutor:
    """Runs nothing: records the order runs are handed over in and answers ok with a made-up wall time."""

    def __init__(self):
        self.order = []

    def map(self, runs, *, timeout=None, force=False, log=print):
        for i, run in enumerate(runs):
            self.order.append(run.name)
            yield i, {**execute.asdict(run), "status": "ok", "seconds": 12.34}


def test_runs_start_longest_expected_first(tmp_path):
    names = ["aand", "advit", "anovit", "baselines", "dmad", "vt_adl", "mine"]  # the planner's alphabetical order
    runs = [_fake_run(tmp_path, n) for n in names]
    # no run has finished before: the per-notebook estimates, unknown notebooks at the default, ties in planned order
    assert [runs[i].name for i in execute.start_order(runs)] == [
        "vt_adl", "dmad", "anovit", "advit", "aand", "mine", "baselines"]
    assert execute.expected_seconds(runs[5]) == (730.0, "estimate")
    assert execute.expected_seconds(runs[6]) == (execute.DEFAULT_EXPECTED_SECONDS, "default estimate")
    # a finished run's own wall time wins over the estimate; a failed attempt's partial time does not count
    for run, status, seconds in ((runs[2], "ok", 900.0), (runs[0], "failed", 5000.0)):
        execute.Path(run.run_dir).mkdir(parents=True)
        (execute.Path(run.run_dir) / execute.STATUS).write_text(json.dumps({"status": status, "seconds": seconds}))
    assert execute.expected_seconds(runs[2]) == (900.0, "last run")
    assert [runs[i].name for i in execute.start_order(runs)] == [
        "anovit", "vt_adl", "dmad", "advit", "aand", "mine", "baselines"]
    # execute_runs hands them to the executor in that order and returns the statuses in planned order
    recorder, log = _RecordingExecutor(), []
    statuses = execute.execute_runs(runs, executor=recorder, progress=False, log=log.append)
    assert recorder.order == ["anovit", "vt_adl", "dmad", "advit", "aand", "mine", "baselines"]
    assert [s["name"] for s in statuses] == names
    assert log[:2] == ["  finished in    12.3 s: anovit [default] (ok)", "  finished in    12.3 s: vt_adl [default] (ok)"]


def test_the_finished_line_names_notebook_params_sets_categories_and_seconds(tmp_path):
    run = _fake_run(tmp_path, "vt_adl", "paper", categories=["bottle", "cable"], sets=["lr=0.001"])
    line = execute.finished_line(run, {"status": "failed", "seconds": 743.96})
    assert line == "  finished in   744.0 s: vt_adl [paper] lr=0.001 bottle,cable (failed)"
    assert execute.finished_line(_fake_run(tmp_path, "knn", categories="brick"), {"status": "ok", "seconds": 1}) \
        == "  finished in     1.0 s: knn [default] brick (ok)"
