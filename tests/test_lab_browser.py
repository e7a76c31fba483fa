"""The notebooks as people open them: a paper notebook run in JupyterLab, in headless Chromium, against a live kernel.

What a user does after ``make lab``: open ``vt_adl.ipynb`` (the cheapest paper notebook at smoke settings, about 15 s
of compute), choose *Run → Run All Cells*, save, then play with the heatmap viewer at the bottom. The test does the
same on a copy of the notebook (papermill's ``prepare_only`` injects ``notebooks/params/vt_adl/smoke.yaml`` as the
cell papermill would add; nothing else changes), in a JupyterLab server of its own (127.0.0.1, a token, a free port,
``JUPYTER_*`` folders under ``tmp_path``) that is shut down whatever happens, and checks:

* every code cell ran, and no cell shows an error (in the page and in the notebook JupyterLab saved);
* the last cell shows the live viewer (one picture the kernel redraws); pressing the right arrow on the image
  slider's handle moves it to image 1 and changes the picture's bytes, and clicking "anomaly map" changes them again;
* progress was shown as widgets: the saved notebook holds widget outputs and no text progress bar;
* saving in JupyterLab left the notebook's runs key (``notebook_sha``) as it was;
* the browser console shows no widget-manager error (unknown model module or version, failed model or view).

That the live widget front end and the kernel's ipywidgets speak one protocol is what the static book's browser test
(``tests/test_book.py``) cannot show. Like it, this test skips only when Chromium or playwright is missing and
``ADCORE_REQUIRE_BROWSER`` is unset (CI sets it: ``.ci/run``).
"""
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

from adcore.runs.plan import _sha

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "vt_adl"
RUN_ALL_TIMEOUT_S = 150  # the smoke run takes about 15 s alone; generous for a loaded 2-core machine
# What the widget manager logs when the kernel's widgets and the front end's JavaScript disagree (an unknown model
# module or version, a protocol mismatch) or a view fails to render.
WIDGET_ERROR = re.compile(r"jupyter-widgets|ipywidgets|widget[ -]?manager|displaying widget|Could not create (a )?"
                          r"(model|view)|Class \S+ not found|Failed loading (module|class)|model_module|\bcomms?\b",
                          re.I)


# The widget model versions the book's vendored widget manager registers, by @jupyter-widgets/html-manager minor
# version (html-manager 1.0.x depends on @jupyter-widgets/base 6, controls 5 and output 6, the JavaScript of
# ipywidgets 8.1). The kernel's ipywidgets must create models of exactly these versions, or the static book shows
# "Error displaying widget"; the live lab's own JavaScript (jupyterlab_widgets) is checked by the browser test.
HTML_MANAGER_MODELS = {"1.0": {"base": "2.0.0", "controls": "2.0.0", "output": "1.0.0"}}


def test_the_kernel_and_the_books_widget_javascript_share_a_widget_protocol():
    import ipywidgets
    import jupyterlab
    import tomllib
    from ipywidgets import _version
    from packaging.requirements import Requirement

    script = (REPO / "book" / "fetch_widget_js.sh").read_text()
    html_manager = re.search(r'HTML_MANAGER_VERSION:-([0-9.]+)\}', script).group(1)
    minor = ".".join(html_manager.split(".")[:2])
    assert minor in HTML_MANAGER_MODELS, f"html-manager {html_manager}: add the model versions it registers"
    kernel = {"base": _version.__jupyter_widgets_base_version__,
              "controls": _version.__jupyter_widgets_controls_version__,
              "output": _version.__jupyter_widgets_output_version__}
    assert kernel == HTML_MANAGER_MODELS[minor], (
        f"ipywidgets {ipywidgets.__version__} creates {kernel}, html-manager {html_manager} registers "
        f"{HTML_MANAGER_MODELS[minor]}: change HTML_MANAGER_VERSION in book/fetch_widget_js.sh or the bound in "
        "pyproject.toml")
    deps = {r.name: r for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())
                                   ["project"]["dependencies"])}
    assert deps["ipywidgets"].specifier and deps["jupyterlab"].specifier, "bound ipywidgets and jupyterlab"
    assert deps["ipywidgets"].specifier.contains(ipywidgets.__version__)
    assert deps["jupyterlab"].specifier.contains(jupyterlab.__version__)


