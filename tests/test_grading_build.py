"""labkit assignments build: nbgrader-style student copies, instructor copies, manifest, determinism."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from labkit.grading.build import (
    build_assignments,
    instructor_notebook,
    read_notebook,
    student_notebook,
)
from labkit.grading.cells import check_cell_info, clear_solutions, find_exercises
from labkit.grading.cli import register

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

SOLUTION = '''def add(a, b):
    """a + b."""
    ### BEGIN SOLUTION
    total = a + b
    return total
    ### END SOLUTION'''
CHECK = """# labkit-check: add (2 points)
assert add(1, 2) == 3
### BEGIN HIDDEN TESTS
assert add(-1, 1) == 0
### END HIDDEN TESTS"""
SECOND = """def twice(x):
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION"""
SECOND_CHECK = "# labkit-check: twice\nassert twice(4) == 8"


def code(source: str, **metadata) -> dict:
    return {
        "cell_type": "code",
        "execution_count": 7,
        "metadata": {"scrolled": True, "papermill": {"duration": 1.5}, **metadata},
        "outputs": [{"output_type": "stream", "name": "stdout", "text": ["old output\n"]}],
        "source": source.splitlines(keepends=True),
    }


def markdown(source: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def toy_notebook(cells: list[dict] | None = None) -> dict:
    """A small instructor notebook: parameters cell, two exercises with hidden tests."""
    if cells is None:
        cells = [
            code('quick = True\ndevice = "auto"\nseed = 0', tags=["parameters"]),
            markdown("**Exercise 1.** Write `add`."),
            code(SOLUTION),
            code(CHECK),
            markdown("**Exercise 2.** Write `twice`."),
            code(SECOND),
            code(SECOND_CHECK),
        ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {
                "name": "labkit",
                "display_name": "Python (labkit)",
                "language": "python",
            },
            "language_info": {"name": "python", "version": "3.11.7"},
            "papermill": {"start_time": "2026-11-21T12:00:00"},
            "widgets": {"state": {}},
        },
        "nbformat": 4,
        "nbformat_minor": 4,
    }


