"""Every comparison a notebook's text makes from recorded zoo runs holds on the recorded runs.

``labkit.lessons.recorded.LESSON_CLAIMS`` lists each claim with the verdict the text states and
the phrase it states it in. A new seed that changes a verdict fails here until the text changes.
"""

from pathlib import Path

import nbformat
import pytest

from labkit import zoo
from labkit.lessons import recorded

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize(
    "stated",
    recorded.LESSON_CLAIMS,
    ids=lambda c: f"{c.notebook[:2]}-{c.first}-{c.second}-{c.metric}",
)
def test_stated_comparison_holds_on_the_recorded_seeds(stated):
    got = recorded.claim(stated.first, stated.second, stated.metric)
    assert got.verdict == stated.verdict, (
        f"{stated.notebook} says {stated.first} vs {stated.second} on {stated.metric} is "
        f"{stated.verdict!r}, the recorded seeds say: {got.sentence}"
    )
    book = nbformat.read(NOTEBOOKS / stated.notebook, as_version=4)
    text = " ".join(" ".join(c.source.split()) for c in book.cells if c.cell_type == "markdown")
    assert stated.phrase in text, f"{stated.notebook} no longer states: {stated.phrase!r}"


def test_every_lesson_comparison_is_covered():
    """The comparisons the lessons make each have a stated verdict (or say it has too few seeds)."""
    pairs = {(c.first, c.second) for c in recorded.LESSON_CLAIMS}
    assert {
        ("atss", "retinanet"),
        ("paa", "retinanet"),
        ("fcos", "fcos_no_centerness"),
        ("co_deformable_detr", "deformable_detr"),
    } <= pairs


def test_claimed_models_are_zoo_entries_with_recorded_seeds():
    trained = {r["name"] for r in zoo.manifest()}
    for stated in recorded.LESSON_CLAIMS:
        assert {stated.first, stated.second} <= set(zoo.ZOO)
        assert {stated.first, stated.second} <= trained, f"{stated} compares untrained models"
