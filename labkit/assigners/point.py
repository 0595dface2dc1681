"""PointAssigner (RepPoints' init stage): each GT takes the ``pos_num`` points nearest its centre on its own level."""

from __future__ import annotations

import torch
from torch import Tensor

from labkit._validation import check_boxes, check_tensor
from labkit.assigners.base import AssignResult


def _levels(
    points: Tensor, gt_bboxes: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Level of every point (log2 stride) and every GT (mean log2 of w/scale, h/scale, clamped)."""
    points_lvl = torch.log2(points[:, 2]).int()
    gt_xy = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]) / 2
    gt_wh = (gt_bboxes[:, 2:] - gt_bboxes[:, :2]).clamp(min=1e-6)
    # .int() truncates toward zero, as mmdetection does (not floor).
    gt_lvl = ((torch.log2(gt_wh[:, 0] / scale) + torch.log2(gt_wh[:, 1] / scale)) / 2).int()
    gt_lvl = gt_lvl.clamp(min=int(points_lvl.min()), max=int(points_lvl.max()))
    return points_lvl, gt_lvl, gt_xy, gt_wh


def _result(gt_inds: Tensor, gt_labels: Tensor | None, num_gts: int) -> AssignResult:
    labels = None
    if gt_labels is not None:
        labels = gt_inds.new_full(gt_inds.shape, -1)
        pos = gt_inds > 0
        labels[pos] = gt_labels[gt_inds[pos] - 1]
    # mmdetection's PointAssigner gives no overlaps.
    return AssignResult(num_gts=num_gts, gt_inds=gt_inds, max_overlaps=None, labels=labels)


class PointAssigner:
    """Assign GTs to points by normalised centre distance, one FPN level per GT (mmdetection 3.x).

    A GT of size (w, h) lives on level ``int((log2(w / scale) + log2(h / scale)) / 2)`` clamped
    to the levels present; on that level its ``pos_num`` nearest points (distance
    ``||(p - c) / (w, h)||``) are candidates, and a point claimed by several GTs goes to the
    nearest one (the earlier GT on an exact tie). Everything else is negative (0); nothing
    is ignored.

    Args:
        scale: box size of level 0 (RepPoints: 4, so a 32x32 box has level
            log2(32 / 4) = 3, the stride-8 map).
        pos_num: positives per GT.
    """

    def __init__(self, scale: float = 4, pos_num: int = 3) -> None:
        if pos_num < 1:
            raise ValueError(f"pos_num: expected >= 1, got {pos_num}")
        self.scale = scale
        self.pos_num = pos_num

    def assign(
        self,
        points: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor | None = None,
        gt_bboxes_ignore: Tensor | None = None,
    ) -> AssignResult:
        """Assign GTs to points.

        Args:
            points: Tensor[N, 3 or 4] (x, y, stride[, stride_h]); stride a power of two.
            gt_bboxes: Tensor[K, 4] xyxy; gt_labels: LongTensor[K] or None.
            gt_bboxes_ignore: accepted for interface parity and unused (as in mmdetection).

        Returns:
            AssignResult with ``gt_inds`` (0 negative, k >= 1 positive), ``labels`` and
            ``max_overlaps=None``.
        """
        check_tensor(points, "points")
        if points.dim() != 2 or points.shape[1] < 3:
            raise ValueError(
                f"points: expected shape [N, 3] (x, y, stride), got {tuple(points.shape)}"
            )
        check_boxes(gt_bboxes, "gt_bboxes")
        num_points, num_gts = points.shape[0], gt_bboxes.shape[0]
        gt_inds = points.new_zeros((num_points,), dtype=torch.long)
        if num_gts == 0 or num_points == 0:
            return _result(gt_inds, gt_labels, num_gts)
        points_lvl, gt_lvl, gt_xy, gt_wh = _levels(points, gt_bboxes, self.scale)
        cand = points.new_full((num_gts, num_points), float("inf"))  # [K, N]
        for lvl in torch.unique(gt_lvl).tolist():
            # One top-k per level over that level's points only, as the reference does.
            p_idx = (points_lvl == lvl).nonzero().flatten()
            g_idx = (gt_lvl == lvl).nonzero().flatten()
            d = ((points[p_idx, None, :2] - gt_xy[None, g_idx]) / gt_wh[None, g_idx]).norm(dim=-1)
            k = min(self.pos_num, len(p_idx))
            min_d, arg = d.t().topk(k, dim=1, largest=False)  # [K_l, k]
            rows = cand[g_idx]
            rows.scatter_(1, p_idx[arg], min_d)
            cand[g_idx] = rows
        best = cand.min(dim=0).values  # [N]
        gt_range = torch.arange(num_gts, device=points.device)[:, None]
        # Nearest GT wins; an exact tie keeps the earlier GT (the reference's strict "<").
        first = torch.where(cand == best[None], gt_range, num_gts).min(dim=0).values
        pos = torch.isfinite(best)
        gt_inds[pos] = first[pos] + 1
        return _result(gt_inds, gt_labels, num_gts)


def point_assign_reference(
    points: Tensor, gt_bboxes: Tensor, gt_labels: Tensor | None, scale: float = 4, pos_num: int = 3
) -> AssignResult:
    """Loop-over-GTs reference of :class:`PointAssigner` (mmdetection's algorithm step by step)."""
    num_points, num_gts = points.shape[0], gt_bboxes.shape[0]
    gt_inds = points.new_zeros((num_points,), dtype=torch.long)
    if num_gts == 0 or num_points == 0:
        return _result(gt_inds, gt_labels, num_gts)
    points_lvl, gt_lvl, gt_xy, gt_wh = _levels(points, gt_bboxes, scale)
    assigned_dist = points.new_full((num_points,), float("inf"))
    index = torch.arange(num_points, device=points.device)
    for i in range(num_gts):
        in_lvl = points_lvl == gt_lvl[i]
        lvl_index = index[in_lvl]
        dist = ((points[in_lvl, :2] - gt_xy[[i]]) / gt_wh[[i]]).norm(dim=1)
        min_dist, min_idx = torch.topk(dist, pos_num, largest=False)
        chosen = lvl_index[min_idx]
        closer = min_dist < assigned_dist[chosen]
        gt_inds[chosen[closer]] = i + 1
        assigned_dist[chosen[closer]] = min_dist[closer]
    return _result(gt_inds, gt_labels, num_gts)
