"""Autograder and gradebook: run each submission in a sandbox, check it from outside, write CSV + feedback.

For each ``SUBMISSIONS_DIR/<student>/<notebook>.ipynb`` and its instructor source notebook:

1. :func:`prepare_submission`: a *serve cell* takes the place of each of the instructor's check
   cells (matched by exercise, not position; missing ones are inserted after the student's
   function). :func:`check_slots` keeps the check cells themselves, hidden tests included,
   for the checking process only: they never enter the student's kernel.
2. :func:`run_submission`: papermill and its kernel in a bubblewrap sandbox
   (:mod:`labkit.grading.sandbox`) with a scratch folder holding a read-only copy of the
   submission; cells run on after errors, a cell over ``cell_timeout`` is interrupted, the
   whole run is killed after ``total_timeout``. Meanwhile a fresh checking process
   (:mod:`labkit.grading.checker`, its own sandbox, a pristine labkit) runs each check cell
   when its serve cell connects, calling the student's functions in the kernel through it
   (:mod:`labkit.grading.rpc`) and reading back only data.
3. :func:`merge_checks` + :func:`score_notebook`: a check cell that ran to its end without
   error in the checking process earns its points; one that failed a labkit check earns the
   check's score (fraction of cases passed) times its points; anything else (error, timeout,
   never ran) earns 0 and says why. Nothing the kernel printed or displayed counts.

:func:`grade_submissions` does this for every student and notebook and writes the gradebook
CSV (no timestamps or durations: the same folder gives the same bytes) and one markdown
feedback file per student.
"""

from __future__ import annotations

import ast
import builtins
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
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from labkit.grading.build import dumps_notebook, instructor_notebook, read_notebook
from labkit.grading.cells import FUNCTION_DEF, cell_source, check_cell_info, find_exercises
from labkit.grading.feedback import _KERNEL_FILE, CHECK_MIME, DONE_MIME
from labkit.grading.sandbox import (
    INSIDE,
    RUN_INSIDE,
    Limits,
    Sandbox,
    hidden_paths,
    kill_group,
    limited,
    probe,
    sandbox_command,
    sandbox_env,
)

__all__ = [
    "ExerciseGrade",
    "NotebookGrade",
    "StudentGrades",
    "format_csv",
    "check_slots",
    "format_feedback",
    "grade_notebook",
    "grade_submissions",
    "merge_checks",
    "prepare_submission",
    "run_submission",
    "score_notebook",
]

GRADER_KEY = "labkit_grader"  # cell metadata the grader sets on the check cells it scores
SOCKET_ENV = "LABKIT_GRADER_SOCKET"  # where a serve cell finds the checking process
RPC_ENV = "LABKIT_GRADER_RPC"  # the path of labkit/grading/rpc.py, which a serve cell loads
RPC_INSIDE = "/tmp/labkit-rpc"  # the checker's socket folder as both sandboxes see it
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


def _serve_cell(ex_id: str, index: int) -> str:
    # Runs in the student's kernel: it only answers the grader's checking process (a separate,
    # sandboxed process with a pristine labkit), which runs the check and decides the score.
    # rpc.py is loaded by its path: no labkit (hence no torch) import before it is needed.
    return (
        f"# labkit grader: check cell {index + 1} of exercise {ex_id!r} runs in the grader's own\n"
        "# process, which calls this notebook's functions through this cell.\n"
        "import importlib.util as _labkit_util\n"
        "import os as _labkit_os\n\n"
        "try:\n"
        "    _labkit_os.getcwd()\n"
        "except FileNotFoundError:  # the notebook deleted its working directory\n"
        "    _labkit_os.chdir('/')\n"
        "_labkit_spec = _labkit_util.spec_from_file_location(\n"
        f"    'labkit_grader_rpc', _labkit_os.environ[{RPC_ENV!r}]\n"
        ")\n"
        "_labkit_rpc = _labkit_util.module_from_spec(_labkit_spec)\n"
        "_labkit_spec.loader.exec_module(_labkit_rpc)\n"
        f"_labkit_rpc.serve({ex_id!r}, {index}, _labkit_os.environ[{SOCKET_ENV!r}])"
    )


