"""The notebooks' prose as a source file: a JSON escape gone wrong (``"\\times"`` read as a tab + ``imes``) is invisible
in the notebook but renders as broken maths in the book."""
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
