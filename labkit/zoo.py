"""The model zoo for the lessons: small trained detectors, reproducible from a seed, verified by hash.

    labkit zoo list                      # name, seed, AP, AP50, training minutes, device, sha256
    labkit zoo train atss --seed 0       # reproduce (or resume) one entry from its seed
    labkit zoo compare atss retinanet    # mean ± std over seeds; is the difference beyond noise?
    model = labkit.zoo.load("atss", seed=0)   # verifies the hash, returns the model in eval mode

Every entry (:data:`ZOO`) is a plain ``labkit train`` command line: a recipe, its model
arguments and its schedule flags, trained on the shapes data with the tiny CPU backbone. ``zoo
train`` runs that command with ``--seed`` and ``--resume`` in ``work_dirs/zoo/NAME-seedS`` (so a
killed run continues where its last checkpoint stopped), then stores, in ``data/zoo/``:

* ``NAME-seedS.pth``: the weights in float16 (a few MB) with the recipe and schedule, a
  checkpoint ``labkit eval --checkpoint`` reads directly;
* ``NAME-seedS.log.jsonl`` (the training log) and ``NAME-seedS.coco.txt`` (the COCO table);
* a row of ``MANIFEST.json``: the file's sha256 and size, COCO AP and AP50 of the float16
  weights (what ``labkit eval`` reproduces), training minutes, device, seed and command.

The repository keeps the weights of seed 0 of every entry (:data:`SEEDS_WITH_WEIGHTS`), the
models the lessons analyse; the other seeds, which feed the lessons' multi-seed tables, keep
their log, COCO table and manifest row (with the sha256 of the weights their run wrote), so
the zoo stays within its 80 MB. ``labkit zoo train NAME --seed S`` writes those weights again,
into ``data/zoo/`` (git ignores them), where :func:`load` finds them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SEEDS_WITH_WEIGHTS",
    "ZOO",
    "ZooEntry",
    "compare",
    "load",
    "log_records",
    "manifest",
    "manifest_row",
    "row_metric",
    "register",
    "train_entry",
    "weights_in_repo",
    "zoo_dir",
]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: ``labkit train --model RECIPE`` with these arguments.

    Attributes:
        name: the zoo name (``labkit zoo train NAME``).
        recipe: a key of ``labkit.recipes.RECIPES``.
        model_args: keyword arguments of the recipe (``--model-arg KEY=VALUE``).
        train_args: other ``labkit train`` flags (``{"epochs": 12, "lr": 1e-3}`` ->
            ``--epochs 12 --lr 0.001``; a tuple becomes several values).
        about: one line for ``zoo list``.
    """

    name: str
    recipe: str
    model_args: dict = field(default_factory=dict)
    train_args: dict = field(default_factory=dict)
    about: str = ""

    def command(self, seed: int, work_dir: Path, device: str | None = None) -> list[str]:
        """The ``labkit train`` argument list that (re)trains this entry from ``seed``."""
        argv = ["train", "--model", self.recipe]
        for key, value in self.model_args.items():
            argv += ["--model-arg", f"{key}={value!r}"]
        for key, value in self.train_args.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            else:
                values = value if isinstance(value, (tuple, list)) else (value,)
                argv += [flag, *(str(v) for v in values)]
        argv += ["--seed", str(seed), "--work-dir", os.fspath(work_dir), "--resume"]
        if device is not None:
            argv += ["--device", device]
        return argv