def test_make_lab_registers_the_kernel_the_notebooks_declare():
    """Opening a notebook from ``make lab`` starts .venv's Python, not another kernel of another name (JupyterLab
    would ask which kernel to use, and saving would rewrite the notebook's metadata)."""
    recipe = re.search(r"^lab:.*?(?=^\S)", (REPO / "Makefile").read_text() + "\nend", re.S | re.M).group(0)
    registered = re.search(r"ipykernel install --sys-prefix --name (\S+)", recipe).group(1)
    declared = {nbformat.read(str(p), as_version=4).metadata["kernelspec"]["name"]
                for p in sorted((REPO / "notebooks").glob("*.ipynb"))}
    assert declared == {registered}, f"make lab registers {registered!r}, the notebooks declare {declared}"
    assert "--notebook-dir=notebooks" in recipe


def test_progress_bars_are_widgets_in_a_notebook():
    """Every progress bar comes from ``tqdm.auto``: a widget in a Jupyter kernel, text in papermill logs and CLIs."""
    plain = [f"{path.relative_to(REPO)}:{i}" for package in ("adcore", "kernels")
             for path in sorted((REPO / package).rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"^\s*(from tqdm import|import tqdm\s*$|from tqdm\.(std|cli) import)", line)]
    assert not plain, f"use tqdm.auto, not the text-only tqdm: {plain}"


