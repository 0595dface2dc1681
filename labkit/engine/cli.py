"""``labkit train`` and ``labkit eval``: train a recipe on a dataset, evaluate a checkpoint.

    labkit train --model atss --data shapes --epochs 12 --work-dir work_dirs/atss
    labkit train --model retinanet --data annotations.json:images/ --image-size 800,1333 --amp
    labkit eval --checkpoint work_dirs/atss/latest.pth
    labkit eval --checkpoint atss_r50_fpn_1x_coco.pth --mmdet atss --data val.json:images/
    torchrun --nproc_per_node=4 --no-python labkit train --model co_deformable_detr --data shapes

Models come from ``labkit.recipes.RECIPES`` (name -> ``Recipe``: a build function taking
``num_classes`` and keyword arguments, which ``--model-arg backbone=tiny`` passes, and the
paper's schedule, which flags such as ``--lr`` override). Checkpoints store the
recipe name, its arguments, the data spec and the image size, so ``labkit eval`` rebuilds
the model from the checkpoint alone; ``--mmdet RECIPE`` instead converts an mmdetection
checkpoint with ``labkit.convert.from_mmdet`` (then ``--data`` is required).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from labkit.data.spec import build_dataset, check_classes
from labkit.lessons.trained import build_recipe_model, labkit_checkpoint, load_mmdet_model

Recipes = Mapping[str, Any]  # name -> labkit.recipes.Recipe (``build``, ``schedule``)


def _recipes(args: argparse.Namespace) -> Recipes:
    if args.recipes is not None:
        return args.recipes
    from labkit.recipes import RECIPES  # imported late: recipes pull in every head

    return RECIPES


def parse_image_size(text: str) -> tuple[int, int]:
    """``"512"`` -> ``(512, 512)``; ``"800,1333"`` -> ``(800, 1333)`` (h, w: the resize limits)."""
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(
            f"--image-size: expected N or H,W positive ints, got {text!r}"
        )
    return parts[0], parts[1]


def parse_scale_range(text: str) -> tuple[float, float]:
    """``"0.6,1.0"`` -> ``(0.6, 1.0)``: two factors with ``0 < low <= high``."""
    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError:
        low = high = float("nan")
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(
            f"--scale-range: expected LO,HI with 0 < LO <= HI, got {text!r}"
        )
    return low, high


def parse_model_arg(text: str) -> tuple[str, Any]:
    """``"backbone=resnet50"`` -> ``("backbone", "resnet50")``; values are Python literals when
    they parse as one (``num_queries=100``, ``aux=("atss",)``), else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--model-arg: expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cmd_train(args: argparse.Namespace) -> int:
    from labkit.data import make_loader
    from labkit.engine.train import train

    recipes = _recipes(args)
    if args.model not in recipes:
        raise SystemExit(
            f"labkit train: --model: unknown {args.model!r}; choose from {sorted(recipes)}"
        )
    from labkit.engine import distributed

    _seed_everything(args.seed)
    # Under torchrun, rank 0 generates/caches the data first; the others wait, then read it.
    info = distributed.init_distributed()
    if not info.is_main:
        distributed.barrier()
    train_set = build_dataset(
        args.data, "train", args.image_size, args.train_crop, args.scale_range
    )
    val_set = (
        None if args.no_eval else build_dataset(args.val_data or args.data, "val", args.image_size)
    )
    if info.is_main:
        distributed.barrier()
    kwargs = {"num_classes": train_set.num_classes, **dict(args.model_arg)}
    model = recipes[args.model].build(**kwargs)
    recipe = {
        "name": args.model,
        "kwargs": kwargs,
        "data": args.data,
        "image_size": list(args.image_size),
        "classes": list(getattr(train_set, "classes", [])),
    }
    overrides = {
        name: getattr(args, name)
        for name in (
            "epochs",
            "max_iters",
            "optimizer",
            "lr",
            "warmup_iters",
            "lr_schedule",
            "max_norm",
            "accum_steps",
            "log_every",
        )
        if getattr(args, name) is not None
    }
    if args.milestones is not None:
        overrides["milestones"] = tuple(args.milestones)
    # The recipe's paper schedule (e.g. AdamW 2e-4, clip 0.1, lr_mult for DETRs); flags win.
    config = dataclasses.replace(
        recipes[args.model].schedule, amp=args.amp, progress=not args.no_progress, **overrides
    )
    work_dir = Path(args.work_dir or os.path.join("work_dirs", args.model))
    train_loader = make_loader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    val_loader = None
    if val_set is not None:
        val_loader = make_loader(val_set, batch_size=args.batch_size, num_workers=args.num_workers)
    history = train(
        model,
        train_loader,
        config,
        val_loader=val_loader,
        val_dataset=val_set,
        work_dir=work_dir,
        device=args.device,
        resume=args.resume,
        recipe=recipe,
    )
    if info.is_main:
        print(f"trained {len(history.train)} iterations; logs and checkpoints in {work_dir}")
        if history.val:
            from labkit.engine.evaluate import format_table

            print(format_table(history.val[-1]))
    return 0


def _check_classes(recipe: dict, dataset: Any, spec: str) -> None:
    """Exit unless ``dataset`` has the checkpoint's classes (``labkit.data.spec.check_classes``)."""
    try:
        check_classes(recipe, dataset, spec, argument="--data")
    except ValueError as err:
        raise SystemExit(f"labkit eval: {err}") from err


