"""Box geometry: format conversions, IoU/IoF/GIoU overlaps and the two box coders dense heads use.

Every box is ``(x1, y1, x2, y2)`` in absolute pixels unless a name says otherwise, with no ``+1``
(a box from 0 to 10 is 10 pixels wide). Behaviour, including edge cases, follows mmdetection 3.x
(``mmdet.structures.bbox`` and ``mmdet.models.task_modules.coders``) so a student can move on to
it without surprises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from labkit._validation import check_boxes, check_choice, check_tensor

__all__ = [
    "DeltaXYWHBBoxCoder",
    "DistancePointBBoxCoder",
    "bbox2delta",
    "bbox2distance",
    "bbox_cxcywh_to_xyxy",
    "bbox_overlaps",
    "bbox_overlaps_reference",
    "bbox_xywh_to_xyxy",
    "bbox_xyxy_to_cxcywh",
    "bbox_xyxy_to_xywh",
    "delta2bbox",
    "denormalize_bboxes",
    "distance2bbox",
    "normalize_bboxes",
]

OVERLAP_MODES = ("iou", "iof", "giou")


# ----------------------------------------------------------------------------- conversions


def _check_last_dim(boxes: object, name: str, size: int = 4) -> Tensor:
    """Cheap check for hot paths: a floating tensor whose last dimension is ``size``."""
    boxes = check_tensor(boxes, name)
    if boxes.dim() < 1 or boxes.shape[-1] != size:
        raise ValueError(f"{name}: expected shape [..., {size}], got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {boxes.dtype}")
    return boxes


def bbox_xyxy_to_cxcywh(bboxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)``; ``bboxes: Tensor[..., 4]`` -> ``Tensor[..., 4]``."""
    bboxes = _check_last_dim(bboxes, "bboxes")
    x1, y1, x2, y2 = bboxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def bbox_cxcywh_to_xyxy(bboxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)``; ``bboxes: Tensor[..., 4]`` -> ``Tensor[..., 4]``."""
    bboxes = _check_last_dim(bboxes, "bboxes")
    cx, cy, w, h = bboxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def bbox_xyxy_to_xywh(bboxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> COCO's ``(x, y, w, h)`` (top-left corner and size); shapes ``[..., 4]``."""
    bboxes = _check_last_dim(bboxes, "bboxes")
    x1, y1, x2, y2 = bboxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def bbox_xywh_to_xyxy(bboxes: Tensor) -> Tensor:
    """COCO's ``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``; shapes ``[..., 4]``."""
    bboxes = _check_last_dim(bboxes, "bboxes")
    x, y, w, h = bboxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def _wh_factor(bboxes: Tensor, img_shape: Sequence[int], name: str) -> Tensor:
    if len(img_shape) < 2:
        raise ValueError(f"{name}: expected (h, w), got {img_shape!r}")
    h, w = img_shape[0], img_shape[1]
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: height and width must be positive, got {img_shape!r}")
    return bboxes.new_tensor([w, h, w, h])


def normalize_bboxes(bboxes_xyxy: Tensor, img_shape: Sequence[int]) -> Tensor:
    """Pixel ``(x1, y1, x2, y2)`` -> DETR's normalized ``(cx, cy, w, h)`` in [0, 1].

    Args:
        bboxes_xyxy: ``Tensor[..., 4]`` in pixels of the unpadded image.
        img_shape: ``(h, w)`` of the unpadded image (``img_meta["img_shape"]``), not the
            padded batch: DETR normalizes by the image size so padding never shifts targets.
    """
    bboxes_xyxy = _check_last_dim(bboxes_xyxy, "bboxes_xyxy")
    return bbox_xyxy_to_cxcywh(bboxes_xyxy) / _wh_factor(bboxes_xyxy, img_shape, "img_shape")