_BUILTINS = set(dir(builtins))


def _bound_names(tree: ast.AST) -> set[str]:
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def _imports(nb: dict) -> dict[str, str]:
    """Name -> the import statement that binds it, from every top-level import of the
    instructor's notebook (checks get these from the grader's labkit, never from the kernel)."""
    found: dict[str, str] = {}
    for cell in nb["cells"]:
        if cell.get("cell_type") != "code":
            continue
        try:
            tree = ast.parse(_python_only(cell_source(cell)))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom) and not (
                isinstance(node, ast.ImportFrom) and node.level
            ):
                for alias in node.names:
                    if alias.name == "*":
                        continue
                    name = (alias.asname or alias.name).split(".")[0]
                    single = copy.copy(node)
                    single.names = [alias]
                    found[name] = ast.unparse(single)
    return found


def _python_only(source: str) -> str:
    """Cell source without IPython magics and shell escapes (they would not parse)."""
    return "\n".join(
        "" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()
    )


def check_slots(source: dict, name: str = "notebook") -> list[dict]:
    """What the checking process runs: per check cell, the instructor's source (hidden tests
    included), the imports it needs from the grader's labkit and the notebook names it uses."""
    inst = instructor_notebook(source, name)
    imports = _imports(inst)
    slots = []
    for ex in find_exercises(source):
        for k, index in enumerate(ex.check_cells):
            code = _python_only(cell_source(inst["cells"][index]))
            try:
                tree = ast.parse(code)
            except SyntaxError:
                tree = ast.parse("")
            loaded = [
                n.id
                for n in ast.walk(tree)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            ]
            free = sorted(set(loaded) - _bound_names(tree) - _BUILTINS)
            slots.append(
                {
                    "exercise": ex.id,
                    "index": k,
                    "source": code,
                    "imports": [imports[n] for n in free if n in imports],
                    "names": [n for n in free if n not in imports],
                }
            )
    return slots


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
    """The notebook the grader runs: the submission with serve cells for the checks.

    Args:
        source: the instructor notebook (solutions and hidden tests).
        submission: the student's notebook.

    Returns:
        A new notebook: outputs cleared; each of the instructor's check cells has a serve
        cell in its place (replacing the student's copy, or inserted after the student's
        function when missing), tagged with ``metadata.labkit_grader = {"exercise", "index",
        "points"}``: it lets the grader's checking process call the notebook's functions. The
        check code itself (:func:`check_slots`) never enters the notebook. Check cells the
        source does not have are demoted to ordinary cells.
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
            grader_cell["source"] = _serve_cell(ex.id, k)  # no check code, no hidden tests
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


@dataclass
class RunOutcome:
    """What happened to a run: the executed notebook (possibly partial), why it stopped, and
    the checking process's records per check cell (``(exercise, index) -> record``)."""

    executed: dict | None
    stopped: str | None  # None: ran to the end; else "timeout", "kernel died" or "error"
    detail: str = ""
    checks: dict[tuple[str, int], dict] = field(default_factory=dict)


def _start_checker(
    sandbox: Sandbox, private: Path, slots: list[dict], cell_timeout: float | None, limits: Limits
) -> tuple[subprocess.Popen, threading.Thread, list[str], object]:
    """The fresh checking process, in a sandbox of its own; its stdout lines are collected."""
    rpc_host = private / "rpc"
    rpc_host.mkdir()
    sock = f"{RPC_INSIDE}/checker.sock" if sandbox.isolated else str(rpc_host / "checker.sock")
    cmd = sandbox_command(
        sandbox,
        [sys.executable, "-P", "-m", "labkit.grading.checker"],
        binds=[(str(rpc_host), RPC_INSIDE, True)],
        chdir="/tmp",
    )
    ctx = limited(limits)
    preexec = ctx.__enter__()
    log = open(private / "checker.log", "w", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        cwd=private,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
        text=True,
        env=sandbox_env() if sandbox.isolated else None,
        preexec_fn=preexec,
    )
    log.close()
    lines: list[str] = []

    def pump() -> None:
        proc.stdin.write(json.dumps({"socket": sock, "cell_timeout": cell_timeout, "slots": slots}))
        proc.stdin.close()
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return proc, reader, lines, (ctx, sock)


