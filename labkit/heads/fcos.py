"""FCOS: per-point targets (regress ranges, center sampling, smallest-area ambiguity), centerness, head and recipe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from labkit._validation import check_boxes, check_labels, check_tensor

# mmdetection's "infinite" upper bound of the last regress range.
INF = 1e8
FCOS_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


def fcos_targets_single(
    points: Tensor,
    gt_bboxes: Tensor,
    gt_labels: Tensor,
    regress_ranges: Tensor,
    point_strides: Tensor,
    num_classes: int,
    center_sampling: bool = False,
    center_sample_radius: float = 1.5,
) -> tuple[Tensor, Tensor]:
    """FCOS targets of one image for points of all levels at once (no loop over GTs).

    A point is a candidate for a GT when it lies strictly inside the GT (or, with center
    sampling, strictly inside the GT's centre box of half-size ``stride * radius`` clipped to
    the GT) and the largest of its four distances lies in its level's regress range (both
    ends inclusive). A point claimed by several GTs takes the one of smallest area.

    Args:
        points: Tensor[N, 2] (x, y) of every point, levels concatenated.
        gt_bboxes: Tensor[K, 4] xyxy.
        gt_labels: LongTensor[K] in 0..num_classes-1.
        regress_ranges: Tensor[N, 2] (low, high) of each point's level.
        point_strides: Tensor[N] stride of each point's level (only used by center sampling).
        num_classes: C; background points get label C.
        center_sampling: restrict positives to the centre region.
        center_sample_radius: centre region half-size in units of the level's stride.

    Returns:
        labels: LongTensor[N] (C = background), bbox_targets: Tensor[N, 4] (l, t, r, b) in
        pixels of the GT each point was given (zeros when there is no GT).
    """
    num_points, num_gts = points.size(0), gt_bboxes.size(0)
    if num_gts == 0:
        return (
            gt_labels.new_full((num_points,), num_classes),
            gt_bboxes.new_zeros((num_points, 4)),
        )
    areas = (gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1])
    areas = areas[None].repeat(num_points, 1)  # [N, K]
    xs = points[:, 0, None]  # [N, 1]
    ys = points[:, 1, None]
    left = xs - gt_bboxes[None, :, 0]
    top = ys - gt_bboxes[None, :, 1]
    right = gt_bboxes[None, :, 2] - xs
    bottom = gt_bboxes[None, :, 3] - ys
    bbox_targets = torch.stack((left, top, right, bottom), -1)  # [N, K, 4]

    if center_sampling:
        cx = (gt_bboxes[:, 0] + gt_bboxes[:, 2]) / 2
        cy = (gt_bboxes[:, 1] + gt_bboxes[:, 3]) / 2
        radius = (point_strides * center_sample_radius)[:, None]  # [N, 1]
        # The centre box is clipped to the GT so small objects keep only their inside points.
        cx1 = torch.maximum(cx[None] - radius, gt_bboxes[None, :, 0])
        cy1 = torch.maximum(cy[None] - radius, gt_bboxes[None, :, 1])
        cx2 = torch.minimum(cx[None] + radius, gt_bboxes[None, :, 2])
        cy2 = torch.minimum(cy[None] + radius, gt_bboxes[None, :, 3])
        center_dist = torch.stack((xs - cx1, ys - cy1, cx2 - xs, cy2 - ys), -1)
        inside_gt = center_dist.min(-1).values > 0
    else:
        inside_gt = bbox_targets.min(-1).values > 0  # strictly inside: edges are outside

    max_regress_distance = bbox_targets.max(-1).values
    inside_regress_range = (max_regress_distance >= regress_ranges[:, None, 0]) & (
        max_regress_distance <= regress_ranges[:, None, 1]
    )
    areas[~inside_gt] = INF
    areas[~inside_regress_range] = INF
    min_area, min_area_inds = areas.min(dim=1)
    labels = gt_labels[min_area_inds]
    labels[min_area == INF] = num_classes
    bbox_targets = bbox_targets[torch.arange(num_points, device=points.device), min_area_inds]
    return labels, bbox_targets


def fcos_targets(
    points: Sequence[Tensor],
    gt_bboxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    num_classes: int,
    strides: Sequence[int],
    regress_ranges: Sequence[tuple[float, float]] = FCOS_REGRESS_RANGES,
    center_sampling: bool = False,
    center_sample_radius: float = 1.5,
    norm_on_bbox: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """FCOS classification and regression targets for a batch, grouped by level.

    Args:
        points: per level Tensor[N_l, 2] (x, y), finest stride first.
        gt_bboxes: per image Tensor[K_i, 4] xyxy.
        gt_labels: per image LongTensor[K_i].
        num_classes: C (background label).
        strides: per level stride.
        regress_ranges: per level (low, high) bounds on max(l, t, r, b).
        center_sampling, center_sample_radius: see ``fcos_targets_single``.
        norm_on_bbox: divide the regression targets by the level's stride.

    Returns:
        labels: per level LongTensor[B * N_l] (images concatenated, image-major),
        bbox_targets: per level Tensor[B * N_l, 4] (l, t, r, b).
    """
    if len(points) != len(regress_ranges) or len(points) != len(strides):
        raise ValueError(
            f"points: expected one tensor per level ({len(regress_ranges)} regress ranges, "
            f"{len(strides)} strides), got {len(points)}"
        )
    if len(gt_bboxes) != len(gt_labels):
        raise ValueError(
            f"gt_labels: expected one tensor per image ({len(gt_bboxes)}), got {len(gt_labels)}"
        )
    for lvl, p in enumerate(points):
        check_tensor(p, f"points[{lvl}]")
        if p.dim() != 2 or p.shape[1] < 2:
            raise ValueError(f"points[{lvl}]: expected shape [N, 2], got {tuple(p.shape)}")
    for i, (b, lab) in enumerate(zip(gt_bboxes, gt_labels)):
        check_boxes(b, f"gt_bboxes[{i}]")
        if b.dim() != 2:
            raise ValueError(f"gt_bboxes[{i}]: expected shape [K, 4], got {tuple(b.shape)}")
        check_labels(lab, f"gt_labels[{i}]", b.shape[0], num_classes)

    num_points = [p.size(0) for p in points]
    concat_points = torch.cat([p[:, :2] for p in points])
    concat_ranges = torch.cat(
        [p.new_tensor(r)[None].expand(p.size(0), 2) for p, r in zip(points, regress_ranges)]
    )
    concat_strides = torch.cat(
        [p.new_full((p.size(0),), float(s)) for p, s in zip(points, strides)]
    )
    per_image = [
        fcos_targets_single(
            concat_points,
            b.to(concat_points),
            lab,
            concat_ranges,
            concat_strides,
            num_classes,
            center_sampling,
            center_sample_radius,
        )
        for b, lab in zip(gt_bboxes, gt_labels)
    ]
    labels_lvl, targets_lvl = [], []
    for lvl in range(len(points)):
        labels_lvl.append(torch.cat([lab.split(num_points)[lvl] for lab, _ in per_image]))
        t = torch.cat([tgt.split(num_points)[lvl] for _, tgt in per_image])
        targets_lvl.append(t / strides[lvl] if norm_on_bbox else t)
    return labels_lvl, targets_lvl


def centerness_target(bbox_targets: Tensor) -> Tensor:
    """Centerness of positive points: sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)).

    Args:
        bbox_targets: Tensor[P, 4] (l, t, r, b) of positive points (all > 0, else NaN/inf).

    Returns:
        Tensor[P] in (0, 1]; 1 at the exact centre of the box.
    """
    left_right = bbox_targets[:, [0, 2]]
    top_bottom = bbox_targets[:, [1, 3]]
    if len(left_right) == 0:
        return left_right[:, 0]
    ratio = (left_right.min(-1).values / left_right.max(-1).values) * (
        top_bottom.min(-1).values / top_bottom.max(-1).values
    )
    return torch.sqrt(ratio)
