"""The notebook conventions of an assignment: solution blocks, hidden tests, check cells, exercises.

An instructor's (source) notebook marks, nbgrader-style:

- **solutions** inside code cells, between ``### BEGIN SOLUTION`` and ``### END SOLUTION``
  lines (any number of ``#``); the student copy keeps the lines around them (the ``def`` line
  and docstring) and gets ``raise NotImplementedError("Exercise N (id): ...")`` instead;
- **hidden tests** inside check cells, between ``### BEGIN HIDDEN TESTS`` and
  ``### END HIDDEN TESTS``; the student copy drops them, the grader puts them back;
- **check cells**: a code cell with a comment line ``# labkit-check: pairwise_iou (2 points)``
  (points optional, default 1) or the metadata ``{"labkit": {"exercise": "pairwise_iou",
  "points": 2}}``. A cell calling ``labkit.grading.check_<id>(...)`` without either counts as
  the check cell of ``<id>`` worth 1 point. An exercise may have several check cells; its
  points are their sum. Its solution cells are the ones before its first check cell.
  A solution cell with no marked check cell after it (before the next solution) falls back
  to: the code cell right after it is its check cell, the exercise named after the
  function (1 point) -- so notebooks with plain assert cells grade too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Exercise",
    "cell_source",
    "check_cell_info",
    "clear_solutions",
    "find_exercises",
    "has_solution",
    "remove_hidden_tests",
]

BEGIN_SOLUTION = re.compile(r"^(?P<indent>[ \t]*)#+\s*BEGIN SOLUTION\s*$")
END_SOLUTION = re.compile(r"^[ \t]*#+\s*END SOLUTION\s*$")
BEGIN_HIDDEN = re.compile(r"^[ \t]*#+\s*BEGIN HIDDEN TESTS\s*$")
END_HIDDEN = re.compile(r"^[ \t]*#+\s*END HIDDEN TESTS\s*$")
CHECK_MARKER = re.compile(
    r"^[ \t]*#\s*labkit-check:\s*(?P<id>[A-Za-z_]\w*)"
    r"(?:\s*\(\s*(?P<points>\d+(?:\.\d+)?)\s*points?\s*\))?\s*$",
    re.MULTILINE,
)
CHECK_CALL = re.compile(r"\bcheck_(?P<id>[A-Za-z_]\w*)\s*\(")
FUNCTION_DEF = re.compile(r"^\s*def\s+(?P<name>\w+)\s*\(", re.MULTILINE)


@dataclass
class Exercise:
    """One exercise of a notebook.

    Attributes:
        id: the exercise id (``"pairwise_iou"``), also the name of its check.
        number: 1-based position in the notebook.
        points: total points of its check cells.
        check_cells: indices of its check cells, in order.
        solution_cells: indices of the cells with solution blocks that belong to it.
        function: the name of the function the student writes (first ``def`` of the first
            solution cell), or ``None``.
    """

    id: str
    number: int
    points: float = 0.0
    check_cells: list[int] = field(default_factory=list)
    check_points: list[float] = field(default_factory=list)
    solution_cells: list[int] = field(default_factory=list)
    function: str | None = None


def cell_source(cell: Any) -> str:
    """A cell's source as one string (notebook files may store a list of lines)."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def check_cell_info(cell: Any) -> tuple[str, float] | None:
    """``(exercise id, points)`` when ``cell`` is a check cell, else ``None``."""
    if cell.get("cell_type") != "code":
        return None
    meta = cell.get("metadata", {}).get("labkit", {})
    if isinstance(meta, dict) and meta.get("exercise") and meta.get("role", "check") == "check":
        return str(meta["exercise"]), float(meta.get("points", 1))
    source = cell_source(cell)
    m = CHECK_MARKER.search(source)
    if m:
        return m["id"], float(m["points"]) if m["points"] else 1.0
    if has_solution(source):
        return None
    for m in CHECK_CALL.finditer(source):
        if _known_exercise(m["id"]) or f"grading.check_{m['id']}" in source:
            return m["id"], 1.0
    return None


def _known_exercise(ex_id: str) -> bool:
    from labkit.grading.checks import EXERCISES  # lazily: it imports torch

    return ex_id in EXERCISES


