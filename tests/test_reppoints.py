"""RepPoints: PointAssigner hand cases and its reference, pseudo-box transforms, offsets, head loss."""

import math

import numpy as np
import pytest
import torch

from labkit.anchors import PointGenerator
from labkit.assigners.point import PointAssigner, point_assign_reference
from labkit.heads.reppoints import RepPointsHead, offsets_to_points, points_to_bbox


def _points(sizes=((8, 8), (4, 4), (2, 2)), strides=(8, 16, 32)):
    return torch.cat(PointGenerator(strides, offset=0.0).grid_priors(list(sizes), with_stride=True))


def test_point_assigner_hand_case():
    pts = _points()
    gts = torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 64.0, 64.0]])
    res = PointAssigner(scale=4, pos_num=1).assign(pts, gts, torch.tensor([3, 5]))
    pos = (res.gt_inds > 0).nonzero().flatten().tolist()
    # GT 1: 32 px -> level log2(32/4) = 3 (stride 8), centre (16, 16) = point (row 2, col 2).
    # GT 2: 64 px -> level 4 (stride 16), centre (32, 32) = point (2, 2) of the 4x4 map.
    assert pos == [2 * 8 + 2, 64 + 2 * 4 + 2]
    assert res.gt_inds[pos].tolist() == [1, 2]
    assert res.labels[pos].tolist() == [3, 5]
    assert (res.labels[res.gt_inds == 0] == -1).all()
    assert res.max_overlaps is None


def test_point_assigner_nearest_gt_wins_and_ties_keep_first():
    pts = _points()
    a, b = [0.0, 0.0, 32.0, 32.0], [2.0, 2.0, 34.0, 34.0]
    for gts, expected in (([a, b], 1), ([b, a], 2)):
        res = PointAssigner(4, 1).assign(pts, torch.tensor(gts), torch.tensor([0, 1]))
        assert res.gt_inds[18].item() == expected  # point (16, 16): A is at distance 0
        assert (res.gt_inds > 0).sum() == 1  # B's only candidate went to A
    res = PointAssigner(4, 1).assign(pts, torch.tensor([a, a]), torch.tensor([0, 1]))
    assert res.gt_inds[18].item() == 1


def test_point_assigner_levels_truncate_and_clamp():
    pts = _points()
    gts = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 63.0, 63.0], [0.0, 0.0, 500.0, 500.0]])
    res = PointAssigner(4, 1).assign(pts, gts, torch.tensor([0, 1, 2]))
    stride = pts[:, 2]
    # 4 px -> level 0 clamped up to 3; 63 px -> log2(15.75) = 3.98 truncated to 3; 500 -> 6 -> 5.
    assert stride[res.gt_inds == 1].tolist() == [8.0]
    assert stride[res.gt_inds == 2].tolist() == [8.0]
    assert stride[res.gt_inds == 3].tolist() == [32.0]


