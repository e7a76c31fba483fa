"""Runs as tasks on a Dask cluster: a running scheduler (``--scheduler tcp://HOST:PORT``) or one that dask-jobqueue
starts on SLURM, PBS, SGE or LSF (``--cluster slurm``).

Each run is one task that executes :func:`adcore.runs.execute.execute_run` on a worker, so the guarantees are the local
ones: the run's lock, its ``status.json``, resume from its checkpoints. Dask adds where and when:

* a worker that dies holding a run (killed, its node lost) is noticed by the scheduler, which gives the task to
  another worker (up to ``distributed.scheduler.allowed-failures`` times, default 3); the new attempt takes over the
  dead holder's lock and ``fit`` resumes from the last epoch's checkpoint;
* a run whose parameters say ``device: cuda`` asks for one ``GPU`` worker resource, so only workers started with
  ``--resources GPU=1`` take it;
* runs, results and checkpoints live in the runs directory, which every worker must see at the same path: checked
  on every worker before the first task (and again inside each task, for workers that join later).
"""
from __future__ import annotations

import secrets
from dataclasses import asdict
from pathlib import Path

import yaml

from .execute import check_runs_dir, execute_run, mark_runs_dir
from .plan import Run
from .params import ParameterError

CLUSTERS = ("slurm", "pbs", "sge", "lsf")
# The directive that asks the batch scheduler for GPUs, per scheduler. Sites differ (partitions, GPU types): a
# cluster file's job_extra_directives replaces it.
GPU_DIRECTIVES = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}", "sge": "-l gpu={n}", "lsf": "-gpu num={n}"}
CLUSTER_KEYS = {"cores", "memory", "gpus", "walltime", "queue", "jobs"}  # ours; any other key goes to dask-jobqueue


def _task(run: Run, marker: str, timeout, force: bool) -> dict:
    problem = check_runs_dir(Path(run.run_dir).parents[1], marker, [run.notebook])
    if problem:
        raise RuntimeError(problem)
    return execute_run(run, timeout, separate_process=True, force=force)


