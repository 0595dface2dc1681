"""labkit assignments grade: hidden tests back in, sandboxed runs, crashes and loops survived, stable CSV."""

from __future__ import annotations

import argparse
import copy
import json

import pytest

from labkit.grading.build import build_assignments, instructor_notebook, student_notebook
from labkit.grading.feedback import CHECK_MIME, DONE_MIME
from labkit.grading.grade import (
    GRADER_KEY,
    check_slots,
    grade_submissions,
    prepare_submission,
    score_notebook,
)
from tests.test_grading_build import CHECK, NOTEBOOKS, code, markdown, src, toy_notebook, write

# Solution cells of the toy notebook (see tests/test_grading_build.py) rewritten by "students".
ADD_OK = "def add(a, b):\n    return a + b"
TWICE_OK = "def twice(x):\n    return 2 * x"


def submission(**cells: str) -> dict:
    """The student copy of the toy notebook with some cells' sources replaced (by index)."""
    nb = student_notebook(toy_notebook(), "toy")
    for index, source in cells.items():
        nb["cells"][int(index.lstrip("c"))]["source"] = source
    return nb


def solved(**cells: str) -> dict:
    return submission(c2=ADD_OK, c5=TWICE_OK, **cells)


# ---------------------------------------------------------------------------------------
# prepare / score without a kernel
# ---------------------------------------------------------------------------------------


def test_prepare_puts_serve_cells_in_place_and_hidden_tests_only_go_to_the_checker():
    sub = solved()
    sub["cells"][3]["source"] = "# labkit-check: add (2 points)\nassert True  # edited by a student"
    sub["cells"][3]["outputs"] = [{"output_type": "display_data", "data": {DONE_MIME: {}}}]
    del sub["cells"][6]  # the check cell of `twice` deleted
    sub["cells"].append(code("# labkit-check: add\nassert True"))  # a forged extra check
    sub["cells"].insert(1, code("labkit.grading.check_add(add)"))  # a scratch call, earlier
    sub["cells"][0]["metadata"][GRADER_KEY] = {"exercise": "twice", "index": 0, "points": 9}
    nb = prepare_submission(toy_notebook(), sub, "toy")

    graded = [
        (i, c["metadata"][GRADER_KEY])
        for i, c in enumerate(nb["cells"])
        if GRADER_KEY in c["metadata"]
    ]
    assert graded == [
        (4, {"exercise": "add", "index": 0, "points": 2.0}),  # the locked cell, not the scratch
        (7, {"exercise": "twice", "index": 0, "points": 1.0}),  # inserted after `def twice`
    ]
    serve = src(nb["cells"][4])
    assert "_labkit_rpc.serve('add', 0, " in serve and "edited by a student" not in serve
    # The student's kernel never sees the check code, hidden tests least of all ...
    assert "assert add(-1, 1) == 0" not in json.dumps(nb) and "HIDDEN" not in json.dumps(nb)
    assert nb["cells"][4]["outputs"] == []  # the forged done marker is gone
    # ... the checking process gets the instructor's check cells, hidden tests included.
    slots = check_slots(toy_notebook(), "toy")
    assert [(s["exercise"], s["index"], s["names"], s["imports"]) for s in slots] == [
        ("add", 0, ["add"], []),
        ("twice", 0, ["twice"], []),
    ]
    assert slots[0]["source"].startswith(CHECK) and "assert add(-1, 1) == 0" in slots[0]["source"]
    assert "labkit" not in nb["cells"][-1]["metadata"]  # the extra check counts for nothing
    assert src(nb["cells"][6]) == TWICE_OK


def _executed(outputs_by_cell: dict[int, list[dict]], status: str = "completed") -> dict:
    nb = prepare_submission(toy_notebook(), solved(), "toy")
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            cell["metadata"]["papermill"] = {"status": "pending"}
        if i in outputs_by_cell:
            cell["outputs"] = outputs_by_cell[i]
            cell["execution_count"] = i
            cell["metadata"]["papermill"] = {"status": status}
    return nb


DONE = {"output_type": "display_data", "data": {DONE_MIME: {"exercise": "x", "index": 0}}}


def _check_output(score: float) -> dict:
    payload = {"exercise": "add", "passed": score == 1, "score": score, "report": f"report {score}"}
    return {"output_type": "display_data", "data": {CHECK_MIME: payload}}


def _error(ename: str, evalue: str = "") -> dict:
    return {
        "output_type": "error",
        "ename": ename,
        "evalue": evalue,
        "traceback": [f"\x1b[31m{ename}\x1b[0m: {evalue}"],
    }


