"""Every numbered notebook is a complete lesson: papers, an explorer, takeaways, graded
exercises, previous/next links, and teaching cells free of test plumbing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

from labkit import run_notebooks as runner
from labkit.grading.cells import CHECK_MARKER

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = runner.discover(NOTEBOOK_DIR)
RECORD_TAG = "labkit-record"


def _book(path):
    return nbformat.read(path, as_version=4)


def _markdown(book) -> str:
    return "\n".join(c.source for c in book.cells if c.cell_type == "markdown")


def _code(book) -> list:
    return [c for c in book.cells if c.cell_type == "code"]


def test_there_are_six_lessons_in_order():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_cites_its_papers_with_links(path):
    links = re.findall(r"\]\((https://arxiv\.org/abs/[0-9.]+)\)", _markdown(_book(path)))
    assert links, f"{path.name}: cite the lesson's papers as markdown links to arxiv.org/abs/..."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_has_takeaways_and_links_to_its_neighbours(path):
    text = _markdown(_book(path))
    assert re.search(r"^## Takeaways", text, re.M), f"{path.name}: needs a '## Takeaways' section"
    index = NOTEBOOKS.index(path)
    if index > 0:
        prev = NOTEBOOKS[index - 1].name
        assert "Previous: " in text and f"]({prev})" in text, f"{path.name}: link back to {prev}"
    if index + 1 < len(NOTEBOOKS):
        nxt = NOTEBOOKS[index + 1].name
        assert "Next: " in text and f"]({nxt})" in text, f"{path.name}: link on to {nxt}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_has_an_interactive_explorer(path):
    calls = [
        node
        for cell in _code(_book(path))
        for node in ast.walk(ast.parse(cell.source))
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", "")).endswith("explorer")
    ]
    assert calls, f"{path.name}: needs an ipywidgets explorer cell (a call to an *explorer)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_has_three_graded_exercises_and_no_bare_asserts(path):
    book = _book(path)
    checks = [m.group("id") for c in _code(book) for m in CHECK_MARKER.finditer(c.source)]
    assert len(set(checks)) >= 3, f"{path.name}: needs >= 3 graded exercises, has {checks}"
    for i, cell in enumerate(_code(book)):
        asserts = [n for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.Assert)]
        assert not asserts, (
            f"{path.name}: code cell {i} uses a bare assert; check exercises with labkit.grading "
            "(actionable feedback) and show comparisons by printing them"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_teaching_cells_hold_no_test_plumbing(path):
    for i, cell in enumerate(_code(_book(path))):
        tags = cell.metadata.get("tags", [])
        assert "NBVAL" not in cell.source, (
            f"{path.name}: code cell {i}: use the nbval-check-output cell tag, not a comment"
        )
        if "labkit.notebook.record(" in cell.source:
            assert RECORD_TAG in tags, (
                f"{path.name}: code cell {i} records metrics inside a teaching cell; move the "
                f"record calls to a small cell tagged {RECORD_TAG!r} after it"
            )
        if RECORD_TAG in tags:
            body = [ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")]
            statements = ast.parse(cell.source).body
            assert all("labkit.notebook.record(" in ast.unparse(s) for s in statements), (
                f"{path.name}: record cell {i} must only record ({body})"
            )
            assert cell.metadata.get("jupyter", {}).get("source_hidden"), (
                f"{path.name}: record cell {i} should be collapsed (jupyter.source_hidden)"
            )