@pytest.fixture
def chromium() -> str:
    """The system Chromium for playwright (its own browser download is not used), or a skip saying what is missing."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
        have_playwright = True
    except ImportError:
        have_playwright = False
    if path and have_playwright:
        return path
    reason = f"chromium={path}, playwright={'yes' if have_playwright else 'missing'}"
    if os.environ.get("ADCORE_REQUIRE_BROWSER"):
        pytest.fail(f"ADCORE_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(f"the live JupyterLab test needs headless Chromium (apt-get install chromium) and playwright: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_copy(root: Path) -> Path:
    """The paper notebook as a user would open it, with the smoke parameters injected after its parameters cell."""
    import papermill

    params = yaml.safe_load((REPO / "notebooks" / "params" / NOTEBOOK / "smoke.yaml").read_text())
    params |= {"results_dir": str(root / "results"), "checkpoint_root": str(root / "checkpoints")}
    out = root / f"{NOTEBOOK}.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / f"{NOTEBOOK}.ipynb"), str(out), parameters=params,
                               prepare_only=True, log_output=False, progress_bar=False)
    return out


def _lab_settings(config_dir: Path) -> None:
    """User settings of the throw-away lab: every cell kept in the page (no windowing, so every prompt and output can
    be read), and no news or update check (nothing outside 127.0.0.1 is asked for)."""
    settings = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
                "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                    {"fetchNews": "false", "checkForUpdates": False}}
    for name, value in settings.items():
        path = config_dir / "lab" / "user-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture
def lab(tmp_path):
    """(base URL, token, notebook path) of a JupyterLab server serving a prepared copy of the notebook.

    The server runs in its own process group; the finaliser asks it to shut down (its kernels with it) and then kills
    whatever of that group is left, so a failing test leaves no server or kernel behind."""
    root = tmp_path / "work"
    root.mkdir()
    notebook = _prepare_copy(root)
    jupyter = {name: tmp_path / "jupyter" / name for name in ("config", "data", "runtime", "ipython")}
    for path in jupyter.values():
        path.mkdir(parents=True)
    _lab_settings(jupyter["config"])
    env = {k: v for k, v in os.environ.items() if k not in ("ADCORE_VIEWER", "ADCORE_ARRAYS_DIR", "JUPYTER_PATH")}
    env |= {"JUPYTER_CONFIG_DIR": str(jupyter["config"]), "JUPYTER_DATA_DIR": str(jupyter["data"]),
            "JUPYTER_RUNTIME_DIR": str(jupyter["runtime"]), "IPYTHONDIR": str(jupyter["ipython"]),
            "JUPYTER_PREFER_ENV_PATH": "1", "OMP_NUM_THREADS": "1"}
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=None", "--allow-root"],
        # stdin from /dev/null: the server reads none, and a test's stdin is pytest's
        cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, token, notebook
    finally:
        try:
            request = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(request, timeout=5).read()
            proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own group: itself and the kernels it started
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


TEXT_BAR = re.compile(r"\d+%\|")  # tqdm's text bar: " 40%|████      | 4/10"
# The bytes of the picture an <img> shows (a blob: URL in a live widget), as base64.
IMAGE_BYTES_JS = """async (img) => {
  const blob = await (await fetch(img.src)).blob();
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let s = ''; for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}"""


def _shown(image) -> str:
    return hashlib.sha256(base64.b64decode(image.evaluate(IMAGE_BYTES_JS))).hexdigest()


def _check_saved(notebook: Path, prepared_sha: str) -> None:
    """The notebook JupyterLab saved: every code cell ran without an error, progress was shown as widgets (no text
    progress bar in any stream), and its runs key is what it was before it was opened."""
    nb = nbformat.read(str(notebook), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "JupyterLab saved unexecuted cells"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text_bars = [o.text[-200:] for o in outputs if o.output_type == "stream" and TEXT_BAR.search(o.text)]
    assert not text_bars, f"progress shown as text, not as a widget: {text_bars[:2]}"
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) >= 2, "expected the training progress bar and the viewer as widgets"
    assert _sha(notebook) == prepared_sha, "saving in JupyterLab changed the notebook's runs key"


@pytest.mark.notebook
def test_a_user_runs_a_paper_notebook_in_jupyterlab_and_the_live_viewer_answers(chromium, lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, notebook = lab
    prepared_sha = _sha(notebook)
    console = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                    else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"{base}/lab/tree/{notebook.name}?token={token}")
            # the notebook is open and its kernel is up: the status bar names it and says it is idle
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"^Python 3.*\| Idle$")).wait_for(
                timeout=90_000)
            n_code = sum(c.cell_type == "code" for c in nbformat.read(str(notebook), as_version=4).cells)
            page.wait_for_function("(n) => document.querySelectorAll('.jp-Notebook .jp-CodeCell').length === n",
                                   arg=n_code, timeout=30_000)  # every cell in the page (windowing off)

            # Run -> Run All Cells, from the menu bar, as a user would
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            page.wait_for_function(
                """(n) => {
                  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
                  return prompts.length === n && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
                }""", arg=n_code, timeout=RUN_ALL_TIMEOUT_S * 1000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
            assert errors.count() == 0, f"a cell failed in JupyterLab: {errors.first.inner_text()[-2000:]}"
            page.keyboard.press("Escape")
            page.keyboard.press("Control+s")  # saved as a user saves it: outputs, counts and kernel metadata
            page.locator(".jp-mod-current.jp-mod-dirty").wait_for(state="detached", timeout=30_000)

            # the notebook ends with the live viewer: an image slider, mode buttons and the picture
            viewer = page.locator(".jp-Notebook .jp-CodeCell").last.locator(".jp-OutputArea")
            image = viewer.locator("img.widget-image").first
            image.wait_for(timeout=30_000)
            # the live build: one picture the kernel redraws (the static build pre-renders a stack of them)
            assert viewer.locator("img.widget-image").count() == 1
            slider = viewer.locator(".widget-slider", has=page.locator("label", has_text="image")).first
            readout = slider.locator(".widget-readout")
            first = _shown(image)
            assert readout.inner_text().strip() == "0"

            # moving the image slider (keyboard on its handle) shows another test image, drawn by the kernel
            handle = slider.locator(".noUi-handle")
            handle.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("(el) => el.textContent.trim() === '1'", arg=readout.element_handle(),
                                   timeout=10_000)
            deadline = time.monotonic() + 20
            while (second := _shown(image)) == first and time.monotonic() < deadline:
                page.wait_for_timeout(200)
            assert second != first, "moving the image slider did not change the picture"

            # picking another mode redraws the same image as its anomaly map
            viewer.locator("button", has_text=re.compile(r"^anomaly map$")).click()
            deadline = time.monotonic() + 20
            while (third := _shown(image)) == second and time.monotonic() < deadline:
                page.wait_for_timeout(200)
            assert third not in (first, second), "picking the anomaly-map mode did not change the picture"
        except Exception:
            page.screenshot(path=str(tmp_path / "lab.png"), full_page=True)  # what the page showed when it failed
            print(f"screenshot: {tmp_path / 'lab.png'}")
            raise
        finally:
            browser.close()
    _check_saved(notebook, prepared_sha)
    widget_errors = [m for m in console if WIDGET_ERROR.search(m)]
    assert not widget_errors, f"the browser console shows widget-manager errors: {widget_errors[:5]}"
