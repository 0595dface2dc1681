"""DETR set losses: Hungarian targets, focal + L1 + GIoU per decoder layer, encoder proposal loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from labkit.assigners.hungarian import HungarianAssigner
from labkit.boxes import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from labkit.losses import FocalLoss, GIoULoss, L1Loss

__all__ = ["DETRCriterion"]


def _img_hw(meta: dict) -> tuple[int, int]:
    h, w = tuple(meta["img_shape"])[:2]
    return int(h), int(w)


class DETRCriterion(nn.Module):
    """Deformable-DETR's loss (mmdetection's ``DeformableDETRHead.loss_by_feat``).

    Every decoder layer is matched to the ground truth on its own and gets the same three
    losses; the last layer's are ``loss_cls/loss_bbox/loss_iou``, earlier layers' are
    prefixed ``d0.`` .. ``d{n-2}.``. In two-stage mode the encoder proposals are matched
    class-agnostically (every ground truth relabelled 0) and give ``enc_loss_*``.

    Classification averages over the number of matched queries (the background weight is 0
    for the sigmoid focal loss); box losses over the number of ground truths, at least 1.

    Args:
        num_classes: foreground classes C.
        loss_cls, loss_bbox, loss_iou: defaults focal (alpha 0.25, gamma 2, weight 2.0), L1
            (weight 5.0) on normalized cxcywh, GIoU (weight 2.0) on absolute xyxy.
        assigner: defaults to :class:`HungarianAssigner` with matching weights 2/5/2.
    """

    def __init__(
        self,
        num_classes: int,
        loss_cls: nn.Module | None = None,
        loss_bbox: nn.Module | None = None,
        loss_iou: nn.Module | None = None,
        assigner: HungarianAssigner | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.loss_cls = (
            FocalLoss(gamma=2.0, alpha=0.25, loss_weight=2.0) if loss_cls is None else loss_cls
        )
        self.loss_bbox = L1Loss(loss_weight=5.0) if loss_bbox is None else loss_bbox
        self.loss_iou = GIoULoss(loss_weight=2.0) if loss_iou is None else loss_iou
        self.assigner = HungarianAssigner() if assigner is None else assigner

    def get_targets(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        gt_bboxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        img_metas: Sequence[dict],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Match one layer's predictions and build per-query targets.

        Args:
            cls_scores: Tensor[B, Q, C] logits. bbox_preds: Tensor[B, Q, 4] normalized cxcywh.
            gt_bboxes: B tensors [K_i, 4] absolute xyxy; gt_labels: B tensors [K_i].

        Returns:
            ``labels`` LongTensor[B*Q] (C = background), ``label_weights`` Tensor[B*Q] (ones),
            ``bbox_targets`` Tensor[B*Q, 4] normalized cxcywh, ``bbox_weights`` Tensor[B*Q, 4]
            (1 on matched queries) and the number of matched queries.
        """
        bs, num_queries, _ = cls_scores.shape
        shapes = [_img_hw(m) for m in img_metas]
        factors = bbox_preds.new_tensor([[w, h, w, h] for h, w in shapes])[:, None, :]  # [B, 1, 4]
        pred_xyxy = bbox_cxcywh_to_xyxy(bbox_preds) * factors
        results = self.assigner.assign_batch(cls_scores, pred_xyxy, gt_bboxes, gt_labels, shapes)
        labels = bbox_preds.new_full((bs, num_queries), self.num_classes, dtype=torch.long)
        bbox_targets = torch.zeros_like(bbox_preds)
        bbox_weights = torch.zeros_like(bbox_preds)
        num_pos = 0
        for i, res in enumerate(results):
            pos = torch.nonzero(res.gt_inds > 0).squeeze(-1)
            gt_idx = res.gt_inds[pos] - 1
            labels[i, pos] = gt_labels[i][gt_idx]
            bbox_targets[i, pos] = bbox_xyxy_to_cxcywh(gt_bboxes[i][gt_idx] / factors[i])
            bbox_weights[i, pos] = 1.0
            num_pos += len(pos)
        label_weights = bbox_preds.new_ones(bs * num_queries)
        return (
            labels.view(-1),
            label_weights,
            bbox_targets.view(-1, 4),
            bbox_weights.view(-1, 4),
            num_pos,
        )

    def loss_single(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        gt_bboxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        img_metas: Sequence[dict],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss_cls, loss_bbox, loss_iou)`` of one layer's ``cls_scores: Tensor[B, Q, C]``
        and ``bbox_preds: Tensor[B, Q, 4]``."""
        labels, label_weights, bbox_targets, bbox_weights, num_pos = self.get_targets(
            cls_scores, bbox_preds, gt_bboxes, gt_labels, img_metas
        )
        cls_scores = cls_scores.reshape(-1, cls_scores.shape[-1])
        # Background weight is 0 for the sigmoid focal loss: only matched queries count.
        cls_avg_factor = max(float(num_pos), 1.0)
        loss_cls = self.loss_cls(cls_scores, labels, label_weights, avg_factor=cls_avg_factor)
        box_avg_factor = max(float(num_pos), 1.0)
        shapes = [_img_hw(m) for m in img_metas]
        factors = bbox_preds.new_tensor([[w, h, w, h] for h, w in shapes])
        factors = factors.repeat_interleave(bbox_preds.shape[1], dim=0)  # [B*Q, 4]
        bbox_preds = bbox_preds.reshape(-1, 4)
        # DETR regresses normalized boxes; GIoU is computed on absolute ones.
        loss_iou = self.loss_iou(
            bbox_cxcywh_to_xyxy(bbox_preds) * factors,
            bbox_cxcywh_to_xyxy(bbox_targets) * factors,
            bbox_weights,
            avg_factor=box_avg_factor,
        )
        loss_bbox = self.loss_bbox(
            bbox_preds, bbox_targets, bbox_weights, avg_factor=box_avg_factor
        )
        return loss_cls, loss_bbox, loss_iou

    def forward(
        self,
        all_cls_scores: Tensor,
        all_bbox_preds: Tensor,
        gt_bboxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        img_metas: Sequence[dict],
        enc_cls_scores: Tensor | None = None,
        enc_bbox_preds: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """All losses.

        Args:
            all_cls_scores: Tensor[num_layers, B, Q, C]; all_bbox_preds: Tensor[num_layers, B, Q, 4].
            enc_cls_scores: Tensor[B, sum(hw), C]; enc_bbox_preds: Tensor[B, sum(hw), 4]
                (two-stage only).

        Returns:
            ``{"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", ..., "enc_loss_cls", ...}``.
        """
        losses: dict[str, Tensor] = {}
        if enc_cls_scores is not None:
            binary_labels = [torch.zeros_like(lab) for lab in gt_labels]
            enc = self.loss_single(
                enc_cls_scores, enc_bbox_preds, gt_bboxes, binary_labels, img_metas
            )
            losses.update(enc_loss_cls=enc[0], enc_loss_bbox=enc[1], enc_loss_iou=enc[2])
        per_layer = [
            self.loss_single(cls, box, gt_bboxes, gt_labels, img_metas)
            for cls, box in zip(all_cls_scores, all_bbox_preds, strict=True)
        ]
        last = per_layer[-1]
        losses.update(loss_cls=last[0], loss_bbox=last[1], loss_iou=last[2])
        for i, (lc, lb, li) in enumerate(per_layer[:-1]):
            losses[f"d{i}.loss_cls"] = lc
            losses[f"d{i}.loss_bbox"] = lb
            losses[f"d{i}.loss_iou"] = li
        return losses