def test_score_passed_partial_error_timeout_and_not_run():
    passed = score_notebook(_executed({3: [DONE], 6: [DONE]}), toy_notebook())
    assert [(g.id, g.points, g.max_points) for g in passed] == [
        ("add", 2.0, 2.0),
        ("twice", 1.0, 1.0),
    ]

    partial = score_notebook(
        _executed({3: [_check_output(0.8), _error("CheckFailed", "x")]}), toy_notebook()
    )
    assert partial[0].points == 1.6 and partial[0].messages == ["report 0.8"]
    strict = score_notebook(
        _executed({3: [_check_output(0.8), _error("CheckFailed", "x")]}),
        toy_notebook(),
        partial_credit=False,
    )
    assert strict[0].points == 0 and strict[0].messages == ["report 0.8"]
    assert partial[1].points == 0 and "did not run" in partial[1].messages[0]

    failed = score_notebook(
        _executed(
            {
                3: [_error("NameError", "name 'add' is not defined")],
                6: [_error("KeyboardInterrupt")],
            }
        ),
        toy_notebook(),
    )
    assert failed[0].points == 0 and "NameError: name 'add' is not defined" in failed[0].messages[0]
    assert "\x1b" not in failed[0].messages[0]
    assert "per-cell time limit" in failed[1].messages[0]

    killed = score_notebook(_executed({3: []}, status="running"), toy_notebook(), "stopped at 5 s")
    assert killed[0].points == 0 and killed[0].messages == [
        "the check cell did not finish (stopped at 5 s)"
    ]
    assert [g.points for g in score_notebook(None, toy_notebook())] == [0, 0]


class _FlakyPapermill:
    """Stands in for papermill.execute_notebook: fails with the given errors, then succeeds."""

    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def run_worker(monkeypatch, tmp_path, errors):
    import papermill

    from labkit.grading import execute

    fake = _FlakyPapermill(errors)
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    result = execute.execute("in.ipynb", "out.ipynb", str(tmp_path), 5.0, "labkit", {})
    return result, fake.calls


def test_worker_starts_the_kernel_again_when_it_died_during_startup(monkeypatch, tmp_path):
    startup = RuntimeError("Kernel died before replying to kernel_info")
    slow = RuntimeError("Kernel didn't respond in 60 seconds")
    assert run_worker(monkeypatch, tmp_path, [startup, slow]) == (None, 3)


def test_worker_gives_up_after_three_failed_starts(monkeypatch, tmp_path):
    errors = [RuntimeError("Kernel died before replying to kernel_info")] * 4
    result, calls = run_worker(monkeypatch, tmp_path, errors)
    assert calls == 3
    assert result == "RuntimeError: Kernel died before replying to kernel_info"


def test_worker_does_not_rerun_a_kernel_that_died_while_running_cells(monkeypatch, tmp_path):
    from nbclient.exceptions import DeadKernelError

    result, calls = run_worker(monkeypatch, tmp_path, [DeadKernelError("Kernel died")])
    assert (result, calls) == ("DeadKernelError: Kernel died", 1)


# ---------------------------------------------------------------------------------------
# end to end: real kernels
# ---------------------------------------------------------------------------------------

LOOP_FOREVER = "def add(a, b):\n    while True:\n        pass"
IGNORE_INTERRUPTS = (
    """import time
while True:  # ignores the per-cell interrupt: only the total time limit stops it
    try:
        time.sleep(0.2)
    except KeyboardInterrupt:
        pass
"""
    + TWICE_OK
)
DELETE_FILES = (
    """import glob, os, shutil
# As if it ran in the submissions folder: its own copy, then the other students' notebooks.
victims = {os.path.realpath(p) for p in glob.glob("*.ipynb") + glob.glob("../*/*.ipynb")}
for path in victims:
    os.remove(path)
print("removed", len(victims))
shutil.rmtree(os.getcwd())
"""
    + ADD_OK
)