def test_point_assigner_empty_and_bad_input():
    pts = _points()
    res = PointAssigner(4, 1).assign(pts, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (res.gt_inds == 0).all() and (res.labels == -1).all()
    with pytest.raises(ValueError, match="points"):
        PointAssigner().assign(pts[:, :2], torch.zeros(0, 4))
    with pytest.raises(ValueError, match="gt_bboxes"):
        PointAssigner().assign(pts, torch.tensor([[0.0, 0.0, float("inf"), 1.0]]))


def test_point_assigner_matches_reference_on_random_cases():
    g = torch.Generator().manual_seed(0)
    pts = _points(((16, 16), (8, 8), (4, 4)))
    for _ in range(50):
        k = int(torch.randint(1, 12, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 100
        wh = torch.rand(k, 2, generator=g) * 120 + 2
        gts = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 4, (k,), generator=g)
        for pos_num in (1, 3):
            fast = PointAssigner(4, pos_num).assign(pts, gts, labels)
            ref = point_assign_reference(pts, gts, labels, 4, pos_num)
            assert torch.equal(fast.gt_inds, ref.gt_inds)
            assert torch.equal(fast.labels, ref.labels)


def test_pseudo_box_transforms():
    xy = torch.tensor(
        [[0, 0], [2, 0], [0, 4], [2, 4], [10, 10], [1, 1], [3, 3], [5, 7], [-1, 2]],
        dtype=torch.float32,
    )
    yx = xy.flip(1).reshape(1, -1)
    assert points_to_bbox(yx, "minmax").tolist() == [[-1.0, 0.0, 10.0, 10.0]]
    assert points_to_bbox(yx, "partial_minmax").tolist() == [[0.0, 0.0, 2.0, 4.0]]
    assert points_to_bbox(xy.reshape(1, -1), "minmax", y_first=False).tolist() == [
        [-1.0, 0.0, 10.0, 10.0]
    ]
    mx, my = xy[:, 0].mean().item(), xy[:, 1].mean().item()
    sx, sy = np.std(xy[:, 0].numpy(), ddof=1), np.std(xy[:, 1].numpy(), ddof=1)
    box = points_to_bbox(yx, "moment")[0]
    assert box.tolist() == pytest.approx([mx - sx, my - sy, mx + sx, my + sy], rel=1e-5)
    # The learnable transfer scales half width / height by exp(transfer).
    box = points_to_bbox(yx, "moment", moment_transfer=torch.tensor([math.log(2.0), 0.0]))[0]
    assert box.tolist() == pytest.approx([mx - 2 * sx, my - sy, mx + 2 * sx, my + sy], rel=1e-5)
    # Feature-map layout [B, 2P, H, W] gives [B, 4, H, W].
    maps = yx.view(1, 18, 1, 1).repeat(2, 1, 3, 2)
    assert points_to_bbox(maps, "minmax").shape == (2, 4, 3, 2)
    with pytest.raises(ValueError, match="transform"):
        points_to_bbox(yx, "mean")


def test_offsets_to_points_swaps_y_first_and_scales():
    centers = torch.tensor([[8.0, 16.0, 8.0, 8.0]])
    pred = torch.zeros(1, 18, 1, 1)
    pred[0, 0], pred[0, 1] = 1.0, 2.0  # point 0: (y, x) = (1, 2) strides
    pts = offsets_to_points(centers, pred, 8)
    assert pts.shape == (1, 1, 18)
    assert pts[0, 0, :4].tolist() == [24.0, 24.0, 8.0, 16.0]


def test_head_forward_loss_predict_and_empty_gt():
    torch.manual_seed(0)
    head = RepPointsHead(
        2, 8, feat_channels=8, stacked_convs=1, point_feat_channels=8, strides=(8, 16)
    )
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    cls, init, refine = head(feats)
    assert (
        cls[0].shape == (2, 2, 8, 8)
        and init[1].shape == (2, 18, 4, 4)
        and refine[0].shape == (2, 18, 8, 8)
    )
    metas = [dict(img_shape=(64, 64), pad_shape=(64, 64), scale_factor=(1.0, 1.0, 1.0, 1.0))] * 2
    batch = dict(
        img_metas=metas,
        gt_bboxes=[torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.zeros(0, 4)],
        gt_labels=[torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
    )
    losses = head.loss(feats, batch)
    assert set(losses) == {"loss_cls", "loss_pts_init", "loss_pts_refine"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_pts_init"] > 0
    sum(losses.values()).backward()
    assert head.moment_transfer.grad is not None
    batch["gt_bboxes"], batch["gt_labels"] = (
        [torch.zeros(0, 4)] * 2,
        [torch.zeros(0, dtype=torch.long)] * 2,
    )
    losses = head.loss(feats, batch)
    assert losses["loss_pts_init"].item() == 0 and torch.isfinite(losses["loss_cls"])
    head.eval()
    out = head.predict(feats, metas)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    with pytest.raises(ValueError, match="num_points"):
        RepPointsHead(2, 8, num_points=4)


def _set_point(maps: torch.Tensor, loc: tuple[int, int], k: int, y: float, x: float) -> None:
    """Point ``k`` of location ``(row, col)`` at ``(y, x)`` stride units (y-first channels)."""
    maps[0, 2 * k, loc[0], loc[1]] = y
    maps[0, 2 * k + 1, loc[0], loc[1]] = x


def test_refine_stage_assigns_on_init_boxes_and_matches_hand_losses():
    # One level, stride 8, a 4 x 4 map on a 32 x 32 image: points at (0, 8, 16, 24)^2
    # (RepPoints' offset 0). One GT [0, 0, 16, 16] of class 1, centred on point (8, 8),
    # i.e. location (row 1, col 1).
    head = RepPointsHead(
        2, 8, feat_channels=8, stacked_convs=1, point_feat_channels=8, strides=(8,),
        transform="minmax",
    )  # fmt: skip
    cls = torch.zeros(1, 2, 4, 4)  # p = 0.5 everywhere
    init = torch.zeros(1, 18, 4, 4)  # zero-area pseudo boxes: IoU 0 with the GT
    # Location (1, 1): init box [-1, -1, 1, 1.125] strides -> [0, 0, 16, 17] px (IoU 0.94).
    _set_point(init, (1, 1), 0, -1.0, -1.0)
    _set_point(init, (1, 1), 1, 1.125, 1.0)
    refine = init.clone()
    # Location (1, 1): refine box [1, 0, 16, 18] px.
    _set_point(refine, (1, 1), 0, -1.0, -0.875)
    _set_point(refine, (1, 1), 1, 1.25, 1.0)
    # Location (1, 2), point (16, 8): its refine box is exactly the GT, but the refine stage
    # assigns on the (detached) init boxes, where it has IoU 0: it stays negative.
    _set_point(refine, (1, 2), 0, -1.0, -2.0)
    _set_point(refine, (1, 2), 1, 1.0, 0.0)
    losses = head.loss_by_feat(
        [cls], [init], [refine],
        batch_gt_bboxes=[torch.tensor([[0.0, 0.0, 16.0, 16.0]])],
        batch_gt_labels=[torch.tensor([1])],
        batch_img_metas=[dict(img_shape=(32, 32), pad_shape=(32, 32))],
    )  # fmt: skip

    def smooth_l1(d: float, beta: float = 0.11) -> float:
        return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta

    norm = 4 * 8  # point_base_scale * stride
    # Init: PointAssigner puts the GT on location (1, 1) only; box error [0, 0, 0, 1] px,
    # loss weight 0.5, avg factor 1 positive.
    assert losses["loss_pts_init"].item() == pytest.approx(0.5 * smooth_l1(1 / norm), rel=1e-5)
    # Refine: MaxIoU (0.5 / 0.4) on init boxes -> location (1, 1) only; error [1, 0, 0, 2] px.
    expected_refine = smooth_l1(1 / norm) + smooth_l1(2 / norm)
    assert losses["loss_pts_refine"].item() == pytest.approx(expected_refine, rel=1e-5)
    # Focal loss (alpha 0.25, gamma 2) at p = 0.5 over 16 locations x 2 classes: one positive
    # element (0.25 * 0.5^2 * ln 2), 31 negative ones (0.75 * 0.5^2 * ln 2), avg factor 1.
    expected_cls = (0.25 + 31 * 0.75) * 0.25 * math.log(2)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