def denormalize_bboxes(bboxes_cxcywh: Tensor, img_shape: Sequence[int]) -> Tensor:
    """Normalized ``(cx, cy, w, h)`` -> pixel ``(x1, y1, x2, y2)``; inverse of :func:`normalize_bboxes`.

    Args:
        bboxes_cxcywh: ``Tensor[..., 4]`` in [0, 1] relative to ``img_shape``.
        img_shape: ``(h, w)`` of the unpadded image.
    """
    bboxes_cxcywh = _check_last_dim(bboxes_cxcywh, "bboxes_cxcywh")
    return bbox_cxcywh_to_xyxy(bboxes_cxcywh) * _wh_factor(bboxes_cxcywh, img_shape, "img_shape")


# ----------------------------------------------------------------------------- overlaps


def _check_overlap_inputs(
    bboxes1: object, bboxes2: object, mode: str, is_aligned: bool, check: bool
) -> tuple[Tensor, Tensor]:
    check_choice(mode, "mode", OVERLAP_MODES)
    check_tensor(bboxes1, "bboxes1")
    check_tensor(bboxes2, "bboxes2")
    if bboxes1.device != bboxes2.device:
        raise ValueError(
            f"bboxes1, bboxes2: expected both on one device, got bboxes1 on {bboxes1.device} "
            f"and bboxes2 on {bboxes2.device} (move one with .to(other.device))"
        )
    pair = []
    for boxes, name in ((bboxes1, "bboxes1"), (bboxes2, "bboxes2")):
        # mmdet accepts an empty [0, 0] tensor as "no boxes"; keep that convenience.
        if boxes.dim() == 2 and boxes.shape[0] == 0 and boxes.shape[1] != 4:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() < 2:
            raise ValueError(f"{name}: expected shape [..., N, 4], got {tuple(boxes.shape)}")
        if check:
            check_boxes(boxes, name)
        else:
            _check_last_dim(boxes, name)
        pair.append(boxes)
    bboxes1, bboxes2 = pair
    if bboxes1.shape[:-2] != bboxes2.shape[:-2]:
        raise ValueError(
            f"bboxes1, bboxes2: batch dimensions must match, got {tuple(bboxes1.shape)} "
            f"and {tuple(bboxes2.shape)}"
        )
    if is_aligned and bboxes1.shape[-2] != bboxes2.shape[-2]:
        raise ValueError(
            "bboxes1, bboxes2: is_aligned=True needs as many boxes in each, got "
            f"{bboxes1.shape[-2]} and {bboxes2.shape[-2]}"
        )
    return bboxes1, bboxes2


def bbox_overlaps(
    bboxes1: Tensor,
    bboxes2: Tensor,
    mode: str = "iou",
    is_aligned: bool = False,
    eps: float = 1e-6,
    *,
    check: bool = True,
) -> Tensor:
    """Overlap of two sets of ``(x1, y1, x2, y2)`` boxes: IoU, IoF or GIoU (mmdetection semantics).

    Args:
        bboxes1: ``Tensor[..., M, 4]``.
        bboxes2: ``Tensor[..., N, 4]`` with the same leading (batch) dimensions as ``bboxes1``.
        mode: ``"iou"`` intersection over union, ``"iof"`` intersection over the area of
            ``bboxes1`` (the "foreground"; used for ignore regions), ``"giou"`` generalized IoU
            in [-1, 1].
        is_aligned: compare ``bboxes1[i]`` with ``bboxes2[i]`` only (needs ``M == N``).
        eps: lower bound on the union (and on the enclosing area for GIoU), so zero-area
            boxes give 0 instead of NaN.
        check: validate values (NaN/inf, ``x2 < x1``) as well as shapes. Losses on predicted
            boxes may pass ``False``; the check costs one pass over the boxes, the overlap
            itself ``M * N``.

    Returns:
        ``Tensor[..., M, N]``, or ``Tensor[..., M]`` when ``is_aligned``. Empty inputs give an
        empty tensor of that shape.
    """
    bboxes1, bboxes2 = _check_overlap_inputs(bboxes1, bboxes2, mode, is_aligned, check)
    batch_shape = bboxes1.shape[:-2]
    rows, cols = bboxes1.shape[-2], bboxes2.shape[-2]
    if rows * cols == 0:
        shape = batch_shape + ((rows,) if is_aligned else (rows, cols))
        return bboxes1.new_zeros(shape)
    if is_aligned:
        return _aligned_overlaps(bboxes1, bboxes2, mode, eps)
    return _pairwise_overlaps(bboxes1, bboxes2, mode, eps)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _finish(overlap: Tensor, union: Tensor, enclose_wh: tuple | None, eps: float) -> Tensor:
    # The eps clamp is what makes two zero-area boxes have IoU 0 (0 / eps) rather than NaN.
    union = union.clamp(min=eps)
    ious = overlap / union
    if enclose_wh is None:
        return ious
    enclose_area = (enclose_wh[0] * enclose_wh[1]).clamp(min=eps)
    return ious - (enclose_area - union) / enclose_area


