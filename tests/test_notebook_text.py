"""The notebooks' prose as a source file: a JSON escape gone wrong (``"\\times"`` read as a tab + ``imes``) is invisible
in the notebook but renders as broken maths in the book."""
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb")) + sorted((REPO / "book" / "chapters").glob("*.ipynb"))
# \t, \b, \f, \v, \r: what "\times", "\beta", "\frac", "\varepsilon", "\rho" become when a backslash is lost
CONTROL = {"\t": "\\t", "\b": "\\b", "\f": "\\f", "\v": "\\v", "\r": "\\r"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_holds_no_control_characters(path):
    nb = nbformat.read(str(path), as_version=4)
    bad = [(i, CONTROL[ch], cell.source[max(0, k - 20):k + 20])
           for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
           for k, ch in enumerate(cell.source) if ch in CONTROL]
    assert not bad, f"{path.name}: control characters in markdown (cell, char, context): {bad[:3]}"


def _text_tokens(tokens):
    for tok in tokens:
        if tok.type == "text":
            yield tok.content
        yield from _text_tokens(tok.children or [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_maths_parses_as_maths(path):
    """Every ``$``/``$$`` pair becomes a MyST math node: no ``$`` or TeX command is left in the plain text.

    MyST's default (``dmath_double_inline`` off, as the book's notebook pages are parsed) reads ``$$...$$`` that shares
    a paragraph with text as ``$`` + inline maths + ``$`` and pairs every later ``$`` wrongly: VT-ADL's mixture formula
    was shown as raw TeX that way. A display block needs blank lines around it.
    """
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    md = create_md_parser(MdParserConfig(enable_extensions={"dollarmath", "colon_fence"}), RendererHTML)
    nb = nbformat.read(str(path), as_version=4)
    bad = [(i, m.group(0), text[max(0, m.start() - 30):m.end() + 30])
           for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
           for text in _text_tokens(md.parse(cell.source))
           for m in re.finditer(r"\$|\\[A-Za-z]{2,}", text)]
    assert not bad, f"{path.name}: TeX left outside maths (cell, match, context): {bad[:3]}"


# The notebooks as a person opens them in JupyterLab (``make lab``): what to run, on which data, with which values.
PAPERS = ("vt_adl", "advit", "anovit", "dmad", "aand")
PARAMETER_NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _parameters(nb) -> tuple[int, dict]:
    """(index of the ``parameters`` cell, {name: its line's comment, or None})."""
    import ast
    import io
    import tokenize

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = nb.cells[index].source
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    return index, {node.targets[0].id: comments.get(node.end_lineno) for node in ast.parse(source).body}


@pytest.mark.parametrize("path", PARAMETER_NOTEBOOKS, ids=lambda p: p.name)
def test_every_parameter_says_what_it_does(path):
    """A comment on each parameter's line, with more in it than the paper's value in brackets: ``# (AAND: 16)``
    leaves a reader guessing what the number is."""
    _, params = _parameters(nbformat.read(str(path), as_version=4))
    assert params
    bare = [name for name, comment in params.items()
            if comment is None or not re.search(r"\w", re.sub(r"\([^)]*\)", "", comment.lstrip("# ")))]
    assert not bare, f"{path.name}: parameters without a comment saying what they do: {bare}"


@pytest.mark.parametrize("paper", PAPERS)
def test_a_paper_notebook_says_how_to_run_it_before_its_parameters(paper):
    """The cells above the parameters say how to open and run the notebook on the embedded data, on MVTec AD and on
    a folder of one's own, and every parameter they tell the reader to set exists."""
    nb = nbformat.read(str(REPO / "notebooks" / f"{paper}.ipynb"), as_version=4)
    index, params = _parameters(nb)
    intro = "\n".join(c.source for c in nb.cells[:index] if c.cell_type == "markdown")
    for needed in ("make lab", "Run All Cells", '`dataset = "textures"`', '`dataset = "mvtec"`', "`data_root = ",
                   "MVTec AD layout", "ground_truth", f"notebooks/params/{paper}/smoke.yaml",
                   f"notebooks/params/{paper}/paper.yaml", "viewer"):
        assert needed in intro, f"{paper}.ipynb: the cells before the parameters do not mention {needed!r}"
    named = set(re.findall(r"`(\w+) = ", intro))
    assert named and named <= set(params), f"{paper}.ipynb names parameters it does not have: {named - set(params)}"
    for path in re.findall(r"notebooks/params/[\w/]+\.yaml", intro):
        assert (REPO / path).is_file(), f"{paper}.ipynb points to {path}, which does not exist"


@pytest.mark.parametrize("paper", PAPERS)
def test_a_paper_notebook_ends_with_the_viewer(paper):
    nb = nbformat.read(str(REPO / "notebooks" / f"{paper}.ipynb"), as_version=4)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert "adcore.viewer.show(" in last.source, f"{paper}.ipynb's last code cell is not the viewer: {last.source!r}"
