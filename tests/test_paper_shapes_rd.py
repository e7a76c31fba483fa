"""The DMAD and AAND paper configurations run at the papers' shapes: 256-px images, WideResNet-50-2, full widths.

Each ``notebooks/params/<nb>/paper.yaml`` goes through the notebook's own path (``run_experiment`` with the yaml's
model parameters: ``create_model`` → ``fit`` → ``evaluate``) on a tiny fake MVTec AD cable at 256 px
(``adcore.data.make_fake_mvtec``), for one optimisation step of each stage, with one change: CI has no ImageNet
weights, so WideResNet-50-2 loads a randomly initialised file (``make_fake_weights``, the session's
``fake_wrn_weights``) given as ``weights_path``, as a user gives the real one. What is checked is the output contract,
not accuracy. Seconds per step (wall), the run's CPU seconds and the process's peak resident memory so far are printed;
they reach the terminal even without ``-s``, though not from xdist workers (``make test``), so run the module on its
own to read them. On a shared machine the wall times grow with the load, the CPU seconds much less:

    .venv/bin/python -m pytest tests/test_paper_shapes_rd.py -m slow
"""
from __future__ import annotations

import json
import math
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import adcore

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256
CATEGORY = "cable"  # AAND's foreground rule for cable: the centred disk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mvtec_tree(fake_mvtec_factory) -> Path:
    """A fake MVTec AD cable at 256 px: 1 train image, 1 good and 1 defective test image (with its mask)."""
    return fake_mvtec_factory(CATEGORY, image_size=SIZE, n_train=1, n_test=1)


def _timed(model, times: list):
    """Record the seconds of every optimisation step (training_step, backward and optimizer.step) per stage."""
    step, configure = model.training_step, model.configure_optimizers

    def training_step(images, stage):
        times.append([stage, time.perf_counter()])
        return step(images, stage)

    def configure_optimizers(stage, lr):
        optimizer, scheduler = configure(stage, lr)
        update = optimizer.step

        def timed_update(*args, **kwargs):
            out = update(*args, **kwargs)
            times[-1][1] = time.perf_counter() - times[-1][1]
            return out

        optimizer.step = timed_update
        return optimizer, scheduler

    model.training_step, model.configure_optimizers = training_step, configure_optimizers


def _run_paper_config(notebook: str, mode: str | None, root: Path, weights: Path, tmp_path: Path, capsys,
                      monkeypatch) -> None:
    values = yaml.safe_load((ROOT / "notebooks" / "params" / notebook / "paper.yaml").read_text())
    recipe = adcore.get_recipe(notebook, "paper")
    # The notebook's model cell: every model parameter the recipe names, read from paper.yaml; one step per stage.
    model_params = {k: values[k] for k in recipe.model_params} | {"weights_path": str(weights)}
    model_params |= {"mode": mode} if mode else {}
    epochs = {s: 1 for s in recipe.num_epochs} if isinstance(recipe.num_epochs, dict) else 1
    assert values["image_size"] == SIZE and values["backbone"] == "wide_resnet50_2"

    built, times = [], []
    create = adcore.runs.experiment.create_model

    def create_timed(name, **params):
        model = create(name, **params)
        _timed(model, times)
        built.append(model)
        return model

    monkeypatch.setattr(adcore.runs.experiment, "create_model", create_timed)
    start, cpu_start = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.step.*")  # the timing wrapper around step
        exp = adcore.run_experiment(notebook, model_params=model_params, num_epochs=epochs, dataset="mvtec",
                                    data_root=str(root), categories=[CATEGORY], image_size=values["image_size"],
                                    lr=values["lr"], batch_size=values["batch_size"], seed=0, device="cpu",
                                    results_dir=tmp_path / "results", checkpoint_root=tmp_path / "checkpoints",
                                    progress=False)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    model = built[0]
    assert model.encoder.name == "wide_resnet50_2" and model.channels == [256, 512, 1024]
    assert model.encoder.pretrained and model.encoder.weights_path == str(weights)  # loaded from the file given
    assert [s for s, _ in times] == list(model.stages)  # one step per stage
    result, arrays = exp.results[0], exp.arrays[CATEGORY]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and 0 <= result[key] <= 1, key
    assert arrays["maps"].shape == (2, SIZE, SIZE) and np.isfinite(arrays["maps"]).all()
    assert arrays["raw_scores"].shape == (2,) and np.isfinite(arrays["raw_scores"]).all()
    with torch.no_grad():
        out = model.predict(torch.rand(1, 3, SIZE, SIZE))
    assert out.pred_score.shape == (1,) and out.anomaly_map.shape == (1, SIZE, SIZE)
    assert torch.isfinite(out.pred_score).all() and torch.isfinite(out.anomaly_map).all()
    assert (tmp_path / "checkpoints").is_dir()  # the paper path checkpoints like every run

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    steps = ", ".join(f"{stage} {seconds:.1f} s/step" for stage, seconds in times)
    label = notebook + (f" mode={mode}" if mode else "")
    with capsys.disabled():
        print(f"\n[paper shape] {label}: 256 px, batch of 1, wide_resnet50_2 (fake weights), "
              f"{torch.get_num_threads()} threads: {steps}; fit + evaluate {total:.1f} s wall, {cpu:.1f} s CPU; "
              f"process peak RSS {peak:.0f} MiB",
              flush=True)


