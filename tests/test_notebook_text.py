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
