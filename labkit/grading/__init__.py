"""Course assignments: per-exercise checks, student notebooks, autograder and gradebook.

``labkit.grading.check_<exercise>(fn)`` is loaded on first use, so importing the package
costs nothing until a check runs.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("check_") or name in ("EXERCISES", "CheckResult", "CheckFailed"):
        from labkit.grading import checks, feedback

        for module in (checks, feedback):
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module 'labkit.grading' has no attribute {name!r}")
