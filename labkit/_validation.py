"""Argument checks shared by every public entry point, so bad input fails early and clearly."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(value: object, name: str) -> Tensor:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is a tensor; return it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_boxes(boxes: object, name: str, *, allow_reversed: bool = False) -> Tensor:
    """Validate a ``[..., N, 4]`` box tensor in ``(x1, y1, x2, y2)`` format.

    Empty boxes (``N == 0``) and zero-area boxes are valid. Raises ``TypeError`` for
    non-tensors and ``ValueError`` for a wrong last dimension, NaN/inf values, a non-float
    dtype, or ``x2 < x1`` / ``y2 < y1`` (unless ``allow_reversed``).

    Returns:
        The same tensor, unchanged.
    """
    boxes = check_tensor(boxes, name)
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name}: expected shape [..., 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {boxes.dtype}")
    if boxes.numel() == 0:
        return boxes
    if not torch.isfinite(boxes).all():
        bad = (~torch.isfinite(boxes)).any(dim=-1).nonzero()[0].tolist()
        raise ValueError(f"{name}: boxes contain NaN or inf (first bad box at index {bad})")
    if not allow_reversed:
        reversed_ = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
        if reversed_.any():
            bad = reversed_.nonzero()[0].tolist()
            raise ValueError(
                f"{name}: boxes must satisfy x2 >= x1 and y2 >= y1 (first bad box at index {bad}: "
                f"{boxes[tuple(bad)].tolist()})"
            )
    return boxes


def check_labels(
    labels: object, name: str, num_boxes: int, num_classes: int | None = None
) -> Tensor:
    """Validate a ``[N]`` integer label tensor matching ``num_boxes`` boxes (and ``< num_classes``)."""
    labels = check_tensor(labels, name)
    if labels.dim() != 1 or labels.shape[0] != num_boxes:
        raise ValueError(f"{name}: expected shape [{num_boxes}], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {labels.dtype}")
    if (
        num_classes is not None
        and labels.numel()
        and (labels.min() < 0 or labels.max() >= num_classes)
    ):
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes - 1}], got {labels.tolist()}"
        )
    return labels


def check_choice(value: object, name: str, choices: tuple) -> object:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``; return it."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value
