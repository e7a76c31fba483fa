"""The built book, checked as a reader would: every chapter executed and error-free, the comparison table filled,
widget state within budget, the widget JavaScript served locally, and (in headless Chromium) the viewer's slider
changing the picture in the static HTML.

Which book: ``ADCORE_BOOK_HTML`` names the ``index.html`` of a book built beforehand (CI builds the smoke book with
``python -m adcore book --smoke`` and points this at it); otherwise a small book is built here from a stand-in paper
notebook (the kNN baseline on one embedded category) and the comparison chapter.

The browser test skips only when Chromium is missing and ``ADCORE_REQUIRE_BROWSER`` is unset.
"""
import json
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from adcore.runs import execute
from adcore.book import build as book_builder

pytestmark = pytest.mark.notebook

REPO = Path(__file__).resolve().parent.parent
STATE_LIMIT = 3 * 2**20  # widget state per page
STATE_RE = re.compile(r'<script type="application/vnd.jupyter.widget-state\+json">(.*?)</script>', re.S)


def stand_in_paper(path: Path) -> Path:
    """A notebook shaped like a paper notebook: parameters, run_experiment, the shared plots and the viewer."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    code = nbformat.v4.new_code_cell
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Stand-in paper\n\nThe kNN baseline on one embedded category, scored by\n"
                                      "$s(x) = \\max_{i} \\min_{m \\in \\mathcal M} \\lVert f_i(x) - m \\rVert$ over a "
                                      "$D\\times h \\times w$ feature map."),
        code('dataset = "textures"  # benchmark\ndata_root = None  # its folder\ncategories = ["brick"]  # which\n'
             'image_size = 64  # pixels\nseed = 0  # seed\nresults_dir = "results"  # results JSON\n'
             'run_name = None  # name in the results', metadata={"tags": ["parameters"]}),
        code("import adcore\nimport adcore.runs.params\nfrom adcore import plots, viewer\n\n"
             "params = adcore.runs.params.check_parameters(globals())"),
        code("exp = adcore.run_experiment('knn', dataset=dataset, data_root=data_root, categories=categories,\n"
             "                           image_size=image_size, num_epochs=1, seed=seed, results_dir=results_dir,\n"
             "                           run_name=run_name, checkpoint_root=None, resume=False,\n"
             "                           progress=False)\nexp.table()"),
        code("plots.compare_table(exp.table(), {'pixel_auroc': 0.9}, 'a made-up paper number')"),
        code("plots.plot_heatmaps(exp.arrays, n_best=2, n_worst=2);"),
        code("viewer.show(exp.arrays, title='stand-in viewer', max_images=8, size=64)"),
    ]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """(index.html, staged sources folder or None) of the book under test."""
    given = os.environ.get("ADCORE_BOOK_HTML")
    if given:
        html = Path(given)
        assert html.is_file(), f"ADCORE_BOOK_HTML={given} does not exist"
        stage = html.parent.parent / "src"
        return html, stage if stage.is_dir() else None
    tmp = tmp_path_factory.mktemp("book")
    (tmp / "notebooks").mkdir()
    nb = stand_in_paper(tmp / "notebooks" / "standin.ipynb")
    grid = tmp / "grid.yaml"
    grid.write_text(f"notebooks: [{nb}]\nparams: [default]\n")
    out = book_builder.build_book(grid=grid, runs_dir=tmp / "runs", book_dir=REPO / "book", out_dir=tmp / "out",
                            chapters=("comparison", "budget", "shortcuts"), progress=False)
    assert not out["failed"], [execute._describe_error(s) for s in out["failed"]]
    return out["html"], out["stage"]


def toc_pages(html: Path) -> list[Path]:
    """The HTML page of every TOC entry of the built book (from its staged _toc.yml)."""
    import yaml

    toc = yaml.safe_load((html.parent.parent / "src" / "_toc.yml").read_text()) \
        if (html.parent.parent / "src" / "_toc.yml").is_file() else None
    if toc is None:  # a book built elsewhere without its sources: every page but Sphinx's own
        return sorted(p for p in html.parent.rglob("*.html") if p.name not in ("genindex.html", "search.html"))
    files = [toc["root"]]
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        files += [c["file"] for c in part["chapters"]]
    return [html.parent / f"{f}.html" for f in files]


def test_every_staged_notebook_was_executed_without_errors(book):
    html, stage = book
    if stage is None:
        pytest.skip("the book's staged sources are not beside it")
    notebooks = sorted(stage.rglob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(str(path), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{path.name} has unexecuted cells"
        errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_pages_exist_within_the_widget_budget_and_load_widget_js_locally(book):
    html, _ = book
    pages = toc_pages(html)
    assert any("comparison" in p.name for p in pages)
    with_widgets = 0
    for page in pages:
        assert page.is_file(), f"{page} missing from the build"
        text = page.read_text()
        assert "Traceback (most recent call last)" not in text, f"{page.name} shows a traceback"
        # nothing from a CDN: widget manager, RequireJS and MathJax are served from the book itself
        assert not re.search(r'<script[^>]+src="https?://', text), f"{page.name} loads a script from the web"
        states = STATE_RE.findall(text)
        size = sum(len(s.encode()) for s in states)
        assert size < STATE_LIMIT, f"{page.name}: widget state {size / 2**20:.2f} MB"
        if states:
            with_widgets += 1
            # the local copies, loaded once (twice would draw every viewer twice)
            assert text.count("vendor-js/html-manager/embed-amd.js") == 1
            assert text.count("vendor-js/require.js") == 1
            state = json.loads(states[0])["state"]
            assert any(m["model_name"] == "LinkModel" for m in state.values())  # the jslinks were saved
    assert with_widgets >= 1
    assert (html.parent / "_static" / "vendor-js" / "require.js").is_file()
    assert (html.parent / "_static" / "vendor-js" / "mathjax" / "tex-mml-chtml.js").is_file()


# Page text with code, program output and typeset maths taken out: what is left is prose, where TeX must not show.
PROSE_JS = """() => {
  const a = document.querySelector('article').cloneNode(true);
  a.querySelectorAll('pre, code, .cell_input, .cell_output, .output, mjx-container, script, style')
    .forEach(e => e.remove());
  return a.innerText;
}"""
RAW_TEX_RE = re.compile(r"\\[A-Za-z]{2,}|\$[^$\s][^$]{0,200}\$|\\[(\[]")


def build_machine_paths(html: Path) -> list[str]:
    """Absolute paths of the machine that built the book; none may appear in a published page."""
    paths = {str(REPO), str(Path.home())}
    out = html.resolve().parents[2]  # OUT/_build/html/index.html -> OUT
    paths |= {str(p) for p in (out, out.parent) if len(p.parts) > 2}  # never "/" or "/tmp" alone
    return sorted(p for p in paths if p not in ("/", ""))


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        if os.environ.get("ADCORE_REQUIRE_BROWSER"):
            pytest.fail(f"ADCORE_REQUIRE_BROWSER is set but chromium={chromium}, playwright="
                        f"{'yes' if sync_playwright else 'missing'}")
        pytest.skip("headless Chromium (apt-get install chromium) or playwright is not available")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--allow-file-access-from-files"])
        yield b
        b.close()


def test_a_reader_sees_every_chapter_the_table_and_a_working_slider(book, browser):
    html, _ = book
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    external = []
    page.on("request", lambda r: external.append(r.url) if r.url.startswith(("http:", "https:")) else None)
    viewer_page = None
    for path in toc_pages(html):
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        body = page.locator("article").inner_text()
        assert "Traceback" not in body and page.locator(".output.traceback").count() == 0, path.name
        assert page.locator("h1").count() >= 1, f"{path.name} has no title"
        if page.locator("span.math, div.math").count():
            page.wait_for_selector("mjx-container", timeout=30_000)  # the vendored MathJax typeset the maths
            page.wait_for_timeout(500)
        assert page.locator("mjx-merror").count() == 0, f"{path.name}: MathJax could not typeset " \
            f"{page.locator('mjx-merror').first.get_attribute('data-mjx-error')}"
        raw = RAW_TEX_RE.findall(page.evaluate(PROSE_JS))
        assert not raw, f"{path.name} shows raw TeX in its prose: {raw[:5]}"
        source = path.read_text()
        leaked = [p for p in build_machine_paths(html) if p in source]
        assert not leaked, f"{path.name} prints the build machine's absolute path(s) {leaked}"
        if "comparison" in path.name:
            cells = page.locator("article table td").all_inner_texts()
            numbers = [c for c in cells if re.fullmatch(r"\s*[01]\.\d{3}\s*", c)]
            assert len(numbers) >= 3, f"the comparison table holds no numbers: {cells[:20]}"
            assert "center_prior" in page.locator("article").inner_text(), "the model-free floor is not shown"
        if "budget" in path.name:  # the stand-in's own run is its x1 budget: one point per metric, the baseline line
            body = page.locator("article").inner_text()
            assert "training budget" in body and page.locator("article img").count() >= 1, "no budget figure"
            assert "python -m adcore run --grid" in body, "the budget chapter does not say how to run the rest"
        if "shortcuts" in path.name:  # the stand-in's kNN run has a training-image threshold: the F1 row is there
            body = page.locator("article").inner_text()
            assert "F1 at the best threshold on the test set" in body, "the shortcuts chapter shows no shortcut"
        if viewer_page is None and STATE_RE.search(path.read_text()) and "viewer" in path.read_text():
            viewer_page = path
    assert viewer_page is not None, "no page with a viewer"

    page.goto(viewer_page.as_uri())
    page.wait_for_selector(".widget-slider .noUi-handle", timeout=60_000)  # the widgets rendered, offline
    image = page.locator(".widget-image:visible").first
    before = image.get_attribute("src")
    readout = page.locator(".widget-readout").first.inner_text()
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("([sel, old]) => document.querySelector(sel) !== null", arg=[".widget-image", before])
    page.wait_for_timeout(300)
    after = page.locator(".widget-image:visible").first.get_attribute("src")
    assert page.locator(".widget-readout").first.inner_text() != readout
    assert after != before, "moving the slider did not change the picture"
    assert not external, f"the book fetched from the network: {external[:5]}"
    page.close()
