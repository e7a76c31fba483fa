# Two commands do all the set-up on a fresh machine (Python 3.11, no GPU, package registries only):
#   make test   create/reuse .venv and run the whole test suite
#   make book   create/reuse .venv, run every notebook with papermill and build the HTML book
#   make lab    create/reuse .venv and open the notebooks in JupyterLab (nothing needs to run first)
#   make budget run the training-budget grid (58 min on a 2-core machine with JOBS=2; resumable), then `make book` again
PYTHON ?= python3
# Notebook runs side by side in `make book` (2 suits a 2-core machine). Each run gets one torch thread whatever JOBS
# is, so its numbers do not depend on JOBS (python -m adcore book --threads N asks for more, recorded per result).
JOBS ?= 2
# pytest-xdist workers for `make test` (2 suits a 2-core machine; each gets its share of the torch threads, see
# tests/conftest.py). --dist loadscope keeps each test module on one worker, so its module fixtures are built once;
# --no-loadscope-reorder hands modules out in collection order, which tests/conftest.py makes slowest first.
# (Not --dist loadgroup: with pytest 9.2 and pytest-xdist 3.8 it silently stops grouping, pytest-xdist issue #1386.)
TEST_WORKERS ?= 2
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adcore-installed

# Options passed on to JupyterLab, e.g. make lab LAB_ARGS="--no-browser --port 8890"
LAB_ARGS ?=

.PHONY: venv test test-fast book budget lab clean

venv: $(STAMP)

# torch and torchvision first, pinned: pip takes this CUDA build (it runs on the CPU) from local disk in about a
# minute, and torchvision only imports beside this torch. Everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,deploy]"
	touch $@

test: venv
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25

# Everything but the notebook runs and the book build.
test-fast: venv
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder -m "not notebook"

book: venv
	$(PY) -m adcore book --jobs $(JOBS)

budget: venv
	$(PY) -m adcore run --grid notebooks/params/budget.yaml --jobs $(JOBS)

# The notebooks declare the kernel "python3": it is registered inside .venv (--sys-prefix, so a user-wide python3 kernel
# elsewhere stays as it is) and runs .venv's Python; JUPYTER_PREFER_ENV_PATH makes .venv's kernel win over a user-wide
# one of the same name. Runs started here write results/ and checkpoints/ under notebooks/ (git ignores both).
lab: venv
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (adcore .venv)" >/dev/null
	JUPYTER_PREFER_ENV_PATH=1 $(PY) -m jupyterlab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) \
		$(LAB_ARGS)

clean:
	rm -rf book/_build book/_runs book/_static/vendor results checkpoints runs runs-reproduced
