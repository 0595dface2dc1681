"""``labkit assignments build|grade|list``: hand out student notebooks, grade submissions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def _sources(names: list[str], notebook_dir: str | None) -> list[Path]:
    """Explicit paths as given; names/prefixes (``01``, ``anchors``) looked up in notebook_dir."""
    from labkit.run_notebooks import discover, select

    paths = [Path(n) for n in names if n.endswith(".ipynb") and Path(n).is_file()]
    rest = [n for n in names if not (n.endswith(".ipynb") and Path(n).is_file())]
    if rest or not names:
        paths += select(discover(notebook_dir), rest)
    return paths


def _cmd_build(args: argparse.Namespace) -> int:
    from labkit.grading.build import build_assignments

    try:
        manifest = build_assignments(_sources(args.notebooks, args.notebook_dir), args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"labkit assignments build: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for entry in manifest["notebooks"]:
        ids = ", ".join(f"{e['id']} ({e['points']:g})" for e in entry["exercises"])
        print(f"{entry['notebook']}: {ids}")
    if manifest["skipped"]:
        print(f"skipped (no exercises): {', '.join(manifest['skipped'])}")
    if not manifest["notebooks"]:
        print("labkit assignments build: no notebook has exercises", file=sys.stderr)
        return 1
    print(
        f"student notebooks + README in {out / 'student'}, instructor copies in "
        f"{out / 'instructor'}, {out / 'manifest.json'} ({manifest['total_points']:g} points)"
    )
    return 0


def _limits(args: argparse.Namespace):
    import os

    from labkit.grading.sandbox import Limits

    return Limits(
        memory=int(args.memory_limit * (1 << 30)),
        processes=args.max_processes,
        cpus=max(1.0, (os.cpu_count() or 1) / max(1, args.jobs)),
    )


def _cmd_grade(args: argparse.Namespace) -> int:
    from labkit.grading.grade import grade_submissions

    try:
        grades = grade_submissions(
            args.submissions_dir,
            _sources(args.notebooks, args.notebook_dir),
            args.out,
            args.feedback,
            cell_timeout=args.cell_timeout,
            total_timeout=args.total_timeout,
            jobs=args.jobs,
            kernel=args.kernel,
            keep_executed=args.keep_executed,
            partial_credit=not args.all_or_nothing,
            progress=not args.no_progress,
            limits=_limits(args),
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"labkit assignments grade: {err}", file=sys.stderr)
        return 2
    width = max([7, *(len(g.student) for g in grades)])
    for g in grades:
        print(f"{g.student:<{width}}  {g.total:6.2f} / {g.max_total:g}  {g.status}")
    if grades:
        print("class mean per exercise:")
        for i, nb in enumerate(grades[0].notebooks):
            for j, ex in enumerate(nb.exercises):
                mean = sum(g.notebooks[i].exercises[j].points for g in grades) / len(grades)
                print(f"  {Path(nb.notebook).stem}:{ex.id:<24} {mean:5.2f} / {ex.max_points:g}")
    feedback = Path(args.feedback) if args.feedback else Path(args.out).parent / "feedback"
    print(f"{len(grades)} student(s): gradebook {args.out}, feedback in {feedback}/")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from labkit.grading.build import read_notebook
    from labkit.grading.cells import find_exercises

    try:
        for path in _sources(args.notebooks, args.notebook_dir):
            for ex in find_exercises(read_notebook(path)):
                fn = ex.function or "-"
                print(f"{path.name}  {ex.number}. {ex.id:<24} {ex.points:g} pt  {fn}")
    except (ValueError, FileNotFoundError) as err:
        print(f"labkit assignments list: {err}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labkit assignments build``, ``grade`` and ``list``."""
    parser = subparsers.add_parser("assignments", help="build student notebooks, grade submissions")
    sub = parser.add_subparsers(
        dest="assignments_command", metavar="{build,grade,list}", required=True
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--notebook-dir",
        default=None,
        help="where names like 01 are looked up (default: notebooks/)",
    )

    build = sub.add_parser(
        "build",
        parents=[common],
        help="student copies (solutions stubbed, hidden tests removed) + instructor copies",
        description="Write OUT/student/*.ipynb (solutions replaced by NotImplementedError stubs, "
        "hidden tests removed, outputs cleared) with a README, OUT/instructor/*.ipynb and "
        "OUT/manifest.json. Deterministic: the same notebooks give the same bytes.",
    )
    build.add_argument("notebooks", nargs="*", help="notebook paths or names (default: all)")
    build.add_argument("--out", default="build/assignments", help="output folder")
    build.set_defaults(func=_cmd_build)

    grade = sub.add_parser(
        "grade",
        parents=[common],
        help="run SUBMISSIONS_DIR/<student>/<notebook>.ipynb and write the gradebook",
        description="Run every submitted notebook (papermill and its kernel in a bubblewrap "
        "sandbox) while a fresh checking process runs the instructor's check cells (hidden "
        "tests included) on its functions, score each exercise and write the gradebook CSV "
        "plus a markdown feedback file per student.",
    )
    grade.add_argument("submissions_dir", help="folder with one sub-folder per student")
    grade.add_argument(
        "--notebooks", nargs="*", default=[], help="instructor notebooks or names (default: all)"
    )
    grade.add_argument("--out", default="grades.csv", help="gradebook CSV (default: grades.csv)")
    grade.add_argument(
        "--feedback", default=None, help="feedback folder (default: feedback/ next to --out)"
    )
    grade.add_argument(
        "--cell-timeout", type=float, default=120, help="seconds per cell (default 120)"
    )
    grade.add_argument(
        "--total-timeout", type=float, default=600, help="seconds per notebook (default 600)"
    )
    grade.add_argument("--jobs", "-j", type=int, default=1, help="notebooks graded at once")
    grade.add_argument("--kernel", default="labkit", help="Jupyter kernel (default: labkit)")
    grade.add_argument(
        "--keep-executed",
        action="store_true",
        help="keep executed notebooks in the feedback folder",
    )
    grade.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="no partial credit: a check cell earns its points only if every case passes",
    )
    grade.add_argument(
        "--memory-limit",
        type=float,
        default=8,
        help="GiB of address space per process in the sandbox (default 8)",
    )
    grade.add_argument(
        "--max-processes",
        type=int,
        default=512,
        help="tasks per sandbox where cgroups allow; half as many processes stop it (default 512)",
    )
    grade.add_argument("--no-progress", action="store_true", help="no progress bar")
    grade.set_defaults(func=_cmd_grade)

    lst = sub.add_parser("list", parents=[common], help="list the exercises of notebooks")
    lst.add_argument("notebooks", nargs="*", help="notebook paths or names (default: all)")
    lst.set_defaults(func=_cmd_list)
