"""Losses against hand computations: focal, cross-entropy, IoU/GIoU, L1/smooth L1, reductions."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.losses import (
    CrossEntropyLoss,
    FocalLoss,
    GIoULoss,
    IoULoss,
    L1Loss,
    SmoothL1Loss,
    sigmoid_focal_loss,
    weight_reduce_loss,
)

EPS32 = torch.finfo(torch.float32).eps


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal_term(logit: float, positive: bool, alpha=0.25, gamma=2.0) -> float:
    p = sig(logit)
    if positive:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p**gamma * -math.log(1 - p)


# ----------------------------------------------------------------------------- reductions


def test_weight_reduce_loss_modes_and_avg_factor():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert weight_reduce_loss(loss, weight, "none").tolist() == [1.0, 0.0, 3.0, 4.0]
    assert weight_reduce_loss(loss, weight, "sum").item() == 8.0
    assert weight_reduce_loss(loss, weight, "mean").item() == 2.0  # 8 / 4 elements
    # avg_factor replaces the element count: 8 / (2 + eps)
    got = weight_reduce_loss(loss, weight, "mean", avg_factor=2)
    assert got.item() == pytest.approx(8 / (2 + EPS32), rel=1e-7)
    # avg_factor = 0 (no positives) stays finite thanks to eps
    assert torch.isfinite(weight_reduce_loss(loss, weight, "mean", avg_factor=0))
    # "none" with avg_factor just applies the weight
    assert weight_reduce_loss(loss, weight, "none", avg_factor=2).tolist() == [1, 0, 3, 4]


def test_weight_reduce_loss_errors():
    with pytest.raises(ValueError, match="avg_factor"):
        weight_reduce_loss(torch.ones(3), reduction="sum", avg_factor=2)
    with pytest.raises(ValueError, match="reduction"):
        weight_reduce_loss(torch.ones(3), reduction="average")


# ----------------------------------------------------------------------------- focal loss


def test_focal_loss_2x3_by_hand():
    # Three classes; sample 0 is class 1, sample 1 is background (label 3 = C).
    pred = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    target = torch.tensor([1, 3])
    expected = [
        [focal_term(0.0, False), focal_term(1.0, True), focal_term(-1.0, False)],
        [focal_term(2.0, False), focal_term(0.0, False), focal_term(0.0, False)],
    ]
    # e.g. element (0, 0): 0.75 * 0.5^2 * ln 2 = 0.1299654
    assert expected[0][0] == pytest.approx(0.75 * 0.25 * math.log(2))
    got = FocalLoss(reduction="none")(pred, target)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    total = sum(map(sum, expected))
    assert FocalLoss()(pred, target).item() == pytest.approx(total / 6, rel=1e-6)
    assert FocalLoss(loss_weight=2.0)(pred, target, avg_factor=1.0).item() == pytest.approx(
        2 * total / (1 + EPS32), rel=1e-6
    )


def test_focal_loss_weights_and_one_hot():
    pred = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    target = torch.tensor([1, 3])
    full = FocalLoss(reduction="none")(pred, target)
    # per-sample weight [N] broadcasts over classes
    got = FocalLoss(reduction="sum")(pred, target, weight=torch.tensor([1.0, 0.0]))
    assert got.item() == pytest.approx(full[0].sum().item(), rel=1e-6)
    # per-element weight, also accepted flattened [N * C]
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    a = FocalLoss(reduction="sum")(pred, target, weight=w)
    b = FocalLoss(reduction="sum")(pred, target, weight=w.flatten())
    assert a.item() == pytest.approx((full * w).sum().item(), rel=1e-6)
    assert b.item() == pytest.approx(a.item())
    # one-hot targets give the same loss as class indices
    one_hot = torch.tensor([[0, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(sigmoid_focal_loss(pred, one_hot, reduction="none"), full)
    # reduction_override wins over the module's reduction
    assert FocalLoss(reduction="sum")(pred, target, reduction_override="none").shape == (2, 3)


def test_focal_loss_bad_input():
    pred = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="target"):
        FocalLoss()(pred, torch.tensor([0, 4]))  # 4 > C = 3
    with pytest.raises(ValueError, match="target"):
        FocalLoss()(pred, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="use_sigmoid"):
        FocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="reduction_override"):
        FocalLoss()(pred, torch.tensor([0, 1]), reduction_override="avg")
    with pytest.raises(TypeError, match="pred"):
        FocalLoss()([[0.0]], torch.tensor([0]))


# ----------------------------------------------------------------------------- cross-entropy


def test_softmax_cross_entropy_by_hand():
    pred = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    label = torch.tensor([0, 0])
    # -log(1/2) and -log(3/4)
    expected = [math.log(2), -math.log(0.75)]
    got = CrossEntropyLoss(reduction="none")(pred, label)
    torch.testing.assert_close(got, torch.tensor(expected))
    assert CrossEntropyLoss()(pred, label).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # class_weight rescales per sample but "mean" still divides by N (mmdetection, not torch)
    weighted = CrossEntropyLoss(class_weight=[2.0, 1.0])(pred, label)
    assert weighted.item() == pytest.approx(sum(expected), rel=1e-6)
    # ignored samples contribute 0; avg_non_ignore averages over the others
    label_ign = torch.tensor([0, -100])
    assert CrossEntropyLoss()(pred, label_ign).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    avg = CrossEntropyLoss(avg_non_ignore=True)(pred, label_ign)
    assert avg.item() == pytest.approx(math.log(2), rel=1e-6)


def test_sigmoid_cross_entropy_background_and_soft_targets():
    pred = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    label = torch.tensor([1, 2])  # second sample is background (C = 2): all-zero targets
    bce = CrossEntropyLoss(use_sigmoid=True, reduction="none")(pred, label)
    expected = [
        [math.log(2), -math.log(sig(2.0))],
        [math.log(2), math.log(2)],
    ]
    torch.testing.assert_close(bce, torch.tensor(expected))
    # centerness style: pred [N] logits, soft targets [N], avg_factor
    logits, targets = torch.tensor([0.0, 0.0]), torch.tensor([0.25, 1.0])
    got = CrossEntropyLoss(use_sigmoid=True)(logits, targets, avg_factor=4.0)
    assert got.item() == pytest.approx(2 * math.log(2) / (4 + EPS32), rel=1e-6)


# ----------------------------------------------------------------------------- box losses


def test_giou_loss_known_boxes():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    # box 0: IoU 1/7, enclosing 3x3 = 9, union 7 -> GIoU = 1/7 - 2/9
    # box 1: disjoint, IoU 0, enclosing 3x1 = 3, union 2 -> GIoU = -1/3
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 1 / 3])
    got = GIoULoss(reduction="none")(pred, target)
    torch.testing.assert_close(got, expected)
    assert GIoULoss()(pred, target).item() == pytest.approx(expected.mean().item(), rel=1e-6)
    # a [N, 4] weight is averaged to [N]
    w4 = torch.tensor([[1.0] * 4, [0.0, 0.0, 1.0, 1.0]])
    got = GIoULoss(reduction="sum")(pred, target, weight=w4)
    assert got.item() == pytest.approx((expected * torch.tensor([1.0, 0.5])).sum().item())


def test_iou_loss_modes():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[0.0, 0.0, 2.0, 1.0]])  # IoU 0.5
    assert IoULoss()(pred, target).item() == pytest.approx(math.log(2), rel=1e-6)
    assert IoULoss(mode="linear")(pred, target).item() == pytest.approx(0.5)
    assert IoULoss(linear=True)(pred, target).item() == pytest.approx(0.5)
    assert IoULoss(mode="square")(pred, target).item() == pytest.approx(0.75)
    # IoU 0 is clamped to eps: -log(1e-6)
    far = torch.tensor([[10.0, 10.0, 11.0, 11.0]])
    assert IoULoss()(far, target).item() == pytest.approx(-math.log(1e-6), rel=1e-5)
    with pytest.raises(ValueError, match="mode"):
        IoULoss(mode="cubic")


def test_smooth_l1_and_l1_by_hand():
    pred = torch.tensor([0.5, 2.0, -0.25, 1.0])
    target = torch.zeros(4)
    # beta = 1: |x| < 1 -> 0.5 x^2, else |x| - 0.5
    got = SmoothL1Loss(reduction="none")(pred, target)
    torch.testing.assert_close(got, torch.tensor([0.125, 1.5, 0.03125, 0.5]))
    # beta = 0.5: 0.5 x^2 / 0.5 below, |x| - 0.25 above
    got = SmoothL1Loss(beta=0.5, reduction="none")(pred, target)
    torch.testing.assert_close(got, torch.tensor([0.25, 1.75, 0.0625, 0.75]))
    assert L1Loss()(pred, target).item() == pytest.approx(3.75 / 4)
    got = L1Loss(loss_weight=2.0)(pred, target, weight=torch.tensor([1.0, 1, 0, 0]), avg_factor=2)
    assert got.item() == pytest.approx(2 * 2.5 / (2 + EPS32), rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        SmoothL1Loss(beta=0.0)
    with pytest.raises(ValueError, match="target"):
        L1Loss()(pred, torch.zeros(3))


def test_box_losses_zero_weight_quirk_and_empty():
    # No positive weight: mmdetection returns (pred * weight).sum(), a graph-connected zero.
    pred = torch.rand(3, 4, requires_grad=True)
    target = torch.rand(3, 4)
    for loss in (SmoothL1Loss(), L1Loss(), GIoULoss()):
        out = loss(pred, target, weight=torch.zeros(3, 4), reduction_override="none")
        assert out.dim() == 0 and out.item() == 0.0
        out.backward()
    # IoULoss keeps element-wise output for reduction "none"
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3)
    out = IoULoss(reduction="none")(boxes, boxes, weight=torch.zeros(3))
    assert out.shape == (3,)
    empty = torch.zeros(0, 4)
    assert SmoothL1Loss()(empty, empty).item() == 0.0
