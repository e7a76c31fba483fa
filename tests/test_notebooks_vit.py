"""The VT-ADL, ADViT and AnoViT notebooks run end to end under papermill with their smoke parameters."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PAPERS = ("vt_adl", "advit", "anovit")
# result files each smoke run must write: the main run and its ablations, one per category
EXPECTED_RUNS = {"vt_adl": ("vt_adl", "vt_adl-no-noise", "vt_adl-k4", "vt_adl-mdn-unconditional", "vt_adl-score-code",
                            "vt_adl-score-paper"),
                 "advit": ("advit", "advit-assoc-position", "advit-assoc-global"),
                 "anovit": ("anovit", "anovit-conv-ae")}


def _smoke(paper: str) -> dict:
    return yaml.safe_load((NOTEBOOKS / "params" / paper / "smoke.yaml").read_text())


@pytest.mark.parametrize("paper", PAPERS)
def test_notebook_runs_with_smoke_parameters(paper, tmp_path):
    papermill = pytest.importorskip("papermill")
    params = _smoke(paper) | {"results_dir": str(tmp_path / "results"),
                              "checkpoint_root": str(tmp_path / "checkpoints")}
    papermill.execute_notebook(str(NOTEBOOKS / f"{paper}.ipynb"), str(tmp_path / f"{paper}.ipynb"),
                               parameters=params, kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*.json"))]
    runs = sorted(r["run_name"] for r in results)
    assert sorted(EXPECTED_RUNS[paper]) == runs
    for r in results:
        assert r["category"] == "brick"
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert math.isfinite(r[metric]) and 0.0 <= r[metric] <= 1.0, (r.get("run_name"), metric, r[metric])
    assert list((tmp_path / "checkpoints").glob("*/last.pt")), "no checkpoint was written"


@pytest.mark.parametrize("paper", PAPERS)
def test_notebook_rejects_unknown_parameter(paper, tmp_path):
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter"):
        papermill.execute_notebook(str(NOTEBOOKS / f"{paper}.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"num_epoch": 3}, kernel_name="python3", cwd=str(tmp_path),
                                   progress_bar=False)


@pytest.mark.parametrize("paper", PAPERS)
def test_parameter_files_name_only_known_parameters(paper):
    from adcore.runs.params import parse_parameters, validate_parameters

    defaults = parse_parameters(NOTEBOOKS / f"{paper}.ipynb")
    for name in ("smoke", "paper"):
        overrides = yaml.safe_load((NOTEBOOKS / "params" / paper / f"{name}.yaml").read_text())
        validate_parameters(defaults, overrides, source=f"{paper}/{name}.yaml")  # raises on unknown or ill-typed
