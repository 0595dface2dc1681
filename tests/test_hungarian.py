"""HungarianAssigner and its match costs: hand cases, brute force, batch == per image."""

import itertools
import math

import pytest
import torch

from labkit.assigners.hungarian import BBoxL1Cost, FocalLossCost, HungarianAssigner, IoUCost
from labkit.boxes import bbox_overlaps


def test_focal_cost_by_hand():
    logits = torch.tensor([[[0.0, 2.0]]])
    cost = FocalLossCost(weight=2.0)(logits, torch.tensor([[1, 0]]))
    p = 1 / (1 + math.exp(-2.0))
    pos = -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2
    neg = -math.log(1 - p + 1e-12) * 0.75 * p**2
    half = -math.log(0.5) * 0.25 * 0.25 - (-math.log(0.5) * 0.75 * 0.25)
    torch.testing.assert_close(cost, torch.tensor([[[2 * (pos - neg), 2 * half]]]))


def test_l1_cost_normalizes_and_converts_to_cxcywh():
    pred = torch.tensor([[[0.0, 0.0, 20.0, 10.0]]])
    gt = torch.tensor([[[10.0, 10.0, 30.0, 30.0]]])
    factors = torch.tensor([[[40.0, 20.0, 40.0, 20.0]]])
    # cxcywh normalized: pred (0.25, 0.25, 0.5, 0.5), gt (0.5, 1.0, 0.5, 1.0)
    assert float(BBoxL1Cost(box_format="xywh")(pred, gt, factors)) == pytest.approx(
        0.25 + 0.75 + 0 + 0.5
    )
    # xyxy normalized: pred (0, 0, .5, .5), gt (.25, .5, .75, 1.5)
    assert float(BBoxL1Cost(weight=2.0)(pred, gt, factors)) == pytest.approx(
        2 * (0.25 + 0.5 + 0.25 + 1.0)
    )
    with pytest.raises(ValueError, match="box_format"):
        BBoxL1Cost(box_format="cxcywh")


def test_giou_cost_by_hand():
    pred = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    gt = torch.tensor([[[5.0, 0.0, 15.0, 10.0], [20.0, 0.0, 30.0, 10.0]]])
    cost = IoUCost(weight=2.0)(pred, gt, None)
    iou = 50 / 150
    giou_far = 0 - (300 - 200) / 300
    torch.testing.assert_close(cost, torch.tensor([[[-2 * iou, -2 * giou_far]]]))


def _boxes(cxcywh, shape):
    h, w = shape
    t = torch.tensor(cxcywh, dtype=torch.float32).view(-1, 4)
    xy = torch.cat([t[:, :2] - t[:, 2:] / 2, t[:, :2] + t[:, 2:] / 2], -1)
    return xy * torch.tensor([w, h, w, h])


def test_assign_swapped_pair_and_labels():
    shape = (100, 200)
    preds = _boxes([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]], shape)
    gts = _boxes([[0.71, 0.69, 0.2, 0.21], [0.2, 0.21, 0.1, 0.1]], shape)
    scores = torch.zeros(3, 4)
    result = HungarianAssigner().assign(scores, preds, gts, torch.tensor([3, 1]), shape)
    assert result.gt_inds.tolist() == [2, 1, 0]
    assert result.labels.tolist() == [1, 3, -1]
    assert result.num_gts == 2 and result.max_overlaps is None


def test_assign_empty_gt_and_no_preds():
    assigner = HungarianAssigner()
    result = assigner.assign(
        torch.zeros(4, 3),
        torch.rand(4, 4) + torch.tensor([0, 0, 1, 1]),
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        (10, 10),
    )
    assert result.gt_inds.tolist() == [0, 0, 0, 0] and result.labels.tolist() == [-1] * 4
    result = assigner.assign(
        torch.zeros(0, 3),
        torch.zeros(0, 4),
        torch.tensor([[0.0, 0, 2, 2]]),
        torch.tensor([1]),
        (10, 10),
    )
    assert result.gt_inds.numel() == 0


