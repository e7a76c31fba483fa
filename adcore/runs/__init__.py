"""Runs: the notebooks executed with papermill, planned, executed here or on a Dask cluster, and read back.

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
* a run executes only under its lock (:mod:`adcore.runs.lock`): two runners on one runs directory, here or on a
  cluster, never execute the same key at once; a runner finding a key taken waits for it and then skips it.

Each run gets a fixed number of torch threads (``threads``, default 1), whatever ``jobs`` and the core count are, so
its numbers do not depend on how many runs go side by side (:mod:`adcore.runs.provenance`).

Where runs execute is an executor: :class:`LocalExecutor` (``jobs`` papermill processes on this machine, the
default) or ``adcore.runs.dask.DaskExecutor`` (one task per run on a Dask cluster). Both execute the same
:func:`execute_run` and yield statuses as runs finish; :func:`execute_runs` does the rest.

Every parameter file, category and data root is checked before the first kernel starts (``ParameterError`` /
``DataError``, both ``ValueError``).

The modules, one concern each:

* :mod:`~adcore.runs.params`: a notebook's parameters cell, parameter layers, and the checks the notebook runs;
* :mod:`~adcore.runs.plan`: notebooks × parameters × categories × seeds → :class:`~adcore.runs.plan.Run` s;
* :mod:`~adcore.runs.execute`: one run under its lock, and :class:`~adcore.runs.execute.LocalExecutor`;
* :mod:`~adcore.runs.dask`: the same runs on a Dask cluster;
* :mod:`~adcore.runs.lock`: the per-run lock;
* :mod:`~adcore.runs.provenance`: what decides a run's digits, and comparing two runs folders;
* :mod:`~adcore.runs.collect`: manifests and results files read back into tables and reproduce commands;
* :mod:`~adcore.runs.experiment`: ``run_experiment``, the loop each notebook calls.
"""
