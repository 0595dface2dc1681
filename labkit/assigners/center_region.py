"""CenterRegionAssigner (FSAF): priors whose centre is in a GT's central "effective" box are positive, the ring around it is ignored for that GT's class."""

from __future__ import annotations

import torch
from torch import Tensor

from labkit._validation import check_boxes
from labkit.assigners.base import AssignResult
from labkit.boxes import bbox_overlaps


def scale_boxes(bboxes: Tensor, scale: float) -> Tensor:
    """Boxes Tensor[M, 4] shrunk (scale < 1) or grown about their centres; same shape."""
    half_w = (bboxes[:, 2] - bboxes[:, 0]) * 0.5 * scale
    half_h = (bboxes[:, 3] - bboxes[:, 1]) * 0.5 * scale
    cx = (bboxes[:, 2] + bboxes[:, 0]) * 0.5
    cy = (bboxes[:, 3] + bboxes[:, 1]) * 0.5
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), -1)


def points_in_boxes(points: Tensor, bboxes: Tensor) -> Tensor:
    """BoolTensor[M, N]: point (x, y) strictly inside box (edges excluded)."""
    x, y = points[:, 0, None], points[:, 1, None]
    return (
        (x > bboxes[None, :, 0])
        & (x < bboxes[None, :, 2])
        & (y > bboxes[None, :, 1])
        & (y < bboxes[None, :, 3])
    )


class CenterRegionAssigner:
    """FSAF's pixel assignment (mmdetection 3.x ``CenterRegionAssigner``).

    A prior is in a GT's *core* when its centre lies strictly inside the GT and its IoF with
    the GT shrunk by ``pos_scale`` exceeds ``min_pos_iof``; in the GT's *shadow* when its IoF
    with the GT shrunk by ``neg_scale`` exceeds ``min_pos_iof`` and it is not in the core. A
    prior in several cores goes to the smallest GT; the other cores it is in become shadows.
    Shadowed priors stay negative but their (prior, class) pair is ignored by the loss; with
    ``foreground_dominate=False`` a positive prior shadowed for its own class becomes
    negative. Priors whose centre is inside an ignore box shrunk by ``ignore_gt_scale`` get
    ``gt_inds = -1``.

    Args:
        pos_scale, neg_scale: core and shadow box scales (FSAF: 0.2 and 0.2).
        min_pos_iof: IoF threshold (FSAF: 0.01).
        ignore_gt_scale: scale of ignore boxes.
        foreground_dominate: keep a prior positive when it is also shadowed for its class.
    """

    def __init__(
        self,
        pos_scale: float,
        neg_scale: float,
        min_pos_iof: float = 1e-2,
        ignore_gt_scale: float = 0.5,
        foreground_dominate: bool = False,
    ) -> None:
        self.pos_scale = pos_scale
        self.neg_scale = neg_scale
        self.min_pos_iof = min_pos_iof
        self.ignore_gt_scale = ignore_gt_scale
        self.foreground_dominate = foreground_dominate

    def assign(
        self,
        priors: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor,
        gt_bboxes_ignore: Tensor | None = None,
    ) -> AssignResult:
        """Assign priors Tensor[N, 4] to gt_bboxes Tensor[K, 4] with gt_labels LongTensor[K].

        Returns:
            AssignResult (``max_overlaps=None``) with an extra attribute ``shadowed_labels``:
            LongTensor[S, 2] rows (prior index, class label) to ignore in the classification
            loss.
        """
        check_boxes(priors, "priors")
        check_boxes(gt_bboxes, "gt_bboxes")
        num_gts, num_priors = gt_bboxes.size(0), priors.size(0)
        gt_core = scale_boxes(gt_bboxes, self.pos_scale)
        gt_shadow = scale_boxes(gt_bboxes, self.neg_scale)
        centers = (priors[:, 2:4] + priors[:, 0:2]) / 2
        in_core = points_in_boxes(centers, gt_bboxes) & (
            bbox_overlaps(priors, gt_core, mode="iof") > self.min_pos_iof
        )
        in_shadow = (bbox_overlaps(priors, gt_shadow, mode="iof") > self.min_pos_iof) & ~in_core

        if num_gts == 0 or num_priors == 0:
            gt_inds = priors.new_zeros((num_priors,), dtype=torch.long)
            shadowed = gt_inds.new_empty((0, 2))
        else:
            gt_inds, shadowed = self._one_hot_gt_inds(
                in_core, in_shadow, self.gt_priorities(gt_bboxes)
            )

        if gt_bboxes_ignore is not None and gt_bboxes_ignore.numel() > 0:
            ignore = scale_boxes(gt_bboxes_ignore, self.ignore_gt_scale)
            gt_inds[points_in_boxes(centers, ignore).any(dim=1)] = -1

        labels = gt_inds.new_full((num_priors,), -1)
        pos = gt_inds > 0
        labels[pos] = gt_labels[gt_inds[pos] - 1]
        shadowed_labels = shadowed.clone()
        if shadowed.numel() > 0:
            pixel, gt = shadowed[:, 0], shadowed[:, 1]
            shadowed_labels[:, 1] = gt_labels[gt - 1]
            override = labels[pixel] == shadowed_labels[:, 1]
            if self.foreground_dominate:
                shadowed_labels = shadowed_labels[~override]
            else:
                labels[pixel[override]] = -1
                gt_inds[pixel[override]] = 0
        result = AssignResult(num_gts=num_gts, gt_inds=gt_inds, max_overlaps=None, labels=labels)
        result.shadowed_labels = shadowed_labels
        return result

    @staticmethod
    def gt_priorities(gt_bboxes: Tensor) -> Tensor:
        """LongTensor[K]: rank of each GT by area, larger rank = smaller area = higher priority."""
        areas = (gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1])
        _, sort_idx = areas.sort(descending=True)
        return sort_idx.argsort()

    @staticmethod
    def _one_hot_gt_inds(
        in_core: Tensor, in_shadow: Tensor, priority: Tensor
    ) -> tuple[Tensor, Tensor]:
        """gt_inds LongTensor[N] (1-based) and shadowed (prior, gt 1-based) pairs LongTensor[S, 2]."""
        num_priors, num_gts = in_core.shape
        gt_inds = in_core.new_zeros((num_priors,), dtype=torch.long)
        shadowed = torch.nonzero(in_shadow)
        if in_core.sum() == 0:
            shadowed[:, 1] += 1
            return gt_inds, shadowed
        pair_priority = torch.where(in_core, priority[None].expand(num_priors, num_gts), -1)
        matched = in_core.any(dim=1)
        argmax = pair_priority[matched].max(dim=1).indices
        gt_inds[matched] = argmax + 1
        # Cores a prior is in but did not win are shadows of those GTs.
        losing = in_core.clone()
        losing[matched.nonzero().flatten(), argmax] = False
        shadowed = torch.cat((shadowed, torch.nonzero(losing)), dim=0)
        if shadowed.numel() > 0:
            shadowed[:, 1] += 1
        return gt_inds, shadowed