def has_solution(source: str) -> bool:
    """Whether ``source`` contains a ``BEGIN SOLUTION`` line."""
    return any(BEGIN_SOLUTION.match(line) for line in source.splitlines())


def _blocks(lines: list[str], begin: re.Pattern, end: re.Pattern, what: str, where: str):
    """Yield ``(start, stop)`` line ranges of marked blocks; unbalanced markers raise."""
    start = None
    for i, line in enumerate(lines):
        if begin.match(line):
            if start is not None:
                raise ValueError(f"{where}: nested BEGIN {what} at line {i + 1}")
            start = i
        elif end.match(line):
            if start is None:
                raise ValueError(f"{where}: END {what} without BEGIN at line {i + 1}")
            yield start, i
            start = None
    if start is not None:
        raise ValueError(f"{where}: BEGIN {what} at line {start + 1} has no END {what}")


def clear_solutions(source: str, stub_message: str, where: str = "cell") -> str:
    """Replace every solution block with ``# YOUR CODE HERE`` + ``raise NotImplementedError``.

    The stub takes the indentation of the ``BEGIN SOLUTION`` line, so a block inside a
    function body stays inside it.
    """
    lines = source.split("\n")
    out: list[str] = []
    last = 0
    for start, stop in _blocks(lines, BEGIN_SOLUTION, END_SOLUTION, "SOLUTION", where):
        indent = BEGIN_SOLUTION.match(lines[start])["indent"]
        out += lines[last:start]
        out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError({stub_message!r})"]
        last = stop + 1
    out += lines[last:]
    return "\n".join(out)


def remove_hidden_tests(source: str, where: str = "cell") -> str:
    """Drop every ``BEGIN HIDDEN TESTS`` ... ``END HIDDEN TESTS`` block, markers included."""
    lines = source.split("\n")
    keep = [True] * len(lines)
    for start, stop in _blocks(lines, BEGIN_HIDDEN, END_HIDDEN, "HIDDEN TESTS", where):
        keep[start : stop + 1] = [False] * (stop + 1 - start)
    return "\n".join(line for line, k in zip(lines, keep, strict=True) if k).rstrip("\n")


def find_exercises(nb: Any) -> list[Exercise]:
    """The exercises of a notebook, in order of their first check cell.

    Solution cells seen since the previous check cell belong to the next check cell's
    exercise. When no marked check cell follows a solution before the next solution (or the
    end), the code cell right after it is its check, the exercise named after the function
    (1 point). A solution with no code cell after it raises ``ValueError``.
    """
    cells = nb["cells"]
    code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code"]
    solution = {i for i in code if has_solution(cell_source(cells[i]))}
    marked = {i: info for i in code if i not in solution and (info := check_cell_info(cells[i]))}
    # marked_ahead[k]: a marked check comes at or after code[k], before the next solution.
    marked_ahead, ahead = [False] * len(code), False
    for k in range(len(code) - 1, -1, -1):
        ahead = False if code[k] in solution else ahead or code[k] in marked
        marked_ahead[k] = ahead
    exercises: dict[str, Exercise] = {}
    pending: list[int] = []
    for k, index in enumerate(code):
        if index in solution:
            pending.append(index)
            continue
        info = marked.get(index)
        if info is None and pending and code[k - 1] in solution and not marked_ahead[k]:
            m = FUNCTION_DEF.search(cell_source(cells[pending[0]]))
            info = (m["name"] if m else f"exercise_{len(exercises) + 1}", 1.0)
        if info is None:
            continue
        ex_id, points = info
        ex = exercises.setdefault(ex_id, Exercise(ex_id, len(exercises) + 1))
        ex.check_cells.append(index)
        ex.check_points.append(points)
        ex.points += points
        ex.solution_cells += pending
        pending = []
    if pending:
        raise ValueError(
            f"cells {pending}: solution blocks with no check cell after them; add one "
            "(# labkit-check: <exercise> (N points))"
        )
    for ex in exercises.values():
        for index in ex.solution_cells:
            m = FUNCTION_DEF.search(cell_source(nb["cells"][index]))
            if m:
                ex.function = m["name"]
                break
    return list(exercises.values())
