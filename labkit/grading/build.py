"""Build an assignment: student notebooks (solutions stubbed, hidden tests removed), instructor copies, manifest.

``build_assignments(["notebooks/01_anchors.ipynb"], "build/assignments")`` writes::

    build/assignments/student/01_anchors.ipynb     hand these out (with student/README.md)
    build/assignments/student/README.md
    build/assignments/instructor/01_anchors.ipynb  solutions + hidden tests, outputs cleared
    build/assignments/manifest.json                exercises, points, file hashes

Every file is a pure function of the source notebooks: same input, same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from labkit.grading.cells import (
    Exercise,
    cell_source,
    check_cell_info,
    clear_solutions,
    find_exercises,
    has_solution,
    remove_hidden_tests,
)

__all__ = [
    "build_assignments",
    "dumps_notebook",
    "instructor_notebook",
    "read_notebook",
    "student_notebook",
]

DEFAULT_KERNELSPEC = {"name": "labkit", "display_name": "Python (labkit)", "language": "python"}
# Cell metadata worth keeping: papermill's parameters tag, nbval markers live in the source.
_KEEP_CELL_METADATA = ("tags", "labkit")


def read_notebook(path: str | os.PathLike) -> dict:
    """A notebook file as a plain dict (``ValueError`` naming the file if it is not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable notebook ({err})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path}: not a notebook (no 'cells' list)")
    return nb


def dumps_notebook(nb: dict) -> str:
    """Notebook JSON the way Jupyter writes it (1-space indent, sorted keys, sources as lists
    of lines), byte-stable."""
    nb = dict(
        nb, cells=[dict(c, source=cell_source(c).splitlines(keepends=True)) for c in nb["cells"]]
    )
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _clean_cell(cell: dict, index: int) -> dict:
    out = {
        "cell_type": cell["cell_type"],
        "metadata": {
            k: cell["metadata"][k] for k in _KEEP_CELL_METADATA if k in cell.get("metadata", {})
        },
        "source": cell_source(cell),
    }
    # nbformat 4.5 cell ids: keep the author's, or derive one from the position.
    out["id"] = str(cell.get("id") or f"cell-{index}")
    if cell["cell_type"] == "code":
        out["execution_count"] = None
        out["outputs"] = []
    elif "attachments" in cell:
        out["attachments"] = cell["attachments"]
    return out


