"""FoveaBox targets (scale ranges, sigma-shrunk fovea, log-space targets), head loss and decode."""

import math

import pytest
import torch

from labkit.anchors import PointGenerator
from labkit.heads.fovea import (
    FoveaHead,
    fovea_decode,
    fovea_region,
    fovea_targets,
    fovea_targets_single,
)

C = 2


def _level_setup(sizes, strides):
    gen = PointGenerator(strides, offset=0.5)
    return gen.grid_priors(sizes)


def test_fovea_region_hand_case():
    # Box 16..48 on stride 8: b = [2, 2, 6, 6], half 2; left = ceil(2 + 0.6*2 - 0.5) = 3,
    # right = floor(2 + 1.4*2 - 0.5) = 4: cells 3..4 in both directions.
    r = fovea_region(torch.tensor([[16.0, 16.0, 48.0, 48.0]]), 8, (8, 8), 0.4)
    assert r.tolist() == [[3, 3, 4, 4]]
    # On stride 16 the same box gives left = ceil(1.1) = 2 > right = floor(1.9) = 1: empty.
    r = fovea_region(torch.tensor([[16.0, 16.0, 48.0, 48.0]]), 16, (4, 4), 0.4)
    assert r.tolist() == [[2, 2, 1, 1]]
    # sigma = 1 keeps every cell whose centre is inside the box.
    r = fovea_region(torch.tensor([[16.0, 16.0, 48.0, 48.0]]), 8, (8, 8), 1.0)
    assert r.tolist() == [[2, 2, 5, 5]]


def test_targets_region_and_log_values():
    sizes, strides = [(8, 8), (4, 4)], (8, 16)
    priors = _level_setup(sizes, strides)
    labels, targets = fovea_targets_single(
        torch.tensor([[16.0, 16.0, 48.0, 48.0]]),
        torch.tensor([1]),
        sizes,
        priors,
        C,
        strides,
        base_edges=(16, 32),
        scale_ranges=((1, 32), (32, 128)),  # sqrt(area) = 32 hits both (inclusive bounds)
    )
    pos0 = (labels[0] == 1).nonzero().flatten().tolist()
    assert pos0 == [3 * 8 + 3, 3 * 8 + 4, 4 * 8 + 3, 4 * 8 + 4]
    assert (labels[1] == C).all()  # in range but the fovea is empty on the coarse level
    # Cell (row 3, col 3): centre (28, 28): ((28-16), (28-16), (48-28), (48-28)) / 16.
    expected = torch.log(torch.tensor([0.75, 0.75, 1.25, 1.25]))
    assert torch.allclose(targets[0][27], expected)
    assert (targets[0][0] == 0).all() and (targets[1] == 0).all()  # background: log(1)


def test_targets_smaller_box_wins_overlap_and_clamp():
    sizes, strides = [(8, 8)], (8,)
    priors = _level_setup(sizes, strides)
    big, small = [0.0, 0.0, 64.0, 64.0], [20.0, 20.0, 44.0, 44.0]
    labels, targets = fovea_targets_single(
        torch.tensor([small, big]),
        torch.tensor([0, 1]),
        sizes,
        priors,
        C,
        strides,
        (16,),
        ((1, 64),),
    )
    grid = labels[0].view(8, 8)
    # big: cells 2..5; small (b = [2.5, 2.5, 5.5, 5.5], half 1.5): cells 3..4 on top.
    assert (grid[2:6, 2:6] != C).all() and (grid[:2] == C).all()
    assert (grid[3:5, 3:5] == 0).all()
    assert grid[2, 2] == 1 and grid[5, 5] == 1
    # Cell (2, 2) centre (20, 20) for the big box: 20/16 and 44/16, clamped into [1/16, 16].
    assert torch.allclose(targets[0][2 * 8 + 2], torch.log(torch.tensor([1.25, 1.25, 2.75, 2.75])))
    # A target below 1/16 is clamped: tiny box, one cell.
    labels, targets = fovea_targets_single(
        torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
        torch.tensor([0]),
        [(2, 2)],
        _level_setup([(2, 2)], (1,)),
        C,
        (1,),
        (64,),
        ((1, 64),),
        sigma=1.0,
    )
    assert labels[0].tolist() == [0, 0, 0, 0]
    assert torch.allclose(targets[0][0], torch.full((4,), math.log(1 / 16)))


def test_out_of_scale_range_and_empty():
    sizes, strides = [(8, 8)], (8,)
    priors = _level_setup(sizes, strides)
    labels, _ = fovea_targets_single(
        torch.tensor([[0.0, 0.0, 64.0, 64.0]]),
        torch.tensor([0]),
        sizes,
        priors,
        C,
        strides,
        (16,),
        ((1, 63),),
    )
    assert (labels[0] == C).all()
    labels, targets = fovea_targets(
        [torch.zeros(0, 4)],
        [torch.zeros(0, dtype=torch.long)],
        sizes,
        priors,
        C,
        strides,
        (16,),
        ((1, 64),),
    )
    assert (labels == C).all() and (targets == 0).all() and labels.shape == (64,)


def test_batch_layout_level_major():
    sizes, strides = [(2, 2), (1, 1)], (8, 16)
    priors = _level_setup(sizes, strides)
    gts = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
    labels, _ = fovea_targets(
        gts,
        [torch.tensor([0]), torch.tensor([1])],
        sizes,
        priors,
        C,
        strides,
        (16, 32),
        ((1, 64), (1000, 2000)),
        sigma=1.0,
    )
    # [level0 img0 (4), level0 img1 (4), level1 img0 (1), level1 img1 (1)]
    assert labels.shape == (10,)
    assert labels[:8].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert labels[8:].tolist() == [C, C]


def test_decode_clips_to_image():
    priors = torch.tensor([[4.0, 4.0]])
    pred = torch.log(torch.tensor([[1.0, 0.25, 0.5, 100.0]]))
    boxes = fovea_decode(priors, pred, 16, (30, 40))
    assert boxes.tolist() == [[0.0, 0.0, 12.0, 29.0]]


def test_head_loss_and_empty_gt():
    torch.manual_seed(0)
    head = FoveaHead(
        C,
        8,
        feat_channels=8,
        stacked_convs=1,
        strides=(8, 16),
        base_edges=(16, 32),
        scale_ranges=((1, 64), (32, 128)),
    )
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    metas = [dict(img_shape=(64, 64), scale_factor=(1.0, 1.0, 1.0, 1.0))] * 2
    batch = dict(
        img_metas=metas,
        gt_bboxes=[torch.tensor([[16.0, 16.0, 48.0, 48.0]]), torch.zeros(0, 4)],
        gt_labels=[torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
    )
    losses = head.loss(feats, batch)
    assert set(losses) == {"loss_cls", "loss_bbox"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_bbox"] > 0
    batch["gt_bboxes"], batch["gt_labels"] = (
        [torch.zeros(0, 4)] * 2,
        [torch.zeros(0, dtype=torch.long)] * 2,
    )
    losses = head.loss(feats, batch)
    assert losses["loss_bbox"].item() == 0 and torch.isfinite(losses["loss_cls"])
    with pytest.raises(ValueError, match="gt_bboxes"):
        batch["gt_bboxes"] = [torch.tensor([[5.0, 5.0, 1.0, 9.0]]), torch.zeros(0, 4)]
        batch["gt_labels"] = [torch.tensor([0]), torch.zeros(0, dtype=torch.long)]
        head.loss(feats, batch)
