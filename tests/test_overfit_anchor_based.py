"""Each anchor-based detector (tiny backbone, CPU) drives its loss down on two images and then detects them."""

from __future__ import annotations

import pytest
import torch
from toy_batches import two_images

from labkit.boxes import bbox_overlaps
from labkit.heads.atss import atss
from labkit.heads.paa import paa
from labkit.heads.retina import retinanet


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
