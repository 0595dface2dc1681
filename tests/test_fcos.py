"""FCOS targets, centerness and head: hand-derived cases in mmdetection 3.x semantics."""

import math

import pytest
import torch

from labkit.boxes import bbox_overlaps
from labkit.heads.fcos import INF, centerness_target, fcos_targets, fcos_targets_single

C = 3  # number of classes; label 3 is background


def _single(points, boxes, labels, ranges=((-1, INF),), strides=(8,), **kw):
    points = torch.tensor(points, dtype=torch.float32)
    n = points.shape[0]
    rr = torch.tensor(ranges[0], dtype=torch.float32).expand(n, 2)
    st = torch.full((n,), float(strides[0]))
    return fcos_targets_single(
        points,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.long),
        rr,
        st,
        C,
        **kw,
    )


def test_points_on_edges_are_background():
    # The "inside" test is strict (> 0): a point on the left/top/right edge is outside.
    pts = [(0.0, 8.0), (8.0, 0.0), (16.0, 8.0), (8.0, 8.0), (0.5, 8.0)]
    labels, targets = _single(pts, [[0, 0, 16, 16]], [2])
    assert labels.tolist() == [C, C, C, 2, 2]
    assert targets[3].tolist() == [8.0, 8.0, 8.0, 8.0]
    assert targets[4].tolist() == [0.5, 8.0, 15.5, 8.0]


def test_point_inside_two_boxes_takes_smallest_area():
    boxes = [[0, 0, 40, 40], [10, 10, 30, 30]]
    labels, targets = _single([(20.0, 20.0), (5.0, 5.0)], boxes, [0, 1])
    assert labels.tolist() == [1, 0]
    assert targets[0].tolist() == [10.0, 10.0, 10.0, 10.0]
    assert targets[1].tolist() == [5.0, 5.0, 35.0, 35.0]
    # Order of the GTs does not matter.
    labels2, _ = _single([(20.0, 20.0)], boxes[::-1], [1, 0])
    assert labels2.tolist() == [1]


def test_smaller_box_out_of_range_leaves_point_to_larger():
    # Range (-1, 8): both boxes fail the range check (max distances 10 and 20): background.
    labels, _ = _single(
        [(20.0, 20.0)], [[0, 0, 40, 40], [10, 10, 30, 30]], [0, 1], ranges=((-1, 8),)
    )
    assert labels.tolist() == [C]
    # With range (12, 64) only the big box (max distance 20) qualifies.
    labels, targets = _single(
        [(20.0, 20.0)], [[0, 0, 40, 40], [10, 10, 30, 30]], [0, 1], ranges=((12, 64),)
    )
    assert labels.tolist() == [0]
    assert targets[0].tolist() == [20.0, 20.0, 20.0, 20.0]


def test_empty_gt_all_background():
    labels, targets = _single([(1.0, 1.0), (5.0, 5.0)], [], [])
    assert labels.tolist() == [C, C]
    assert targets.shape == (2, 4) and targets.abs().sum() == 0


def test_regress_range_bounds_are_inclusive():
    # Box 128 wide centred on (64, 64): at the centre max(l, t, r, b) = 64, exactly the shared
    # bound of levels (-1, 64) and (64, 128): positive on both.
    pts = [torch.tensor([[64.0, 64.0], [64.5, 64.0]]), torch.tensor([[64.0, 64.0], [64.5, 64.0]])]
    labels, targets = fcos_targets(
        pts,
        [torch.tensor([[0.0, 0.0, 128.0, 128.0]])],
        [torch.tensor([1])],
        C,
        strides=(8, 16),
        regress_ranges=((-1, 64), (64, 128)),
    )
    assert labels[0].tolist() == [1, C]  # 64.5 > 64: not on the first level
    assert labels[1].tolist() == [1, 1]


def test_center_sampling_radius_clipped_at_box_border():
    # Thin box 10 x 100; stride 8, radius 1.5 -> half-size 12, clipped to x in (0, 10).
    box = [[0, 0, 10, 100]]
    pts = [(9.9, 50.0), (4.0, 39.0), (4.0, 37.9), (4.0, 62.0), (4.0, 61.9), (0.0, 50.0)]
    labels, targets = _single(pts, box, [0], center_sampling=True, center_sample_radius=1.5)
    assert labels.tolist() == [0, 0, C, C, 0, C]
    # Targets are still distances to the full box, not to the centre region.
    assert torch.allclose(targets[1], torch.tensor([4.0, 39.0, 6.0, 61.0]))
    # Without center sampling the far points are positive.
    labels, _ = _single(pts, box, [0])
    assert labels.tolist() == [0, 0, 0, 0, 0, C]