@pytest.mark.parametrize("mode", ["sp", "px"])
def test_dmad_paper_config_at_paper_shape(mode, mvtec_tree, fake_wrn_weights, tmp_path, capsys, monkeypatch):
    values = yaml.safe_load((ROOT / "notebooks" / "params" / "dmad" / "paper.yaml").read_text())
    assert values["mode"] == "both"  # the paper path trains both of DMAD's models; each is run here
    _run_paper_config("dmad", mode, mvtec_tree, fake_wrn_weights, tmp_path, capsys, monkeypatch)


def test_aand_paper_config_at_paper_shape(mvtec_tree, fake_wrn_weights, tmp_path, capsys, monkeypatch):
    _run_paper_config("aand", None, mvtec_tree, fake_wrn_weights, tmp_path, capsys, monkeypatch)


@pytest.mark.notebook
def test_dmad_notebook_trains_both_models_when_mode_is_both(tmp_path):
    """The notebook cells behind paper.yaml's ``mode: both`` (at smoke size): two models, image results from the
    image model, pixel results from the pixel model, the paper's pixel AUROC beside the pixel model only."""
    papermill = pytest.importorskip("papermill")
    params = yaml.safe_load((ROOT / "notebooks" / "params" / "dmad" / "smoke.yaml").read_text())
    params |= {"mode": "both", "run_ablation": False, "results_dir": str(tmp_path / "results"),
               "checkpoint_root": str(tmp_path / "checkpoints")}
    out = papermill.execute_notebook(str(ROOT / "notebooks" / "dmad.ipynb"), str(tmp_path / "out.ipynb"),
                                     parameters=params, kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    results = {r["run_name"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json"))}
    assert set(results) == {"dmad", "dmad-px"}
    assert results["dmad"]["params"]["model_params"]["mode"] == "sp"
    assert results["dmad-px"]["params"]["model_params"]["mode"] == "px"
    cell = next(c for c in out.cells if c.cell_type == "code" and c.source.rstrip().endswith("\nmain"))
    table = next(o["data"]["text/plain"] for o in cell.outputs if o["output_type"] == "execute_result")
    brick = next(line.split() for line in table.splitlines() if line.startswith("brick"))
    assert float(brick[1]) == pytest.approx(results["dmad"]["image_auroc"], abs=1e-4)
    assert float(brick[2]) == pytest.approx(results["dmad-px"]["pixel_auroc"], abs=1e-4)
