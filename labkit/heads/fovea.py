"""FoveaBox: scale-range level assignment, sigma-shrunk positive "fovea", log-space targets, head and recipe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from labkit._validation import check_boxes, check_labels

FOVEA_BASE_EDGES = (16, 32, 64, 128, 256)
FOVEA_SCALE_RANGES = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))


def fovea_region(
    gt_bboxes: Tensor, stride: int, featmap_size: tuple[int, int], sigma: float = 0.4
) -> Tensor:
    """The cell rectangle of each GT's fovea (its centre shrunk by ``sigma``) on one level.

    Args:
        gt_bboxes: Tensor[K, 4] xyxy in image pixels.
        stride: the level's stride.
        featmap_size: (h, w) of the level.
        sigma: the fovea keeps the central ``sigma`` fraction of each side.

    Returns:
        LongTensor[K, 4] inclusive cell indices (col_left, row_top, col_right, row_bottom),
        clamped to the map; empty when left > right or top > bottom.
    """
    h, w = featmap_size
    b = gt_bboxes / stride
    half_w = 0.5 * (b[:, 2] - b[:, 0])
    half_h = 0.5 * (b[:, 3] - b[:, 1])
    # Cell (i, j) has its centre at j + 0.5 in level units, hence the -0.5.
    left = torch.ceil(b[:, 0] + (1 - sigma) * half_w - 0.5).long().clamp(0, w - 1)
    right = torch.floor(b[:, 0] + (1 + sigma) * half_w - 0.5).long().clamp(0, w - 1)
    top = torch.ceil(b[:, 1] + (1 - sigma) * half_h - 0.5).long().clamp(0, h - 1)
    down = torch.floor(b[:, 1] + (1 + sigma) * half_h - 0.5).long().clamp(0, h - 1)
    return torch.stack((left, top, right, down), -1)


def fovea_targets_single(
    gt_bboxes: Tensor,
    gt_labels: Tensor,
    featmap_sizes: Sequence[tuple[int, int]],
    priors: Sequence[Tensor],
    num_classes: int,
    strides: Sequence[int],
    base_edges: Sequence[int] = FOVEA_BASE_EDGES,
    scale_ranges: Sequence[tuple[float, float]] = FOVEA_SCALE_RANGES,
    sigma: float = 0.4,
) -> tuple[list[Tensor], list[Tensor]]:
    """FoveaBox targets of one image, per level.

    A GT goes to every level whose scale range holds sqrt(w * h) (both ends inclusive; the
    ranges overlap, so a GT may train two levels). On a level its fovea cells are positive;
    where foveas overlap, the smaller GT wins (mmdetection paints larger GTs first).

    Args:
        gt_bboxes: Tensor[K, 4] xyxy; gt_labels: LongTensor[K].
        featmap_sizes: per level (h, w).
        priors: per level Tensor[h * w, 2] cell centres (x, y) in pixels.
        num_classes: C (background label); strides, base_edges, scale_ranges: per level.
        sigma: fovea shrink factor.

    Returns:
        labels: per level LongTensor[h * w]; bbox_targets: per level Tensor[h * w, 4] =
        log(clamp(((x - x1), (y - y1), (x2 - x), (y2 - y)) / base_edge, 1/16, 16)), 0 on
        background (log 1).
    """
    areas = torch.sqrt((gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1]))
    labels_lvl, targets_lvl = [], []
    for base_len, (low, high), stride, size, pri in zip(
        base_edges, scale_ranges, strides, featmap_sizes, priors
    ):
        h, w = size
        labels = gt_labels.new_full((h * w,), num_classes)
        targets = gt_bboxes.new_ones((h * w, 4))
        hit = ((areas >= low) & (areas <= high)).nonzero().flatten()
        if len(hit) > 0:
            # Painting order of mmdetection: largest first, so the smallest ends on top.
            _, order = torch.sort(-areas[hit])
            hit = hit[order]
            region = fovea_region(gt_bboxes[hit], stride, size, sigma)  # [H, 4]
            rows = torch.arange(h, device=gt_bboxes.device).repeat_interleave(w)
            cols = torch.arange(w, device=gt_bboxes.device).repeat(h)
            inside = (
                (cols[:, None] >= region[None, :, 0])
                & (cols[:, None] <= region[None, :, 2])
                & (rows[:, None] >= region[None, :, 1])
                & (rows[:, None] <= region[None, :, 3])
            )  # [h*w, H]
            rank = torch.arange(len(hit), device=gt_bboxes.device)
            last = torch.where(inside, rank[None], rank.new_tensor(-1)).max(dim=1).values
            pos = last >= 0
            gt_idx = hit[last[pos]]
            labels[pos] = gt_labels[gt_idx]
            x, y = pri[pos, 0], pri[pos, 1]
            g = gt_bboxes[gt_idx]
            targets[pos] = (
                torch.stack((x - g[:, 0], y - g[:, 1], g[:, 2] - x, g[:, 3] - y), -1) / base_len
            )
            targets = targets.clamp(min=1.0 / 16, max=16.0)
        labels_lvl.append(labels)
        targets_lvl.append(torch.log(targets))
    return labels_lvl, targets_lvl


def fovea_targets(
    gt_bboxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    featmap_sizes: Sequence[tuple[int, int]],
    priors: Sequence[Tensor],
    num_classes: int,
    strides: Sequence[int],
    base_edges: Sequence[int] = FOVEA_BASE_EDGES,
    scale_ranges: Sequence[tuple[float, float]] = FOVEA_SCALE_RANGES,
    sigma: float = 0.4,
) -> tuple[Tensor, Tensor]:
    """FoveaBox targets for a batch, flattened level-major then image-major.

    Returns:
        labels: LongTensor[sum_l B * h_l * w_l]; bbox_targets: Tensor[same, 4] (log space),
        in the order of per-level predictions flattened with ``permute(0, 2, 3, 1)``.
    """
    if len(gt_bboxes) != len(gt_labels):
        raise ValueError(
            f"gt_labels: expected one tensor per image ({len(gt_bboxes)}), got {len(gt_labels)}"
        )
    if not (
        len(featmap_sizes) == len(priors) == len(strides) == len(base_edges) == len(scale_ranges)
    ):
        raise ValueError(
            "featmap_sizes: priors, strides, base_edges and scale_ranges need one entry per level, got "
            f"{len(featmap_sizes)}, {len(priors)}, {len(strides)}, {len(base_edges)}, {len(scale_ranges)}"
        )
    for i, (b, lab) in enumerate(zip(gt_bboxes, gt_labels)):
        check_boxes(b, f"gt_bboxes[{i}]")
        check_labels(lab, f"gt_labels[{i}]", b.shape[0], num_classes)
    per_image = [
        fovea_targets_single(
            b, lab, featmap_sizes, priors, num_classes, strides, base_edges, scale_ranges, sigma
        )
        for b, lab in zip(gt_bboxes, gt_labels)
    ]
    labels = torch.cat(
        [torch.cat([img[0][lvl] for img in per_image]) for lvl in range(len(priors))]
    )
    targets = torch.cat(
        [torch.cat([img[1][lvl] for img in per_image]) for lvl in range(len(priors))]
    )
    return labels, targets


def fovea_decode(
    priors: Tensor, bbox_pred: Tensor, base_len: float, max_shape: tuple[int, int]
) -> Tensor:
    """Boxes from log-space FoveaBox predictions, clipped to ``[0, w-1] x [0, h-1]`` as mmdetection.

    Args:
        priors: Tensor[N, 2] (x, y); bbox_pred: Tensor[N, 4] log distances / base_len.
        base_len: the level's base edge; max_shape: (h, w) of the image.

    Returns:
        Tensor[N, 4] xyxy.
    """
    d = bbox_pred.exp() * base_len
    x, y = priors[:, 0], priors[:, 1]
    x1 = (x - d[:, 0]).clamp(min=0, max=max_shape[1] - 1)
    y1 = (y - d[:, 1]).clamp(min=0, max=max_shape[0] - 1)
    x2 = (x + d[:, 2]).clamp(min=0, max=max_shape[1] - 1)
    y2 = (y + d[:, 3]).clamp(min=0, max=max_shape[0] - 1)
    return torch.stack((x1, y1, x2, y2), -1)
