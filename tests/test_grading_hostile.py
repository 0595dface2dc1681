"""Dishonest and hostile submissions: the grader's scores, files and machine stay out of their reach.

One grader call grades every hostile student of a small assignment (a real labkit check with
hidden tests, worth 2 points, and a plain-assert exercise worth 1), in the bubblewrap sandbox.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from labkit.grading.build import instructor_notebook, student_notebook
from labkit.grading.grade import grade_submissions
from labkit.grading.sandbox import Limits, hidden_paths, probe, sandbox_command
from tests.test_grading_build import SECOND, SECOND_CHECK, code, markdown, toy_notebook, write
from tests.test_grading_grade import IOU_CHECK, IOU_SOLUTION, TWICE_OK

IOU_OK = IOU_SOLUTION.replace("    ### BEGIN SOLUTION\n", "").replace("    ### END SOLUTION", "")

# Replaces every check, the result class and the grader's helpers in the student's kernel, and
# forges the outputs the old grader read back: a check that always passes, a tick per exercise.
PATCH_EVERYTHING = """import builtins
import labkit.grading
import labkit.grading.checks as checks
import labkit.grading.feedback as feedback
import labkit.grading.rpc as rpc
from IPython.display import display

class AlwaysPassed(feedback.CheckResult):
    passed = property(lambda self: True)
    score = property(lambda self: 1.0)

def no_op(*args, **kwargs):
    return AlwaysPassed("patched")

for name in list(checks.EXERCISES):
    setattr(labkit.grading, f"check_{name}", no_op)
    setattr(checks, f"check_{name}", no_op)
    checks.EXERCISES[name] = no_op
feedback.CheckResult.passed = property(lambda self: True)
feedback.CheckResult.score = property(lambda self: 1.0)
feedback.run_cases = no_op
feedback.compare = lambda *args, **kwargs: None
builtins.AssertionError = type("AssertionError", (Exception,), {})
display({feedback.CHECK_MIME: {"exercise": "pairwise_iou", "passed": True, "score": 1.0,
         "report": "forged"}, feedback.DONE_MIME: {"exercise": "pairwise_iou", "index": 0},
         "text/plain": "forged"}, raw=True)
print("patched")
"""

# Tries to damage other students, the gradebook, the feedback and the instructor's notebook.
ATTACK_FILES = """import glob, os, shutil
outcome = {}
def attempt(label, action):
    try:
        action()
        outcome[label] = "done"
    except Exception as err:
        outcome[label] = type(err).__name__
own = os.path.abspath("hostile.ipynb")
attempt("other submission", lambda: shutil.copyfile(own, VICTIM))
others = glob.glob("/tmp/**/victim/*.ipynb", recursive=True)
others += glob.glob(os.path.dirname(os.path.dirname(VICTIM)) + "/*/*.ipynb")
attempt("other submissions, by glob", lambda: [shutil.copyfile(own, p) for p in others] or 1 / 0)
attempt("gradebook", lambda: open(GRADEBOOK, "w").write("attacker,3,3,3,3,ok"))
attempt("feedback", lambda: open(FEEDBACK, "w").write("full marks"))
attempt("instructor notebook", lambda: open(SOURCE, "w").write("{}"))
print("ATTACK", json.dumps(outcome, sort_keys=True))
"""

# Looks for the hidden tests (their text, the grader's folders, other processes) and the network.
PEEK = """import glob, os, socket
needle = "seed" + "=1"
places = ["/tmp/**", "/tmp/.*/**", SOURCE_DIR + "/**", "/proc/*/cmdline", "/proc/*/environ"]
hits = []
for pattern in places:
    for path in glob.glob(pattern, recursive=True):
        try:
            if os.path.isfile(path) and needle in open(path, errors="ignore").read(10**7):
                hits.append(path)
        except Exception:
            pass
print("HIDDEN", json.dumps(sorted(hits)))
print("GRADER DIRS", json.dumps(glob.glob("/tmp/labkit-grader-*") + glob.glob(SOURCE_DIR)))
try:
    socket.create_connection(("1.1.1.1", 80), timeout=3).close()
    print("NETWORK open")
except OSError as err:
    print("NETWORK blocked", type(err).__name__)
"""

FORK_BOMB = """import os
while True:
    try:
        os.fork()
    except BaseException:
        pass