def test_center_sampling_radius_scales_with_stride():
    box = [[0, 0, 200, 200]]
    pt = [(100.0 + 13.0, 100.0)]
    assert _single(pt, box, [1], strides=(8,), center_sampling=True)[0].tolist() == [C]
    assert _single(pt, box, [1], strides=(16,), center_sampling=True)[0].tolist() == [1]


def test_norm_on_bbox_and_level_layout():
    # Two images, two levels: outputs are per level, images concatenated image-major.
    p0 = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    p1 = torch.tensor([[8.0, 8.0]])
    gts = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)]
    lbl = [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    labels, targets = fcos_targets(
        [p0, p1],
        gts,
        lbl,
        C,
        strides=(8, 16),
        regress_ranges=((-1, 14), (14, 64)),
        norm_on_bbox=True,
    )
    assert labels[0].tolist() == [2, 2, C, C]
    assert labels[1].tolist() == [C, C]  # max distance 8 < 14
    assert targets[0][0].tolist() == [0.5, 0.5, 1.5, 1.5]  # (4, 4, 12, 12) / 8


def test_centerness_values():
    t = torch.tensor([[5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 9.0, 1.0]])
    c = centerness_target(t)
    assert c[0].item() == pytest.approx(1.0)
    assert c[1].item() == pytest.approx(math.sqrt(1 / 3 * 2 / 4))
    assert c[2].item() == pytest.approx(math.sqrt(1 / 9))
    assert centerness_target(torch.zeros(0, 4)).shape == (0,)


def test_bad_input_errors():
    pts = [torch.tensor([[4.0, 4.0]])]
    with pytest.raises(ValueError, match="gt_bboxes"):
        fcos_targets(
            pts,
            [torch.tensor([[0.0, 0.0, float("nan"), 1.0]])],
            [torch.tensor([0])],
            C,
            (8,),
            ((-1, 64),),
        )
    with pytest.raises(ValueError, match="gt_labels"):
        fcos_targets(
            pts,
            [torch.tensor([[0.0, 0.0, 4.0, 4.0]])],
            [torch.tensor([0, 1])],
            C,
            (8,),
            ((-1, 64),),
        )
    with pytest.raises(ValueError, match="points"):
        fcos_targets(
            pts, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], C, (8, 16), ((-1, 64),)
        )
    with pytest.raises(TypeError, match="points"):
        fcos_targets(
            [[4.0, 4.0]],
            [torch.zeros(0, 4)],
            [torch.zeros(0, dtype=torch.long)],
            C,
            (8,),
            ((-1, 64),),
        )


def _head(**kw):
    from labkit.heads.fcos import FCOSHead

    torch.manual_seed(0)
    return FCOSHead(
        C,
        8,
        feat_channels=8,
        stacked_convs=1,
        strides=(8, 16),
        regress_ranges=((-1, 32), (32, INF)),
        **kw,
    )


def _feats_batch(boxes, labels):
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    metas = [dict(img_shape=(64, 64), pad_shape=(64, 64), scale_factor=(1.0, 1.0, 1.0, 1.0))] * 2
    return feats, dict(img_metas=metas, gt_bboxes=boxes, gt_labels=labels)


def test_head_outputs_norm_on_bbox_and_centerness_branch():
    head = _head(norm_on_bbox=True, centerness_on_reg=True)
    feats, _ = _feats_batch([], [])
    cls, bbox, ctr = head(feats)
    assert (
        cls[0].shape == (2, C, 8, 8)
        and bbox[1].shape == (2, 4, 4, 4)
        and ctr[0].shape == (2, 1, 8, 8)
    )
    assert (bbox[0] >= 0).all()
    train_pred = bbox[1]
    head.eval()
    # At inference norm_on_bbox distances are multiplied back by the stride.
    assert torch.allclose(head(feats)[1][1], train_pred * 16)
    # Without the centerness branch the head returns two lists and no centerness loss.
    head = _head(centerness=False)
    assert len(head(feats)) == 2 and head.conv_centerness is None