# The CPU zoo: tiny backbone, shapes data. Measured (benchmarks/RESULTS.md): with 4,096
# generated training images, 320-px crops of the 0.6-1x scaled 512-px images, tests on whole
# 512-px images and AdamW with a cosine schedule, FCOS reaches COCO AP 0.18 in 2,800 steps
# (16 CPU-minutes on one core), where the 256-image, 320-px, 12-epoch setting gave 0.036. Every
# dense entry shares this schedule, so a comparison differs only in the detector.
_SHAPES_SCHEDULE = {
    "data": "shapes:4096",
    "image_size": 512,
    "train_crop": 320,
    "scale_range": "0.6,1.0",
    "batch_size": 4,
    "max_iters": 2800,
    "optimizer": "adamw",
    "lr": 2e-3,
    "warmup_iters": 200,
    "lr_schedule": "cosine",
}
# The same setting with bf16 autocast (``--amp``): a step costs about 0.57x on a CPU with
# AVX512-BF16, so twice the steps (5,600) fit about the same 20 CPU-minutes: ATSS reaches COCO
# AP 0.365 (benchmarks/RESULTS.md). FCOS reached 0.342 there and 0.351 with 6,000 steps (about
# 23 CPU-minutes), so its entry takes 6,000. Dense heads keep targets and losses in float32.
_SHAPES_BF16_SCHEDULE = {**_SHAPES_SCHEDULE, "max_iters": 5600, "amp": True}
_FCOS_BF16_SCHEDULE = {**_SHAPES_BF16_SCHEDULE, "max_iters": 6000}
# The DETRs: the same data and crops with the recipe's paper optimisation
# (AdamW, clip 0.1, lr x 0.1 on the backbone and sampling offsets) at lr 4e-4, for 2,000 steps.
# Measured on one loaded core: 1.36 s per step for Deformable-DETR, 1.50 with Co-DETR's ATSS
# head, 3.03 with both auxiliary heads (FCOS: 0.35), so 30 to 100 minutes per entry.
_DETR_SCHEDULE = {**_SHAPES_SCHEDULE, "max_iters": 2000, "lr": 4e-4}
_DETR_ARGS = {"backbone": "tiny", "num_queries": 60}

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "retinanet", "retinanet", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "MaxIoU anchors"
        ),
        ZooEntry("atss", "atss", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "ATSS anchors"),
        ZooEntry(
            "atss_bf16",
            "atss",
            {"backbone": "tiny"},
            _SHAPES_BF16_SCHEDULE,
            "ATSS, 5,600 bf16 steps in the same CPU time",
        ),
        ZooEntry("paa", "paa", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "PAA GMM re-assignment"),
        ZooEntry("fcos", "fcos", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "FCOS with centerness"),
        ZooEntry(
            "fcos_bf16",
            "fcos",
            {"backbone": "tiny"},
            _FCOS_BF16_SCHEDULE,
            "FCOS, 6,000 bf16 steps in about the same CPU time",
        ),
        # torchvision's choice of the three FCOS differences (benchmarks/RESULTS.md, "Which of
        # FCOS's three differences matters"): each positive's GIoU counts equally instead of by
        # its centerness target. Seed 0 reached AP 0.375 where fcos_bf16's design had 0.342 at
        # 5,600 steps.
        ZooEntry(
            "fcos_uniform_giou_bf16",
            "fcos",
            {"backbone": "tiny", "bbox_loss_weight": "uniform"},
            _SHAPES_BF16_SCHEDULE,
            "FCOS with an unweighted GIoU mean (torchvision's), 5,600 bf16 steps",
        ),
        ZooEntry(
            "fcos_no_centerness",
            "fcos",
            {"backbone": "tiny", "centerness": False},
            _SHAPES_SCHEDULE,
            "FCOS without the centerness branch",
        ),
        ZooEntry("foveabox", "foveabox", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "FoveaBox"),
        ZooEntry("fsaf", "fsaf", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "FSAF"),
        ZooEntry("reppoints", "reppoints", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "RepPoints"),
        ZooEntry("faster_rcnn", "faster_rcnn", {"backbone": "tiny"}, _SHAPES_SCHEDULE, "RPN + RoI"),
        # Co-DETR's baseline, "Deformable-DETR++": its model and losses without the auxiliary
        # heads, so the three DETR entries differ only in ``aux``.
        ZooEntry(
            "deformable_detr",
            "co_deformable_detr",
            {**_DETR_ARGS, "aux": ()},
            _DETR_SCHEDULE,
            "Deformable-DETR++ (Co-DETR without auxiliary heads)",
        ),
        ZooEntry(
            "co_deformable_detr_atss",
            "co_deformable_detr",
            {**_DETR_ARGS, "aux": ("atss",)},
            _DETR_SCHEDULE,
            "Co-DETR, ATSS auxiliary head",
        ),
        ZooEntry(
            "co_deformable_detr",
            "co_deformable_detr",
            _DETR_ARGS,
            _DETR_SCHEDULE,
            "Co-DETR, ATSS + Faster R-CNN auxiliary heads",
        ),
    )
}


# The seeds whose float16 weights the repository keeps (``.gitignore`` drops the others).
SEEDS_WITH_WEIGHTS = (0,)


