"""The DMAD and AAND notebooks run end to end under papermill with their smoke parameters."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from adcore.runs.params import parse_parameters, validate_parameters

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("dmad", "aand")


@pytest.mark.parametrize("paper", NOTEBOOKS)
def test_parameter_files_match_the_parameters_cell(paper):
    defaults = parse_parameters(ROOT / "notebooks" / f"{paper}.ipynb")
    for name in ("smoke", "paper"):
        values = yaml.safe_load((ROOT / "notebooks" / "params" / paper / f"{name}.yaml").read_text())
        validate_parameters(defaults, values, source=f"{paper}/{name}.yaml")  # names and types
    assert defaults["dataset"] == "textures" and defaults["categories"] is None


@pytest.mark.notebook
@pytest.mark.parametrize("paper", NOTEBOOKS)
def test_notebook_runs_with_smoke_parameters(paper, tmp_path):
    papermill = pytest.importorskip("papermill")
    params = yaml.safe_load((ROOT / "notebooks" / "params" / paper / "smoke.yaml").read_text())
    params |= {"results_dir": str(tmp_path / "results"), "checkpoint_root": str(tmp_path / "checkpoints")}
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{paper}.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters=params, kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*.json"))]
    # The main run and every ablation variant write one file per category.
    runs = {r["run_name"] for r in results}
    assert runs == ({"dmad", "dmad-nodeform", "dmad-novq", "dmad-nodeform-novq"} if paper == "dmad"
                    else {"aand", "aand-no-stage1", "aand-rd4ad-loss"})
    for r in results:
        assert r["model"] == paper and r["category"] == "brick"
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and 0 <= r[key] <= 1, (r["run_name"], key)


@pytest.mark.notebook
def test_notebook_rejects_an_unknown_parameter(tmp_path):
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter"):
        papermill.execute_notebook(str(ROOT / "notebooks" / "aand.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"num_epoch": 3}, kernel_name="python3", cwd=str(tmp_path),
                                   progress_bar=False)
    assert not (tmp_path / "results").exists()  # it failed at the top, before any training
