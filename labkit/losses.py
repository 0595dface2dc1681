"""Detection losses with mmdetection's ``weight`` / ``reduction`` / ``avg_factor`` semantics.

Every loss exists twice: a function computing the element-wise loss and reducing it with
:func:`weight_reduce_loss`, and an ``nn.Module`` holding the settings (``reduction``,
``loss_weight``, ...) whose ``forward(pred, target, weight=None, avg_factor=None,
reduction_override=None)`` is what the heads call.

The reduction rule, the one thing to remember: ``weight`` multiplies the element-wise loss;
then ``reduction="none"`` returns it, ``"sum"`` sums it, ``"mean"`` divides the sum by the
number of elements, or by ``avg_factor + eps`` when ``avg_factor`` is given (heads pass the
number of positives, so a batch with many negatives is not diluted). ``avg_factor`` with
``"sum"`` is an error.

Two mmdetection quirks are kept on purpose: the box losses (IoU, GIoU, L1, smooth L1) return
``(pred * weight).sum()`` -- a scalar zero that still has a gradient path -- when no weight is
positive, whatever the reduction (IoU loss: unless ``reduction="none"``); and a ``[N, 4]``
weight on the IoU-type losses is averaged to ``[N]`` because those losses are per box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit._validation import check_choice, check_tensor
from labkit.boxes import bbox_overlaps

__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "GIoULoss",
    "IoULoss",
    "L1Loss",
    "SmoothL1Loss",
    "binary_cross_entropy",
    "cross_entropy",
    "giou_loss",
    "iou_loss",
    "l1_loss",
    "reduce_loss",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "weight_reduce_loss",
]

REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------- reduction


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Reduce an element-wise loss: ``"none"`` (as is), ``"mean"`` or ``"sum"`` over all elements."""
    check_choice(reduction, "reduction", REDUCTIONS)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def weight_reduce_loss(
    loss: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Apply an element-wise ``weight`` and reduce, as mmdetection does.

    Args:
        loss: element-wise loss, any shape.
        weight: broadcastable to ``loss`` (e.g. ``[N]`` against ``[N]``, ``[N, 1]`` against
            ``[N, C]``) or ``None``.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        avg_factor: with ``"mean"``, divide the weighted sum by ``avg_factor + eps``
            (``eps`` = float32 machine epsilon) instead of the element count.

    Returns:
        The reduced loss (a scalar unless ``reduction="none"``).

    Raises:
        ValueError: ``avg_factor`` given together with ``reduction="sum"``.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":
        # The eps keeps avg_factor=0 (an image without positives) from dividing by zero.
        eps = torch.finfo(torch.float32).eps
        return loss.sum() / (avg_factor + eps)
    if reduction == "sum":
        raise ValueError('avg_factor: cannot be used with reduction="sum"')
    return loss


def _resolve_reduction(default: str, override: str | None) -> str:
    check_choice(override, "reduction_override", (None, *REDUCTIONS))
    return override if override else default


def _check_pair(pred: object, target: object) -> tuple[Tensor, Tensor]:
    pred = check_tensor(pred, "pred")
    target = check_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    return pred, target


def _check_weight(weight: object) -> Tensor | None:
    return None if weight is None else check_tensor(weight, "weight")


# ----------------------------------------------------------------------------- focal loss


def _class_targets_to_one_hot(target: Tensor, num_classes: int) -> Tensor:
    """``[N]`` labels in ``0..C`` (``C`` = background) -> ``[N, C]`` one-hot without the bg column."""
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target: expected integer class indices, got dtype {target.dtype}")
    if target.numel() and (target.min() < 0 or target.max() > num_classes):
        raise ValueError(
            f"target: class indices must lie in [0, {num_classes}] ({num_classes} = background), "
            f"got min {int(target.min())} and max {int(target.max())}"
        )
    return F.one_hot(target, num_classes=num_classes + 1)[:, :num_classes]


def _expand_weight_like(weight: Tensor, loss: Tensor) -> Tensor:
    """A per-prior ``[N]`` weight becomes ``[N, 1]``; a flat ``[N * C]`` one becomes ``[N, C]``."""
    if weight.shape != loss.shape:
        if weight.size(0) == loss.size(0):
            weight = weight.view(-1, 1)
        else:
            if weight.numel() != loss.numel():
                raise ValueError(
                    f"weight: expected shape [{loss.size(0)}] or {tuple(loss.shape)} (or as many "
                    f"elements), got {tuple(weight.shape)}"
                )
            weight = weight.view(loss.size(0), -1)
    if weight.dim() != loss.dim():
        raise ValueError(f"weight: cannot be matched to a loss of shape {tuple(loss.shape)}")
    return weight


def sigmoid_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    gamma: float = 2.0,
    alpha: float = 0.25,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Sigmoid focal loss (RetinaNet), one binary classifier per class.

    ``FL = -alpha * (1 - p)^gamma * log(p)`` for the target class and
    ``-(1 - alpha) * p^gamma * log(1 - p)`` for every other class.

    Args:
        pred: ``Tensor[N, C]`` logits.
        target: ``LongTensor[N]`` labels in ``0..C`` (``C`` = background: all C outputs are
            negatives), or ``Tensor[N, C]`` already one-hot (or soft) targets.
        weight: ``Tensor[N]`` per prior, ``Tensor[N, C]`` (or flattened ``[N * C]``) per
            element, or ``None``.
        gamma: focusing exponent; alpha: weight of the positive term.
        reduction, avg_factor: see :func:`weight_reduce_loss`.

    Returns:
        The loss, ``Tensor[N, C]`` with ``reduction="none"``.
    """
    pred = check_tensor(pred, "pred")
    target = check_tensor(target, "target")
    if pred.dim() != 2:
        raise ValueError(f"pred: expected shape [N, C], got {tuple(pred.shape)}")
    if target.dim() == pred.dim():
        if target.shape != pred.shape:
            raise ValueError(
                f"target: one-hot targets must have the shape of pred {tuple(pred.shape)}, "
                f"got {tuple(target.shape)}"
            )
    elif target.shape != pred.shape[:1]:
        raise ValueError(f"target: expected shape [{pred.shape[0]}], got {tuple(target.shape)}")
    else:
        target = _class_targets_to_one_hot(target, pred.size(1))
    target = target.type_as(pred)
    prob = pred.sigmoid()
    # one_minus_pt is (1 - p_t) of the paper: how wrong the prediction is.
    one_minus_pt = (1 - prob) * target + prob * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * one_minus_pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None:
        weight = _expand_weight_like(check_tensor(weight, "weight"), loss)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


class FocalLoss(nn.Module):
    """Sigmoid focal loss module (mmdetection ``FocalLoss``; only ``use_sigmoid=True``).

    ``forward(pred[N, C], target[N] in 0..C, weight=None, avg_factor=None,
    reduction_override=None)``; see :func:`sigmoid_focal_loss`. The result is multiplied by
    ``loss_weight``.
    """

    def __init__(
        self,
        use_sigmoid: bool = True,
        gamma: float = 2.0,
        alpha: float = 0.25,
        reduction: str = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if use_sigmoid is not True:
            raise ValueError("use_sigmoid: only the sigmoid focal loss is supported (True)")
        self.use_sigmoid = use_sigmoid
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.loss_weight = loss_weight

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        """Weighted focal loss of ``pred: Tensor[N, C]`` against ``target: LongTensor[N]``."""
        reduction = _resolve_reduction(self.reduction, reduction_override)
        loss = sigmoid_focal_loss(
            pred, target, weight, self.gamma, self.alpha, reduction, avg_factor
        )
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}, loss_weight={self.loss_weight}"


# ----------------------------------------------------------------------------- cross-entropy


def cross_entropy(
    pred: Tensor,
    label: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int | None = -100,
    avg_non_ignore: bool = False,
) -> Tensor:
    """Softmax cross-entropy per sample, then :func:`weight_reduce_loss`.

    Args:
        pred: ``Tensor[N, C]`` logits (``C`` includes the background class if used).
        label: ``LongTensor[N]`` in ``0..C-1``; entries equal to ``ignore_index`` give 0 loss.
        weight: ``Tensor[N]`` per-sample weight or ``None``.
        class_weight: ``Tensor[C]`` rescaling each class (applied inside the per-sample loss,
            so ``"mean"`` still divides by ``N``, unlike ``torch``'s weighted mean).
        ignore_index: label to skip (``None`` means -100, as in torch).
        avg_non_ignore: with ``"mean"`` and no ``avg_factor``, average over non-ignored
            samples only.
    """
    ignore_index = -100 if ignore_index is None else ignore_index
    loss = F.cross_entropy(
        pred, label, weight=class_weight, reduction="none", ignore_index=ignore_index
    )
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = label.numel() - (label == ignore_index).sum().item()
    if weight is not None:
        weight = weight.float()
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def _expand_onehot_labels(
    labels: Tensor, label_weights: Tensor | None, label_channels: int, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``[N]`` labels -> ``[N, C]`` binary targets, weights and validity mask (bg ``C`` = zeros)."""
    bin_labels = labels.new_zeros((labels.size(0), label_channels))
    valid_mask = (labels >= 0) & (labels != ignore_index)
    inds = torch.nonzero(valid_mask & (labels < label_channels), as_tuple=False)
    if inds.numel() > 0:
        bin_labels[inds, labels[inds]] = 1
    valid_mask = valid_mask.view(-1, 1).expand(labels.size(0), label_channels).float()
    if label_weights is None:
        bin_label_weights = valid_mask
    else:
        bin_label_weights = label_weights.view(-1, 1).repeat(1, label_channels) * valid_mask
    return bin_labels, bin_label_weights, valid_mask


def binary_cross_entropy(
    pred: Tensor,
    label: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int | None = -100,
    avg_non_ignore: bool = False,
) -> Tensor:
    """Sigmoid (binary) cross-entropy with logits, then :func:`weight_reduce_loss`.

    Args:
        pred: ``Tensor[N, C]`` logits, or any shape when ``label`` has the same shape
            (e.g. centerness ``Tensor[N]`` against soft targets in ``[0, 1]``).
        label: ``LongTensor[N]`` class indices (index ``>= C`` -> all zeros, i.e. background;
            ``ignore_index`` or negative -> weight 0), or float targets shaped like ``pred``.
        weight: per-sample ``Tensor[N]`` (class-index labels) or broadcastable to ``pred``.
        class_weight: ``pos_weight`` of ``binary_cross_entropy_with_logits``.
    """
    ignore_index = -100 if ignore_index is None else ignore_index
    if pred.dim() != label.dim():
        label, weight, valid_mask = _expand_onehot_labels(
            label, weight, pred.size(-1), ignore_index
        )
    else:
        valid_mask = ((label >= 0) & (label != ignore_index)).float()
        weight = valid_mask if weight is None else weight * valid_mask
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = valid_mask.sum().item()
    loss = F.binary_cross_entropy_with_logits(
        pred, label.float(), pos_weight=class_weight, reduction="none"
    )
    return weight_reduce_loss(loss, weight.float(), reduction, avg_factor)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy module: softmax (``use_sigmoid=False``) or sigmoid per class.

    ``forward(cls_score, label, weight=None, avg_factor=None, reduction_override=None,
    ignore_index=None)``; see :func:`cross_entropy` and :func:`binary_cross_entropy` for the
    shapes. ``class_weight`` is a list of per-class factors.
    """

    def __init__(
        self,
        use_sigmoid: bool = False,
        reduction: str = "mean",
        class_weight: list[float] | None = None,
        ignore_index: int | None = None,
        loss_weight: float = 1.0,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__()
        self.use_sigmoid = use_sigmoid
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.class_weight = class_weight
        self.ignore_index = ignore_index
        self.loss_weight = loss_weight
        self.avg_non_ignore = avg_non_ignore

    def forward(
        self,
        cls_score: Tensor,
        label: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
        ignore_index: int | None = None,
    ) -> Tensor:
        """Weighted cross-entropy of ``cls_score`` against ``label`` times ``loss_weight``."""
        cls_score = check_tensor(cls_score, "cls_score")
        label = check_tensor(label, "label")
        weight = _check_weight(weight)
        if label.shape[:1] != cls_score.shape[:1]:
            raise ValueError(
                f"label: expected {cls_score.shape[0]} entries like cls_score "
                f"{tuple(cls_score.shape)}, got {tuple(label.shape)}"
            )
        reduction = _resolve_reduction(self.reduction, reduction_override)
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        class_weight = None
        if self.class_weight is not None:
            class_weight = cls_score.new_tensor(self.class_weight)
        criterion = binary_cross_entropy if self.use_sigmoid else cross_entropy
        loss = criterion(
            cls_score,
            label,
            weight,
            reduction=reduction,
            avg_factor=avg_factor,
            class_weight=class_weight,
            ignore_index=ignore_index,
            avg_non_ignore=self.avg_non_ignore,
        )
        return self.loss_weight * loss


# ----------------------------------------------------------------------------- box losses


def iou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    mode: str = "log",
    eps: float = 1e-6,
) -> Tensor:
    """IoU loss of aligned boxes: ``-log(IoU)`` (``"log"``), ``1 - IoU`` or ``1 - IoU^2``.

    Args:
        pred, target: ``Tensor[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        weight: ``Tensor[N]`` or ``None``.
        mode: ``"log"``, ``"linear"`` or ``"square"``.
        eps: IoU is clamped to ``>= eps`` first (so the log stays finite).

    Returns:
        The loss, ``Tensor[N]`` with ``reduction="none"``.
    """
    check_choice(mode, "mode", ("linear", "square", "log"))
    ious = bbox_overlaps(pred, target, is_aligned=True, check=False).clamp(min=eps)
    if mode == "linear":
        loss = 1 - ious
    elif mode == "square":
        loss = 1 - ious**2
    else:
        loss = -ious.log()
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    eps: float = 1e-7,
) -> Tensor:
    """Generalized IoU loss ``1 - GIoU`` of aligned ``Tensor[N, 4]`` boxes (range [0, 2])."""
    gious = bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=eps, check=False)
    return weight_reduce_loss(1 - gious, weight, reduction, avg_factor)


def smooth_l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    beta: float = 1.0,
) -> Tensor:
    """Smooth L1: ``0.5 * d^2 / beta`` where ``d = |pred - target| < beta``, else ``d - 0.5 * beta``.

    ``pred``, ``target`` and ``weight`` share a shape (e.g. ``[N, 4]`` deltas).
    """
    if beta <= 0:
        raise ValueError(f"beta: expected a positive number, got {beta}")
    if target.numel() == 0:
        return pred.sum() * 0
    diff = torch.abs(pred - target)
    loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """L1 loss ``|pred - target|`` element-wise, then :func:`weight_reduce_loss`."""
    if target.numel() == 0:
        return pred.sum() * 0
    return weight_reduce_loss(torch.abs(pred - target), weight, reduction, avg_factor)


def _zero_when_no_weight(pred: Tensor, weight: Tensor) -> Tensor:
    # mmdetection returns this (a zero that keeps pred in the graph) when nothing is weighted.
    if pred.dim() == weight.dim() + 1:
        weight = weight.unsqueeze(1)
    return (pred * weight).sum()


def _per_box_weight(weight: Tensor | None, pred: Tensor) -> Tensor | None:
    # IoU-type losses are per box; a per-coordinate [N, 4] weight is averaged to [N].
    if weight is not None and weight.dim() > 1:
        if weight.shape != pred.shape:
            raise ValueError(
                f"weight: expected shape [{pred.shape[0]}] or {tuple(pred.shape)}, "
                f"got {tuple(weight.shape)}"
            )
        weight = weight.mean(-1)
    return weight


class _BoxLoss(nn.Module):
    """Shared settings and argument checks of the box regression losses."""

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.loss_weight = loss_weight

    def _prepare(self, pred, target, weight, reduction_override):
        pred, target = _check_pair(pred, target)
        weight = _check_weight(weight)
        return pred, target, weight, _resolve_reduction(self.reduction, reduction_override)


class IoULoss(_BoxLoss):
    """IoU loss module (mmdetection ``IoULoss``): ``mode="log"`` gives ``-log(IoU)``.

    ``forward(pred[N, 4], target[N, 4], weight[N] or [N, 4] = None, avg_factor=None,
    reduction_override=None)``; see :func:`iou_loss`.
    """

    def __init__(
        self,
        linear: bool = False,
        eps: float = 1e-6,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        mode: str = "log",
    ) -> None:
        super().__init__(reduction, loss_weight)
        check_choice(mode, "mode", ("linear", "square", "log"))
        # `linear=True` is mmdetection's older spelling of mode="linear".
        self.mode = "linear" if linear else mode
        self.eps = eps

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        """Weighted IoU loss of aligned boxes times ``loss_weight``."""
        pred, target, weight, reduction = self._prepare(pred, target, weight, reduction_override)
        if weight is not None and not torch.any(weight > 0) and reduction != "none":
            return _zero_when_no_weight(pred, weight)
        weight = _per_box_weight(weight, pred)
        loss = iou_loss(pred, target, weight, reduction, avg_factor, mode=self.mode, eps=self.eps)
        return self.loss_weight * loss


class GIoULoss(_BoxLoss):
    """Generalized IoU loss module ``1 - GIoU`` (mmdetection ``GIoULoss``, ``eps=1e-6``).

    ``forward(pred[N, 4], target[N, 4], weight[N] or [N, 4] = None, avg_factor=None,
    reduction_override=None)``.
    """

    def __init__(self, eps: float = 1e-6, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        self.eps = eps

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        """Weighted GIoU loss of aligned boxes times ``loss_weight``."""
        pred, target, weight, reduction = self._prepare(pred, target, weight, reduction_override)
        if weight is not None and not torch.any(weight > 0):
            return _zero_when_no_weight(pred, weight)
        weight = _per_box_weight(weight, pred)
        loss = giou_loss(pred, target, weight, reduction, avg_factor, eps=self.eps)
        return self.loss_weight * loss


class SmoothL1Loss(_BoxLoss):
    """Smooth L1 module; ``forward(pred, target, weight=None, avg_factor=None, reduction_override=None)``
    with ``pred``, ``target`` (and ``weight``) of one shape, e.g. ``[N, 4]``."""

    def __init__(self, beta: float = 1.0, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        if beta <= 0:
            raise ValueError(f"beta: expected a positive number, got {beta}")
        self.beta = beta

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        """Weighted smooth L1 loss times ``loss_weight``."""
        pred, target, weight, reduction = self._prepare(pred, target, weight, reduction_override)
        if weight is not None and not torch.any(weight > 0):
            return _zero_when_no_weight(pred, weight)
        loss = smooth_l1_loss(pred, target, weight, reduction, avg_factor, beta=self.beta)
        return self.loss_weight * loss


class L1Loss(_BoxLoss):
    """L1 module; ``forward(pred, target, weight=None, avg_factor=None, reduction_override=None)``."""

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        """Weighted L1 loss times ``loss_weight``."""
        pred, target, weight, reduction = self._prepare(pred, target, weight, reduction_override)
        if weight is not None and not torch.any(weight > 0):
            return _zero_when_no_weight(pred, weight)
        loss = l1_loss(pred, target, weight, reduction, avg_factor)
        return self.loss_weight * loss
