"""Notebook 01's opening picture: one image through a whole anchor-based detector, with the real
tensors of every stage (backbone, FPN, head, assignment, loss; decode, NMS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from labkit.detectors.single_stage import SingleStageDetector

__all__ = ["PipelineTrace", "trace_pipeline"]


@dataclass
class PipelineTrace:
    """What one image becomes at each stage of a single-stage anchor detector.

    Attributes:
        img: Tensor[3, H, W] the normalized input (valid region).
        gt_bboxes: Tensor[K, 4] xyxy pixels; gt_labels: LongTensor[K].
        backbone: per stage (C3, C4, C5) Tensor[C_s, H_s, W_s].
        fpn: per level (P3...) Tensor[C, H_l, W_l].
        objectness: per level Tensor[H_l, W_l], the highest class probability of any anchor at
            each location (sigmoid of the classification logits).
        anchors: Tensor[N, 4] every anchor of every level (xyxy pixels).
        num_level_anchors: anchors per level.
        positive_anchors: LongTensor[P] indices into ``anchors`` of the assignment's positives.
        positive_gt: LongTensor[P] the 0-based GT index of each positive.
        losses: ``{"loss_cls": float, "loss_bbox": float, ...}`` of this image.
        before_nms: ``{"boxes": Tensor[M, 4], "scores": Tensor[M], "labels": LongTensor[M]}``,
            decoded boxes above the score threshold (``nms_pre`` per level) before NMS.
        after_nms: the same after batched NMS and ``max_per_img``.
    """

    img: Tensor
    gt_bboxes: Tensor
    gt_labels: Tensor
    backbone: list[Tensor]
    fpn: list[Tensor]
    objectness: list[Tensor]
    anchors: Tensor
    num_level_anchors: list[int]
    positive_anchors: Tensor
    positive_gt: Tensor
    losses: dict[str, float]
    before_nms: dict[str, Tensor]
    after_nms: dict[str, Tensor]


@torch.no_grad()
def trace_pipeline(model: SingleStageDetector, batch: dict) -> PipelineTrace:
    """Run the first image of ``batch`` (a collated batch with ground truth) through ``model``
    stage by stage, in eval mode, and keep what each stage produced.

    ``model`` must be a single-stage detector with an anchor head (RetinaNet, ATSS, PAA's
    targets are anchor targets too): its ``loss_and_targets`` returns ``AnchorTargets``.
    """
    if not isinstance(model, SingleStageDetector):
        raise TypeError(f"model: expected a SingleStageDetector, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        inputs = model.inputs(batch)
        img = inputs["img"][:1]
        stages = list(model.backbone(img))
        levels = list(model.neck(stages)) if model.neck is not None else stages
        outs = model.head(levels)
        cls_scores, bbox_preds = outs[0], outs[1]
        one = {
            "img": inputs["img"][:1],
            "img_metas": inputs["img_metas"][:1],
            "gt_bboxes": inputs["gt_bboxes"][:1],
            "gt_labels": inputs["gt_labels"][:1],
        }
        losses, targets = model.head.loss_and_targets(levels, one)
        if not hasattr(targets, "anchors"):
            raise TypeError(
                f"model: trace_pipeline needs an anchor head (AnchorTargets), got "
                f"{type(targets).__name__}"
            )
        meta = inputs["img_metas"][0]
        kwargs = {"score_factors": [f[:1] for f in outs[2]]} if len(outs) > 2 else {}
        before = model.head.predict_by_feat(
            [c[:1] for c in cls_scores], [b[:1] for b in bbox_preds], **kwargs,
            batch_img_metas=[meta], with_nms=False,
        )[0]  # fmt: skip
        after = model.head.predict_by_feat(
            [c[:1] for c in cls_scores], [b[:1] for b in bbox_preds], **kwargs,
            batch_img_metas=[meta], with_nms=True,
        )[0]  # fmt: skip
    finally:
        model.train(was_training)
    h, w = (int(v) for v in meta["img_shape"][:2])
    num_classes = model.head.num_classes
    objectness = []
    for c in cls_scores:
        logits = c[0].reshape(-1, num_classes, *c.shape[-2:])  # [A, C, H, W]
        objectness.append(logits.sigmoid().amax(dim=(0, 1)).cpu())
    return PipelineTrace(
        img=inputs["img"][0, :, :h, :w].cpu(),
        gt_bboxes=inputs["gt_bboxes"][0].cpu(),
        gt_labels=inputs["gt_labels"][0].cpu(),
        backbone=[s[0].cpu() for s in stages],
        fpn=[p[0].cpu() for p in levels],
        objectness=objectness,
        anchors=targets.anchors.cpu(),
        num_level_anchors=list(targets.num_level_priors),
        positive_anchors=targets.pos_inds[0].cpu(),
        positive_gt=targets.pos_gt_inds[0].cpu(),
        losses={k: float(v) for k, v in losses.items() if k.startswith("loss")},
        before_nms={k: v.cpu() for k, v in before.items()},
        after_nms={k: v.cpu() for k, v in after.items()},
    )
