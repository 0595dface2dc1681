"""The ``labkit`` command: notebooks, data and training subcommands, each from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import labkit

# (module providing register(subparsers), commands it adds, what they do)
SUBCOMMAND_MODULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("labkit.run_notebooks", ("notebooks",), "run or list the numbered notebooks"),
    ("labkit.data.cli", ("data",), "generate or fetch datasets"),
    ("labkit.engine.cli", ("train", "eval"), "train or evaluate a detector"),
    ("labkit.grading.cli", ("assignments",), "build student notebooks and grade submissions"),
    ("labkit.zoo", ("zoo",), "list, train or verify the lessons' trained models"),
)


def _unavailable(module: str, reason: str):
    def run(args: argparse.Namespace) -> int:
        print(
            f"labkit {args.command}: unavailable in this checkout ({module}: {reason})",
            file=sys.stderr,
        )
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand that could be loaded.

    A subcommand module that is missing or broken does not break the others: its commands
    are still listed and say why they are unavailable.
    """
    parser = argparse.ArgumentParser(
        prog="labkit",
        description="labkit: object-detection notebooks and the PyTorch package behind them.",
    )
    parser.add_argument("--version", action="version", version=f"labkit {labkit.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for module_name, commands, help_text in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
            module.register(subparsers)
        except Exception as err:  # missing module or broken import: keep the rest usable
            reason = f"{type(err).__name__}: {err}"
            for command in commands:
                if command in subparsers.choices:
                    continue
                stub = subparsers.add_parser(
                    command, help=f"{help_text} (unavailable)", add_help=False
                )
                stub.set_defaults(func=_unavailable(module_name, reason), accepts_any=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``labkit`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_any", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