class DaskExecutor:
    """Submits each run to a Dask cluster and yields statuses as tasks finish.

    Args:
        scheduler: address of a running scheduler (``tcp://HOST:PORT``).
        cluster: a ``dask_jobqueue`` cluster (see :func:`start_cluster`); closed with the executor.
        retries: resubmissions of a task that raised (not a failing notebook: that is a status), e.g. on a worker
            that cannot see the runs directory. A worker's death is the scheduler's business (allowed-failures).
    """

    def __init__(self, scheduler: str | None = None, cluster=None, retries: int = 2, log=print):
        from distributed import Client

        if (scheduler is None) == (cluster is None):
            raise ValueError("give a scheduler address or a cluster, not both or neither")
        self.cluster = cluster
        try:
            self.client = Client(scheduler or cluster)  # waits distributed.comm.timeouts.connect (30 s) at most
        except OSError as e:
            raise RuntimeError(f"no Dask scheduler answers at {scheduler!r}: {e}; start one with `dask scheduler` "
                               "and workers with `dask worker ADDRESS`") from None
        self.retries = retries
        info = self.client.scheduler_info()
        dashboard = ("dashboard " + self.client.dashboard_link if "dashboard" in info.get("services", {})
                     else "no dashboard (pip install bokeh to get one)")
        log(f"Dask scheduler {info['address']}: {len(info['workers'])} worker(s), {dashboard}")

    def describe(self) -> str:
        return f"Dask at {self.client.scheduler.address}"

    def check_workers(self, runs_dir, marker: str, notebooks=()) -> None:
        """Fail now, with the workers named, when one cannot see the runs directory or the notebooks."""
        seen = self.client.run(check_runs_dir, str(runs_dir), marker, list(notebooks))
        bad = {addr: problem for addr, problem in seen.items() if problem}
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(seen)} Dask worker(s) cannot run these notebooks:\n  "
                               + "\n  ".join(f"{addr}: {problem}" for addr, problem in sorted(bad.items())))

    def map(self, runs: list[Run], *, timeout=None, force=False, log=print):
        """Yield ``(index into runs, status)`` as each run's task finishes."""
        from distributed import as_completed

        if not runs:
            return
        runs_dirs = {Path(r.run_dir).parents[1] for r in runs}
        markers = {d: mark_runs_dir(d) for d in runs_dirs}
        for d in runs_dirs:
            self.check_workers(d, markers[d], sorted({r.notebook for r in runs}))
        attempt = secrets.token_hex(3)
        futures = {}
        for i, run in enumerate(runs):
            fut = self.client.submit(_task, run, markers[Path(run.run_dir).parents[1]], timeout, force,
                                     key=f"{run.key}-{attempt}", pure=False, retries=self.retries,
                                     resources={"GPU": 1} if run.gpu else None,
                                     priority=len(runs) - i)  # runs come longest first; Dask alone keeps no order
            futures[fut] = i
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    st = fut.result()
                except Exception as exc:  # KilledWorker after too many worker deaths, or a worker-side error
                    st = {**asdict(runs[i]), "status": "failed",
                          "error": {"type": type(exc).__name__, "message": str(exc)[:500]}}
                yield i, st
        finally:
            # Ctrl-C: pending runs never start; a run already on a worker finishes there and keeps its lock till then
            self.client.cancel(list(futures))

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def cluster_options(kind: str, config=None, **flags) -> dict:
    """Options for :func:`start_cluster`: the YAML file ``config`` (``cores``, ``memory``, ``gpus``, ``walltime``,
    ``queue``, ``jobs``, and any dask-jobqueue argument such as ``account`` or ``job_script_prologue``), then the
    flags that are not None."""
    if kind not in CLUSTERS:
        raise ParameterError(f"unknown cluster {kind!r}; dask-jobqueue starts {list(CLUSTERS)}")
    opts = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ParameterError(f"cluster file {str(path)!r} does not exist")
        opts = yaml.safe_load(path.read_text()) or {}
        if not isinstance(opts, dict):
            raise ParameterError(f"cluster file {str(path)!r} must hold a mapping of option: value")
    opts.update({k: v for k, v in flags.items() if v is not None})
    for k in ("cores", "gpus", "jobs"):
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], int) or opts[k] < 0):
            raise ParameterError(f"cluster option {k} must be a non-negative int, got {opts[k]!r}")
    opts.setdefault("cores", 1)
    opts.setdefault("memory", "8GB")
    return opts


def start_cluster(kind: str, opts: dict, threads: int = 1, scale: bool = True):
    """A dask-jobqueue cluster of ``opts["jobs"]`` batch jobs (default 1), each one worker that runs
    ``cores // threads`` runs side by side and offers ``gpus`` GPU resources. ``scale=False`` submits no job (to
    look at ``cluster.job_script()``)."""
    import dask_jobqueue

    opts = dict(opts)
    cores, gpus, jobs = opts.pop("cores"), opts.pop("gpus", 0), opts.pop("jobs", 1)
    queue, extra = opts.pop("queue", None), list(opts.pop("job_extra_directives", []))
    worker_args = list(opts.pop("worker_extra_args", []))
    worker_args += ["--nthreads", str(max(1, cores // threads))]  # after dask-jobqueue's own --nthreads: this wins
    if gpus:
        if not any("gpu" in d for d in extra):
            extra.append(GPU_DIRECTIVES[kind].format(n=gpus))
        worker_args += ["--resources", f"GPU={gpus}"]
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster, "sge": dask_jobqueue.SGECluster,
           "lsf": dask_jobqueue.LSFCluster}[kind]
    if queue is not None:
        opts["queue"] = queue
    cluster = cls(cores=cores, processes=1, job_extra_directives=extra, worker_extra_args=worker_args, **opts)
    if scale:
        cluster.scale(jobs=jobs)
    return cluster