def _clean_notebook(nb: dict, role: str, exercises: list[Exercise], name: str) -> dict:
    meta = nb.get("metadata", {})
    return {
        "cells": [_clean_cell(c, i) for i, c in enumerate(nb["cells"])],
        "metadata": {
            "kernelspec": meta.get("kernelspec", DEFAULT_KERNELSPEC),
            "language_info": {"name": meta.get("language_info", {}).get("name", "python")},
            "labkit": {
                "assignment": name,
                "role": role,
                "exercises": [
                    {"id": e.id, "number": e.number, "points": e.points, "function": e.function}
                    for e in exercises
                ],
            },
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _label(ex: Exercise) -> str:
    what = f"write {ex.function}" if ex.function else "your code here"
    return f"Exercise {ex.number} ({ex.id}): {what}"


def instructor_notebook(nb: dict, name: str = "notebook") -> dict:
    """The source with outputs cleared and metadata normalized; solutions and hidden tests kept.

    Check and solution cells are tagged with ``{"labkit": {"exercise", "role", ...}}`` so the
    grader matches cells by metadata, not by position.
    """
    exercises = find_exercises(nb)
    out = _clean_notebook(nb, "instructor", exercises, name)
    for ex in exercises:
        for index, points in zip(ex.check_cells, ex.check_points, strict=True):
            out["cells"][index]["metadata"]["labkit"] = {
                "exercise": ex.id,
                "points": points,
                "role": "check",
            }
        for index in ex.solution_cells:
            out["cells"][index]["metadata"]["labkit"] = {"exercise": ex.id, "role": "solution"}
    return out


def student_notebook(nb: dict, name: str = "notebook") -> dict:
    """The student copy: solution blocks become ``raise NotImplementedError("Exercise N ...")``
    stubs, hidden-test blocks are removed, outputs and execution counts cleared, check cells
    locked (``editable``/``deletable`` false, as nbgrader's read-only cells).

    Raises:
        ValueError: unbalanced markers, or solution blocks with no check cell after them.
    """
    exercises = find_exercises(nb)
    out = instructor_notebook(nb, name)
    out["metadata"]["labkit"]["role"] = "student"
    by_cell = {i: ex for ex in exercises for i in ex.solution_cells}
    for index, cell in enumerate(out["cells"]):
        if cell["cell_type"] != "code":
            continue
        where = f"{name} cell {index}"
        source = cell["source"]
        if index in by_cell:
            source = clear_solutions(source, _label(by_cell[index]), where)
        elif has_solution(source):  # defensive: find_exercises assigns every solution cell
            raise ValueError(f"{where}: solution block outside an exercise")
        if check_cell_info(cell) is not None:
            source = remove_hidden_tests(source, where)
            cell["metadata"]["editable"] = False
            cell["metadata"]["deletable"] = False
        cell["source"] = source
    return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write(path: Path, text: str) -> None:
    from labkit.files import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _student_readme(entries: list[dict]) -> str:
    lines = [
        "# labkit assignments",
        "",
        "Each notebook ends with exercises. For each one, write the function where it says",
        "`# YOUR CODE HERE` (delete the `raise NotImplementedError` line), then run the check",
        "cell below it: it prints `✓ <exercise>: all N cases passed`, or the inputs your",
        "function got wrong with the expected and actual outputs and a hint.",
        "",
        "- Keep the function names and signatures; do not edit the check cells (they are",
        "  locked, and the grader replaces them with its own copy, which runs more cases).",
        "- Run the whole notebook top to bottom (Kernel > Restart and Run All) before you",
        "  submit: the grader runs it exactly like that, with a time limit per cell.",
        "- You can also run a check from any cell:",
        "  `labkit.grading.check_pairwise_iou(my_box_iou)`.",
        "- Submit the notebooks unchanged in name, in a folder named after you:",
        "  `<your-id>/01_anchors.ipynb`, ...",
        "",
        "| notebook | exercise | function | points |",
        "|---|---|---|---|",
    ]
    for entry in entries:
        for ex in entry["exercises"]:
            fn = f"`{ex['function']}`" if ex["function"] else ""
            lines.append(
                f"| {entry['notebook']} | {ex['number']}. `{ex['id']}` | {fn} | {ex['points']:g} |"
            )
    total = sum(e["points"] for e in entries)
    lines += ["", f"Total: {total:g} points.", ""]
    return "\n".join(lines)


def build_assignments(
    notebooks: Sequence[str | os.PathLike], out_dir: str | os.PathLike = "build/assignments"
) -> dict:
    """Write the student and instructor notebooks, the student README and ``manifest.json``.

    Args:
        notebooks: source notebooks (with solutions); ones without exercises are skipped.
        out_dir: output folder (``student/``, ``instructor/``, ``manifest.json``).

    Returns:
        The manifest: ``{"notebooks": [{"notebook", "exercises", "points", "student_sha256",
        "instructor_sha256"}], "total_points", "skipped"}``.
    """
    out = Path(out_dir)
    entries, skipped = [], []
    for path in sorted(Path(p) for p in notebooks):
        nb = read_notebook(path)
        exercises = find_exercises(nb)
        if not exercises:
            skipped.append(path.name)
            continue
        student_text = dumps_notebook(student_notebook(nb, path.stem))
        instructor_text = dumps_notebook(instructor_notebook(nb, path.stem))
        _write(out / "student" / path.name, student_text)
        _write(out / "instructor" / path.name, instructor_text)
        entries.append(
            {
                "notebook": path.name,
                "exercises": [
                    {
                        "id": e.id,
                        "number": e.number,
                        "points": e.points,
                        "function": e.function,
                        "check_cells": len(e.check_cells),
                    }
                    for e in exercises
                ],
                "points": sum(e.points for e in exercises),
                "student_sha256": _sha256(student_text),
                "instructor_sha256": _sha256(instructor_text),
            }
        )
    manifest = {
        "notebooks": entries,
        "total_points": sum(e["points"] for e in entries),
        "skipped": skipped,
    }
    if entries:
        _write(out / "student" / "README.md", _student_readme(entries))
    _write(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return copy.deepcopy(manifest)
