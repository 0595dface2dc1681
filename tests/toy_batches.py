"""A tiny collated batch every overfit test shares: two flat images with solid boxes."""

from __future__ import annotations

import torch

SIZE = 192
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])


def two_images() -> dict:
    """Two ``SIZE`` x ``SIZE`` images with solid boxes, one colour per class (5 classes), as
    ``labkit.data.collate`` makes them: ``img`` Tensor[2, 3, SIZE, SIZE], 2 and 3 boxes."""
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
