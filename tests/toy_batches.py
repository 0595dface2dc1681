"""What the overfit tests share: tiny collated batches of flat images with solid boxes, the
short training loop that should drive a detector's loss down on them, and the check that it
then detects them."""

from __future__ import annotations

import torch

from labkit.boxes import bbox_overlaps

SIZE = 192
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])


def solid_box_batch(
    gts: list[torch.Tensor], labels: list[torch.Tensor], size: int, scale: float = 1.0
) -> dict:
    """Images ``[len(gts), 3, size, size]`` at -1 with each box filled in its class's colour
    (5 classes), collated like ``labkit.data.collate`` (no padding mask); ``scale`` is the
    resize factor recorded in the metas (the original images were ``size / scale``)."""
    imgs = torch.full((len(gts), 3, size, size), -1.0)
    for i in range(len(gts)):
        for box, label in zip(gts[i], labels[i], strict=True):
            x1, y1, x2, y2 = box.int().tolist()
            imgs[i, :, y1:y2, x1:x2] = COLOURS[label][:, None, None] * 2 - 0.5
    meta = {
        "img_shape": (size, size),
        "pad_shape": (size, size),
        "ori_shape": (round(size / scale), round(size / scale)),
        "scale_factor": (scale,) * 4,
        "batch_input_shape": (size, size),
    }
    return {
        "img": imgs,
        "img_metas": [dict(meta, image_id=i) for i in range(len(gts))],
        "gt_bboxes": gts,
        "gt_labels": labels,
        "gt_bboxes_ignore": [torch.zeros(0, 4) for _ in gts],
    }


def two_images() -> dict:
    """Two ``SIZE`` x ``SIZE`` images with 2 and 3 solid boxes (see :func:`solid_box_batch`)."""
    gts = [
        torch.tensor([[22.0, 30.0, 82.0, 90.0], [105.0, 45.0, 172.0, 150.0]]),
        torch.tensor(
            [[45.0, 22.0, 150.0, 82.0], [15.0, 112.0, 68.0, 180.0], [112.0, 128.0, 158.0, 172.0]]
        ),
    ]
    return solid_box_batch(gts, [torch.tensor([0, 2]), torch.tensor([1, 3, 4])], SIZE)


def overfit(
    model, iters: int, lr: float = 1e-3, max_norm: float | None = None
) -> tuple[float, float]:
    """AdamW on :func:`two_images` for ``iters`` steps (gradient clipping at ``max_norm`` when
    given); the first and the last total loss."""
    torch.manual_seed(0)
    batch = two_images()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    first = last = None
    for _ in range(iters):
        losses = model.loss(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        first = float(total.detach()) if first is None else first
        last = float(total.detach())
    return first, last


def assert_detects(model, min_score: float = 0.3) -> None:
    """Every GT of :func:`two_images` has a same-class detection scoring ``>= min_score`` at
    IoU > 0.5."""
    batch = two_images()
    model.eval()
    results = model.predict(batch)
    for res, gts, labels in zip(results, batch["gt_bboxes"], batch["gt_labels"], strict=True):
        confident = res["scores"] >= min_score
        boxes, det_labels = res["boxes"][confident], res["labels"][confident]
        assert len(boxes) > 0, f"no detection above {min_score}: {res['scores'][:5]}"
        ious = bbox_overlaps(gts, boxes)  # [K, D]
        same_class = labels[:, None] == det_labels[None, :]
        best = (ious * same_class).max(dim=1).values
        assert (best > 0.5).all(), f"best same-class IoU per GT {best.tolist()}"