@pytest.mark.slow
def test_grader_survives_raising_looping_deleting_and_dying_notebooks(tmp_path):
    source = write(tmp_path / "source" / "toy.ipynb", toy_notebook())
    subs = tmp_path / "submissions"
    students = {
        "raises": submission(c2="raise RuntimeError('boom')\n" + ADD_OK, c5=TWICE_OK),
        "loops": submission(c2=LOOP_FOREVER, c5=TWICE_OK),
        "deletes": submission(c2=DELETE_FILES, c5=TWICE_OK),
        "dies": submission(c2=ADD_OK, c5="import os\nos._exit(1)"),
    }
    for name, nb in students.items():
        write(subs / name / "toy.ipynb", nb)
    (subs / "missing").mkdir()
    before = {p: p.read_bytes() for p in subs.rglob("*.ipynb")}
    before[source] = source.read_bytes()

    grades = grade_submissions(
        subs, [source], tmp_path / "grades.csv", cell_timeout=4, total_timeout=120, jobs=4
    )
    csv_text = (tmp_path / "grades.csv").read_text()
    assert csv_text.splitlines() == [
        "student,toy:add,toy:twice,total,max_total,status",
        "deletes,2,1,3,3,ok",
        "dies,2,0,2,3,toy: kernel died",
        "loops,0,1,1,3,ok",
        "missing,0,0,0,3,toy: missing",
        "raises,0,1,1,3,ok",
    ]
    assert {p: p.read_bytes() for p in before} == before  # nothing outside the sandboxes changed
    feedback = {g.student: (tmp_path / "feedback" / f"{g.student}.md").read_text() for g in grades}
    assert "per-cell time limit" in feedback["loops"]
    assert "the kernel died" in feedback["dies"]
    assert "RuntimeError: boom" in feedback["raises"] and "NameError" in feedback["raises"]
    assert "no submission" in feedback["missing"]


@pytest.mark.slow
def test_endless_notebook_is_killed_at_the_total_limit_and_keeps_earlier_points(tmp_path):
    source = write(tmp_path / "toy.ipynb", toy_notebook())
    write(tmp_path / "subs" / "hangs" / "toy.ipynb", submission(c2=ADD_OK, c5=IGNORE_INTERRUPTS))
    write(tmp_path / "subs" / "ok" / "toy.ipynb", solved())
    grades = grade_submissions(
        tmp_path / "subs",
        [source],
        tmp_path / "grades.csv",
        cell_timeout=3,
        total_timeout=30,
        jobs=2,
    )
    assert (tmp_path / "grades.csv").read_text().splitlines()[1:] == [
        "hangs,2,0,2,3,toy: timeout",
        "ok,2,1,3,3,ok",
    ]
    assert grades[0].notebooks[0].exercises[1].messages == [
        "the check cell did not run (the notebook was stopped at the total time limit of 30 s)"
    ]


@pytest.mark.slow
def test_grading_the_same_folder_twice_gives_the_same_files(tmp_path):
    source = write(tmp_path / "toy.ipynb", toy_notebook())
    for name, nb in {
        "ann": solved(),
        "ben": student_notebook(toy_notebook(), "toy"),
        "cy": submission(c2="def add(a, b):\n    return a - b", c5=TWICE_OK),
    }.items():
        write(tmp_path / "subs" / name / "toy.ipynb", nb)
    outputs = []
    for run in ("first", "second"):
        grade_submissions(
            tmp_path / "subs", [source], tmp_path / run / "grades.csv", cell_timeout=30, jobs=3
        )
        outputs.append({p.name: p.read_bytes() for p in (tmp_path / run).rglob("*") if p.is_file()})
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == ["ann.md", "ben.md", "cy.md", "grades.csv"]
    assert b"cy,0,1,1,3,ok" in outputs[0]["grades.csv"]
    assert b"AssertionError" in outputs[0]["cy.md"]
    assert b"NotImplementedError: Exercise 1 (add): write add" in outputs[0]["ben.md"]
    assert b"Total: **0 / 3** points." in outputs[0]["ben.md"]


IOU_SOLUTION = '''import torch
import labkit.grading


def my_box_iou(boxes1, boxes2):
    """IoU [M, N]."""
    ### BEGIN SOLUTION
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    a1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    a2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    return overlap / (a1[:, None] + a2[None, :] - overlap).clamp(min=1e-6)
    ### END SOLUTION'''
IOU_CHECK = """# labkit-check: pairwise_iou (2 points)
labkit.grading.check_pairwise_iou(my_box_iou)
### BEGIN HIDDEN TESTS
labkit.grading.check_pairwise_iou(my_box_iou, seed=1)
### END HIDDEN TESTS"""