def _watch_processes(proc: subprocess.Popen, limit: int, crowd: list[int]) -> None:
    """Kill the sandbox when it holds more than ``limit`` processes (where no cgroup caps them,
    e.g. a grader running as root, whom ``RLIMIT_NPROC`` does not bound)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    while proc.poll() is None:
        try:
            count = len(root.children(recursive=True))
        except psutil.Error:
            return
        if count > limit:
            crowd.append(count)
            kill_group(proc)
            return
        time.sleep(0.1)


def run_submission(
    notebook: dict,
    submission_path: str | os.PathLike,
    *,
    slots: list[dict] | None = None,
    cell_timeout: float = 120,
    total_timeout: float = 600,
    kernel: str = "labkit",
    parameters: dict | None = None,
    sandbox: Sandbox | None = None,
    limits: Limits | None = None,
) -> RunOutcome:
    """Execute a prepared notebook in a sandbox while the checking process runs the checks.

    The notebook (papermill and its kernel, both inside bubblewrap when available) sees a
    read-only system, a private ``/tmp`` and one writable scratch folder holding a read-only
    copy of the submission; the checking process runs ``slots`` (:func:`check_slots`) in a
    second sandbox, reached through a Unix socket. Both are killed as a whole after
    ``total_timeout``; their temporary folders are removed whatever the notebook did.
    """
    parameters = DEFAULT_PARAMETERS if parameters is None else parameters
    sandbox = probe() if sandbox is None else sandbox
    limits = Limits() if limits is None else limits
    name = Path(submission_path).name
    with tempfile.TemporaryDirectory(prefix="labkit-grader-", ignore_cleanup_errors=True) as tmp:
        private = Path(tmp)
        # box/ (work/, the notebook's working directory) and run/ (papermill's notebooks)
        # are all the sandbox may write.
        box, run_dir = private / "box", private / "run"
        work = box / "work"
        work.mkdir(parents=True)
        run_dir.mkdir()
        copy_in = work / name
        shutil.copyfile(submission_path, copy_in)
        copy_in.chmod(0o444)
        (run_dir / "prepared.ipynb").write_text(dumps_notebook(notebook), encoding="utf-8")
        executed = run_dir / "executed.ipynb"
        checker, reader, lines, (checker_ctx, sock) = _start_checker(
            sandbox, private, slots or [], cell_timeout, limits
        )
        root, run_root = (INSIDE, RUN_INSIDE) if sandbox.isolated else (str(box), str(run_dir))
        cmd = [
            sys.executable, "-P", "-m", "labkit.grading.execute", f"{run_root}/prepared.ipynb",
            f"{run_root}/executed.ipynb", "--cwd", f"{root}/work", "--kernel", kernel,
            "--parameters", json.dumps(parameters),
        ]  # fmt: skip
        if cell_timeout:
            cmd += ["--cell-timeout", str(cell_timeout)]
        cmd = sandbox_command(
            sandbox,
            cmd,
            binds=[
                (str(box), INSIDE, True),
                (str(run_dir), RUN_INSIDE, True),
                (str(private / "rpc"), RPC_INSIDE, False),
            ],
            chdir=run_root,
        )
        extra = {
            SOCKET_ENV: sock,
            RPC_ENV: str(Path(__file__).resolve().with_name("rpc.py")),
            "LABKIT_GRADER_CELL_TIMEOUT": str(cell_timeout or 0),
        }
        env = sandbox_env(extra) if sandbox.isolated else {**os.environ, **extra}
        log = open(private / "worker.log", "w+", encoding="utf-8")  # noqa: SIM115
        status = None
        try:
            with limited(limits) as preexec:
                proc = subprocess.Popen(
                    cmd,
                    cwd=run_dir,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                    text=True,
                    env=env,
                    preexec_fn=preexec,
                )
                crowd: list[int] = []
                watch = threading.Thread(
                    target=_watch_processes, args=(proc, limits.processes // 2, crowd), daemon=True
                )
                watch.start()
                try:
                    out, _ = proc.communicate(timeout=total_timeout)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
                    out, _ = proc.communicate()
                    status = "timeout"
                watch.join(timeout=5)
        finally:
            log.close()
            # The kernel is gone: a check still running gets a closed connection at once and
            # its record follows; then the checker, idle, is stopped.
            deadline = time.monotonic() + 15
            while checker.poll() is None and time.monotonic() < deadline:
                started = sum('"event": "start"' in line for line in lines)
                if started <= len(lines) - started:
                    break
                time.sleep(0.05)
            kill_group(checker)
            checker.wait()
            reader.join(timeout=5)
            checker_ctx.__exit__(None, None, None)
        detail = ""
        if crowd:
            status = "error"
            detail = (
                f"the notebook started more than {limits.processes // 2} processes (a fork "
                "bomb?) and was stopped"
            )
        if status is None:
            try:
                detail = json.loads(out.strip().splitlines()[-1])["error"] or ""
            except (IndexError, ValueError, KeyError, TypeError):
                tail = (private / "worker.log").read_text(errors="replace")[-2000:]
                detail = f"the grader's worker failed (exit {proc.returncode}): {tail}"
            if detail:
                status = "kernel died" if "DeadKernel" in detail or "died" in detail else "error"
        try:
            result = json.loads(executed.read_text(encoding="utf-8"))
            if not isinstance(result, dict) or not isinstance(result.get("cells"), list):
                raise ValueError("not a notebook")
        except (OSError, ValueError):
            result = None
            status = status or "error"
            detail = detail or "no executed notebook was written"
        checks = {}
        for line in lines:
            try:
                record = json.loads(line)
                if "outputs" not in record:
                    continue
                checks[(record["exercise"], int(record["index"]))] = record
            except (ValueError, KeyError, TypeError):
                continue
    return RunOutcome(result, status, _ANSI.sub("", detail), checks)


def merge_checks(prepared: dict, executed: dict | None, checks: dict) -> dict:
    """The notebook :func:`score_notebook` reads: the grader's cells hold the checking
    process's outputs only. A check cell it has no record of keeps nothing but the errors the
    kernel reported (never a forged result or done marker): it scores 0."""
    by_id = {}
    for cell in (executed or {}).get("cells", []):
        if isinstance(cell, dict) and isinstance(cell.get("metadata", {}).get(GRADER_KEY), dict):
            by_id[cell.get("id")] = cell
    out = copy.deepcopy(prepared)
    for cell in out["cells"]:
        tag = cell.get("metadata", {}).get(GRADER_KEY)
        if not isinstance(tag, dict):
            continue
        record = checks.get((tag["exercise"], tag["index"]))
        ran = by_id.get(cell.get("id"), {})
        if record is not None:
            cell["outputs"] = record["outputs"]
            cell["execution_count"] = 1
            cell["metadata"]["papermill"] = {"status": "completed"}
            continue
        outputs = ran.get("outputs", []) if isinstance(ran.get("outputs"), list) else []
        cell["outputs"] = [
            o for o in outputs if isinstance(o, dict) and o.get("output_type") == "error"
        ]
        cell["execution_count"] = ran.get("execution_count")
        papermill = ran.get("metadata", {}).get("papermill", {})
        cell["metadata"]["papermill"] = {"status": papermill.get("status", "pending")}
    return out


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
    sandbox: Sandbox | None = None,
    limits: Limits | None = None,
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
    if sandbox is None:
        found = probe()
        hide = [Path(submission_path).resolve().parent.parent, Path(source_path).resolve().parent]
        sandbox = Sandbox(found.mode, found.reason, hidden_paths(hide))
    run = run_submission(
        prepared,
        submission_path,
        slots=check_slots(source, Path(name).stem),
        cell_timeout=cell_timeout,
        total_timeout=total_timeout,
        kernel=kernel,
        sandbox=sandbox,
        limits=limits,
    )
    stop_note = {
        None: "",
        "timeout": f"the notebook was stopped at the total time limit of {total_timeout:g} s",
        "kernel died": "the kernel died",
        "error": "the run failed",
    }[run.stopped]
    merged = merge_checks(prepared, run.executed, run.checks)
    grades = score_notebook(merged, source, stop_note, partial_credit)
    notes = [f"{stop_note}: {run.detail}".rstrip(": ")] if run.stopped else []
    for key in sorted(run.checks):
        notes += run.checks[key].get("notes", [])
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


def format_csv(
    grades: Sequence[StudentGrades],
    sources: Sequence[tuple[str, dict]],
    sandbox: str = "bubblewrap",
) -> str:
    """The gradebook: ``student``, one column per ``<notebook>:<exercise>``, ``total``,
    ``max_total``, ``status``; one row per student, in the given order. Graded without the
    bubblewrap sandbox, every status ends with ``; sandbox: <mode>``."""
    columns = [f"{Path(name).stem}:{ex.id}" for name, nb in sources for ex in find_exercises(nb)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["student", *columns, "total", "max_total", "status"])
    for s in grades:
        points = {
            f"{Path(n.notebook).stem}:{e.id}": e.points for n in s.notebooks for e in n.exercises
        }
        row = [s.student, *(_fmt(points.get(c, 0.0)) for c in columns)]
        status = s.status if sandbox == "bubblewrap" else f"{s.status}; sandbox: {sandbox}"
        writer.writerow([*row, _fmt(s.total), _fmt(s.max_total), status])
    return buf.getvalue()


def format_feedback(grades: StudentGrades, warning: str = "") -> str:
    """The markdown feedback file of one student: points and check messages per exercise
    (``warning``: the weaker sandbox mode it was graded in, shown first)."""
    lines = [f"# Feedback: {grades.student}", ""]
    if warning:
        lines += [f"> {warning}", ""]
    lines.append(f"Total: **{_fmt(grades.total)} / {_fmt(grades.max_total)}** points.")
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
    limits: Limits | None = None,
) -> list[StudentGrades]:
    """Grade every ``SUBMISSIONS_DIR/<student>/<notebook>.ipynb``; write the CSV and feedback.

    Args:
        source_notebooks: instructor notebooks (solutions + hidden tests); those without
            exercises are ignored.
        feedback_dir: where ``<student>.md`` go (default: ``feedback/`` next to the CSV);
            with ``keep_executed`` the executed notebooks go to ``<feedback_dir>/<student>/``.
        jobs: notebooks graded at once (each is its own worker and kernel).
        partial_credit: a failed labkit check earns its fraction of passed cases.
        limits: memory / processes / CPU per sandbox (default: :class:`Limits`, with the
            CPU cores shared between the ``jobs``).

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
    found = probe()
    if found.mode != "unsandboxed":
        from labkit.data.shapes import make_shapes

        make_shapes()  # the sandbox sees the data folder read-only: generate the lessons' data now
    feedback.mkdir(parents=True, exist_ok=True)  # hidden from the start, like the CSV's folder
    hide = [sub_dir, out_csv.parent, feedback, *(p.parent for p, _ in sources)]
    sandbox = Sandbox(found.mode, found.reason, hidden_paths(hide))
    if not sandbox.isolated:
        print(f"labkit assignments grade: {sandbox.warning()}", file=sys.stderr)
    if limits is None:
        limits = Limits(cpus=max(1.0, (os.cpu_count() or 1) / max(1, jobs)))

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
            sandbox=sandbox,
            limits=limits,
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
        out_csv,
        lambda tmp: tmp.write_text(
            format_csv(grades, named_sources, sandbox.mode), encoding="utf-8"
        ),
    )
    for g in grades:
        text = format_feedback(g, sandbox.warning())
        write_atomic(
            feedback / f"{g.student}.md", lambda tmp, t=text: tmp.write_text(t, encoding="utf-8")
        )
    return grades
