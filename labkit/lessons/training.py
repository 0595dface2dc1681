"""Training for lessons: the one train-then-evaluate every notebook uses, notebook 03's live FCOS
demo setting, and a briefly trained Deformable-DETR for notebook 04's pictures (not for accuracy)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from labkit.data.collate import make_loader
from labkit.data.shapes import shapes_dataset
from labkit.data.transforms import test_transforms, train_transforms
from labkit.detectors.deformable_detr import DeformableDETR
from labkit.engine.evaluate import evaluate
from labkit.engine.train import History, TrainConfig, train
from labkit.recipes import deformable_detr, schedule

__all__ = ["fcos_demo_setup", "train_and_evaluate", "train_on_shapes"]


def train_and_evaluate(
    model: torch.nn.Module,
    train_loader: object,
    val_loader: object,
    val_set: object,
    config: TrainConfig,
    device: torch.device | str | None = None,
) -> dict:
    """Train ``model`` with :func:`labkit.engine.train.train`, then COCO-evaluate it on ``val_set``.

    Returns:
        ``{"history": History, "metrics": {"AP": ..., "AP50": ..., ...}}``.
    """
    history: History = train(model, train_loader, config, device=device)
    metrics = evaluate(model, val_loader, val_set, device=device, progress=False)
    return {"history": history, "metrics": metrics}


def fcos_demo_setup(
    quick: bool, seed: int = 0
) -> tuple[DataLoader, DataLoader, Dataset, TrainConfig]:
    """Data and schedule of notebook 03's live FCOS demo (with and without centerness).

    Quick: the first 32 shapes training and 16 validation images at 256 x 256 px, 2 epochs of
    batch 4 (16 AdamW steps, lr 2e-3, 4 warmup steps, x0.1 after epoch 2). Full: the whole
    splits at 512 x 512 px, 12 epochs (lr 1e-3, 200 warmup steps, x0.1 after epochs 8 and 11).
    Both: weight decay 1e-4, gradient clipping at 10, a log line every step, no tqdm bar.
    ``seed`` fixes the training augmentation and the shuffling.

    Returns:
        ``(train_loader, val_loader, val_set, config)``: the train loader yields collated
        batches of 4 images ``[4, 3, S, S]`` (S = 256 or 512), the val loader of 8.
    """
    size = 256 if quick else 512
    train_set = shapes_dataset("train", transforms=train_transforms(scale=(size, size), seed=seed))
    val_set = shapes_dataset("val", transforms=test_transforms(scale=(size, size)))
    if quick:
        train_set, val_set = Subset(train_set, range(32)), Subset(val_set, range(16))
    train_loader = make_loader(train_set, batch_size=4, shuffle=True, seed=seed)
    val_loader = make_loader(val_set, batch_size=8)
    config = TrainConfig(
        epochs=2 if quick else 12,
        optimizer="adamw",
        lr=2e-3 if quick else 1e-3,
        weight_decay=1e-4,
        warmup_iters=4 if quick else 200,
        milestones=(2,) if quick else (8, 11),
        max_norm=10.0,
        progress=False,
        eval_every=100,
        log_every=1,
    )
    return train_loader, val_loader, val_set, config


def train_on_shapes(
    steps: int = 40,
    image_size: int = 256,
    num_images: int = 8,
    backbone: str = "tiny",
    num_queries: int = 30,
    embed_dims: int | None = None,
    batch_size: int = 2,
    lr: float = 1e-3,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[DeformableDETR, object, object]:
    """Train a small two-stage Deformable-DETR with box refinement for ``steps`` optimizer steps.

    Uses :func:`labkit.engine.train.train` with the Deformable-DETR optimisation
    (``schedule("deformable_detr")``: AdamW, lr x0.1 for backbone / sampling offsets / reference points,
    gradient clipping 0.1) on the first ``num_images`` shapes training images resized to
    ``image_size``. ``lr`` is higher than the paper's 2e-4 because a handful of steps from
    scratch is all we can afford on a CPU.

    Returns:
        ``(model in eval mode, History, val dataset with test transforms)``.
    """
    torch.manual_seed(seed)
    scale = (image_size, image_size)
    train_set = Subset(
        shapes_dataset("train", transforms=train_transforms(scale, seed=seed)), range(num_images)
    )
    val_set = shapes_dataset("val", transforms=test_transforms(scale))
    loader = make_loader(train_set, batch_size=batch_size, shuffle=True, seed=seed)
    model = deformable_detr(
        5, backbone=backbone, num_queries=num_queries, embed_dims=embed_dims, dropout=0.0
    )
    config = schedule(
        "deformable_detr",
        max_iters=steps, lr=lr, log_every=1, progress=False, checkpoint_every=10**6
    )
    history = train(model, loader, config, device=device)
    return model.eval(), history, val_set
