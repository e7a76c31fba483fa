"""The ViT notebooks' paper settings, run for real at the papers' shapes: one optimisation step and one prediction.

No ``paper.yaml`` can be run to the end here (400 epochs at 512 px want a GPU), but every one of them must at least
build, train and score at the paper's image size and widths. For each of ``notebooks/params/{vt_adl,advit,anovit}/
paper.yaml`` this test reads a tiny fake MVTec AD carpet at that image size (``adcore.data.make_fake_mvtec``: one
training batch, 2 good and 2 defective test images with masks; one 512-px tree per worker for vt_adl and advit), injects
the yaml into the notebook's parameters as papermill would, overrides only its epochs (``num_epochs=1``, AnoViT's
``conv_ae_epochs=1``), ``device="cpu"``,
``data_root`` and the output folders, and runs the notebook's own code cells that
train and evaluate (the parameter check, the main run, and any ablation the yaml switches on: AnoViT's conv AE). It
asserts the output contract and prints the peak resident memory and the seconds of the optimisation step and of the
prediction of each run:

    .venv/bin/python -m pytest tests/test_paper_shapes_vit.py -s -q
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import adcore
import adcore.runs.experiment

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CATEGORY = "carpet"
# The model each notebook's main run trains, and the other models its paper.yaml makes it train.
RUNS = {"vt_adl": ["vt_adl"], "advit": ["advit"], "anovit": ["anovit", "conv_ae"]}


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_gib(reset_worked: bool) -> str:
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 2**20:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak so far)"


class _Meter:
    """Wraps ``fit`` and ``evaluate`` inside ``run_experiment`` to time them and read the peak RSS of each."""

    def __init__(self, monkeypatch):
        self.rows, self._fit, self._evaluate = [], adcore.runs.experiment.fit, adcore.runs.experiment.evaluate
        monkeypatch.setattr(adcore.runs.experiment, "fit", self.fit)
        monkeypatch.setattr(adcore.runs.experiment, "evaluate", self.evaluate)

    def fit(self, model, train, *, epoch_end=None, **kwargs):
        steps, cpu = {}, {}
        reset = _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()

        def timed_epoch_end(model, stage, epoch):  # one batch per epoch and one epoch per stage: this is one step
            steps[stage] = time.perf_counter() - t0 - sum(steps.values())
            cpu[stage] = time.process_time() - c0 - sum(cpu.values())  # CPU seconds of all threads
            if epoch_end is not None:
                epoch_end(model, stage, epoch)

        history = self._fit(model, train, epoch_end=timed_epoch_end, **kwargs)
        self.rows.append({"model": model.model_name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                          "image_size": model.image_size, "history": history, "step_s": steps, "step_cpu_s": cpu,
                          "fit_s": time.perf_counter() - t0, "fit_peak": _peak_rss_gib(reset)})
        return history

    def evaluate(self, model, test, **kwargs):
        reset = _reset_peak_rss()
        t0 = time.perf_counter()
        out = self._evaluate(model, test, **kwargs)
        self.rows[-1].update(n_test=len(test), predict_s=time.perf_counter() - t0, predict_peak=_peak_rss_gib(reset))
        return out


def _run_notebook_cells(notebook: str, overrides: dict) -> dict:
    """Execute, in one namespace, the notebook's parameters cell, the injected parameters (as papermill writes them),
    the cell that checks them, and every code cell that calls ``run_experiment``; return the namespace."""
    cells = [("".join(c["source"])) for c in json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    params_cell = cells[0]
    injected = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in overrides.items())
    chosen = [params_cell, injected] + [c for c in cells[1:] if "check_parameters(" in c or "run_experiment(" in c]
    ns = {"__name__": "__main__", "In": []}
    for source in chosen:
        ns["In"].append(source)
        exec(compile(source, f"<{notebook}.ipynb>", "exec"), ns)
    return ns


@pytest.mark.parametrize("notebook", sorted(RUNS))
def test_paper_config_trains_one_step_and_predicts(notebook, fake_mvtec_factory, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    paper = yaml.safe_load((ROOT / "notebooks" / "params" / notebook / "paper.yaml").read_text())
    recipe = adcore.get_recipe(RUNS[notebook][0], "paper")
    size, batch = paper["image_size"], paper["batch_size"]
    assert (size, batch) == (recipe.image_size, recipe.batch_size)
    root = fake_mvtec_factory(CATEGORY, image_size=size, n_train=batch, n_test=2)
    overrides = {**paper, **{k: 1 for k in paper if k.endswith("_epochs")}, "device": "cpu", "data_root": str(root),
                 "categories": [CATEGORY], "results_dir": str(tmp_path / "results"),
                 "checkpoint_root": str(tmp_path / "checkpoints"), "num_threads": torch.get_num_threads()}
    meter = _Meter(monkeypatch)
    threads = torch.get_num_threads()
    try:
        ns = _run_notebook_cells(notebook, overrides)
    finally:
        torch.set_num_threads(threads)
        import matplotlib.pyplot as plt

        plt.close("all")

    assert [row["model"] for row in meter.rows] == RUNS[notebook]
    model = ns["exp"].models[CATEGORY]
    assert {k: model.model_params[k] for k in recipe.model_params} == recipe.model_params  # the paper's widths
    for row in meter.rows:
        assert row["image_size"] == size
        assert len(row["history"]) == 1 and math.isfinite(row["history"][0]["loss"])  # one step of its one stage
        assert row["n_test"] == 4
        print(f"\npaper shape {notebook}/{row['model']}: {size} px, batch {batch}, {row['params_M']:.1f}M parameters; "
              f"one optimisation step {', '.join(f'{s} {t:.1f} s' for s, t in row['step_s'].items())} "
              f"({', '.join(f'{t:.1f}' for t in row['step_cpu_s'].values())} CPU s) "
              f"(fit {row['fit_s']:.1f} s), peak RSS {row['fit_peak']}; predict + evaluate {row['n_test']} images "
              f"{row['predict_s']:.1f} s, peak RSS {row['predict_peak']}; {torch.get_num_threads()} threads")
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*.json"))]
    assert len(results) >= len(RUNS[notebook])
    for r in results:
        assert r["resolution"] == f"{size}x{size}" and r["n_test"] == 4 and r["n_anomalous"] == 2
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert math.isfinite(r[metric]) and 0.0 <= r[metric] <= 1.0, (r["run_name"], metric, r[metric])
    arrays = ns["exp"].arrays[CATEGORY]
    assert arrays["maps"].shape == (4, size, size) and np.isfinite(arrays["maps"]).all()
    out = model.predict(torch.rand(1, 3, size, size))  # the raw map, before evaluate upsamples it
    grid = size // paper["patch_size"]
    assert out.pred_score.shape == (1,) and torch.isfinite(out.pred_score).all()
    assert out.anomaly_map.shape == ((1, grid, grid) if notebook in ("vt_adl", "advit") else (1, size, size))
