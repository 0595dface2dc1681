"""Check results and the feedback a student reads: which input, expected vs got, shapes, tracebacks."""

from __future__ import annotations

import copy
import math
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECK_MIME",
    "Case",
    "CaseResult",
    "CheckFailed",
    "CheckResult",
    "compare",
    "format_value",
    "run_cases",
]

# The grader reads check results back from executed notebooks through this MIME type (the
# ``text/plain`` twin is what a student sees), like labkit.notebook's metrics.
CHECK_MIME = "application/vnd.labkit.check+json"
# The grader ends each check cell it runs with a display of this type: its presence proves
# the cell ran to its last line (an error, a dead kernel or a kill leaves none).
DONE_MIME = "application/vnd.labkit.check-done+json"

NOT_RUN = "not run (implement the function first)"

# Failures shown in full per check; more would bury the first (usually the telling) one.
MAX_SHOWN_FAILURES = 3
_GRADING_DIR = str(Path(__file__).resolve().parent)
_KERNEL_FILE = re.compile(r"[^\"\s]*ipykernel_\d+[/\\]\d+\.py")
# The grader's checking process (labkit.grading.checker) collects every check's result here.
_RESULT_SINK: list[dict] | None = None


class CheckFailed(AssertionError):
    """A check found a wrong answer; the message is the full report.

    It is an ``AssertionError`` so assert-style graders (nbgrader, pytest, labkit's own)
    count the check cell as failed.
    """


@dataclass
class Case:
    """One input of a check.

    Attributes:
        name: what the case tests, in words (``"touching boxes"``).
        args: the positional arguments, by the parameter names the exercise uses.
        expected: labkit's answer.
        locate: optional, turns an index of the output into the inputs behind it
            (``(2, 3) -> "boxes1[2] = ..., boxes2[3] = ..."``).
        hint: optional, ``hint(got, expected) -> str | None``: a diagnosis of a wrong answer
            (``"x and y are swapped"``).
    """

    name: str
    args: dict[str, Any]
    expected: Any
    locate: Callable[[tuple[int, ...]], str] | None = None
    hint: Callable[[Any, Any], str | None] | None = None


@dataclass
class CaseResult:
    """Outcome of one case: ``message`` is empty when it passed."""

    name: str
    passed: bool
    message: str = ""