def _aligned_overlaps(b1: Tensor, b2: Tensor, mode: str, eps: float) -> Tensor:
    area1, area2 = _area(b1), _area(b2)
    lt = torch.max(b1[..., :2], b2[..., :2])  # [..., M, 2]
    rb = torch.min(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap if mode != "iof" else area1
    enclose = None
    if mode == "giou":
        ewh = (torch.max(b1[..., 2:], b2[..., 2:]) - torch.min(b1[..., :2], b2[..., :2])).clamp(
            min=0
        )
        enclose = (ewh[..., 0], ewh[..., 1])
    return _finish(overlap, union, enclose, eps)


def _pairwise_overlaps(b1: Tensor, b2: Tensor, mode: str, eps: float) -> Tensor:
    # Width and height of the intersection are computed as two [..., M, N] tensors instead of
    # one [..., M, N, 2] tensor: the same arithmetic (so the same bits as the reference), but
    # contiguous memory and no strided [..., 0] / [..., 1] reads, which matters at 200k x 100.
    if torch.is_grad_enabled() and (b1.requires_grad or b2.requires_grad):
        return _pairwise_overlaps_autograd(b1, b2, mode, eps)
    # Without autograd, every [M, N] temporary is reused in place: ~1.7x faster on CPU.
    x1a, y1a, x2a, y2a = (c.unsqueeze(-1) for c in b1.unbind(-1))  # [..., M, 1]
    x1b, y1b, x2b, y2b = (c.unsqueeze(-2) for c in b2.unbind(-1))  # [..., 1, N]
    iw = torch.min(x2a, x2b).sub_(torch.max(x1a, x1b)).clamp_(min=0)
    ih = torch.min(y2a, y2b).sub_(torch.max(y1a, y1b)).clamp_(min=0)
    overlap = iw.mul_(ih)
    area1 = _area(b1).unsqueeze(-1)
    if mode == "iof":
        return overlap.div_(area1.clamp(min=eps))
    union = (area1 + _area(b2).unsqueeze(-2)).sub_(overlap).clamp_(min=eps)
    ious = overlap.div_(union)
    if mode == "iou":
        return ious
    ew = torch.max(x2a, x2b).sub_(torch.min(x1a, x1b)).clamp_(min=0)
    eh = torch.max(y2a, y2b).sub_(torch.min(y1a, y1b)).clamp_(min=0)
    enclose = ew.mul_(eh).clamp_(min=eps)
    gap = union.neg_().add_(enclose).div_(enclose)  # (enclose - union) / enclose
    return ious.sub_(gap)


def _pairwise_overlaps_autograd(b1: Tensor, b2: Tensor, mode: str, eps: float) -> Tensor:
    x1a, y1a, x2a, y2a = (c.unsqueeze(-1) for c in b1.unbind(-1))  # [..., M, 1]
    x1b, y1b, x2b, y2b = (c.unsqueeze(-2) for c in b2.unbind(-1))  # [..., 1, N]
    iw = (torch.min(x2a, x2b) - torch.max(x1a, x1b)).clamp(min=0)
    ih = (torch.min(y2a, y2b) - torch.max(y1a, y1b)).clamp(min=0)
    overlap = iw * ih
    area1 = _area(b1).unsqueeze(-1)
    if mode == "iof":
        union = area1
    else:
        union = area1 + _area(b2).unsqueeze(-2) - overlap
    enclose = None
    if mode == "giou":
        ew = (torch.max(x2a, x2b) - torch.min(x1a, x1b)).clamp(min=0)
        eh = (torch.max(y2a, y2b) - torch.min(y1a, y1b)).clamp(min=0)
        enclose = (ew, eh)
    return _finish(overlap, union, enclose, eps)


def bbox_overlaps_reference(
    bboxes1: Tensor, bboxes2: Tensor, mode: str = "iou", is_aligned: bool = False, eps: float = 1e-6
) -> Tensor:
    """Straightforward ``[..., M, N, 2]`` version of :func:`bbox_overlaps`, kept for tests.

    Same arguments and result as :func:`bbox_overlaps`; it broadcasts corner pairs the way
    mmdetection's code reads, which is easier to check by eye and slower on large inputs.
    """
    bboxes1, bboxes2 = _check_overlap_inputs(bboxes1, bboxes2, mode, is_aligned, True)
    rows, cols = bboxes1.shape[-2], bboxes2.shape[-2]
    if rows * cols == 0:
        return bboxes1.new_zeros(bboxes1.shape[:-2] + ((rows,) if is_aligned else (rows, cols)))
    if is_aligned:
        return _aligned_overlaps(bboxes1, bboxes2, mode, eps)
    area1, area2 = _area(bboxes1), _area(bboxes2)
    lt = torch.max(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])  # [..., M, N, 2]
    rb = torch.min(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[..., None] + area2[..., None, :] - overlap if mode != "iof" else area1[..., None]
    enclose = None
    if mode == "giou":
        elt = torch.min(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
        erb = torch.max(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
        ewh = (erb - elt).clamp(min=0)
        enclose = (ewh[..., 0], ewh[..., 1])
    return _finish(overlap, union, enclose, eps)


# ----------------------------------------------------------------------------- delta coder


def bbox2delta(
    proposals: Tensor,
    gt: Tensor,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Regression targets ``(dx, dy, dw, dh)`` that move ``proposals`` onto ``gt`` (R-CNN encoding).

    ``dx = (gx - px) / pw``, ``dw = log(gw / pw)`` (same for y, h), then ``(d - means) / stds``.
    Both inputs ``Tensor[..., 4]`` of the same shape; the result is float32 like mmdetection's
    (it casts to ``float()`` first), shape ``[..., 4]``.
    """
    proposals = proposals.float()
    gt = gt.float()
    px = (proposals[..., 0] + proposals[..., 2]) * 0.5
    py = (proposals[..., 1] + proposals[..., 3]) * 0.5
    pw = proposals[..., 2] - proposals[..., 0]
    ph = proposals[..., 3] - proposals[..., 1]
    gx = (gt[..., 0] + gt[..., 2]) * 0.5
    gy = (gt[..., 1] + gt[..., 3]) * 0.5
    gw = gt[..., 2] - gt[..., 0]
    gh = gt[..., 3] - gt[..., 1]
    deltas = torch.stack(
        [(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1
    )
    return deltas.sub(deltas.new_tensor(means)).div(deltas.new_tensor(stds))


def delta2bbox(
    rois: Tensor,
    deltas: Tensor,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_shape: Sequence[int] | Sequence[Sequence[int]] | Tensor | None = None,
    wh_ratio_clip: float = 16 / 1000,
    clip_border: bool = True,
    add_ctr_clamp: bool = False,
    ctr_clamp: float = 32,
) -> Tensor:
    """Apply ``deltas`` to ``rois``: the inverse of :func:`bbox2delta`.

    Args:
        rois: ``Tensor[N, 4]`` or ``Tensor[B, N, 4]`` base boxes (anchors or proposals).
        deltas: ``Tensor[N, 4k]`` or ``Tensor[B, N, 4k]`` (``k`` > 1 for class-specific
            regression: each group of 4 is decoded against the same roi).
        max_shape: ``(h, w)`` to clip to, or one ``(h, w)`` per image (``[B, 2]``) for batched
            input. Ignored when ``clip_border`` is False.
        wh_ratio_clip: ``|dw|, |dh|`` are clamped to ``|log(wh_ratio_clip)|`` (about 4.135), so
            a box can grow or shrink at most ~62x per side; this keeps ``exp`` finite early in
            training.
        add_ctr_clamp: YOLOF's variant: the centre shift is clamped to ``±ctr_clamp`` pixels
            and ``dw, dh`` only from above (no lower clamp, as in mmdetection).

    Returns:
        ``(x1, y1, x2, y2)`` boxes with the shape of ``deltas``.
    """
    if deltas.shape[-2] == 0:
        return deltas
    k = deltas.shape[-1] // 4
    denorm = deltas * deltas.new_tensor(stds).repeat(k) + deltas.new_tensor(means).repeat(k)
    d = denorm.unflatten(-1, (k, 4))  # [..., N, k, 4]
    rois = rois.unsqueeze(-2)  # [..., N, 1, 4]
    pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
    pwh = rois[..., 2:] - rois[..., :2]
    dxy_wh = pwh * d[..., :2]
    dwh = d[..., 2:]
    max_ratio = abs(math.log(wh_ratio_clip))
    if add_ctr_clamp:
        dxy_wh = dxy_wh.clamp(min=-ctr_clamp, max=ctr_clamp)
        dwh = dwh.clamp(max=max_ratio)
    else:
        dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    bboxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)  # [..., N, k, 4]
    if clip_border and max_shape is not None:
        bboxes = _clip_to_shape(bboxes, max_shape, batched=deltas.dim() == 3)
    return bboxes.flatten(-2)


def _clip_to_shape(bboxes: Tensor, max_shape: Sequence | Tensor, batched: bool) -> Tensor:
    """Clamp ``[..., 4]`` boxes into ``[0, w] x [0, h]``; ``max_shape`` is ``(h, w)`` or ``[B, 2]``."""
    if not isinstance(max_shape, Tensor):
        max_shape = torch.as_tensor(max_shape)
    max_xy = max_shape[..., :2].to(bboxes).flip(-1)  # (w, h), or [B, 2]
    max_xyxy = torch.cat([max_xy, max_xy], dim=-1)
    if max_xyxy.dim() == 2:  # one (h, w) per image: broadcast over that image's boxes
        if not batched or max_xyxy.shape[0] != bboxes.shape[0]:
            raise ValueError(
                f"max_shape: {max_xyxy.shape[0]} image shapes given for boxes of shape "
                f"{tuple(bboxes.shape)}"
            )
        max_xyxy = max_xyxy.reshape((max_xyxy.shape[0],) + (1,) * (bboxes.dim() - 2) + (4,))
    return torch.minimum(bboxes.clamp(min=0), max_xyxy)


class DeltaXYWHBBoxCoder:
    """Encode ground-truth boxes as ``(dx, dy, dw, dh)`` offsets from priors, and decode them back.

    Args:
        target_means, target_stds: targets are normalized as ``(delta - mean) / std``; RetinaNet
            uses (0, 0, 0, 0) / (1, 1, 1, 1), Faster R-CNN's RoI head (0, 0, 0, 0) / (.1, .1, .2, .2).
        clip_border: clip decoded boxes to ``max_shape`` when one is given.
        add_ctr_clamp, ctr_clamp: YOLOF's centre clamp (see :func:`delta2bbox`).
    """

    def __init__(
        self,
        target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        clip_border: bool = True,
        add_ctr_clamp: bool = False,
        ctr_clamp: float = 32,
    ) -> None:
        if len(target_means) != 4 or len(target_stds) != 4:
            raise ValueError(
                f"target_means, target_stds: expected 4 values each, got {target_means!r}, "
                f"{target_stds!r}"
            )
        self.means = tuple(float(m) for m in target_means)
        self.stds = tuple(float(s) for s in target_stds)
        self.clip_border = clip_border
        self.add_ctr_clamp = add_ctr_clamp
        self.ctr_clamp = ctr_clamp

    def encode(self, bboxes: Tensor, gt_bboxes: Tensor) -> Tensor:
        """``bboxes: Tensor[N, 4]`` priors, ``gt_bboxes: Tensor[N, 4]`` -> ``deltas: Tensor[N, 4]`` (float32)."""
        bboxes = _check_last_dim(bboxes, "bboxes")
        gt_bboxes = _check_last_dim(gt_bboxes, "gt_bboxes")
        if bboxes.shape != gt_bboxes.shape:
            raise ValueError(
                f"bboxes, gt_bboxes: shapes must match, got {tuple(bboxes.shape)} and "
                f"{tuple(gt_bboxes.shape)}"
            )
        return bbox2delta(bboxes, gt_bboxes, self.means, self.stds)

    def decode(
        self,
        bboxes: Tensor,
        pred_bboxes: Tensor,
        max_shape: Sequence[int] | Sequence[Sequence[int]] | Tensor | None = None,
        wh_ratio_clip: float = 16 / 1000,
    ) -> Tensor:
        """Turn predicted deltas into boxes.

        Args:
            bboxes: ``Tensor[N, 4]`` or ``Tensor[B, N, 4]`` priors.
            pred_bboxes: ``Tensor[N, 4k]`` or ``Tensor[B, N, 4k]`` predicted deltas.
            max_shape: ``(h, w)`` (or one per image for batched input) to clip boxes to.
            wh_ratio_clip: see :func:`delta2bbox`.

        Returns:
            Boxes ``(x1, y1, x2, y2)`` shaped like ``pred_bboxes``.
        """
        bboxes = _check_last_dim(bboxes, "bboxes")
        pred_bboxes = check_tensor(pred_bboxes, "pred_bboxes")
        if (
            pred_bboxes.dim() not in (2, 3)
            or pred_bboxes.shape[-1] % 4
            or pred_bboxes.shape[-1] == 0
            or pred_bboxes.shape[:-1] != bboxes.shape[:-1]
        ):
            raise ValueError(
                f"pred_bboxes: expected shape {tuple(bboxes.shape[:-1])} + (4k,) to match "
                f"bboxes {tuple(bboxes.shape)}, got {tuple(pred_bboxes.shape)}"
            )
        return delta2bbox(
            bboxes,
            pred_bboxes,
            self.means,
            self.stds,
            max_shape,
            wh_ratio_clip,
            self.clip_border,
            self.add_ctr_clamp,
            self.ctr_clamp,
        )


# ----------------------------------------------------------------------------- distance coder


def _stride_column(stride: float | Tensor, like: Tensor) -> float | Tensor:
    # A per-point stride tensor [..., N] (e.g. priors[:, 2] from with_stride=True) scales all
    # four distances of its point.
    if isinstance(stride, Tensor):
        return stride.to(like).unsqueeze(-1)
    return stride


def bbox2distance(
    points: Tensor,
    bboxes: Tensor,
    max_dis: float | None = None,
    eps: float = 0.1,
    *,
    stride: float | Tensor | None = None,
) -> Tensor:
    """Distances ``(left, top, right, bottom)`` from each point to the sides of its box.

    Args:
        points: ``Tensor[..., N, 2]`` ``(x, y)``.
        bboxes: ``Tensor[..., N, 4]`` ``(x1, y1, x2, y2)``.
        max_dis: if given, distances are clamped to ``[0, max_dis - eps]`` (GFL's integral
            regression needs targets strictly below its last bin).
        eps: see ``max_dis``.
        stride: if given (a number or a per-point ``Tensor[..., N]``), distances are
            measured in units of the stride (divided by it) before the clamp. FCOS's
            ``norm_on_bbox`` is ``stride=level_stride, max_dis=None``; GFL is
            ``stride=level_stride, max_dis=reg_max``.

    Returns:
        ``Tensor[..., N, 4]``. Points outside their box give negative distances (unless
        clamped), which is how FCOS finds "inside" points.
    """
    left = points[..., 0] - bboxes[..., 0]
    top = points[..., 1] - bboxes[..., 1]
    right = bboxes[..., 2] - points[..., 0]
    bottom = bboxes[..., 3] - points[..., 1]
    distances = torch.stack([left, top, right, bottom], -1)
    if stride is not None:
        distances = distances / _stride_column(stride, distances)
    if max_dis is not None:
        distances = distances.clamp(min=0, max=max_dis - eps)
    return distances


def distance2bbox(
    points: Tensor,
    distance: Tensor,
    max_shape: Sequence[int] | Sequence[Sequence[int]] | Tensor | None = None,
    *,
    stride: float | Tensor | None = None,
) -> Tensor:
    """Boxes from points and ``(left, top, right, bottom)`` distances; inverse of :func:`bbox2distance`.

    Args:
        points: ``Tensor[..., N, 2]``.
        distance: ``Tensor[..., N, 4]``; multiplied by ``stride`` first when it is given
            (a number or ``Tensor[..., N]``), for heads that predict stride-normalized distances.
        max_shape: ``(h, w)`` (or ``[B, 2]``, one per image, for ``[B, N, ...]`` input) to
            clip the boxes to.

    Returns:
        ``Tensor[..., N, 4]`` ``(x1, y1, x2, y2)``.
    """
    if stride is not None:
        distance = distance * _stride_column(stride, distance)
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    bboxes = torch.stack([x1, y1, x2, y2], -1)
    if max_shape is not None:
        bboxes = _clip_to_shape(bboxes, max_shape, batched=bboxes.dim() == 3)
    return bboxes


class DistancePointBBoxCoder:
    """Encode a ground-truth box as the distances ``(left, top, right, bottom)`` from a point.

    Used by anchor-free heads (FCOS, GFL, ...) whose priors are points rather than boxes.

    Args:
        clip_border: clip decoded boxes to ``max_shape`` when one is given.
    """

    def __init__(self, clip_border: bool = True) -> None:
        self.clip_border = clip_border

    def encode(
        self,
        points: Tensor,
        gt_bboxes: Tensor,
        max_dis: float | None = None,
        eps: float = 0.1,
        *,
        stride: float | Tensor | None = None,
    ) -> Tensor:
        """``points: Tensor[N, 2]``, ``gt_bboxes: Tensor[N, 4]`` -> ``Tensor[N, 4]`` (l, t, r, b).

        ``max_dis``, ``eps`` and ``stride`` as in :func:`bbox2distance`.
        """
        points = _check_last_dim(points, "points", 2)
        gt_bboxes = _check_last_dim(gt_bboxes, "gt_bboxes")
        if points.shape[:-1] != gt_bboxes.shape[:-1]:
            raise ValueError(
                f"points, gt_bboxes: need one box per point, got {tuple(points.shape)} and "
                f"{tuple(gt_bboxes.shape)}"
            )
        return bbox2distance(points, gt_bboxes, max_dis, eps, stride=stride)

    def decode(
        self,
        points: Tensor,
        pred_bboxes: Tensor,
        max_shape: Sequence[int] | Sequence[Sequence[int]] | Tensor | None = None,
        *,
        stride: float | Tensor | None = None,
    ) -> Tensor:
        """``points: Tensor[(B,) N, 2]``, ``pred_bboxes: Tensor[(B,) N, 4]`` distances -> boxes.

        ``max_shape`` is ignored when ``clip_border`` is False; ``stride`` as in
        :func:`distance2bbox`.
        """
        points = _check_last_dim(points, "points", 2)
        pred_bboxes = _check_last_dim(pred_bboxes, "pred_bboxes")
        if points.shape[0] != pred_bboxes.shape[0] or points.shape[-2] != pred_bboxes.shape[-2]:
            raise ValueError(
                f"points, pred_bboxes: need one distance per point, got {tuple(points.shape)} "
                f"and {tuple(pred_bboxes.shape)}"
            )
        return distance2bbox(
            points, pred_bboxes, max_shape if self.clip_border else None, stride=stride
        )
