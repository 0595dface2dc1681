"""``labkit data shapes`` and ``labkit data trees``: write the datasets under data/ and say what was written."""

from __future__ import annotations

import argparse
import os

from labkit.data.paths import default_root


def _cmd_shapes(args: argparse.Namespace) -> int:
    from labkit.data.shapes import make_shapes

    root = default_root("shapes", args.root)
    manifest = make_shapes(root, args.seed, args.num_train, args.num_val, args.image_size)
    _report(root, manifest)
    return 0


def _cmd_trees(args: argparse.Namespace) -> int:
    from labkit.data.trees import make_trees

    root = default_root("trees", args.root)
    manifest = make_trees(root, wheel=args.wheel)
    _report(root, manifest)
    for name, count in manifest["counts"].items():
        print(f"  {name}: {count} boxes")
    return 0


def _report(root: str, manifest: dict) -> None:
    files = manifest["files"]
    size = sum(os.path.getsize(os.path.join(root, p)) for p in files)
    verb = "wrote" if manifest["generated"] else "up to date:"
    print(f"{verb} {len(files)} files ({size / 2**20:.1f} MiB) under {root}")
    for p in sorted(files):
        if p.endswith(".json"):
            print(f"  {os.path.join(root, p)}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data shapes`` and ``data trees`` to the ``labkit`` command."""
    data = subparsers.add_parser("data", help="generate or fetch datasets under data/")
    sub = data.add_subparsers(dest="data_command", metavar="dataset", required=True)

    shapes = sub.add_parser("shapes", help="synthetic shapes in COCO format (deterministic)")
    shapes.add_argument("--root", default=None, help="output folder (default: data/shapes)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--num-train", type=int, default=256)
    shapes.add_argument("--num-val", type=int, default=64)
    shapes.add_argument("--image-size", type=int, default=512)
    shapes.set_defaults(func=_cmd_shapes)

    trees = sub.add_parser("trees", help="tree crowns from the deepforest 2.1.0 wheel (MIT)")
    trees.add_argument("--root", default=None, help="output folder (default: data/trees)")
    trees.add_argument("--wheel", default=None, help="use this wheel instead of pip download")
    trees.set_defaults(func=_cmd_trees)