def write(path: Path, nb: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def src(cell: dict) -> str:
    return "".join(cell["source"])


def test_exercises_are_found_with_points_and_functions():
    exercises = find_exercises(toy_notebook())
    assert [(e.id, e.number, e.points, e.function) for e in exercises] == [
        ("add", 1, 2.0, "add"),
        ("twice", 2, 1.0, "twice"),
    ]
    assert exercises[0].solution_cells == [2] and exercises[0].check_cells == [3]
    by_meta = code("assert True", labkit={"exercise": "iou", "points": 3})
    assert check_cell_info(by_meta) == ("iou", 3.0)
    assert check_cell_info(code("# labkit-check: iou (2.5 points)\npass")) == ("iou", 2.5)
    assert check_cell_info(code("labkit.grading.check_pairwise_iou(f)")) == ("pairwise_iou", 1.0)
    assert check_cell_info(code("print('hello')")) is None


def test_unmarked_check_cells_fall_back_to_the_cell_after_the_solution():
    nb = toy_notebook(
        [
            code(SOLUTION),
            code("print(add(2, 2))  # a demo between the solution and its marked check"),
            code(CHECK),
            code(SECOND),
            code("assert twice(4) == 8"),  # plain assert, no marker: the fallback
        ]
    )
    exercises = find_exercises(nb)
    assert [(e.id, e.check_cells, e.solution_cells, e.points) for e in exercises] == [
        ("add", [2], [0], 2.0),
        ("twice", [4], [3], 1.0),
    ]


def test_student_copy_stubs_solutions_and_drops_hidden_tests():
    nb = student_notebook(toy_notebook(), "toy")
    solution, check = src(nb["cells"][2]), src(nb["cells"][3])
    assert solution == (
        "def add(a, b):\n"
        '    """a + b."""\n'
        "    # YOUR CODE HERE\n"
        "    raise NotImplementedError('Exercise 1 (add): write add')"
    )
    assert "total = a + b" not in solution
    assert check == "# labkit-check: add (2 points)\nassert add(1, 2) == 3"
    assert "HIDDEN" not in json.dumps(nb) and "BEGIN SOLUTION" not in json.dumps(nb)
    assert "Exercise 2 (twice): write twice" in src(nb["cells"][5])
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
        assert set(cell["metadata"]) <= {"tags", "labkit", "editable", "deletable"}
    assert nb["cells"][0]["metadata"]["tags"] == ["parameters"]
    assert nb["cells"][3]["metadata"]["editable"] is False  # locked check cell
    assert nb["cells"][3]["metadata"]["labkit"] == {
        "exercise": "add",
        "points": 2.0,
        "role": "check",
    }
    assert set(nb["metadata"]) == {"kernelspec", "language_info", "labkit"}
    assert nb["metadata"]["kernelspec"]["name"] == "labkit"


def test_instructor_copy_keeps_solutions_and_hidden_tests():
    nb = instructor_notebook(toy_notebook(), "toy")
    assert "total = a + b" in src(nb["cells"][2])
    assert "assert add(-1, 1) == 0" in src(nb["cells"][3])
    assert nb["cells"][2]["outputs"] == []


def test_bad_markers_raise_naming_the_cell():
    with pytest.raises(ValueError, match=r"toy cell 0: BEGIN SOLUTION at line 2 has no END"):
        student_notebook(
            toy_notebook(
                [
                    code("def f():\n    ### BEGIN SOLUTION\n    return 1"),
                    code("# labkit-check: f\n"),
                ]
            ),
            "toy",
        )
    with pytest.raises(ValueError, match="solution blocks with no check cell after them"):
        find_exercises(toy_notebook([code(CHECK), code(SECOND)]))
    with pytest.raises(ValueError, match="END SOLUTION without BEGIN"):
        clear_solutions("x = 1\n### END SOLUTION", "stub")


def test_build_is_deterministic_and_writes_manifest_and_readme(tmp_path):
    source = write(tmp_path / "src" / "03_toy.ipynb", toy_notebook())
    write(tmp_path / "src" / "04_plain.ipynb", toy_notebook([code("print(1)")]))
    paths = sorted((tmp_path / "src").iterdir())
    manifest = build_assignments(paths, tmp_path / "a")
    build_assignments(list(reversed(paths)), tmp_path / "b")
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert [str(f) for f in files] == [
        "instructor/03_toy.ipynb",
        "manifest.json",
        "student/03_toy.ipynb",
        "student/README.md",
    ]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    before = (tmp_path / "a" / "student" / "03_toy.ipynb").read_bytes()
    build_assignments(paths, tmp_path / "a")  # rebuilding in place changes nothing
    assert (tmp_path / "a" / "student" / "03_toy.ipynb").read_bytes() == before
    assert manifest["skipped"] == ["04_plain.ipynb"] and manifest["total_points"] == 3.0
    assert [e["id"] for e in manifest["notebooks"][0]["exercises"]] == ["add", "twice"]
    readme = (tmp_path / "a" / "student" / "README.md").read_text()
    assert "| 03_toy.ipynb | 1. `add` | `add` | 2 |" in readme and "Total: 3 points." in readme
    student = read_notebook(tmp_path / "a" / "student" / "03_toy.ipynb")
    assert json.loads(before) == student and student["nbformat_minor"] == 5
    assert source.read_text() == json.dumps(toy_notebook())  # the source is untouched


def test_cli_build_and_list(tmp_path, capsys):
    source = write(tmp_path / "05_toy.ipynb", toy_notebook())
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["assignments", "build", str(source), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert "05_toy.ipynb: add (2), twice (1)" in capsys.readouterr().out
    assert (tmp_path / "out" / "student" / "05_toy.ipynb").is_file()
    args = parser.parse_args(["assignments", "list", str(source)])
    assert args.func(args) == 0
    assert "1. add" in capsys.readouterr().out
    args = parser.parse_args(["assignments", "build", str(tmp_path / "nope.ipynb")])
    assert args.func(args) == 2


def test_real_notebook_01_student_copy():
    nb = read_notebook(NOTEBOOKS / "01_anchors.ipynb")
    exercises = find_exercises(nb)
    assert len(exercises) >= 3
    student = student_notebook(nb, "01_anchors")
    text = json.dumps(student)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    assert text.count("raise NotImplementedError(") >= 3
    assert "torch.max(boxes1[:, None, :2]" not in text  # the IoU solution is gone
    assert all(c.get("outputs", []) == [] for c in student["cells"])
    assert student == student_notebook(read_notebook(NOTEBOOKS / "01_anchors.ipynb"), "01_anchors")
