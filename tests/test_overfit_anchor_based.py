"""Each anchor-based detector (tiny backbone, CPU) drives its loss down on two images and then detects them."""

from __future__ import annotations

import pytest
import torch

from labkit.boxes import bbox_overlaps
from labkit.heads.atss import atss
from labkit.heads.paa import paa
from labkit.heads.retina import retinanet

SIZE = 192
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])


def two_images() -> dict:
    """Two flat images with solid boxes, one colour per class, as ``labkit.data.collate`` makes them."""
    gts = [
        torch.tensor([[22.0, 30.0, 82.0, 90.0], [105.0, 45.0, 172.0, 150.0]]),
        torch.tensor([[45.0, 22.0, 150.0, 82.0], [15.0, 112.0, 68.0, 180.0], [112, 128, 158, 172]]),
    ]
    labels = [torch.tensor([0, 2]), torch.tensor([1, 3, 4])]
    imgs = torch.full((2, 3, SIZE, SIZE), -1.0)
    for i in range(2):
        for box, label in zip(gts[i], labels[i], strict=True):
            x1, y1, x2, y2 = box.int().tolist()
            imgs[i, :, y1:y2, x1:x2] = COLOURS[label][:, None, None] * 2 - 0.5
    meta = {
        "img_shape": (SIZE, SIZE),
        "pad_shape": (SIZE, SIZE),
        "ori_shape": (SIZE, SIZE),
        "scale_factor": (1.0, 1.0, 1.0, 1.0),
        "batch_input_shape": (SIZE, SIZE),
    }
    return {
        "img": imgs,
        "img_metas": [dict(meta, image_id=i) for i in range(2)],
        "gt_bboxes": [g.float() for g in gts],
        "gt_labels": labels,
        "gt_bboxes_ignore": [torch.zeros(0, 4), torch.zeros(0, 4)],
    }


def overfit(model, iters: int, lr: float = 1e-3) -> tuple[float, float]:
    torch.manual_seed(0)
    batch = two_images()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    first = last = None
    for _ in range(iters):
        losses = model.loss(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        first = float(total.detach()) if first is None else first
        last = float(total.detach())
    return first, last


def assert_detects(model, min_score: float = 0.3) -> None:
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "iters"),
    [(retinanet, 90), (atss, 80), (paa, 70)],
    ids=["retinanet", "atss", "paa"],
)
def test_overfit_two_images(recipe, iters):
    torch.manual_seed(0)
    model = recipe(5, backbone="tiny")
    first, last = overfit(model, iters)
    assert last < 0.35 * first, (first, last)
    assert_detects(model)