"""

MEMORY_HOG = """hog = []
try:
    while True:
        hog.append(bytes(256 << 20))  # calloc: address space, not RAM
except MemoryError:
    print("HOG stopped at", len(hog) // 4, "GiB")
del hog
"""

HOG_FUNCTION = """def my_box_iou(boxes1, boxes2):
    hog = []
    while True:
        hog.append(bytes(256 << 20))
"""

IGNORE_SIGINT = """import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    time.sleep(0.1)
"""


def assignment() -> dict:
    return toy_notebook(
        [
            code('quick = True\ndevice = "auto"\nseed = 0', tags=["parameters"]),
            markdown("**Exercise 1.** IoU."),
            code(IOU_SOLUTION),
            code(IOU_CHECK),
            markdown("**Exercise 2.** Write `twice`."),
            code(SECOND),
            code(SECOND_CHECK),
        ]
    )


def student(*, iou: str | None = None, twice: str | None = None, first: str | None = None) -> dict:
    """The student copy, with cells 2 (IoU) and 5 (twice) replaced; ``first`` goes before them."""
    nb = student_notebook(assignment(), "hostile")
    if iou is not None:
        nb["cells"][2]["source"] = iou
    if twice is not None:
        nb["cells"][5]["source"] = twice
    if first is not None:
        nb["cells"].insert(1, code(first))
    return nb


def _printed(executed: dict, prefix: str) -> str:
    for cell in executed["cells"]:
        for out in cell.get("outputs", []):
            for line in "".join(out.get("text", "")).splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
    raise AssertionError(f"{prefix!r} was not printed")


def test_sandbox_command_hides_the_grader_and_other_students(tmp_path):
    subs, out = tmp_path / "subs", tmp_path / "out"
    subs.mkdir()
    out.mkdir()
    box = probe()
    hidden = hidden_paths([subs, out, Path(__file__).parent])
    assert str(subs) in hidden and str(out) in hidden and tempfile.gettempdir() in hidden
    if not box.isolated:
        pytest.skip(box.reason)
    box.hidden = hidden
    cmd = sandbox_command(box, ["true"], binds=[(str(tmp_path / "box"), "/tmp/labkit", True)])
    assert cmd[:3] == ["bwrap", "--ro-bind", "/"] and cmd[-2:] == ["--", "true"]
    for flag in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"):
        assert flag in cmd
    # Under /tmp (a fresh tmpfs) the folders are simply not there; elsewhere an empty,
    # read-only tmpfs covers them, before the scratch folder is bound.
    assert str(subs) not in cmd and str(out) not in cmd
    tests = str(Path(__file__).parent)
    if tests.startswith("/tmp/"):  # a checkout in /tmp: only its labkit package comes back
        assert tests not in cmd
        return
    i = cmd.index(tests)
    assert cmd[i - 1 : i + 3] == ["--tmpfs", tests, "--remount-ro", tests]
    assert i < cmd.index("/tmp/labkit")


@pytest.mark.slow
def test_hostile_submissions_change_nothing_but_their_own_score(tmp_path):
    if not probe().isolated:
        pytest.skip(f"no bubblewrap sandbox here: {probe().reason}")
    source = write(tmp_path / "source" / "hostile.ipynb", assignment())
    subs, out = tmp_path / "subs", tmp_path / "out"
    paths = {
        "VICTIM": str(subs / "victim" / "hostile.ipynb"),
        "GRADEBOOK": str(out / "grades.csv"),
        "FEEDBACK": str(out / "feedback" / "victim.md"),
        "SOURCE": str(source),
        "SOURCE_DIR": str(source.parent),
    }
    known = "import json\n" + "".join(f"{k} = {v!r}\n" for k, v in paths.items())
    students = {
        "honest": student(iou=IOU_OK, twice=TWICE_OK),
        "stub": student(),
        "patcher": student(first=PATCH_EVERYTHING),
        "attacker": student(iou=IOU_OK, twice=TWICE_OK, first=known + ATTACK_FILES),
        "victim": instructor_notebook(assignment(), "hostile"),
        "peeker": student(iou=IOU_OK, twice=TWICE_OK, first=known + PEEK),
        "forkbomb": student(iou=IOU_OK, twice=TWICE_OK, first=FORK_BOMB),
        "hog": student(iou=HOG_FUNCTION, twice=TWICE_OK, first=MEMORY_HOG),
        "sigint": student(iou=IOU_OK, twice=TWICE_OK, first=IGNORE_SIGINT),
        "exits": student(iou=IOU_OK, twice="import os\n\ndef twice(x):\n    os._exit(3)"),
    }
    for name, nb in students.items():
        write(subs / name / "hostile.ipynb", nb)
    before = {p: p.read_bytes() for p in [*subs.rglob("*.ipynb"), source]}
    temp = Path(tempfile.gettempdir())
    temp_before = set(temp.iterdir())

    grade_submissions(
        subs,
        [source],
        out / "grades.csv",
        cell_timeout=20,
        total_timeout=90,
        jobs=3,
        keep_executed=True,
        limits=Limits(memory=8 << 30, processes=512, cpus=1.0),
    )

    rows = (out / "grades.csv").read_text().splitlines()
    assert rows[0] == "student,hostile:pairwise_iou,hostile:twice,total,max_total,status"
    scores = {row.split(",")[0]: row.split(",", 1)[1] for row in rows[1:]}
    assert scores == {
        "attacker": "2,1,3,3,ok",
        "exits": "2,0,2,3,hostile: kernel died",
        "forkbomb": "0,0,0,3,hostile: error",
        "hog": "0,1,1,3,ok",
        "honest": "2,1,3,3,ok",
        "patcher": "0,0,0,3,ok",  # exactly the unsolved stub's score
        "peeker": "2,1,3,3,ok",
        "sigint": "0,0,0,3,hostile: timeout",
        "stub": "0,0,0,3,ok",
        "victim": "2,1,3,3,ok",
    }
    # Nothing outside the sandboxes changed: every submission and the instructor's notebook.
    assert {p: p.read_bytes() for p in before} == before
    executed = {
        name: json.loads((out / "feedback" / name / "hostile.ipynb").read_text())
        for name in students
    }
    attack = json.loads(_printed(executed["attacker"], "ATTACK"))
    assert sorted(attack) == [
        "feedback",
        "gradebook",
        "instructor notebook",
        "other submission",
        "other submissions, by glob",
    ]
    assert "done" not in attack.values(), attack
    assert json.loads(_printed(executed["peeker"], "HIDDEN")) == []
    assert json.loads(_printed(executed["peeker"], "GRADER DIRS")) == []
    assert _printed(executed["peeker"], "NETWORK").startswith("blocked")
    assert _printed(executed["patcher"], "patched") == ""
    hog_gib = int(_printed(executed["hog"], "HOG stopped at").split()[0])
    assert hog_gib <= 8
    feedback = {name: (out / "feedback" / f"{name}.md").read_text() for name in students}
    assert "NotImplementedError" in feedback["patcher"] and "forged" not in feedback["patcher"]
    assert "✓" not in feedback["patcher"]
    assert "fork bomb" in feedback["forkbomb"]
    assert "MemoryError" in feedback["hog"]
    assert "total time limit of 90 s" in feedback["sigint"]
    assert "the kernel died" in feedback["exits"]
    # Killed runs leave nothing behind: no kernel connection file, no grader folder.
    left = {p.name for p in set(temp.iterdir()) - temp_before}
    assert not {n for n in left if n.startswith(("kernel-", "labkit-grader-"))}, left


class Liar(torch.Tensor):
    """A tensor that compares equal to anything."""

    def __eq__(self, other):
        return True


class _Evil:
    """A return value that runs a command when unpickled by a careless grader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_values_from_the_kernel_are_read_as_data_only(tmp_path):
    import numpy as np

    from labkit.anchors import AnchorGenerator
    from labkit.grading import rpc

    marker = tmp_path / "pwned"
    with pytest.raises(TypeError, match="does not read back"):
        rpc.safe_load(rpc.dumps(_Evil(marker)))
    assert not marker.exists()

    with pytest.raises(TypeError, match="Liar"):
        rpc.safe_load(rpc.dumps(torch.zeros(2).as_subclass(Liar)))
    gen = AnchorGenerator(strides=[8, 16], ratios=[0.5, 1.0], scales=[1.0])
    data = {"t": torch.arange(3), "gen": gen, "np": np.ones(2), "x": (1, 2.5, "s", None)}
    back = rpc.safe_load(rpc.dumps(data))
    assert torch.equal(back["t"], data["t"]) and back["x"] == data["x"]
    assert type(back["gen"]) is AnchorGenerator and back["gen"].num_base_anchors == [2, 2]
    assert back["np"].tolist() == [1.0, 1.0]


def test_checker_runs_a_check_cell_through_the_serve_protocol(tmp_path, monkeypatch):
    """The protocol in one process: a serve loop (the kernel's side) in a thread, the checker's
    run_slot here; results, student exceptions and inputs modified in place come through."""
    import threading

    import __main__
    from labkit.grading import checker, rpc
    from labkit.grading.feedback import CHECK_MIME, DONE_MIME

    def iou_in_place(boxes1, boxes2):
        boxes1 += 0  # a no-op, then a real modification of the input
        boxes1[:, 0] = boxes1[:, 0]
        from labkit.boxes import bbox_overlaps

        out = bbox_overlaps(boxes1, boxes2)
        boxes2.mul_(2)
        return out

    def twice(x):
        raise NotImplementedError("Exercise 2 (twice): write twice")

    monkeypatch.setattr(__main__, "my_box_iou", iou_in_place, raising=False)
    monkeypatch.setattr(__main__, "twice", twice, raising=False)
    monkeypatch.delenv("LABKIT_GRADER_CELL_TIMEOUT", raising=False)
    path = str(tmp_path / "sock")
    listener = checker.listen(path)
    slots = {
        "pairwise_iou": {
            "exercise": "pairwise_iou",
            "index": 0,
            "source": "import labkit.grading\nlabkit.grading.check_pairwise_iou(my_box_iou)",
            "imports": [],
            "names": ["my_box_iou"],
        },
        "twice": {
            "exercise": "twice",
            "index": 0,
            "source": "assert twice(4) == 8",
            "imports": [],
            "names": ["twice"],
        },
    }
    records = {}
    for ex, slot in slots.items():
        kernel = threading.Thread(target=rpc.serve, args=(ex, 0, path, 10.0), daemon=True)
        kernel.start()
        sock, _ = listener.accept()
        assert rpc.recv(sock)[0] == {"op": "hello", "exercise": ex, "index": 0}
        records[ex] = checker.run_slot(sock, slot, None)
        rpc.send(sock, {"op": "done", "report": ""})
        kernel.join(10)
        sock.close()
    iou = records["pairwise_iou"]["outputs"]
    result = iou[0]["data"][CHECK_MIME]
    assert not result["passed"] and result["num_passed"] < result["num_cases"]
    assert "modified its input boxes2 in place" in result["report"]
    assert iou[-1]["ename"] == "CheckFailed" and not any(
        DONE_MIME in o.get("data", {}) for o in iou
    )
    error = records["twice"]["outputs"][-1]
    assert error["ename"] == "NotImplementedError" and "write twice" in error["evalue"]
    assert any("in twice" in line for line in error["traceback"])


def test_grading_without_bubblewrap_says_so_in_the_csv_and_feedback(monkeypatch):
    from labkit.grading import sandbox
    from labkit.grading.grade import (
        ExerciseGrade,
        NotebookGrade,
        StudentGrades,
        format_csv,
        format_feedback,
    )

    sandbox._probe.cache_clear()
    monkeypatch.setenv("LABKIT_GRADER_SANDBOX", "off")
    try:
        weak = sandbox.probe()
    finally:
        sandbox._probe.cache_clear()
    assert weak.mode == "unsandboxed" and not weak.isolated
    assert sandbox.sandbox_command(weak, ["python", "x"]) == ["python", "x"]
    grades = [
        StudentGrades("ann", [NotebookGrade("toy.ipynb", "ok", [ExerciseGrade("add", 1, 2, 2)])])
    ]
    sources = [("toy.ipynb", toy_notebook())]
    assert format_csv(grades, sources, weak.mode).splitlines()[1] == (
        "ann,2,0,2,2,ok; sandbox: unsandboxed"
    )
    assert format_csv(grades, sources).splitlines()[1] == "ann,2,0,2,2,ok"
    text = format_feedback(grades[0], weak.warning())
    assert "WARNING: graded WITHOUT the bubblewrap sandbox" in text.splitlines()[2]
    assert "LABKIT_GRADER_SANDBOX=off" in text
