"""``python -m labkit.grading assignments ...``: the assignments commands without the labkit CLI."""

import argparse
import sys

from labkit.grading.cli import register

parser = argparse.ArgumentParser(prog="python -m labkit.grading")
register(parser.add_subparsers(dest="command", metavar="command", required=True))
args = parser.parse_args()
sys.exit(int(args.func(args) or 0))
