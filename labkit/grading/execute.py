"""Grader worker: run one prepared submission with papermill, errors allowed, in its own process.

``python -m labkit.grading.execute IN.ipynb OUT.ipynb --cwd DIR --cell-timeout S`` executes
like nbgrader's autograder: every cell runs even after an error (``allow_errors``), a cell
that exceeds its time is interrupted and the next one runs (``interrupt_on_timeout``).
papermill saves OUT at every cell start and end, so the parent can score a run it had to
kill. A kernel that fails to start (before any cell ran) is started again, up to three
times (``labkit.run_notebooks.execute_notebook``). The last stdout line is JSON:
``{"error": null | "..."}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

SERVE_ALLOWANCE = 60.0  # seconds a serve cell gets over the per-cell limit, to load torch


def execute(
    input_path: str,
    output_path: str,
    cwd: str,
    cell_timeout: float | None,
    kernel: str,
    parameters: dict,
) -> str | None:
    """Run the notebook; return ``None``, or a description of what stopped the run early."""
    from papermill.exceptions import PapermillExecutionError

    from labkit.notebook import HEADLESS_ENV
    from labkit.run_notebooks import describe_error, execute_notebook

    def timeout_func(cell) -> float | None:
        # A grader's serve cell first loads torch and labkit in the kernel (not the student's
        # time); the per-cell limit on the check itself is applied by the serve loop and the
        # checking process, from the moment it starts.
        if cell_timeout and "labkit_grader" in cell.get("metadata", {}):
            return cell_timeout + SERVE_ALLOWANCE
        return cell_timeout

    os.environ.pop("MPLBACKEND", None)  # inline plots in the kernel, as run_notebooks does
    os.environ[HEADLESS_ENV] = "1"  # explorers draw once instead of opening widgets
    try:
        execute_notebook(  # started again if the kernel fails to start: no student code ran
            input_path,
            output_path,
            parameters=parameters,
            kernel_name=kernel,
            # The kernel starts in ``cwd`` (nbclient's resources path); papermill's own ``cwd``
            # would move this process there too, and a notebook deleting its working
            # directory would then break every save of the executed notebook.
            resources={"metadata": {"path": cwd}},
            progress_bar=False,
            log_output=False,
            execution_timeout=cell_timeout,
            timeout_func=timeout_func,
            allow_errors=True,
            interrupt_on_timeout=True,
            # No IPython history file: nothing shared between students' kernels.
            extra_arguments=["--HistoryManager.hist_file=:memory:"],
        )
    except PapermillExecutionError:
        return None  # errors inside cells are results; the notebook ran to the end
    except Exception as err:  # the kernel died, could not start three times, ...
        return describe_error(err)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the worker process."""
    parser = argparse.ArgumentParser(prog="python -m labkit.grading.execute")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--cwd", required=True)
    parser.add_argument("--cell-timeout", type=float, default=None)
    parser.add_argument("--kernel", default="labkit")
    parser.add_argument("--parameters", default="{}", help="JSON dict of papermill parameters")
    args = parser.parse_args(argv)
    error = execute(
        args.input,
        args.output,
        args.cwd,
        args.cell_timeout,
        args.kernel,
        json.loads(args.parameters),
    )
    sys.stdout.write(json.dumps({"error": error}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
