"""Training for lessons: the one train-then-evaluate every notebook uses, and a briefly trained
Deformable-DETR for notebook 04's pictures (not for accuracy)."""

from __future__ import annotations

import torch
from torch.utils.data import Subset

from labkit.data.collate import make_loader
from labkit.data.shapes import shapes_dataset
from labkit.data.transforms import test_transforms, train_transforms
from labkit.detectors.deformable_detr import DeformableDETR
from labkit.engine.evaluate import evaluate
from labkit.engine.train import History, TrainConfig, train
from labkit.recipes import deformable_detr, schedule

__all__ = ["train_and_evaluate", "train_on_shapes"]


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
