"""Notebook 01's opening picture: one image through a whole anchor-based detector, with the real
tensors of every stage (backbone, FPN, head, assignment, loss; decode, NMS), and its numbers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from labkit.detectors.single_stage import SingleStageDetector

__all__ = ["PipelineTrace", "pipeline_summary", "trace_pipeline"]


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


def pipeline_summary(
    trace: PipelineTrace,
    class_names: Sequence[str] | None = None,
    test_cfg: Any = None,
    min_score: float = 0.3,
) -> str:
    """The numbers of :func:`labkit.viz.pipeline.plot_pipeline`'s figure as text, one stage per line.

    Args:
        trace: from :func:`trace_pipeline`.
        class_names: names of the labels ``0 .. C-1`` (default: the label numbers).
        test_cfg: the head's ``TestConfig`` (``score_thr``, ``nms_pre``, ``iou_threshold``,
            ``max_per_img``); when given, the inference line states those settings.
        min_score: the detections listed are those scoring at least this (the figure's 0.3).

    Returns:
        Lines: anchors and positives, the losses and their sum, the candidates before and the
        detections after NMS, then one line per detection scoring ``>= min_score``: class,
        score and ``[x1, y1, x2, y2]`` rounded to pixels, by descending score.
    """
    losses = " + ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in trace.losses.items())
    lines = [
        f"{len(trace.anchors)} anchors, {len(trace.positive_anchors)} positive; "
        f"loss {losses} = {sum(trace.losses.values()):.3f}"
    ]
    before, after = len(trace.before_nms["boxes"]), len(trace.after_nms["boxes"])
    if test_cfg is None:
        lines.append(f"{before} boxes above the score threshold, {after} after NMS")
    else:  # a "box" is an (anchor, class) pair: the threshold tests each class score
        lines.append(
            f"{before} boxes above the score threshold (class score > {test_cfg.score_thr:g}, at "
            f"most {test_cfg.nms_pre} per level); NMS at IoU {test_cfg.iou_threshold:g} per class "
            f"keeps {after} (at most {test_cfg.max_per_img})"
        )
    scores = trace.after_nms["scores"]
    keep = (scores >= min_score).nonzero().squeeze(1)
    keep = keep[scores[keep].argsort(descending=True)]
    lines.append(f"{len(keep)} detections with score >= {min_score:g}:")
    for i in keep.tolist():
        label = int(trace.after_nms["labels"][i])
        name = class_names[label] if class_names is not None else str(label)
        box = [round(v) for v in trace.after_nms["boxes"][i].tolist()]
        lines.append(f"  {name:>10s} {float(scores[i]):.2f}  {box}")
    return "\n".join(lines)
