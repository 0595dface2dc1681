"""Each anchor-free detector (tiny backbone, CPU) drives its loss down on two images and then detects them."""

from __future__ import annotations

import pytest
import torch
from toy_batches import two_images

from labkit.boxes import bbox_overlaps
from labkit.heads.fcos import fcos
from labkit.heads.fovea import foveabox
from labkit.heads.fsaf import fsaf
from labkit.heads.reppoints import reppoints


def overfit(model, iters: int, lr: float, max_norm: float | None = None) -> tuple[float, float]:
    torch.manual_seed(0)
    batch = two_images()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    first = last = None
    for _ in range(iters):
        losses = model.loss(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        if max_norm is not None:  # mmdetection trains FSAF and RepPoints with grad_clip max_norm 10
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        first = float(total.detach()) if first is None else first
        last = float(total.detach())
    return first, last


def assert_detects(model, min_score: float) -> None:
    batch = two_images()
    model.eval()
    for res, gts, labels in zip(
        model.predict(batch), batch["gt_bboxes"], batch["gt_labels"], strict=True
    ):
        keep = res["scores"] >= min_score
        boxes, det_labels = res["boxes"][keep], res["labels"][keep]
        assert len(boxes) > 0, f"no detection above {min_score}: {res['scores'][:5]}"
        same_class = labels[:, None] == det_labels[None, :]
        best = (bbox_overlaps(gts, boxes) * same_class).max(dim=1).values
        assert (best > 0.5).all(), f"best same-class IoU per GT {best.tolist()}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "kwargs", "iters", "lr", "max_norm", "min_score"),
    [
        (fcos, {}, 80, 2e-3, None, 0.2),
        (foveabox, {}, 100, 2e-3, 10.0, 0.3),
        (fsaf, {}, 120, 3e-3, 10.0, 0.3),
        # Deformable convolution is slow on CPU: a narrower head keeps the test short.
        (reppoints, {"feat_channels": 16}, 120, 3e-3, 10.0, 0.3),
    ],
    ids=["fcos", "foveabox", "fsaf", "reppoints"],
)
def test_overfit_two_images(recipe, kwargs, iters, lr, max_norm, min_score):
    torch.manual_seed(0)
    model = recipe(5, backbone="tiny", **kwargs)
    first, last = overfit(model, iters, lr, max_norm)
    assert last < 0.35 * first, (first, last)
    assert_detects(model, min_score)