def _random(n, k, c, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (60, 90)

    def cxcywh(m):
        return torch.cat(
            [
                torch.rand(m, 2, generator=gen) * 0.8 + 0.1,
                torch.rand(m, 2, generator=gen) * 0.3 + 0.05,
            ],
            1,
        ).tolist()

    preds, gts = _boxes(cxcywh(n), shape), _boxes(cxcywh(k), shape)
    return (
        torch.randn(n, c, generator=gen),
        preds,
        gts,
        torch.randint(0, c, (k,), generator=gen),
        shape,
    )


@pytest.mark.parametrize("n,k", [(5, 3), (4, 4), (3, 5)])
def test_assign_is_optimal_against_brute_force(n, k):
    scores, preds, gts, labels, shape = _random(n, k, 4, seed=n * 10 + k)
    assigner = HungarianAssigner()
    result = assigner.assign(scores, preds, gts, labels, shape)
    cost = assigner.cost_matrix(
        scores[None], preds[None], gts[None], labels[None], torch.tensor([shape])
    )[0]
    matched = (result.gt_inds > 0).nonzero().squeeze(1)
    total = float(cost[matched, result.gt_inds[matched] - 1].sum())
    if n >= k:
        best = min(
            sum(float(cost[p, j]) for j, p in enumerate(perm))
            for perm in itertools.permutations(range(n), k)
        )
    else:
        best = min(
            sum(float(cost[i, g]) for i, g in enumerate(perm))
            for perm in itertools.permutations(range(k), n)
        )
    assert total == pytest.approx(best, rel=1e-5)
    assert len(matched) == min(n, k)
    assert len(set(result.gt_inds[matched].tolist())) == min(n, k)


def test_batch_matches_per_image():
    problems = [_random(6, k, 5, seed=k) for k in (2, 0, 4)]
    assigner = HungarianAssigner()
    batch = assigner.assign_batch(
        torch.stack([p[0] for p in problems]),
        torch.stack([p[1] for p in problems]),
        [p[2] for p in problems],
        [p[3] for p in problems],
        [p[4] for p in problems],
    )
    for p, res in zip(problems, batch, strict=True):
        single = assigner.assign(*p)
        assert torch.equal(single.gt_inds, res.gt_inds) and torch.equal(single.labels, res.labels)


def test_assign_errors():
    assigner = HungarianAssigner()
    with pytest.raises(ValueError, match="gt_labels"):
        assigner.assign(
            torch.zeros(2, 3),
            torch.tensor([[0.0, 0, 1, 1]] * 2),
            torch.tensor([[0.0, 0, 2, 2]]),
            torch.tensor([7]),
            (10, 10),
        )
    with pytest.raises(ValueError, match="gt_bboxes"):
        assigner.assign(
            torch.zeros(2, 3),
            torch.tensor([[0.0, 0, 1, 1]] * 2),
            torch.tensor([[3.0, 0, 2, 2]]),
            torch.tensor([1]),
            (10, 10),
        )
    with pytest.raises(ValueError, match="pred_bboxes"):
        assigner.assign(
            torch.zeros(2, 3),
            torch.zeros(3, 4),
            torch.tensor([[0.0, 0, 2, 2]]),
            torch.tensor([1]),
            (10, 10),
        )


def test_nan_predictions_give_a_clear_error():
    scores = torch.full((2, 3), float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        HungarianAssigner().assign(
            scores,
            torch.tensor([[0.0, 0, 1, 1]] * 2),
            torch.tensor([[0.0, 0, 2, 2]]),
            torch.tensor([1]),
            (10, 10),
        )


def test_match_costs_list():
    scores, preds, gts, labels, shape = _random(5, 3, 4, seed=3)
    default = HungarianAssigner()
    explicit = HungarianAssigner(
        [
            IoUCost(iou_mode="giou", weight=2.0),
            FocalLossCost(weight=2.0),
            BBoxL1Cost(weight=5.0, box_format="xywh"),
        ]
    )
    args = (scores[None], preds[None], gts[None], labels[None], torch.tensor([shape]))
    torch.testing.assert_close(default.cost_matrix(*args), explicit.cost_matrix(*args))
    only_iou = HungarianAssigner([IoUCost(iou_mode="iou")])
    torch.testing.assert_close(only_iou.cost_matrix(*args)[0], -bbox_overlaps(preds, gts))
    with pytest.raises(TypeError, match="match_costs"):
        HungarianAssigner(["giou"])
