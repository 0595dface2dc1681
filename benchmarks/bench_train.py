"""Training speed (images/s) and short-schedule COCO AP of each detector on the shapes dataset.

Run: ``.venv/bin/python -m benchmarks.bench_train [--quick] [--device cuda] [--epochs N]``

Two tables, every detector measured in the same run:

1. speed: time of one training step (forward, loss, backward, AdamW step) on a fixed batch
   of shapes training images (best of 5 round-robin rounds, 20 in full mode), as images/s,
   and the ratio to the first detector;
2. accuracy: each detector trained from scratch with ``labkit.engine.train.train`` for
   ``--epochs`` on the shapes train split, then COCO AP on the val split
   (``labkit.engine.evaluate``).

The detectors are ``labkit.recipes.RECIPES`` (every recipe that accepts
``backbone=``), else RetinaNet, ATSS and PAA. ``--quick`` is the CPU setting: tiny backbone,
320 px images, 64 train / 32 val images, 2 epochs. Such a schedule is far too short for
meaningful AP (mmdetection trains 12 epochs on 118k images from pretrained weights): the
accuracy table is a smoke test of the whole pipeline and a relative signal at best. The
full setting (512 px, all 256/64 images, ``--epochs 12`` by default, ResNet-18 on CUDA,
tiny on CPU) is the documented schedule for real comparisons.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.data import Subset

from benchmarks._common import describe_device, print_table, time_call
from labkit.data.collate import collate, make_loader
from labkit.data.shapes import shapes_dataset
from labkit.data.transforms import test_transforms, train_transforms
from labkit.engine.evaluate import evaluate
from labkit.engine.train import train


def detector_recipes() -> dict:
    """``name -> recipe(num_classes, backbone=...)`` for every recipe in ``labkit.recipes``."""
    from labkit.recipes import RECIPES

    return {name: r.build for name, r in RECIPES.items()}


def build(recipe, num_classes: int, backbone: str):
    """The recipe's model, or ``None`` when it does not take this backbone."""
    try:
        return recipe(num_classes, backbone=backbone)
    except (TypeError, ValueError) as err:
        warnings.warn(f"skipped {getattr(recipe, '__name__', recipe)}: {err}", stacklevel=2)
        return None


def speed_table(recipes: dict, batch: dict, backbone: str, device: torch.device, rounds: int):
    """Images/s of one training step per detector, and the ratio to the first one.

    Detectors are timed round-robin (one step each per round, after two warm-up steps) and
    the fastest round is kept, so a burst of load on a shared machine hits all of them alike
    and mostly drops out.
    """
    steps = {}
    for name, recipe in recipes.items():
        torch.manual_seed(0)
        model = build(recipe, 5, backbone)
        if model is None:
            continue
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            losses = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            sum(v for k, v in losses.items() if "loss" in k).backward()
            opt.step()

        steps[name] = step
    for step in steps.values():
        time_call(step, device=device, warmup=1, repeat=1)
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], time_call(step, device=device, warmup=0, repeat=1))
    rows, first = [], None
    for name, seconds in best.items():
        ips = len(batch["img_metas"]) / seconds
        first = first or ips
        rows.append([name, backbone, round(seconds * 1000, 1), ips, ips / first])
    return rows


def accuracy_table(recipes: dict, args, backbone: str, device: torch.device):
    """Train each detector on shapes train for ``args.epochs`` and report COCO AP on val."""
    scale = (args.size, args.size)
    train_set = shapes_dataset("train", root=args.root, transforms=train_transforms(scale))
    val_set = shapes_dataset("val", root=args.root, transforms=test_transforms(scale))
    if args.num_train:
        train_set = Subset(train_set, range(min(args.num_train, len(train_set))))
    val_loader = make_loader(Subset(val_set, range(min(args.num_val, len(val_set)))), 4)
    rows = []
    for name, recipe in recipes.items():
        torch.manual_seed(0)
        model = build(recipe, 5, backbone)
        if model is None:
            continue
        loader = make_loader(train_set, args.batch_size, shuffle=True, seed=0)
        start = time.perf_counter()
        train(
            model,
            loader,
            epochs=args.epochs,
            optimizer="adamw",
            lr=args.lr,
            weight_decay=0.05,
            warmup_iters=min(100, args.epochs * len(loader) // 4),
            milestones=(max(1, args.epochs * 3 // 4),),
            max_norm=35.0,
            device=device,
            progress=False,
            log_every=10**9,
            eval_every=10**9,
            checkpoint_every=10**9,
        )
        minutes = (time.perf_counter() - start) / 60
        metrics = evaluate(model, val_loader, val_set, device=device, progress=False)
        rows.append(
            [name, backbone, args.epochs, round(minutes, 2), metrics["AP"], metrics["AP50"]]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized run (see module doc)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="*", help="subset of detector names")
    parser.add_argument("--backbone", default=None, help="default: tiny on CPU, resnet18 on CUDA")
    parser.add_argument("--epochs", type=int, default=None, help="default 2 quick, 12 full")
    parser.add_argument("--size", type=int, default=None, help="image size, 320 quick, 512 full")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--num-train", type=int, default=None, help="train images (quick: 64)")
    parser.add_argument("--num-val", type=int, default=None, help="val images (quick: 32)")
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()

    import labkit

    device = labkit.device(args.device)
    backbone = args.backbone or ("resnet18" if device.type == "cuda" else "tiny")
    args.epochs = args.epochs or (2 if args.quick else 12)
    args.size = args.size or (320 if args.quick else 512)
    args.num_train = args.num_train or (64 if args.quick else 0)
    args.num_val = args.num_val or (32 if args.quick else 64)
    recipes = detector_recipes()
    if args.models:
        recipes = {k: v for k, v in recipes.items() if k in args.models}

    scale = (args.size, args.size)
    items = [
        shapes_dataset("train", root=args.root, transforms=test_transforms(scale))[i]
        for i in range(args.batch_size)
    ]
    batch = collate(items)
    batch = {
        **batch,
        "img": batch["img"].to(device),
        "gt_bboxes": [b.to(device) for b in batch["gt_bboxes"]],
        "gt_labels": [b.to(device) for b in batch["gt_labels"]],
        "gt_bboxes_ignore": [b.to(device) for b in batch["gt_bboxes_ignore"]],
    }
    print(f"device: {describe_device(device)}; images {args.size} px, batch {args.batch_size}\n")
    rows = speed_table(recipes, batch, backbone, device, rounds=5 if args.quick else 20)
    print_table(
        "Training speed (one step: forward + loss + backward + AdamW)",
        ["detector", "backbone", "ms/step", "images/s", "vs first"],
        rows,
    )
    if args.skip_accuracy:
        return
    rows = accuracy_table(recipes, args, backbone, device)
    subset = f"{args.num_train or 'all'} train / {args.num_val} val images"
    print_table(
        f"COCO AP on shapes val after {args.epochs} epochs from scratch ({subset}, {args.size} px)",
        ["detector", "backbone", "epochs", "train min", "AP", "AP50"],
        rows,
    )


if __name__ == "__main__":
    main()
