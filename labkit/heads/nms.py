"""mmdetection's ``multiclass_nms`` and mmcv's ``batched_nms``: score threshold, NMS within each class, best kept."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

from labkit._validation import check_tensor
from labkit.heads.dense_head import TestConfig


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    class_agnostic: bool = False,
) -> Tensor:
    """NMS that never lets a box suppress a box of another group (mmcv's ``batched_nms``).

    Every box is shifted by ``idxs * (max_coordinate + 1)``, where ``max_coordinate`` is the
    largest coordinate of all ``boxes``: group ``g`` then lives in
    ``[g * (m + 1), g * (m + 1) + m]`` on both axes, so boxes of different groups never
    overlap and a single NMS call over all boxes equals one NMS per group. Like mmcv (and
    torchvision) this assumes non-negative coordinates, as clipped detections have.

    mmcv switches to a loop over the groups once there are ``split_thr`` (10000) or more boxes,
    only to save memory; the kept set is the same, so labkit keeps the single call. (mmcv's
    loop also ignores ``class_agnostic``; labkit honours it for any number of boxes.)

    Args:
        boxes: ``Tensor[K, 4]`` as ``(x1, y1, x2, y2)``.
        scores: ``Tensor[K]``.
        idxs: ``LongTensor[K]``, the group (class) of each box.
        iou_threshold: a box is suppressed when its IoU with a kept, higher-scoring box of
            its group is strictly above this.
        class_agnostic: ignore ``idxs``: one NMS over all boxes.

    Returns:
        ``LongTensor[M]``: indices of the kept boxes, by descending score.
    """
    for value, name in ((boxes, "boxes"), (scores, "scores"), (idxs, "idxs")):
        check_tensor(value, name)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected shape [K, 4], got {tuple(boxes.shape)}")
    k = boxes.shape[0]
    if scores.shape != (k,):
        raise ValueError(f"scores: expected shape [{k}] to match boxes, got {tuple(scores.shape)}")
    if idxs.shape != (k,):
        raise ValueError(f"idxs: expected shape [{k}] to match boxes, got {tuple(idxs.shape)}")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        boxes_for_nms = boxes + offsets[:, None]
    return nms(boxes_for_nms, scores, float(iou_threshold))


def multiclass_nms(
    multi_bboxes: Tensor,
    multi_scores: Tensor,
    cfg: TestConfig,
    *,
    score_factors: Tensor | None = None,
    class_agnostic: bool = False,
    return_inds: bool = False,
) -> dict[str, Tensor]:
    """mmdetection's ``multiclass_nms``: threshold (box, class) pairs, NMS per class, keep the best.

    Every box ``i`` is paired with every foreground class ``c``; pair ``(i, c)`` is candidate
    ``i * C + c`` of the flattened ``[N * C]`` list. Candidates whose class score is strictly
    above ``cfg.score_thr`` go through NMS (per class unless ``class_agnostic``), and the
    ``cfg.max_per_img`` best survivors are returned.

    Args:
        multi_bboxes: ``Tensor[N, 4]`` (one box shared by every class) or ``Tensor[N, C*4]``
            (class ``c``'s box in columns ``4c .. 4c+3``).
        multi_scores: ``Tensor[N, C+1]`` class scores, background last (ignored).
        cfg: ``score_thr`` (strict), ``iou_threshold``, ``max_per_img`` (mmdetection's
            ``max_num``; ``<= 0`` keeps all).
        score_factors: optional ``Tensor[N]`` multiplied into every class score of its box
            (e.g. centerness or objectness) AFTER the ``score_thr`` test and before NMS.
        class_agnostic: NMS across classes (mmdetection's ``nms_cfg.class_agnostic``).
        return_inds: also return ``"inds"``, the kept candidates' indices ``box * C + class``.

    Returns:
        ``{"boxes": Tensor[M, 4], "scores": Tensor[M], "labels": LongTensor[M]}`` by descending
        score (factors included), plus ``"inds": LongTensor[M]`` when ``return_inds``.
    """
    check_tensor(multi_bboxes, "multi_bboxes")
    check_tensor(multi_scores, "multi_scores")
    if multi_scores.dim() != 2 or multi_scores.shape[1] < 1:
        raise ValueError(
            "multi_scores: expected shape [N, C+1] (background score last), "
            f"got {tuple(multi_scores.shape)}"
        )
    n, num_classes = multi_scores.shape[0], multi_scores.shape[1] - 1
    if (
        multi_bboxes.dim() != 2
        or multi_bboxes.shape[0] != n
        or multi_bboxes.shape[1] not in (4, 4 * num_classes)
    ):
        raise ValueError(
            f"multi_bboxes: expected shape [{n}, 4] or [{n}, {4 * num_classes}] to match "
            f"multi_scores {tuple(multi_scores.shape)}, got {tuple(multi_bboxes.shape)}"
        )
    if score_factors is not None:
        check_tensor(score_factors, "score_factors")
        if score_factors.shape != (n,):
            raise ValueError(
                f"score_factors: expected shape [{n}] (one factor per box), "
                f"got {tuple(score_factors.shape)}"
            )

    if multi_bboxes.shape[1] == 4:
        bboxes = multi_bboxes[:, None].expand(n, num_classes, 4)
    else:
        bboxes = multi_bboxes.reshape(n, num_classes, 4)
    # Row-major flattening of [N, C] puts pair (i, c) at i * C + c.
    bboxes = bboxes.reshape(-1, 4)
    scores = multi_scores[:, :-1].reshape(-1)
    labels = torch.arange(num_classes, device=scores.device).repeat(n)

    # Order as in mmdetection (bbox_nms.py: "multiply score_factor after threshold to preserve
    # more bboxes, improve mAP by 1% for YOLOv3"): the threshold tests the RAW class score,
    # then the factors scale the scores that NMS ranks and that are returned. A pair whose
    # product falls below score_thr survives; a pair whose raw score does not pass is gone
    # however large its factor.
    valid = scores > cfg.score_thr
    if score_factors is not None:
        scores = scores * score_factors[:, None].expand(n, num_classes).reshape(-1)
    inds = valid.nonzero().squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]

    if inds.numel() > 0:
        keep = batched_nms(bboxes, scores, labels, cfg.iou_threshold, class_agnostic)
        if cfg.max_per_img > 0:
            keep = keep[: cfg.max_per_img]
        bboxes, scores, labels, inds = bboxes[keep], scores[keep], labels[keep], inds[keep]
    out = {"boxes": bboxes, "scores": scores, "labels": labels}
    if return_inds:
        out["inds"] = inds
    return out
