"""``adcore run --scheduler`` / ``--cluster`` on real processes: a ``dask scheduler`` and two ``dask worker`` processes
on 127.0.0.1 run real smoke notebooks; one worker is killed (SIGKILL) while it holds a run with a checkpoint, and every
results file must still equal the local run's digit for digit. The SLURM path is checked on its job script.

The grid is two notebooks copied into tmp_path with a ``kill`` parameter file each: anovit's smoke parameters as they
are, and vt_adl's smoke parameters with 40 epochs and no ablations, so that its training lasts long enough to be
killed after a checkpoint and resumed. Measured numbers (which run, when, how long the retry took) are printed.
"""
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adcore.runs import collect, execute, plan, provenance
from adcore.__main__ import main
from test_runner import _wait_for

# One worker runs the reference grid and the cluster (module fixtures) for every test here.
pytestmark = [pytest.mark.notebook, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"], [sys.executable, "-m", "distributed.cli.dask_worker"]
KILL_EPOCHS = 40  # vt_adl smoke trains 1 epoch (~0.3 s on one core); 40 leave a window to kill it mid-training


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """notebooks/{vt_adl,anovit}.ipynb with params/<nb>/kill.yaml in a fresh folder."""
    root = tmp_path_factory.mktemp("grid")
    for name, extra in (("vt_adl", {"num_epochs": KILL_EPOCHS, "ablations": False}), ("anovit", {})):
        (root / "notebooks" / "params" / name).mkdir(parents=True)
        shutil.copy(REPO / "notebooks" / f"{name}.ipynb", root / "notebooks")
        smoke = yaml.safe_load((REPO / "notebooks" / "params" / name / "smoke.yaml").read_text())
        (root / "notebooks" / "params" / name / "kill.yaml").write_text(yaml.safe_dump({**smoke, **extra}))
    return root


def _run_cli(root: Path, *args, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "adcore", "run", "notebooks/vt_adl.ipynb", "notebooks/anovit.ipynb", "--params",
           "kill", "--no-progress", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(grid):
    """The grid run locally, two runs side by side: what every other way of running it must reproduce."""
    proc = _run_cli(grid, "--jobs", "2", "--runs-dir", "runs-local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return collect.load_manifest(grid / "runs-local" / "manifest.json")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler, two one-thread workers (no nanny: a killed worker stays dead) and a third that offers a GPU
    resource (no GPU needed: the resource is only a label the scheduler matches) on 127.0.0.1."""
    d = tmp_path_factory.mktemp("dask")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    logs = []

    def start(cmd, name):
        log = open(d / f"{name}.log", "w")
        logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=d)

    scheduler = start(DASK[0] + ["--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], "scheduler")
    workers = [start(DASK[1] + [address, "--nthreads", "1", "--no-nanny", "--name", name, "--local-directory",
                                str(d / name), "--no-dashboard", *extra], name)
               for name, extra in (("w0", []), ("w1", []), ("gpu", ["--resources", "GPU=1"]))]
    from distributed import Client

    try:
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(3, timeout=120)
            pids = client.run(os.getpid)
            gpu_pid = next(pids[addr] for addr, w in client.scheduler_info()["workers"].items() if w["name"] == "gpu")
        yield {"address": address, "workers": workers, "pids": pids, "gpu_pid": gpu_pid, "logs": d}
    finally:
        for p in workers + [scheduler]:
            if p.poll() is None:
                p.terminate()
        for p in workers + [scheduler]:
            try:
                p.wait(timeout=5)  # a worker whose scheduler is gone can spend 30 s closing; nothing is checked here
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def test_slurm_job_script(tmp_path, capsys):
    """--cluster slurm with --dry-run prints the job script dask-jobqueue would submit; no SLURM needed."""
    from distributed.cli.dask_worker import main as dask_worker

    config = tmp_path / "cluster.yaml"
    config.write_text("memory: 16GB\nqueue: cpu\naccount: proj42\njob_script_prologue: ['module load cuda']\n")
    nb = REPO / "notebooks" / "vt_adl.ipynb"
    assert main(["run", str(nb), "--params", "smoke", "--runs-dir", str(tmp_path / "runs"), "--dry-run",
                 "--cluster", "slurm", "--cluster-config", str(config), "--cores", "8", "--gpus", "1",
                 "--walltime", "12:00:00", "--queue", "gpu", "--threads", "2", "--cluster-jobs", "3"]) == 0
    out = capsys.readouterr().out
    script = out[out.index("#!/usr/bin/env bash"):]
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in ("#SBATCH -p gpu", "#SBATCH -A proj42", "#SBATCH --cpus-per-task=8", "#SBATCH -t 12:00:00",
                     "#SBATCH --gres=gpu:1", "#SBATCH --mem=15G"):
        assert expected in directives, script
    assert "module load cuda" in script and "for each of the 3 slurm job(s)" in out
    worker = next(line for line in script.splitlines() if "dask_worker" in line).split()
    args = worker[worker.index("distributed.cli.dask_worker") + 1:]
    ctx = dask_worker.make_context("dask worker", args)  # the worker's own CLI parses the line
    # 8 cores, 2 torch threads per run: 4 runs side by side; one GPU resource for runs with device: cuda
    assert ctx.params["nthreads"] == 4 and ctx.params["resources"] == "GPU=1"
    from adcore.runs.dask import cluster_options
    from adcore.runs.params import ParameterError

    with pytest.raises(ParameterError, match="unknown cluster 'condor'"):
        cluster_options("condor")


def test_a_worker_that_cannot_see_the_runs_dir_fails_early(cluster, tmp_path):
    from adcore.runs.dask import DaskExecutor

    executor = DaskExecutor(scheduler=cluster["address"], log=lambda *a: None)
    try:
        marker = execute.mark_runs_dir(tmp_path / "runs")
        executor.check_workers(tmp_path / "runs", marker, [])  # the same folder: fine
        with pytest.raises(RuntimeError, match=r"(?s)3 of 3 Dask worker\(s\).*is another folder of the same name"):
            executor.check_workers(tmp_path / "runs", "a-different-marker")
        with pytest.raises(RuntimeError, match="does not exist here; runs, results and checkpoints must live on a"):
            executor.check_workers(tmp_path / "elsewhere", marker)
    finally:
        executor.close()
    # no scheduler there: one line and exit status 2 from the CLI, before any run
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert main(["run", str(REPO / "notebooks" / "vt_adl.ipynb"), "--scheduler", "tcp://127.0.0.1:9",
                     "--runs-dir", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert not (tmp_path / "r2").exists()


def test_reproduce_command_gives_the_same_digits_at_another_jobs(grid, reference):
    """Issue 11 §2: the appendix's command for one run, run at --jobs 1 (the reference ran at --jobs 2), writes
    results files equal to the reference's in every field but the timing ones."""
    row = next(r for r in reference if r["name"] == "anovit")
    cmd = collect.reproduce_command(row, repo_root=grid)
    assert cmd == ("python -m adcore run notebooks/anovit.ipynb --params kill --categories brick --threads 1 "
                   "--runs-dir runs-reproduced")
    proc = subprocess.run([sys.executable, *collect.shlex.split(cmd)[1:], "--no-progress", "--jobs", "1"], cwd=grid,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = collect.load_manifest(grid / "runs-reproduced" / "manifest.json")
    assert [r["key"] for r in again] == [row["key"]]
    _assert_same_results(Path(row["run_dir"]), Path(again[0]["run_dir"]))


def _assert_same_results(a: Path, b: Path) -> int:
    files = sorted(p.name for p in (a / "results").glob("*.json"))
    assert files and files == sorted(p.name for p in (b / "results").glob("*.json"))
    for name in files:
        ra, rb = (json.loads((d / "results" / name).read_text()) for d in (a, b))
        assert provenance.same_numbers(ra, rb) == [], name
        assert ra["reproducibility"]["torch_threads"] == 1 and ra["reproducibility"]["device"] == "cpu"
        assert set(ra["reproducibility"]["versions"]) == set(provenance.LIBRARIES)
    return len(files)


def test_two_runners_local_and_dask_share_a_runs_dir(cluster, tmp_path):
    """A local and a Dask runner started at once on one runs directory: every run executes once."""
    nb = tmp_path / "slow.ipynb"
    import nbformat

    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbformat.v4.new_code_cell("seed = 0  # s", metadata={"tags": ["parameters"]}),
                  nbformat.v4.new_code_cell(
                      # the workers do not get this test's environment; the cwd is <runs>/slow/<key>
                      "import os, time\nlog = os.path.join('..', '..', '..', 'executions.log')\n"
                      "open(log, 'a').write(f'{seed} start\\n')\n"
                      "time.sleep(1.5)\nopen(log, 'a').write(f'{seed} end\\n')")]
    nbformat.write(book, str(nb))
    log = tmp_path / "executions.log"
    cmd = [sys.executable, "-m", "adcore", "run", str(nb), "--seeds", "0", "1", "2", "3", "--runs-dir",
           str(tmp_path / "runs"), "--no-progress"]
    # the Dask runner first, the local one as soon as a worker holds a run: both then find runs the other holds
    procs = [subprocess.Popen(cmd + ["--scheduler", cluster["address"]], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    _wait_for(lambda: any((tmp_path / "runs").glob("slow/*/.lock")), 120, what="a worker to take a run")
    procs.insert(0, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    starts = sorted(int(line.split()[0]) for line in log.read_text().splitlines() if line.endswith("start"))
    assert starts == [0, 1, 2, 3], (starts, outs)
    done_by = [{line.split()[-1] for line in out.splitlines() if line.strip().startswith("ok ")} for out in outs]
    assert len(done_by[0] | done_by[1]) == 4 and not done_by[0] & done_by[1], outs
    assert done_by[1], outs  # the Dask runner did the run it was first to take


def test_a_cuda_run_asks_for_a_gpu_worker(cluster, tmp_path):
    """Runs whose parameters say device: cuda go only to the worker started with --resources GPU=1."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('device = "cpu"  # d\nseed = 0  # s', metadata={"tags": ["parameters"]})]
    nbformat.write(nb, str(tmp_path / "gpu.ipynb"))
    proc = subprocess.run([sys.executable, "-m", "adcore", "run", str(tmp_path / "gpu.ipynb"), "--params",
                           '{"device": "cuda"}', "--seeds", "0", "1", "2", "--runs-dir", str(tmp_path / "runs"),
                           "--no-progress", "--scheduler", cluster["address"]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    statuses = collect.load_manifest(tmp_path / "runs" / "manifest.json")
    assert [s["gpu"] for s in statuses] == [True] * 3
    # each run's status names the worker process that held it: the GPU worker, three times out of three
    holders = [json.loads((Path(s["run_dir"]) / execute.STATUS).read_text())["pid"] for s in statuses]
    assert holders == [cluster["gpu_pid"]] * 3


def test_a_killed_worker_loses_nothing(grid, reference, cluster):
    """SIGKILL to the worker holding the vt_adl run after its first epoch checkpoint: the scheduler gives the task to
    the other worker, which takes over the dead worker's lock, resumes from the checkpoint, and every results file of
    the grid equals the local run's digit for digit."""
    import torch

    t0 = time.time()
    driver = subprocess.Popen([sys.executable, "-m", "adcore", "run", "notebooks/vt_adl.ipynb",
                               "notebooks/anovit.ipynb", "--params", "kill", "--no-progress", "--runs-dir",
                               "runs-dask", "--scheduler", cluster["address"]], cwd=grid, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    runs = plan.plan_runs([grid / "notebooks" / "vt_adl.ipynb", grid / "notebooks" / "anovit.ipynb"], ["kill"],
                           runs_dir=grid / "runs-dask")
    victim = runs[0]
    ckpts = Path(victim.run_dir) / "checkpoints"
    ckpt = _wait_for(lambda: next(ckpts.glob("*/last.pt"), None), 300, what="the vt_adl run's first checkpoint")
    holder, _ = execute.runlock.read_lock(victim.run_dir)
    worker = {pid: addr for addr, pid in cluster["pids"].items()}[holder["pid"]]
    os.kill(holder["pid"], signal.SIGKILL)
    t_kill = time.time()
    next(p for p in cluster["workers"] if p.pid == holder["pid"]).wait(timeout=30)
    state = torch.load(ckpt, weights_only=False)
    epoch_at_kill = state["next_epoch"]
    assert 0 < epoch_at_kill < KILL_EPOCHS, "the kill came after training had finished"

    out, _ = driver.communicate(timeout=600)
    t_end = time.time()
    assert driver.returncode == 0, out[-3000:]
    statuses = collect.load_manifest(grid / "runs-dask" / "manifest.json")
    assert [s["status"] for s in statuses] == ["ok", "ok"], out[-3000:]
    final = execute._read_status(victim)
    assert final["pid"] != holder["pid"] and final["pid"] in cluster["pids"].values()  # the other worker
    assert f"checkpoints/{ckpt.parent.name}/last.pt" in final["resumed_from"]  # it found the checkpoint
    finished = datetime.datetime.fromisoformat(final["finished"]).timestamp()
    compared = sum(_assert_same_results(Path(ref["run_dir"]), Path(st["run_dir"]))
                   for ref, st in zip(reference, statuses))
    print(f"\nkilled worker {worker} (pid {holder['pid']}) holding {victim.key} at epoch {epoch_at_kill}/"
          f"{KILL_EPOCHS}, {t_kill - t0:.1f} s after submission; the retry on pid {final['pid']} ran "
          f"{final['seconds']:.1f} s (resumed from {final['resumed_from']}) and finished "
          f"{finished - t_kill:.1f} s after the kill; whole grid {t_end - t0:.1f} s; {compared} results files equal "
          "to the local run's in every field but " + ", ".join(provenance.TIMING_FIELDS))