def test_head_loss_keys_and_empty_gt():
    head = _head(center_sampling=True, norm_on_bbox=True)
    feats, batch = _feats_batch(
        [torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.zeros(0, 4)],
        [torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
    )
    losses = head.loss(feats, batch)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_bbox"] > 0
    feats, batch = _feats_batch([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2)
    losses = head.loss(feats, batch)
    assert losses["loss_bbox"].item() == 0 and losses["loss_centerness"].item() == 0
    # No positives: the focal loss is averaged over max(num_pos, 1) = 1.
    cls = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, C) for x in head(feats)[0]])
    expected = head.loss_cls(cls, torch.full((cls.shape[0],), C), reduction_override="sum")
    assert losses["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(_head(centerness=False).loss(feats, batch)) == {"loss_cls", "loss_bbox"}


def test_predict_multiplies_scores_by_centerness():
    head = _head()
    torch.nn.init.constant_(head.conv_cls.bias, 2.0)  # sigmoid 0.881 everywhere
    torch.nn.init.constant_(head.conv_centerness.bias, -1.0)  # sigmoid 0.269
    for m in (head.conv_cls, head.conv_centerness):
        torch.nn.init.zeros_(m.weight)
    head.eval()
    feats, batch = _feats_batch([], [])
    out = head.predict(feats, batch["img_metas"])
    expected = torch.sigmoid(torch.tensor(2.0)) * torch.sigmoid(torch.tensor(-1.0))
    assert len(out[0]["scores"]) > 0
    assert torch.allclose(out[0]["scores"], expected.expand_as(out[0]["scores"]))
    # Without centerness the class probability itself is the score.
    head.with_centerness = False
    head.conv_centerness = None
    out = head.predict(feats, batch["img_metas"])
    assert torch.allclose(
        out[0]["scores"], torch.sigmoid(torch.tensor(2.0)).expand_as(out[0]["scores"])
    )


def _toy_fcos_batch():
    """Two 128 x 128 images, one 30-px object each, and 5 levels of random features."""
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    batch = {
        "gt_bboxes": [
            torch.tensor([[10.0, 12.0, 40.0, 42.0]]),
            torch.tensor([[20.0, 5.0, 50.0, 30.0]]),
        ],
        "gt_labels": [torch.tensor([1]), torch.tensor([0])],
        "img_metas": [{"img_shape": (128, 128), "pad_shape": (128, 128)}] * 2,
    }
    return feats, batch


def test_torchvision_style_options_of_the_fcos_head():
    from labkit.heads.fcos import FCOSHead, centerness_target

    feats, batch = _toy_fcos_batch()
    torch.manual_seed(1)
    mm = FCOSHead(2, 8, feat_channels=8, stacked_convs=1, center_sampling=True, norm_on_bbox=True)
    torch.manual_seed(1)
    tv = FCOSHead(
        2, 8, feat_channels=8, stacked_convs=1, center_sampling=True, norm_on_bbox=True,
        bbox_loss_weight="uniform", point_offset=0.0, learnable_scale=False,
    )  # fmt: skip
    # point offset: mmdetection puts points at (x + 0.5) * stride, torchvision at x * stride
    assert mm.points(feats)[0][:2].tolist() == [[4.0, 4.0], [12.0, 4.0]]
    assert tv.points(feats)[0][:2].tolist() == [[0.0, 0.0], [8.0, 0.0]]
    # learnable scale: frozen at 1 for torchvision's variant
    assert all(p.requires_grad for p in mm.scales.parameters())
    assert not any(p.requires_grad for p in tv.scales.parameters())
    # bbox loss weighting: recompute both from the returned targets
    for head, weighted in ((mm, True), (tv, False)):
        losses, t = head.loss_and_targets(feats, batch)
        outs = head(feats)
        pred = torch.cat([x.permute(0, 2, 3, 1).reshape(2, -1, 4) for x in outs[1]], 1)
        giou_losses, weights = [], []
        for i in range(2):
            pos = t.pos_inds[i]
            pts = t.points[pos]
            decoded = head.bbox_coder.decode(pts, pred[i, pos])
            target = head.bbox_coder.decode(pts, t.bbox_targets[i, pos])
            giou = bbox_overlaps(decoded, target, mode="giou", is_aligned=True)
            giou_losses.append(1 - giou)
            weights.append(centerness_target(t.bbox_targets[i, pos]))
        giou_losses, weights = torch.cat(giou_losses), torch.cat(weights)
        expected = (giou_losses * weights).sum() / weights.sum() if weighted else giou_losses.mean()
        torch.testing.assert_close(losses["loss_bbox"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bbox_loss_weight"):
        FCOSHead(2, 8, bbox_loss_weight="iou")
