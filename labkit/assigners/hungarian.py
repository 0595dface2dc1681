"""One-to-one Hungarian matching of DETR queries to ground truths (mmdetection's HungarianAssigner).

The cost of giving query ``i`` ground truth ``j`` is a weighted sum of a classification
cost, an L1 distance between normalized ``(cx, cy, w, h)`` boxes and ``-GIoU`` of absolute
``(x1, y1, x2, y2)`` boxes; scipy's ``linear_sum_assignment`` picks the matching of least
total cost. Costs are computed for a whole batch at once (ground truths padded to the
largest count); only the assignment itself runs per image, on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from labkit._validation import check_boxes, check_labels, check_tensor
from labkit.assigners.base import AssignResult
from labkit.boxes import bbox_overlaps, bbox_xyxy_to_cxcywh

__all__ = [
    "BBoxL1Cost",
    "ClassificationCost",
    "FocalLossCost",
    "HungarianAssigner",
    "IoUCost",
]


@dataclass
class FocalLossCost:
    """Focal-loss classification cost: ``pos_cost[label] - neg_cost[label]`` of each query.

    ``pos = -alpha * (1 - p)^gamma * log(p + eps)``, ``neg = -(1 - alpha) * p^gamma *
    log(1 - p + eps)`` with ``p = sigmoid(logit)``: the loss a query would lose by calling
    that ground truth's class positive instead of negative.
    """

    weight: float = 1.0
    alpha: float = 0.25
    gamma: float = 2.0
    eps: float = 1e-12

    def __call__(self, cls_scores: Tensor, gt_labels: Tensor) -> Tensor:
        """``cls_scores: Tensor[B, N, C]`` logits, ``gt_labels: LongTensor[B, K]`` -> ``[B, N, K]``."""
        prob = cls_scores.sigmoid()
        neg = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
        pos = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
        index = gt_labels[:, None, :].expand(-1, prob.shape[1], -1)
        return (pos.gather(2, index) - neg.gather(2, index)) * self.weight


@dataclass
class ClassificationCost:
    """Softmax classification cost ``-softmax(logits)[label]`` (DETR with cross-entropy)."""

    weight: float = 1.0

    def __call__(self, cls_scores: Tensor, gt_labels: Tensor) -> Tensor:
        """``cls_scores: Tensor[B, N, C(+1)]``, ``gt_labels: LongTensor[B, K]`` -> ``[B, N, K]``."""
        prob = cls_scores.softmax(-1)
        index = gt_labels[:, None, :].expand(-1, prob.shape[1], -1)
        return -prob.gather(2, index) * self.weight


@dataclass
class BBoxL1Cost:
    """L1 distance between boxes normalized by the image size.

    ``box_format="xywh"`` compares ``(cx, cy, w, h)`` (Deformable-DETR), ``"xyxy"`` corners.
    """

    weight: float = 1.0
    box_format: str = "xyxy"

    def __post_init__(self) -> None:
        if self.box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format: expected 'xyxy' or 'xywh', got {self.box_format!r}")

    def __call__(self, pred_bboxes: Tensor, gt_bboxes: Tensor, factors: Tensor) -> Tensor:
        """Absolute xyxy ``pred: [B, N, 4]``, ``gt: [B, K, 4]``, ``factors: [B, 1, 4]`` -> ``[B, N, K]``."""
        pred = pred_bboxes / factors
        gt = gt_bboxes / factors
        if self.box_format == "xywh":
            pred, gt = bbox_xyxy_to_cxcywh(pred), bbox_xyxy_to_cxcywh(gt)
        return torch.cdist(pred, gt, p=1) * self.weight


@dataclass
class IoUCost:
    """``-IoU`` (or ``-GIoU`` with ``iou_mode="giou"``) of absolute xyxy boxes."""

    weight: float = 1.0
    iou_mode: str = "giou"

    def __call__(self, pred_bboxes: Tensor, gt_bboxes: Tensor, factors: Tensor) -> Tensor:
        """Absolute xyxy ``pred: [B, N, 4]``, ``gt: [B, K, 4]`` -> ``[B, N, K]``."""
        overlaps = bbox_overlaps(pred_bboxes, gt_bboxes, mode=self.iou_mode, check=False)
        return -overlaps * self.weight


class HungarianAssigner:
    """Match each ground truth to exactly one query; all other queries are negatives.

    Args:
        match_costs: the cost terms, summed (mmdetection 3.x's ``match_costs`` list):
            classification costs (:class:`FocalLossCost`, :class:`ClassificationCost`) and box
            costs (:class:`BBoxL1Cost`, :class:`IoUCost`) in any number and order. ``None``
            gives Deformable-DETR's ``[FocalLossCost(weight=2.0), BBoxL1Cost(weight=5.0,
            box_format="xywh"), IoUCost(iou_mode="giou", weight=2.0)]``.
    """

    def __init__(self, match_costs: Sequence[object] | None = None) -> None:
        if match_costs is None:
            match_costs = [
                FocalLossCost(weight=2.0),
                BBoxL1Cost(weight=5.0, box_format="xywh"),
                IoUCost(iou_mode="giou", weight=2.0),
            ]
        kinds = (FocalLossCost, ClassificationCost, BBoxL1Cost, IoUCost)
        for i, cost in enumerate(match_costs):
            if not isinstance(cost, kinds):
                raise TypeError(
                    f"match_costs[{i}]: expected one of {[k.__name__ for k in kinds]}, "
                    f"got {type(cost).__name__}"
                )
        if not match_costs:
            raise ValueError("match_costs: expected at least one cost")
        self.match_costs = list(match_costs)

    def cost_matrix(
        self,
        cls_scores: Tensor,
        pred_bboxes: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor,
        img_shapes: Tensor,
    ) -> Tensor:
        """Batched matching cost.

        Args:
            cls_scores: Tensor[B, N, C] logits.
            pred_bboxes: Tensor[B, N, 4] absolute xyxy.
            gt_bboxes: Tensor[B, K, 4] absolute xyxy (padded with any valid box).
            gt_labels: LongTensor[B, K] (padded with any valid label).
            img_shapes: Tensor[B, 2] ``(h, w)`` of each unpadded image.

        Returns:
            Tensor[B, N, K]; entries for padded ground truths are meaningless.
        """
        h, w = img_shapes[:, 0], img_shapes[:, 1]
        factors = torch.stack([w, h, w, h], -1)[:, None, :].to(pred_bboxes)  # [B, 1, 4]
        cost = pred_bboxes.new_zeros(pred_bboxes.shape[0], pred_bboxes.shape[1], gt_bboxes.shape[1])
        for term in self.match_costs:
            if isinstance(term, FocalLossCost | ClassificationCost):
                cost = cost + term(cls_scores, gt_labels)
            else:
                cost = cost + term(pred_bboxes, gt_bboxes, factors)
        return cost

    @torch.no_grad()
    def assign_batch(
        self,
        cls_scores: Tensor,
        pred_bboxes: Tensor,
        gt_bboxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        img_shapes: Sequence[Sequence[int]],
    ) -> list[AssignResult]:
        """Assign every image of a batch (costs in one batched pass).

        Args:
            cls_scores: Tensor[B, N, C] classification logits.
            pred_bboxes: Tensor[B, N, 4] predicted boxes, absolute xyxy of each image.
            gt_bboxes: B tensors Tensor[K_i, 4] absolute xyxy.
            gt_labels: B tensors LongTensor[K_i].
            img_shapes: B ``(h, w)`` of the unpadded images.

        Returns:
            One :class:`AssignResult` per image: ``gt_inds`` 0 for unmatched queries, ``k``
            (1-based) for the query matched to GT ``k - 1``; ``labels`` -1 or that GT's label;
            ``max_overlaps`` is ``None`` (as in mmdetection).
        """
        check_tensor(cls_scores, "cls_scores")
        check_tensor(pred_bboxes, "pred_bboxes")
        if cls_scores.dim() != 3 or pred_bboxes.shape != (*cls_scores.shape[:2], 4):
            raise ValueError(
                f"cls_scores, pred_bboxes: expected [B, N, C] and [B, N, 4], got "
                f"{tuple(cls_scores.shape)} and {tuple(pred_bboxes.shape)}"
            )
        bs, num_preds, _ = cls_scores.shape
        if not len(gt_bboxes) == len(gt_labels) == len(img_shapes) == bs:
            raise ValueError(
                f"gt_bboxes, gt_labels, img_shapes: expected {bs} entries each, got "
                f"{len(gt_bboxes)}, {len(gt_labels)} and {len(img_shapes)}"
            )
        for i in range(bs):
            check_boxes(gt_bboxes[i], f"gt_bboxes[{i}]")
            check_labels(gt_labels[i], f"gt_labels[{i}]", len(gt_bboxes[i]), cls_scores.shape[2])
        counts = [len(b) for b in gt_bboxes]
        kmax = max(counts, default=0)
        device = cls_scores.device
        cost = None
        if kmax > 0 and num_preds > 0:
            # Pad with a unit box and label 0; the padded columns are cut off below.
            pad_boxes = pred_bboxes.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(bs, kmax, 4).clone()
            pad_labels = torch.zeros(bs, kmax, dtype=torch.long, device=device)
            for i, (b, lab) in enumerate(zip(gt_bboxes, gt_labels, strict=True)):
                pad_boxes[i, : len(b)] = b
                pad_labels[i, : len(lab)] = lab
            shapes = torch.as_tensor(
                [tuple(s)[:2] for s in img_shapes], dtype=torch.float32, device=device
            )
            cost = self.cost_matrix(cls_scores, pred_bboxes, pad_boxes, pad_labels, shapes)
            cost = cost.detach().float().cpu()
            if not torch.isfinite(cost).all():
                # scipy would fail with "matrix contains invalid numeric entries"
                raise FloatingPointError(
                    "HungarianAssigner: the matching cost has NaN/inf entries (NaN predictions? "
                    "the model may have diverged)"
                )
        results = []
        for i in range(bs):
            gt_inds = torch.full((num_preds,), -1, dtype=torch.long, device=device)
            labels = torch.full((num_preds,), -1, dtype=torch.long, device=device)
            if counts[i] == 0 or num_preds == 0:
                if counts[i] == 0:
                    gt_inds[:] = 0
                results.append(AssignResult(counts[i], gt_inds, None, labels))
                continue
            rows, cols = linear_sum_assignment(cost[i, :, : counts[i]].numpy())
            rows = torch.from_numpy(rows).to(device)
            cols = torch.from_numpy(cols).to(device)
            gt_inds[:] = 0
            gt_inds[rows] = cols + 1
            labels[rows] = gt_labels[i][cols]
            results.append(AssignResult(counts[i], gt_inds, None, labels))
        return results

    def assign(
        self,
        cls_scores: Tensor,
        pred_bboxes: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor,
        img_shape: Sequence[int],
    ) -> AssignResult:
        """Assign one image: ``cls_scores: Tensor[N, C]``, ``pred_bboxes: Tensor[N, 4]``
        absolute xyxy, ``gt_bboxes: Tensor[K, 4]``, ``gt_labels: LongTensor[K]``, ``img_shape``
        ``(h, w)``; see :meth:`assign_batch`."""
        check_tensor(cls_scores, "cls_scores")
        check_tensor(pred_bboxes, "pred_bboxes")
        if cls_scores.dim() != 2 or pred_bboxes.dim() != 2:
            raise ValueError(
                f"cls_scores, pred_bboxes: expected [N, C] and [N, 4], got "
                f"{tuple(cls_scores.shape)} and {tuple(pred_bboxes.shape)}"
            )
        return self.assign_batch(
            cls_scores[None], pred_bboxes[None], [gt_bboxes], [gt_labels], [img_shape]
        )[0]