def weights_in_repo(row: dict) -> bool:
    """Whether the repository keeps the weights of manifest ``row`` (see :data:`SEEDS_WITH_WEIGHTS`)."""
    return bool(row.get("weights_in_repo", row["seed"] in SEEDS_WITH_WEIGHTS))


def zoo_dir() -> Path:
    """Where zoo files live: ``$LABKIT_ZOO``, else the checkout's ``data/zoo``."""
    env = os.environ.get("LABKIT_ZOO")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "zoo"


def _stem(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(root: Path | None = None) -> list[dict]:
    """The rows of ``MANIFEST.json`` (one per trained name and seed), sorted by name and seed."""
    path = (root or zoo_dir()) / "MANIFEST.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))["models"]
    return sorted(rows, key=lambda r: (r["name"], r["seed"]))


def _write_manifest(rows: list[dict], root: Path) -> None:
    from labkit.files import write_atomic

    rows = sorted(rows, key=lambda r: (r["name"], r["seed"]))
    text = json.dumps({"models": rows}, indent=1) + "\n"
    write_atomic(root / "MANIFEST.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def manifest_row(name: str, seed: int = 0, root: Path | None = None) -> dict:
    """The manifest row of zoo model ``name`` trained from ``seed`` (AP, AP50, sha256, ...);
    ``ValueError`` naming what is trained when it is not."""
    root = root or zoo_dir()
    for row in manifest(root):
        if row["name"] == name and row["seed"] == seed:
            return row
    trained = sorted({(r["name"], r["seed"]) for r in manifest(root)})
    known = name in ZOO or any(n == name for n, _ in trained)
    what = f"seed {seed} of {name!r} is not trained" if known else f"unknown zoo model {name!r}"
    raise ValueError(
        f"name, seed: {what}; trained: {trained or 'none'} (labkit zoo train {name} --seed {seed})"
    )


def load(
    name: str, seed: int = 0, device: str | torch.device = "cpu", root: Path | None = None
) -> nn.Module:
    """The zoo model ``name`` trained from ``seed``, in eval mode on ``device``.

    The file's sha256 must match the manifest (``ValueError: ... is corrupt`` otherwise); the
    float16 weights are loaded into the recipe's float32 model. Seeds other than 0 have weights
    only after ``labkit zoo train NAME --seed S`` (``FileNotFoundError`` saying so otherwise).
    """
    from labkit.engine.checkpoint import load_checkpoint
    from labkit.recipes import RECIPES

    root = root or zoo_dir()
    row = manifest_row(name, seed, root)
    path = root / row["file"]
    if not path.is_file():
        if not weights_in_repo(row):
            raise FileNotFoundError(
                f"name, seed: the repository keeps the weights of seed 0 only (the zoo's 80 MB "
                f"budget); seed {seed} of {name!r} has its log and COCO table (AP "
                f"{row['AP']:.3f}). labkit zoo train {name} --seed {seed} writes its weights to "
                f"{path} (about {row['train_minutes']:.0f} CPU-minutes)"
            )
        raise FileNotFoundError(
            f"name: {name!r} seed {seed}: {path} is missing (git lfs? a partial checkout?)"
        )
    digest = sha256_of(path)
    if digest != row["sha256"]:
        raise ValueError(
            f"name: the zoo file {path} is corrupt: sha256 {digest[:12]}... does not match the "
            f"manifest's {row['sha256'][:12]}... (restore it with git, or labkit zoo train {name} "
            f"--seed {seed})"
        )
    ckpt = load_checkpoint(path)
    recipe = ckpt["recipe"]
    model = RECIPES[recipe["name"]].build(**recipe["kwargs"])
    load_checkpoint(path, model)
    return model.to(device).eval()


def row_metric(row: dict, metric: str, root: Path | None = None) -> float:
    """``metric`` of a manifest row: the row's own field (AP, AP50), else the row's COCO table
    (``NAME-seedS.coco.txt``: AP75, APs, APm, APl, AR100, ...), both of the float16 weights."""
    if metric in row:
        return float(row[metric])
    table = (root or zoo_dir()) / row["file"].replace(".pth", ".coco.txt")
    header, values = table.read_text(encoding="utf-8").splitlines()[:2]
    metrics = dict(zip(header.split(), (float(v) for v in values.split()), strict=True))
    if metric not in metrics:
        raise ValueError(f"metric: {metric!r} is not recorded; choose one of {sorted(metrics)}")
    return metrics[metric]


def compare(names: list[str], metric: str = "AP", root: Path | None = None) -> list[dict]:
    """Per zoo name: the recorded ``metric`` of every trained seed, their mean and sample std.

    Returns ``[{"name", "seeds": [...], "values": [...], "n", "mean", "std"}, ...]`` in the
    order of ``names``; ``mean``/``std`` are ``None`` without seeds, ``std`` is ``None`` for one.
    A lesson shows these (never a single live run) when it compares detectors.
    """
    import statistics

    root = root or zoo_dir()
    rows = manifest(root)
    out = []
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        values = [row_metric(r, metric, root) for r in mine]
        out.append(
            {
                "name": name,
                "seeds": [r["seed"] for r in mine],
                "values": values,
                "n": len(values),
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
            }
        )
    return out


def log_records(log_path: Path) -> list[dict]:
    """The train and val lines of a ``log.jsonl``, in iteration order (train before val).

    A resumed run may re-log iterations: a train line at iteration ``i`` drops every line logged
    before it at ``i`` or later (the killed run's), and a re-logged line replaces its twin.
    """
    kept: dict[tuple[str, int], dict] = {}
    for text in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(text)
        mode = record.get("mode")
        if mode not in ("train", "val"):
            continue
        if mode == "train":
            for key in [k for k in kept if k[1] >= record["iter"]]:
                del kept[key]  # a resume went back: forget the killed run's later lines
        kept[(mode, record["iter"])] = record
    return [kept[k] for k in sorted(kept, key=lambda k: (k[1], k[0]))]


def _train_minutes(log_path: Path) -> float:
    """Training minutes from a ``log.jsonl``: each train line's mean step time x its steps
    (each iteration counted once, see :func:`log_records`)."""
    seconds, previous = 0.0, 0
    for record in log_records(log_path):
        if record["mode"] == "train" and "time" in record:
            seconds += record["time"] * (record["iter"] - previous)
            previous = record["iter"]
    return seconds / 60


def _to_half(state: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def train_entry(
    name: str,
    seed: int = 0,
    device: str | None = None,
    work_root: str | os.PathLike = "work_dirs/zoo",
    root: Path | None = None,
) -> dict:
    """Train (or resume) zoo entry ``name`` from ``seed``, store its float16 checkpoint, log and
    COCO table in the zoo folder and its manifest row; returns that row."""
    from labkit.engine import cli as engine_cli
    from labkit.engine.checkpoint import load_checkpoint, save_checkpoint
    from labkit.engine.evaluate import evaluate, format_table
    from labkit.files import write_atomic
    from labkit.recipes import RECIPES

    if name not in ZOO:
        raise ValueError(f"name: unknown zoo model {name!r}; choose one of {sorted(ZOO)}")
    entry, root = ZOO[name], root or zoo_dir()
    work = Path(work_root) / _stem(name, seed)
    argv = entry.command(seed, work, device)
    parser = argparse.ArgumentParser(prog="labkit")
    engine_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if args.func(args) != 0:
        raise RuntimeError(f"labkit {shlex.join(argv)} failed")

    ckpt = load_checkpoint(work / "latest.pth")
    stem = _stem(name, seed)
    root.mkdir(parents=True, exist_ok=True)
    keep = {k: ckpt[k] for k in ("recipe", "config", "epoch", "iter") if k in ckpt}
    save_checkpoint(root / f"{stem}.pth", {"model": _to_half(ckpt["model"]), **keep})
    # Score the float16 weights: the number `labkit eval` on the zoo file reproduces.
    model = RECIPES[ckpt["recipe"]["name"]].build(**ckpt["recipe"]["kwargs"])
    load_checkpoint(root / f"{stem}.pth", model)
    from labkit.data import make_loader
    from labkit.data.spec import build_dataset

    val_set = build_dataset(args.data, "val", args.image_size)

    metrics = evaluate(model, make_loader(val_set, batch_size=args.batch_size), val_set, device)
    log_text = (work / "log.jsonl").read_text(encoding="utf-8")
    write_atomic(root / f"{stem}.log.jsonl", lambda tmp: tmp.write_text(log_text, encoding="utf-8"))
    table = format_table(metrics) + "\n"
    write_atomic(root / f"{stem}.coco.txt", lambda tmp: tmp.write_text(table, encoding="utf-8"))
    import labkit

    used = labkit.device(device)
    row = {
        "name": name,
        "seed": seed,
        "recipe": ckpt["recipe"]["name"],
        "file": f"{stem}.pth",
        "sha256": sha256_of(root / f"{stem}.pth"),
        "bytes": (root / f"{stem}.pth").stat().st_size,
        "weights_in_repo": seed in SEEDS_WITH_WEIGHTS,
        "AP": round(float(metrics["AP"]), 4),
        "AP50": round(float(metrics["AP50"]), 4),
        "train_minutes": round(_train_minutes(work / "log.jsonl"), 1),
        "device": torch.cuda.get_device_name(used) if used.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "labkit " + shlex.join(argv),
    }
    with _manifest_lock(root):  # two `zoo train` jobs (one per core) may finish together
        rows = [r for r in manifest(root) if (r["name"], r["seed"]) != (name, seed)]
        _write_manifest([*rows, row], root)
    return row


@contextlib.contextmanager
def _manifest_lock(root: Path):
    """An exclusive lock on ``root/.MANIFEST.lock`` around a read-modify-write of the manifest."""
    import fcntl

    with open(root / ".MANIFEST.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- command line


def _format_rows(rows: list[dict]) -> str:
    head = f"{'name':<24} {'seed':>4} {'AP':>6} {'AP50':>6} {'min':>6} {'device':<10} sha256"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['name']:<24} {r['seed']:>4} {r['AP']:>6.3f} {r['AP50']:>6.3f} "
            f"{r['train_minutes']:>6.1f} {r['device'][:10]:<10} {r['sha256'][:12]}"
            + ("" if weights_in_repo(r) else "  *")
        )
    if not all(weights_in_repo(r) for r in rows):
        lines.append(
            "* weights not in the repository (it keeps seed 0's); "
            "labkit zoo train NAME --seed S writes them"
        )
    missing = sorted(set(ZOO) - {r["name"] for r in rows})
    if missing:
        lines.append(f"not trained yet: {', '.join(missing)} (labkit zoo train NAME --seed S)")
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    rows = manifest()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_format_rows(rows))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    for seed in args.seed:
        row = train_entry(args.name, seed, args.device, args.work_root)
        print(_format_rows([row]).splitlines()[1], file=sys.stdout)
    print(f"zoo train: done in {(time.perf_counter() - start) / 60:.1f} min; see labkit zoo list")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from labkit.lessons import recorded

    unknown = sorted(set(args.names) - set(ZOO))
    if unknown:
        raise SystemExit(
            f"labkit zoo compare: unknown zoo names {unknown}; choose from {sorted(ZOO)}"
        )
    print(recorded.seed_table(args.names, tuple(args.metric)))
    print()
    first = args.names[0]
    for other in args.names[1:]:
        print(recorded.claim(first, other, args.metric[0]).sentence)
    return 0


def register(subparsers: Any) -> None:
    """Add ``labkit zoo list`` and ``labkit zoo train`` to the ``labkit`` command."""
    zoo = subparsers.add_parser("zoo", help="list, train or verify the lessons' trained models")
    sub = zoo.add_subparsers(dest="zoo_command", required=True)
    listing = sub.add_parser("list", help="name, seed, AP, AP50, minutes, device, sha256")
    listing.add_argument("--json", action="store_true", help="print the manifest rows as JSON")
    listing.set_defaults(func=_cmd_list)
    train = sub.add_parser("train", help="reproduce a zoo model from its seed (resumes)")
    train.add_argument("name", choices=sorted(ZOO))
    train.add_argument("--seed", type=int, nargs="+", default=[0])
    train.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: auto)")
    train.add_argument("--work-root", default="work_dirs/zoo")
    train.set_defaults(func=_cmd_train)
    comp = sub.add_parser(
        "compare", help="mean ± std over seeds, and what the first name's difference supports"
    )
    comp.add_argument("names", nargs="+", help="zoo names; the first is compared with each other")
    comp.add_argument(
        "--metric", nargs="+", default=["AP", "AP50"], help="COCO metrics (first: the claim)"
    )
    comp.set_defaults(func=_cmd_compare)
