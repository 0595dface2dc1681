"""Each anchor-free detector (tiny backbone, CPU) drives its loss down on two images and then detects them."""

from __future__ import annotations

import pytest
import torch

from labkit.boxes import bbox_overlaps
from labkit.heads.fcos import fcos
from labkit.heads.fovea import foveabox
from labkit.heads.fsaf import fsaf
from labkit.heads.reppoints import reppoints

SIZE = 192
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])


def two_images() -> dict:
    """Two flat images with solid boxes, one colour per class, collated like ``labkit.data.collate``."""
    gts = [
        torch.tensor([[22.0, 30.0, 82.0, 90.0], [105.0, 45.0, 172.0, 150.0]]),
        torch.tensor(
            [[45.0, 22.0, 150.0, 82.0], [15.0, 112.0, 68.0, 180.0], [112.0, 128.0, 158.0, 172.0]]
        ),
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
        "gt_bboxes": gts,
        "gt_labels": labels,
        "gt_bboxes_ignore": [torch.zeros(0, 4), torch.zeros(0, 4)],
    }


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