@dataclass
class CheckResult:
    """Outcome of a check: ``passed`` (every case), ``score`` in [0, 1] and ``messages``.

    ``messages`` holds one actionable message per failed case (input, expected vs got).
    """

    exercise: str
    cases: list[CaseResult] = field(default_factory=list)
    _shown: bool = field(default=False, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def score(self) -> float:
        """Fraction of cases passed."""
        return sum(c.passed for c in self.cases) / len(self.cases) if self.cases else 0.0

    @property
    def messages(self) -> list[str]:
        return [
            f"{c.name}: {c.message}" for c in self.cases if not c.passed and c.message != NOT_RUN
        ]

    def summary(self) -> str:
        """One line: ``"pairwise_iou: all 14 cases passed"`` or ``"... 3 of 14 cases failed"``."""
        n = len(self.cases)
        if self.passed:
            return f"✓ {self.exercise}: all {n} cases passed"
        failed = n - sum(c.passed for c in self.cases)
        return f"✗ {self.exercise}: {failed} of {n} cases failed (score {self.score:.2f})"

    def report(self) -> str:
        """The summary plus the first failures in full (what a student reads)."""
        lines = [self.summary()]
        failed = [c for c in self.cases if not c.passed and c.message != NOT_RUN]
        not_run = len(self.cases) - sum(c.passed for c in self.cases) - len(failed)
        for case in failed[:MAX_SHOWN_FAILURES]:
            lines.append(f"\n✗ {case.name}")
            lines += [f"    {line}" for line in case.message.splitlines()]
        if len(failed) > MAX_SHOWN_FAILURES:
            rest = ", ".join(c.name for c in failed[MAX_SHOWN_FAILURES:])
            lines.append(f"\n... and {len(failed) - MAX_SHOWN_FAILURES} more failed: {rest}")
        if not_run:
            lines.append(f"\n{not_run} more cases not run until the function is implemented")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Plain JSON for the grader: exercise, passed, score, cases, messages."""
        return {
            "exercise": self.exercise,
            "passed": self.passed,
            "score": round(self.score, 4),
            "num_cases": len(self.cases),
            "num_passed": sum(c.passed for c in self.cases),
            "messages": self.messages,
            "report": self.report(),
        }

    def __repr__(self) -> str:
        return f"CheckResult({self.summary()})"

    def _ipython_display_(self) -> None:
        # A check cell often ends with the check call: its report is already shown, so the
        # returned result must not print it a second time.
        if not self._shown:
            print(self.report())


# ---------------------------------------------------------------------------------------
# Formatting values small enough to read
# ---------------------------------------------------------------------------------------


def _round(x: Any) -> Any:
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return x
        return round(x, 4) if abs(x) >= 1e-4 or x == 0 else float(f"{x:.3g}")
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def format_value(value: Any, max_items: int = 24) -> str:
    """A short, readable rendering of a value: small tensors in full, big ones by shape and head."""
    if isinstance(value, Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        shape = list(value.shape)
        if value.numel() <= max_items:
            return f"tensor({_round(value.detach().cpu().tolist())}, {dtype})"
        head = value.detach().cpu()[:2] if value.dim() > 1 else value.detach().cpu()[:6]
        return f"Tensor{shape} {dtype}, starting {_round(head.tolist())} ..."
    if isinstance(value, tuple | list) and value and all(isinstance(v, Tensor) for v in value):
        inner = ", ".join(format_value(v, max_items) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, float | list | tuple):
        text = repr(_round(list(value)) if isinstance(value, tuple) else _round(value))
        if isinstance(value, tuple):
            text = "(" + text[1:-1] + ")"
        return text if len(text) <= 200 else text[:197] + "..."
    text = repr(value)
    return text if len(text) <= 200 else f"{type(value).__name__} ({len(text)} characters)"


def _format_args(args: dict[str, Any]) -> str:
    return "\n".join(f"  {name} = {format_value(v)}" for name, v in args.items())


# ---------------------------------------------------------------------------------------
# Comparing a student's output with labkit's
# ---------------------------------------------------------------------------------------


def _kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() else "integer"


def _index_str(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def _compare_tensor(
    got: Any,
    expected: Tensor,
    name: str,
    atol: float,
    rtol: float,
    coerce: bool,
    locate: Callable[[tuple[int, ...]], str] | None,
) -> str | None:
    if not isinstance(got, Tensor):
        if not coerce:
            return f"{name}: expected a torch.Tensor, got {type(got).__name__}: {format_value(got)}"
        try:
            got = torch.as_tensor(got, dtype=expected.dtype)
        except Exception:
            return f"{name}: expected a tensor-like value, got {type(got).__name__}: {format_value(got)}"
    if tuple(got.shape) != tuple(expected.shape):
        msg = f"{name}: shape should be {list(expected.shape)}, got {list(got.shape)}"
        if got.dim() == 2 and tuple(got.shape) == tuple(expected.shape)[::-1]:
            msg += " (transposed? check which input indexes the rows)"
        return msg
    if not coerce and _kind(got) != _kind(expected):
        return (
            f"{name}: dtype should be {_kind(expected)} ({expected.dtype}), got {got.dtype}"
            f" -- values {format_value(got)}"
        )
    got = got.detach().cpu()
    expected = expected.detach().cpu()
    if _kind(expected) == "float":
        got_f, exp_f = got.double(), expected.double()
        close = torch.isclose(got_f, exp_f, rtol=rtol, atol=atol, equal_nan=True)
    else:
        close = got == expected
    if bool(close.all()):
        return None
    bad = (~close).nonzero()
    first = tuple(int(i) for i in bad[0])
    where = _index_str(first) if first else ""
    g, e = got[first].item(), expected[first].item()
    lines = [
        f"{name}: expected {format_value(expected)}",
        f"{' ' * len(name)}  got      {format_value(got)}",
        f"first difference at {name}{where}: expected {_round(e)}, got {_round(g)}"
        f" ({len(bad)} of {expected.numel()} entries differ)",
    ]
    if isinstance(g, float) and (math.isnan(g) or math.isinf(g)) and math.isfinite(e):
        lines.append("  a NaN/inf where a number is expected: a division by zero? (clamp it)")
    if locate is not None and first:
        lines.append(f"  that entry comes from {locate(first)}")
    return "\n".join(lines)


def compare(
    got: Any,
    expected: Any,
    *,
    name: str = "output",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    coerce: bool = False,
    locate: Callable[[tuple[int, ...]], str] | None = None,
) -> str | None:
    """``None`` when ``got`` matches ``expected``, else what differs (shape, dtype, values).

    Tensors are compared with ``atol``/``rtol`` (floats; NaN equals NaN) or exactly (integers,
    bools). Tuples are compared item by item. ``coerce`` accepts lists / tuples / numbers
    where a tensor is expected.
    """
    if isinstance(expected, Tensor):
        return _compare_tensor(got, expected, name, atol, rtol, coerce, locate)
    if isinstance(expected, tuple):
        if not isinstance(got, tuple | list) or len(got) != len(expected):
            return (
                f"{name}: expected a tuple of {len(expected)} values, got "
                f"{type(got).__name__} {format_value(got)}"
            )
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            problem = compare(
                g, e, name=f"{name}[{i}]", atol=atol, rtol=rtol, coerce=coerce, locate=locate
            )
            if problem:
                return problem
        return None
    if isinstance(expected, float | int):
        try:
            ok = math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol)
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"{name}: expected {_round(expected)}, got {format_value(got)}"
    return None if got == expected else f"{name}: expected {expected!r}, got {got!r}"


# ---------------------------------------------------------------------------------------
# Running a student's function on cases
# ---------------------------------------------------------------------------------------


def _traceback_tail(err: BaseException, frames: int = 3) -> str:
    """The last frames outside labkit.grading: where the student's code failed."""
    stack = [f for f in traceback.extract_tb(err.__traceback__) if _GRADING_DIR not in f.filename]
    lines = traceback.format_list(stack[-frames:])
    # Raised in the student's kernel and sent to the grader's checking process: that trace.
    lines.append(getattr(err, "remote_traceback", ""))
    # ipykernel compiles each cell to a temporary file named by process id: say "cell" instead.
    tail = _KERNEL_FILE.sub("<notebook cell>", "".join(lines).rstrip())
    head = f"{type(err).__name__}: {err}".strip()
    return f"{tail}\n{head}" if tail else head


def _describe_exception(err: BaseException) -> str:
    if isinstance(err, NotImplementedError):
        return (
            f"raised NotImplementedError({str(err)!r}): not implemented yet -- replace the "
            "`raise NotImplementedError` line with your code"
        )
    return "raised an exception:\n" + "\n".join(
        f"  {line}" for line in _traceback_tail(err).splitlines()
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _run_case(student_fn: Callable, case: Case, tolerances: dict) -> CaseResult:
    args = copy.deepcopy(case.args)
    inputs = f"input:\n{_format_args(case.args)}"
    try:
        got = student_fn(*args.values())
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        return CaseResult(case.name, False, f"{inputs}\n{_describe_exception(err)}")
    problem = compare(got, case.expected, locate=case.locate, **tolerances)
    if problem is None:
        changed = [n for n in args if not _same(args[n], case.args[n])]
        if changed:
            problem = (
                f"the answer is right, but your function modified its input {', '.join(changed)} "
                "in place; work on a copy (or out-of-place ops) instead"
            )
    if problem is None:
        return CaseResult(case.name, True)
    if case.hint is not None:
        try:
            hint = case.hint(got, case.expected)
        except Exception:  # a hint must never hide the real message
            hint = None
        if hint:
            problem += f"\nhint: {hint}"
    return CaseResult(case.name, False, f"{inputs}\n{problem}")


def _show(result: CheckResult, failed: bool) -> None:
    """In a notebook: a machine-readable bundle for the grader plus the report for the student."""
    from labkit.notebook import in_ipython

    if not in_ipython():
        return
    from IPython.display import display

    # On failure the traceback carries the full report; print only the summary here.
    text = result.summary() if failed else result.report()
    display({CHECK_MIME: result.to_json(), "text/plain": text}, raw=True)
    result._shown = True


def run_cases(
    exercise: str,
    student_fn: Callable,
    cases: Sequence[Case],
    *,
    raise_on_fail: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    coerce: bool = False,
) -> CheckResult:
    """Run ``student_fn`` on every case and compare with the expected answers.

    Stops after the first case if the function is not implemented yet (one message is enough).

    Returns:
        The :class:`CheckResult`; also shown in a notebook. Raises :class:`CheckFailed` (an
        ``AssertionError``) with the report when a case fails and ``raise_on_fail``.
    """
    if not callable(student_fn):
        raise TypeError(
            f"student_fn: expected your function (e.g. check_{exercise}(my_fn)), got "
            f"{type(student_fn).__name__}"
        )
    result = CheckResult(exercise)
    tolerances = {"atol": atol, "rtol": rtol, "coerce": coerce}
    for i, case in enumerate(cases):
        outcome = _run_case(student_fn, case, tolerances)
        result.cases.append(outcome)
        if i == 0 and "NotImplementedError" in outcome.message:
            result.cases += [CaseResult(c.name, False, NOT_RUN) for c in cases[1:]]
            break
    failed = not result.passed
    if _RESULT_SINK is not None:
        _RESULT_SINK.append(result.to_json())
    _show(result, failed)
    if failed and raise_on_fail:
        raise CheckFailed(result.report())
    return result