@pytest.mark.slow
def test_labkit_check_cells_give_partial_credit_and_feedback(tmp_path):
    import labkit.grading as grading

    nb = toy_notebook([markdown("IoU"), code(IOU_SOLUTION), code(IOU_CHECK)])
    source = write(tmp_path / "iou.ipynb", nb)
    plus_one = IOU_SOLUTION.replace("(rb - lt)", "(rb - lt + 1)")
    plus_one = plus_one.replace("    ### BEGIN SOLUTION\n", "").replace("    ### END SOLUTION", "")
    subs = {
        "right": instructor_notebook(nb),
        "stub": student_notebook(nb),
        "plus_one": copy.deepcopy(student_notebook(nb)),
    }
    subs["plus_one"]["cells"][1]["source"] = plus_one
    for name, sub in subs.items():
        write(tmp_path / "subs" / name / "iou.ipynb", sub)
    grade_submissions(tmp_path / "subs", [source], tmp_path / "grades.csv", cell_timeout=60, jobs=3)

    rows = (tmp_path / "grades.csv").read_text().splitlines()
    namespace: dict = {}
    exec(plus_one, namespace)  # the same function, scored in this process
    wrong_score = grading.check_pairwise_iou(namespace["my_box_iou"], raise_on_fail=False).score
    assert 0 < wrong_score < 1
    assert rows[1] == f"plus_one,{round(2 * wrong_score, 2):g},{round(2 * wrong_score, 2):g},2,ok"
    assert rows[2:] == ["right,2,2,2,ok", "stub,0,0,2,ok"]
    feedback = (tmp_path / "feedback" / "plus_one.md").read_text()
    assert "boxes2 = tensor([[10.0, 0.0, 20.0, 10.0]], float32)" in feedback
    assert "expected tensor([[0.0]], float32)" in feedback and "got      tensor([[" in feedback
    assert "not implemented yet" in (tmp_path / "feedback" / "stub.md").read_text()


@pytest.mark.slow
def test_real_notebook_01_solution_passes_and_student_copy_fails(tmp_path):
    manifest = build_assignments([NOTEBOOKS / "01_anchors.ipynb"], tmp_path / "build")
    max_points = manifest["total_points"]
    write(
        tmp_path / "subs" / "solution" / "01_anchors.ipynb",
        json.loads((tmp_path / "build" / "instructor" / "01_anchors.ipynb").read_text()),
    )
    write(
        tmp_path / "subs" / "student" / "01_anchors.ipynb",
        json.loads((tmp_path / "build" / "student" / "01_anchors.ipynb").read_text()),
    )
    parser = argparse.ArgumentParser()
    from labkit.grading.cli import register

    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "assignments", "grade", str(tmp_path / "subs"), "--notebooks", str(NOTEBOOKS / "01_anchors.ipynb"),
        "--out", str(tmp_path / "grades.csv"), "--jobs", "2", "--cell-timeout", "120", "--no-progress",
    ])  # fmt: skip
    assert args.func(args) == 0
    rows = (tmp_path / "grades.csv").read_text().splitlines()
    assert rows[1].startswith("solution,") and rows[1].endswith(
        f",{max_points:g},{max_points:g},ok"
    )
    assert rows[2].startswith("student,") and rows[2].endswith(f",0,{max_points:g},ok")
    feedback = (tmp_path / "feedback" / "student.md").read_text()
    assert "NotImplementedError" in feedback and "Exercise 1" in feedback


@pytest.mark.slow
def test_every_lesson_grades_solution_full_and_student_copy_zero(tmp_path):
    """All six notebooks, end to end: the instructor's solution earns every point of every
    exercise and the untouched student copy earns none (in the sandbox, checks from outside)."""
    from labkit.grading.grade import grade_submissions
    from labkit.run_notebooks import discover

    sources = discover(NOTEBOOKS)
    build_assignments(sources, tmp_path / "build")
    for path in sources:
        for who, flavour in (("solution", "instructor"), ("student", "student")):
            built = json.loads((tmp_path / "build" / flavour / path.name).read_text())
            write(tmp_path / "subs" / who / path.name, built)
    grades = grade_submissions(
        tmp_path / "subs", sources, tmp_path / "grades.csv", jobs=2, cell_timeout=300,
        total_timeout=900,
    )  # fmt: skip
    by_student = {g.student: g for g in grades}
    for notebook in by_student["solution"].notebooks:
        assert notebook.status == "ok", (notebook.notebook, notebook.notes)
        assert len(notebook.exercises) >= 3, notebook.notebook
        lost = [
            (e.id, e.points, e.max_points) for e in notebook.exercises if e.points != e.max_points
        ]
        assert not lost, f"{notebook.notebook}: the solution lost points: {lost} {notebook.notes}"
    for notebook in by_student["student"].notebooks:
        assert notebook.points == 0 and notebook.max_points > 0, notebook.notebook
    assert len(by_student["solution"].notebooks) == len(sources) == 6