def _mmdet_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``labkit eval --mmdet RECIPE``: the model converted from an mmdetection
    checkpoint by ``labkit.convert.from_mmdet`` (classes checked before any inference)."""
    from labkit.convert import MMDET_RECIPES

    if args.mmdet not in MMDET_RECIPES:
        raise SystemExit(
            f"labkit eval: --mmdet: no mmdetection conversion for {args.mmdet!r}; choose from "
            f"{list(MMDET_RECIPES)}"
        )
    if args.data is None:
        raise SystemExit("labkit eval: --mmdet needs --data (an mmdetection checkpoint names none)")
    try:
        model, classes = load_mmdet_model(args.checkpoint, args.mmdet)
    except (OSError, TypeError, ValueError) as err:
        raise SystemExit(f"labkit eval: --checkpoint: {err}") from err
    dataset = build_dataset(args.data, "val", args.image_size or (512, 512))
    recipe = {"classes": classes, "kwargs": {"num_classes": model.num_classes}}
    _check_classes(recipe, dataset, args.data)
    return model, dataset


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.mmdet is not None:
        return _evaluate(args, *_mmdet_model(args))
    recipes = _recipes(args)
    try:
        ckpt = labkit_checkpoint(args.checkpoint, recipes)
    except ValueError as err:
        raise SystemExit(f"labkit eval: {err}") from err
    recipe = ckpt["recipe"]
    spec = args.data or recipe.get("data")
    if spec is None:
        raise SystemExit(
            "labkit eval: pass --data (the checkpoint does not say which data it used)"
        )
    image_size = args.image_size or tuple(recipe.get("image_size", (512, 512)))
    dataset = build_dataset(spec, "val", image_size)
    _check_classes(recipe, dataset, spec)  # before building the model and any inference
    return _evaluate(args, build_recipe_model(ckpt, recipes), dataset)


def _evaluate(args: argparse.Namespace, model: Any, dataset: Any) -> int:
    """COCO-evaluate ``model`` on ``dataset``, print the table, write ``--output``."""
    import labkit
    from labkit.data import make_loader
    from labkit.engine import evaluate as evaluate_module

    device = labkit.device(args.device)
    model.to(device)
    loader = make_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    metrics = evaluate_module.evaluate(
        model, loader, dataset, device, progress=not args.no_progress
    )
    print(evaluate_module.format_table(metrics))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(metrics, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction, recipes: Recipes | None = None) -> None:
    """Add ``train`` and ``eval`` to the ``labkit`` command (``recipes`` replaces
    ``labkit.recipes.RECIPES``, for tests and custom model zoos)."""
    train = subparsers.add_parser("train", help="train a detector recipe on a dataset")
    train.add_argument("--model", required=True, help="recipe name in labkit.recipes.RECIPES")
    train.add_argument("--data", default="shapes", help="shapes | trees | PATH.json[:IMG_DIR]")
    train.add_argument(
        "--val-data", default=None, help="evaluation data (default: --data's val split)"
    )
    train.add_argument(
        "--model-arg", action="append", type=parse_model_arg, default=[], metavar="KEY=VALUE"
    )
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument(
        "--max-iters", type=int, default=None, help="optimizer steps (overrides --epochs)"
    )
    train.add_argument("--batch-size", type=int, default=2, help="images per GPU/process")
    train.add_argument("--optimizer", choices=("sgd", "adamw"), default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--warmup-iters", type=int, default=None)
    train.add_argument(
        "--lr-schedule", choices=("step", "cosine"), default=None,
        help="step decay at --milestones (default) or a cosine over the whole run",
    )  # fmt: skip
    train.add_argument(
        "--milestones", type=int, nargs="*", default=None, help="epochs where lr *= 0.1"
    )
    train.add_argument("--max-norm", type=float, default=None, help="gradient clipping (L2)")
    train.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation")
    train.add_argument("--log-every", type=int, default=None)
    train.add_argument("--image-size", type=parse_image_size, default=(512, 512), metavar="H[,W]")
    train.add_argument(
        "--train-crop", type=int, default=None, metavar="C",
        help="train on random C x C crops of the scale-jittered image (tested at --image-size)",
    )  # fmt: skip
    train.add_argument(
        "--scale-range", type=parse_scale_range, default=(0.6, 1.0), metavar="LO,HI",
        help="with --train-crop: resize factors drawn uniformly in [LO, HI] (default 0.6,1.0)",
    )  # fmt: skip
    train.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast (CUDA, or a CPU: about 1.75x faster with AVX512-BF16)",
    )
    train.add_argument("--device", default="auto")
    train.add_argument("--num-workers", type=int, default=0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--work-dir", default=None, help="default: work_dirs/MODEL")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT, or from WORK_DIR/latest.pth when given alone",
    )
    train.add_argument("--no-eval", action="store_true", help="skip COCO evaluation after epochs")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_cmd_train, recipes=recipes)

    ev = subparsers.add_parser("eval", help="COCO-evaluate a checkpoint saved by `labkit train`")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument(
        "--mmdet", default=None, metavar="RECIPE",
        help="the checkpoint is mmdetection's: convert it to labkit RECIPE (needs --data)",
    )  # fmt: skip
    ev.add_argument("--data", default=None, help="default: the data the checkpoint was trained on")
    ev.add_argument("--image-size", type=parse_image_size, default=None, metavar="H[,W]")
    ev.add_argument("--batch-size", type=int, default=2)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--num-workers", type=int, default=0)
    ev.add_argument("--output", default=None, help="also write the metrics as JSON here")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_eval, recipes=recipes)
