"""Autograder and gradebook: run each submission in a sandbox, score its check cells, write CSV + feedback.

For each ``SUBMISSIONS_DIR/<student>/<notebook>.ipynb`` and its instructor source notebook:

1. :func:`prepare_submission`: the instructor's check cells (hidden tests included) replace the
   student's (matched by exercise, not position; missing ones are inserted after the
   student's function), each ending with a marker call that proves it ran to the end.
2. :func:`run_submission`: papermill in a separate worker process and kernel, in a fresh
   temporary working directory holding a read-only copy of the submission; cells run on
   after errors, a cell over ``cell_timeout`` is interrupted, the whole run is killed after
   ``total_timeout``.
3. :func:`score_notebook`: a check cell that ran to its end without error earns its points;
   one that failed a labkit check earns the check's score (fraction of cases passed) times
   its points; anything else (error, timeout, never ran) earns 0 and says why.

:func:`grade_submissions` does this for every student and notebook and writes the gradebook
CSV (no timestamps or durations: the same folder gives the same bytes) and one markdown
feedback file per student.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from labkit.grading.build import dumps_notebook, instructor_notebook, read_notebook
from labkit.grading.cells import FUNCTION_DEF, cell_source, check_cell_info, find_exercises
from labkit.grading.feedback import _KERNEL_FILE, CHECK_MIME, DONE_MIME

__all__ = [
    "ExerciseGrade",
    "NotebookGrade",
    "StudentGrades",
    "format_csv",
    "format_feedback",
    "grade_notebook",
    "grade_submissions",
    "prepare_submission",
    "run_submission",
    "score_notebook",
]

GRADER_KEY = "labkit_grader"  # cell metadata the grader sets on the check cells it scores
DEFAULT_PARAMETERS = {"quick": True, "device": "cpu", "seed": 0}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class ExerciseGrade:
    """Points of one exercise with the messages that explain them."""

    id: str
    number: int
    points: float
    max_points: float
    messages: list[str] = field(default_factory=list)


@dataclass
class NotebookGrade:
    """One student's notebook: ``status`` is ``"ok"``, ``"missing"``, ``"invalid"``,
    ``"timeout"``, ``"kernel died"`` or ``"error"``; ``notes`` say more."""

    notebook: str
    status: str
    exercises: list[ExerciseGrade]
    notes: list[str] = field(default_factory=list)

    @property
    def points(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self) -> float:
        return sum(e.max_points for e in self.exercises)


@dataclass
class StudentGrades:
    """Every notebook of one student."""

    student: str
    notebooks: list[NotebookGrade]

    @property
    def total(self) -> float:
        return sum(n.points for n in self.notebooks)

    @property
    def max_total(self) -> float:
        return sum(n.max_points for n in self.notebooks)

    @property
    def status(self) -> str:
        bad = [f"{Path(n.notebook).stem}: {n.status}" for n in self.notebooks if n.status != "ok"]
        return "; ".join(bad) if bad else "ok"


# ---------------------------------------------------------------------------------------
# 1. prepare
# ---------------------------------------------------------------------------------------


def _done_line(ex_id: str, index: int) -> str:
    # Plain IPython, no labkit import: a check cell that needs no torch stays torch-free.
    payload = {
        DONE_MIME: {"exercise": ex_id, "index": index},
        "text/plain": f"[labkit grader] {ex_id}: done",
    }
    return (
        "\n\n# labkit grader: this check cell ran to its end\n"
        "from IPython.display import display as _labkit_display\n"
        f"_labkit_display({payload!r}, raw=True)"
    )


def _submission_check_cells(cells: list[dict]) -> dict[str, list[int]]:
    """Check cells per exercise: the ones the build tagged first, then marked or inferred ones
    (a student's scratch cell calling a check must not take the place of the real one)."""
    tagged: dict[str, list[int]] = {}
    other: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        info = check_cell_info(cell)
        if info is not None:
            meta = cell.get("metadata", {}).get("labkit", {})
            is_tagged = isinstance(meta, dict) and meta.get("role") == "check"
            (tagged if is_tagged else other).setdefault(info[0], []).append(i)
    return {k: tagged.get(k, []) + other.get(k, []) for k in {*tagged, *other}}


def _defining_cell(cells: list[dict], ex_id: str, function: str | None) -> int | None:
    """The last cell that is the exercise's solution cell or defines its function."""
    best = None
    for i, cell in enumerate(cells):
        meta = cell.get("metadata", {}).get("labkit", {})
        if (
            isinstance(meta, dict)
            and meta.get("exercise") == ex_id
            and meta.get("role") == "solution"
        ):
            best = i
        elif function and cell.get("cell_type") == "code":
            if any(m["name"] == function for m in FUNCTION_DEF.finditer(cell_source(cell))):
                best = i
    return best


def prepare_submission(source: dict, submission: dict, name: str = "notebook") -> dict:
    """The notebook the grader runs: the submission with the instructor's check cells.

    Args:
        source: the instructor notebook (solutions and hidden tests).
        submission: the student's notebook.

    Returns:
        A new notebook: outputs cleared; each instructor check cell replaces the student's
        copy (or is inserted after the student's function when missing), tagged with
        ``metadata.labkit_grader = {"exercise", "index", "points"}`` and ending with the
        done marker. Check cells the source does not have are demoted to ordinary cells.
    """
    exercises = find_exercises(source)
    inst = instructor_notebook(source, name)
    nb = copy.deepcopy(submission)
    cells: list[dict] = []
    for cell in nb["cells"]:
        cell = dict(cell)
        cell["source"] = cell_source(cell)
        cell["metadata"] = dict(cell.get("metadata", {}))
        cell["metadata"].pop(GRADER_KEY, None)  # never trust grader metadata from a student
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    found = _submission_check_cells(cells)
    inserts: list[tuple[int, dict]] = []
    for ex in exercises:
        for k, (src_index, points) in enumerate(zip(ex.check_cells, ex.check_points, strict=True)):
            grader_cell = copy.deepcopy(inst["cells"][src_index])
            grader_cell["source"] = grader_cell["source"].rstrip() + _done_line(ex.id, k)
            grader_cell["metadata"][GRADER_KEY] = {"exercise": ex.id, "index": k, "points": points}
            targets = found.get(ex.id, [])
            if k < len(targets):
                grader_cell["id"] = cells[targets[k]].get("id", grader_cell["id"])
                cells[targets[k]] = grader_cell
                continue
            after = targets[-1] if targets else _defining_cell(cells, ex.id, ex.function)
            inserts.append((len(cells) if after is None else after + 1, grader_cell))
    for cell in cells:  # the student's extra "check" cells no longer count
        if GRADER_KEY not in cell.get("metadata", {}) and check_cell_info(cell) is not None:
            cell["metadata"].pop("labkit", None)
    for position, cell in sorted(inserts, key=lambda t: t[0], reverse=True):
        cells.insert(position, cell)
    nb["cells"] = cells
    nb.setdefault("metadata", {})["kernelspec"] = inst["metadata"]["kernelspec"]
    nb["nbformat"], nb["nbformat_minor"] = 4, max(int(nb.get("nbformat_minor", 5)), 5)
    for i, cell in enumerate(nb["cells"]):
        cell.setdefault("id", f"cell-{i}")
    return nb


# ---------------------------------------------------------------------------------------
# 2. run
# ---------------------------------------------------------------------------------------


def _kill_tree(pid: int) -> None:
    """Kill a process and all its descendants (the worker and the kernel it started)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@dataclass
class RunOutcome:
    """What happened to a run: the executed notebook (possibly partial) and why it stopped."""

    executed: dict | None
    stopped: str | None  # None: ran to the end; else "timeout", "kernel died" or "error"
    detail: str = ""


def run_submission(
    notebook: dict,
    submission_path: str | os.PathLike,
    *,
    cell_timeout: float = 120,
    total_timeout: float = 600,
    kernel: str = "labkit",
    parameters: dict | None = None,
) -> RunOutcome:
    """Execute a prepared notebook in a sandbox and return the executed notebook.

    The kernel runs in a new temporary directory holding only a read-only copy of the
    submission; the grader's own files live in another temporary directory. Both are
    removed afterwards, whatever the notebook did to them.
    """
    parameters = DEFAULT_PARAMETERS if parameters is None else parameters
    name = Path(submission_path).name
    with (
        tempfile.TemporaryDirectory(prefix="labkit-grader-", ignore_cleanup_errors=True) as private,
        tempfile.TemporaryDirectory(prefix="labkit-sandbox-", ignore_cleanup_errors=True) as box,
    ):
        # work/ inside a private folder: even "../" from the kernel stays in the sandbox.
        work = os.path.join(box, "work")
        os.mkdir(work)
        copy_in = Path(work) / name
        shutil.copyfile(submission_path, copy_in)
        copy_in.chmod(0o444)
        prepared, executed = Path(private) / "prepared.ipynb", Path(private) / "executed.ipynb"
        prepared.write_text(dumps_notebook(notebook), encoding="utf-8")
        log = open(Path(private) / "worker.log", "w+", encoding="utf-8")  # noqa: SIM115
        cmd = [
            sys.executable, "-m", "labkit.grading.execute", str(prepared), str(executed),
            "--cwd", work, "--kernel", kernel, "--parameters", json.dumps(parameters),
        ]  # fmt: skip
        if cell_timeout:
            cmd += ["--cell-timeout", str(cell_timeout)]
        proc = subprocess.Popen(
            cmd, cwd=private, stdout=subprocess.PIPE, stderr=log, start_new_session=True, text=True
        )
        try:
            out, _ = proc.communicate(timeout=total_timeout)
            status = None
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            out, _ = proc.communicate()
            status = "timeout"
        finally:
            log.close()
        detail = ""
        if status is None:
            try:
                detail = json.loads(out.strip().splitlines()[-1])["error"] or ""
            except (IndexError, ValueError, KeyError, TypeError):
                tail = (Path(private) / "worker.log").read_text(errors="replace")[-2000:]
                detail = f"the grader's worker failed (exit {proc.returncode}): {tail}"
            if detail:
                status = "kernel died" if "DeadKernel" in detail or "died" in detail else "error"
        try:
            result = json.loads(executed.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = None
            status = status or "error"
            detail = detail or "no executed notebook was written"
    return RunOutcome(result, status, _ANSI.sub("", detail))


# ---------------------------------------------------------------------------------------
# 3. score
# ---------------------------------------------------------------------------------------


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _error_tail(output: dict, lines: int = 12) -> str:
    tb = _ANSI.sub("", "\n".join(output.get("traceback", [])))
    tb = _KERNEL_FILE.sub("<notebook cell>", tb)
    tail = [line for line in tb.splitlines() if line.strip()][-lines:]
    head = f"{output.get('ename', 'Error')}: {_ANSI.sub('', str(output.get('evalue', '')))}"
    return "\n".join(tail) if tail else head


def _check_results(cell: dict) -> list[dict]:
    results = []
    for o in cell.get("outputs", []):
        data = (
            o.get("data", {}) if o.get("output_type") in ("display_data", "execute_result") else {}
        )
        if CHECK_MIME in data:
            payload = data[CHECK_MIME]
            results.append(json.loads(payload) if isinstance(payload, str) else payload)
    return results


def _cell_outcome(cell: dict, stop_note: str, partial_credit: bool = True) -> tuple[float, str]:
    """(fraction of the cell's points, message) for one executed check cell."""
    outputs = cell.get("outputs", [])
    errors = [o for o in outputs if o.get("output_type") == "error"]
    done = any(DONE_MIME in o.get("data", {}) for o in outputs)
    results = _check_results(cell)
    reports = "\n".join(_KERNEL_FILE.sub("<notebook cell>", r["report"]) for r in results)
    if done and not errors:
        return 1.0, reports or "passed"
    if errors:
        err = errors[0]
        if err.get("ename") == "CheckFailed" and results:
            # The lowest score: the check that raised (a result the student's own code might
            # have displayed can only lower it).
            return (min(float(r["score"]) for r in results) if partial_credit else 0.0), reports
        if err.get("ename") == "KeyboardInterrupt":
            return (
                0.0,
                "timed out: the check cell exceeded the per-cell time limit and was interrupted",
            )
        return 0.0, f"the check cell raised an error:\n{_error_tail(err)}"
    status = cell.get("metadata", {}).get("papermill", {}).get("status")
    if status == "running" or (status == "completed" and cell.get("execution_count")):
        return 0.0, f"the check cell did not finish ({stop_note or 'the kernel stopped'})"
    return 0.0, f"the check cell did not run ({stop_note or 'the notebook stopped earlier'})"


def _other_errors(nb: dict) -> list[str]:
    notes = []
    for i, cell in enumerate(nb["cells"]):
        if GRADER_KEY in cell.get("metadata", {}) or cell.get("cell_type") != "code":
            continue
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                notes.append(
                    f"cell {i} (not a check cell) raised {o.get('ename')}: "
                    f"{_ANSI.sub('', str(o.get('evalue', '')))[:300]}"
                )
                break
    return notes


def score_notebook(
    executed: dict | None, source: dict, stop_note: str = "", partial_credit: bool = True
) -> list[ExerciseGrade]:
    """Points per exercise of ``source`` from an executed prepared notebook (``None``: all 0).

    With ``partial_credit``, a check cell that failed a labkit check earns the fraction of
    cases passed; without, only a clean run of the cell earns its points.
    """
    grades = []
    cells = {}
    for cell in executed["cells"] if executed else []:
        tag = cell.get("metadata", {}).get(GRADER_KEY)
        if isinstance(tag, dict):
            cells[(tag.get("exercise"), tag.get("index"))] = cell
    for ex in find_exercises(source):
        grade = ExerciseGrade(ex.id, ex.number, 0.0, ex.points)
        for k, points in enumerate(ex.check_points):
            cell = cells.get((ex.id, k))
            if cell is None:
                fraction, message = 0.0, f"not graded ({stop_note or 'the notebook did not run'})"
            else:
                fraction, message = _cell_outcome(cell, stop_note, partial_credit)
            grade.points += round(points * fraction, 2)
            label = (
                f"check cell {k + 1} of {len(ex.check_points)}: "
                if len(ex.check_points) > 1
                else ""
            )
            grade.messages.append(f"{label}{message}")
        grade.points = round(grade.points, 2)
        grades.append(grade)
    return grades


def grade_notebook(
    source_path: str | os.PathLike,
    submission_path: str | os.PathLike,
    *,
    cell_timeout: float = 120,
    total_timeout: float = 600,
    kernel: str = "labkit",
    keep_executed: str | os.PathLike | None = None,
    partial_credit: bool = True,
) -> NotebookGrade:
    """Grade one submitted notebook against its instructor source (never raises for a bad submission)."""
    source = read_notebook(source_path)
    name = Path(source_path).name
    zero = score_notebook(None, source)
    if not Path(submission_path).is_file():
        for g in zero:
            g.messages = ["no submission"]
        return NotebookGrade(name, "missing", zero, [f"{name} was not submitted"])
    try:
        prepared = prepare_submission(source, read_notebook(submission_path), Path(name).stem)
    except ValueError as err:
        for g in zero:
            g.messages = [f"could not read the submission: {err}"]
        return NotebookGrade(name, "invalid", zero, [str(err)])
    run = run_submission(
        prepared,
        submission_path,
        cell_timeout=cell_timeout,
        total_timeout=total_timeout,
        kernel=kernel,
    )
    stop_note = {
        None: "",
        "timeout": f"the notebook was stopped at the total time limit of {total_timeout:g} s",
        "kernel died": "the kernel died",
        "error": "the run failed",
    }[run.stopped]
    grades = score_notebook(run.executed, source, stop_note, partial_credit)
    notes = [f"{stop_note}: {run.detail}".rstrip(": ")] if run.stopped else []
    if run.executed is not None:
        notes += _other_errors(run.executed)
        if keep_executed is not None:
            Path(keep_executed).mkdir(parents=True, exist_ok=True)
            (Path(keep_executed) / name).write_text(dumps_notebook(run.executed), encoding="utf-8")
    return NotebookGrade(name, run.stopped or "ok", grades, notes)


# ---------------------------------------------------------------------------------------
# 4. gradebook
# ---------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def format_csv(grades: Sequence[StudentGrades], sources: Sequence[tuple[str, dict]]) -> str:
    """The gradebook: ``student``, one column per ``<notebook>:<exercise>``, ``total``,
    ``max_total``, ``status``; one row per student, in the given order."""
    columns = [f"{Path(name).stem}:{ex.id}" for name, nb in sources for ex in find_exercises(nb)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["student", *columns, "total", "max_total", "status"])
    for s in grades:
        points = {
            f"{Path(n.notebook).stem}:{e.id}": e.points for n in s.notebooks for e in n.exercises
        }
        row = [s.student, *(_fmt(points.get(c, 0.0)) for c in columns)]
        writer.writerow([*row, _fmt(s.total), _fmt(s.max_total), s.status])
    return buf.getvalue()


def format_feedback(grades: StudentGrades) -> str:
    """The markdown feedback file of one student: points and check messages per exercise."""
    lines = [
        f"# Feedback: {grades.student}",
        "",
        f"Total: **{_fmt(grades.total)} / {_fmt(grades.max_total)}** points.",
    ]
    for nb in grades.notebooks:
        lines += ["", f"## {nb.notebook}: {_fmt(nb.points)} / {_fmt(nb.max_points)} ({nb.status})"]
        for note in nb.notes:
            lines.append(f"- {note}")
        for ex in nb.exercises:
            lines += [
                "",
                f"### Exercise {ex.number} `{ex.id}`: {_fmt(ex.points)} / {_fmt(ex.max_points)}",
                "",
                "```text",
                *"\n".join(ex.messages).splitlines(),
                "```",
            ]
    return "\n".join(lines) + "\n"


def _students(submissions_dir: Path) -> list[str]:
    return sorted(
        p.name
        for p in submissions_dir.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_"))
    )


def grade_submissions(
    submissions_dir: str | os.PathLike,
    source_notebooks: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike = "grades.csv",
    feedback_dir: str | os.PathLike | None = None,
    *,
    cell_timeout: float = 120,
    total_timeout: float = 600,
    jobs: int = 1,
    kernel: str = "labkit",
    keep_executed: bool = False,
    partial_credit: bool = True,
    progress: bool = False,
) -> list[StudentGrades]:
    """Grade every ``SUBMISSIONS_DIR/<student>/<notebook>.ipynb``; write the CSV and feedback.

    Args:
        source_notebooks: instructor notebooks (solutions + hidden tests); those without
            exercises are ignored.
        feedback_dir: where ``<student>.md`` go (default: ``feedback/`` next to the CSV);
            with ``keep_executed`` the executed notebooks go to ``<feedback_dir>/<student>/``.
        jobs: notebooks graded at once (each is its own worker and kernel).
        partial_credit: a failed labkit check earns its fraction of passed cases.

    Returns:
        One :class:`StudentGrades` per student, sorted by name.
    """
    from labkit.files import write_atomic
    from labkit.run_notebooks import ensure_kernel

    sub_dir = Path(submissions_dir)
    if not sub_dir.is_dir():
        raise FileNotFoundError(f"submissions_dir: {sub_dir} is not a directory")
    sources = []
    for p in sorted(Path(s) for s in source_notebooks):
        nb = read_notebook(p)
        if find_exercises(nb):
            sources.append((p, nb))
    if not sources:
        raise ValueError("source_notebooks: none of them has exercises (solution + check cells)")
    kernel = ensure_kernel(kernel)
    out_csv = Path(out_csv)
    feedback = Path(feedback_dir) if feedback_dir is not None else out_csv.parent / "feedback"
    students = _students(sub_dir)
    tasks = [(s, p) for s in students for p, _ in sources]

    def work(task):
        student, path = task
        return grade_notebook(
            path,
            sub_dir / student / path.name,
            cell_timeout=cell_timeout,
            total_timeout=total_timeout,
            kernel=kernel,
            keep_executed=feedback / student if keep_executed else None,
            partial_credit=partial_credit,
        )

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(
            tqdm(pool.map(work, tasks), total=len(tasks), desc="grading", disable=not progress)
        )
    by_task = dict(zip(tasks, results, strict=True))
    grades = [StudentGrades(s, [by_task[(s, p)] for p, _ in sources]) for s in students]
    named_sources = [(p.name, nb) for p, nb in sources]
    write_atomic(
        out_csv, lambda tmp: tmp.write_text(format_csv(grades, named_sources), encoding="utf-8")
    )
    for g in grades:
        text = format_feedback(g)
        write_atomic(
            feedback / f"{g.student}.md", lambda tmp, t=text: tmp.write_text(t, encoding="utf-8")
        )
    return grades
