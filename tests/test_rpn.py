"""RPN head: hand-derived targets and losses, sampling caps, proposal generation, positives, errors."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.anchors import AnchorGenerator
from labkit.heads.rpn import RPNHead


def meta(h: int, w: int) -> dict:
    return {
        "img_shape": (h, w),
        "pad_shape": (h, w),
        "batch_input_shape": (h, w),
        "ori_shape": (h, w),
        "scale_factor": (1.0, 1.0, 1.0, 1.0),
    }


def one_level_head(stride: int = 16, scale: float = 2.0, **kwargs) -> RPNHead:
    """RPN with one level, one square anchor per location (side ``stride * scale``)."""
    gen = AnchorGenerator(strides=[stride], ratios=[1.0], scales=[scale])
    return RPNHead(4, 4, anchor_generator=gen, **kwargs)


def zeros_out(head: RPNHead, b: int, h: int, w: int) -> tuple[list, list]:
    a = head.num_base_priors
    return [torch.zeros(b, a, h, w)], [torch.zeros(b, a * 4, h, w)]


def test_forward_shapes_and_init():
    head = RPNHead(8, 16)
    assert head.num_base_priors == 3  # 1 scale x 3 ratios
    feats = [torch.randn(2, 8, 32 // 2**i, 40 // 2**i) for i in range(5)]
    cls, reg = head(feats)
    for lvl, (c, r) in enumerate(zip(cls, reg, strict=True)):
        assert c.shape == (2, 3, 32 // 2**lvl, 40 // 2**lvl)
        assert r.shape == (2, 12, 32 // 2**lvl, 40 // 2**lvl)
    assert float(head.rpn_cls.bias.detach().abs().sum()) == 0.0
    assert head.rpn_cls.weight.std() < 0.02


def test_targets_and_losses_hand_case():
    """4x4 grid of 32x32 anchors at stride 16 (centres 0, 16, 32, 48) on a 64x64 image.

    Image 0, GT [2, 0, 34, 32]: anchor 5 (centre 16,16) has IoU 960/1088 = 0.88 -> positive;
    anchors 1, 6, 9 have IoU 480/1568 = 0.306, 576/1472 = 0.391, 0.306 -> ignored (in
    [0.3, 0.7)); the 12 others are below 0.3 -> negative.
    Image 1, GT [20, 20, 44, 44]: best anchor 10 (centre 32,32) IoU 576/1024 = 0.5625 < 0.7,
    but >= min_pos_iou 0.3 -> low-quality positive; every other anchor is below 0.3.
    """
    head = one_level_head()
    cls, reg = zeros_out(head, 2, 4, 4)
    gts = [torch.tensor([[2.0, 0.0, 34.0, 32.0]]), torch.tensor([[20.0, 20.0, 44.0, 44.0]])]
    losses, t = head.loss_and_targets_by_feat(
        cls, reg, batch_gt_bboxes=gts, batch_img_metas=[meta(64, 64), meta(64, 64)]
    )
    assert t.labels[0].tolist() == [1] * 5 + [0] + [1] * 10
    assert t.label_weights[0].tolist() == [1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert t.labels[1].tolist() == [1] * 10 + [0] + [1] * 5
    assert t.label_weights[1].tolist() == [1.0] * 16
    assert t.avg_factor == (1 + 12) + (1 + 15)
    # deltas with stds 1: dx = 2 / 32 for image 0; dw = dh = log(24 / 32) for image 1
    torch.testing.assert_close(t.bbox_targets[0, 5], torch.tensor([0.0625, 0.0, 0.0, 0.0]))
    d = math.log(0.75)
    torch.testing.assert_close(t.bbox_targets[1, 10], torch.tensor([0.0, 0.0, d, d]))
    # zero logits: every sampled anchor costs log 2; zero deltas: L1 = |targets| summed
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor(math.log(2.0)))
    expected_bbox = (0.0625 + 2 * abs(d)) / 29
    torch.testing.assert_close(losses["loss_rpn_bbox"], torch.tensor(expected_bbox))


def test_random_sampling_caps_positives_at_half_of_256():
    """200 GTs equal to 200 of 400 tiling anchors: 128 positives and 128 negatives are drawn."""
    gen = AnchorGenerator(strides=[16], ratios=[1.0], scales=[1.0], center_offset=0.5)
    head = RPNHead(4, 4, anchor_generator=gen)
    anchors = gen.grid_priors([(20, 20)])[0]  # 16x16 boxes tiling the 320x320 image
    gts = anchors[:200]
    cls, reg = zeros_out(head, 1, 20, 20)
    torch.manual_seed(0)
    _, t = head.loss_and_targets_by_feat(
        cls, reg, batch_gt_bboxes=[gts], batch_img_metas=[meta(320, 320)]
    )
    res = t.sampling_results[0]
    assert res.pos_inds.numel() == 128 and res.neg_inds.numel() == 128
    assert int((t.label_weights[0] > 0).sum()) == 256
    assert t.avg_factor == 256
    assert int((t.labels[0] == 0).sum()) == 128


def test_proposals_nms_pre_per_level_nms_and_max_per_img():
    """Two levels: 16x16 anchors at stride 16 (4x4) and 32x32 anchors at stride 32 (2x2), 64x64 image."""
    gen = AnchorGenerator(strides=[16, 32], ratios=[1.0], scales=[1.0])
    head = RPNHead(4, 4, anchor_generator=gen)
    s0 = torch.full((1, 1, 4, 4), -5.0)
    # level 0: anchor 5 (centre 16,16 -> [8, 8, 24, 24]) best, 6 next, 10 third
    s0[0, 0, 1, 1], s0[0, 0, 1, 2], s0[0, 0, 2, 2] = 3.0, 2.0, 1.0
    s1 = torch.tensor([[[[0.5, -1.0], [-2.0, -3.0]]]])
    r0 = torch.zeros(1, 4, 4, 4)
    r0[0, 0, 1, 2] = -1.0  # anchor 6 shifted left by one width: identical to anchor 5
    r1 = torch.zeros(1, 4, 2, 2)
    # level-1 anchor 0 ([-16, -16, 16, 16]) moved/shrunk onto [8, 8, 24, 24], anchor 5's box
    r1[0, :, 0, 0] = torch.tensor([0.5, 0.5, math.log(0.5), math.log(0.5)])
    cfg = {"nms_pre": 3, "iou_threshold": 0.7, "max_per_img": 1000, "min_bbox_size": 0}
    out = head.predict_by_feat(
        [s0, s1], [r0, r1], batch_img_metas=[meta(64, 64)], cfg=head.with_test_cfg(**cfg)
    )[0]
    # level 0 keeps its 3 best (5, 6, 10); 6 duplicates 5 and is suppressed; level 1 keeps
    # 3 of 4 anchors and its copy of [8, 8, 24, 24] survives (NMS is per level)
    expected_scores = torch.tensor([3.0, 1.0, 0.5, -1.0, -2.0]).sigmoid()
    torch.testing.assert_close(out["scores"], expected_scores)
    expected_boxes = torch.tensor(
        [[8.0, 8, 24, 24], [24, 24, 40, 40], [8, 8, 24, 24], [16, 0, 48, 16], [0, 16, 16, 48]]
    )
    torch.testing.assert_close(out["boxes"], expected_boxes)
    assert out["labels"].tolist() == [0] * 5

    few = head.predict_by_feat(
        [s0, s1],
        [r0, r1],
        batch_img_metas=[meta(64, 64)],
        cfg=head.with_test_cfg(**{**cfg, "max_per_img": 2}),
    )[0]
    torch.testing.assert_close(few["boxes"], expected_boxes[:2])
    # min_bbox_size 16: the clipped 16-wide boxes are not strictly larger and go
    big = head.predict_by_feat(
        [s0, s1],
        [r0, r1],
        batch_img_metas=[meta(64, 64)],
        cfg=head.with_test_cfg(**{**cfg, "min_bbox_size": 16}),
    )[0]
    assert big["boxes"].shape[0] == 0


def test_proposals_rescale_and_default_cfgs():
    head = RPNHead(4, 4)
    assert (head.test_cfg.nms_pre, head.test_cfg.max_per_img, head.test_cfg.iou_threshold) == (
        1000,
        1000,
        0.7,
    )
    assert head.train_proposal_cfg.nms_pre == 2000
    gen = AnchorGenerator(strides=[16], ratios=[1.0], scales=[1.0])
    head = RPNHead(4, 4, anchor_generator=gen)
    m = dict(meta(64, 64), scale_factor=(2.0, 4.0, 2.0, 4.0))
    s = torch.full((1, 1, 4, 4), -5.0)
    s[0, 0, 1, 1] = 5.0
    out = head.predict_by_feat([s], [torch.zeros(1, 4, 4, 4)], batch_img_metas=[m], rescale=True)[0]
    torch.testing.assert_close(out["boxes"][0], torch.tensor([4.0, 2.0, 12.0, 6.0]))


def test_loss_and_predict_targets_hold_the_sampled_positive_anchors():
    head = one_level_head()
    feats = [torch.randn(2, 4, 4, 4)]
    gts = [torch.tensor([[2.0, 0.0, 34.0, 32.0]]), torch.tensor([[20.0, 20.0, 44.0, 44.0]])]
    batch = {
        "gt_bboxes": gts,
        "gt_labels": [torch.tensor([7]), torch.tensor([3])],
        "img_metas": [meta(64, 64), meta(64, 64)],
    }
    losses, proposals, targets = head.loss_and_predict(feats, batch)
    pos = targets.sampling_results
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}
    anchors = head.prior_generator.grid_priors([(4, 4)])[0]
    torch.testing.assert_close(pos[0].pos_priors, anchors[5:6])
    torch.testing.assert_close(pos[1].pos_priors, anchors[10:11])
    assert pos[0].pos_assigned_gt_inds.tolist() == [0] and pos[1].pos_assigned_gt_inds.tolist() == [
        0
    ]
    torch.testing.assert_close(pos[0].pos_gt_bboxes, gts[0])
    torch.testing.assert_close(pos[1].pos_gt_bboxes, gts[1])
    assert len(proposals) == 2 and not proposals[0]["boxes"].requires_grad
    assert proposals[0]["boxes"].shape[0] <= 16


def test_empty_gt_is_valid():
    head = RPNHead(4, 4)
    feats = [torch.randn(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    batch = {
        "gt_bboxes": [torch.zeros(0, 4)],
        "gt_labels": [torch.zeros(0, dtype=torch.long)],
        "img_metas": [meta(64, 64)],
    }
    losses, proposals, targets = head.loss_and_predict(feats, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_rpn_bbox"].detach()) == 0.0
    assert targets.sampling_results[0].pos_inds.numel() == 0
    sum(losses.values()).backward()
    assert head.rpn_cls.weight.grad is not None
    # class-free data (RPN only): every GT is foreground (label 0)
    gts = [torch.tensor([[8.0, 8.0, 40.0, 40.0]])]
    _, _, targets = head.loss_and_predict(feats, {"gt_bboxes": gts, "img_metas": [meta(64, 64)]})
    assert targets.sampling_results[0].pos_inds.numel() > 0
    num_pos = targets.sampling_results[0].pos_inds.numel()
    assert int((targets.labels[0] == 0).sum()) == num_pos  # positives are class 0, the rest 1


def test_bad_input_names_the_argument():
    head = RPNHead(4, 4)
    feats = [torch.randn(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    labels = [torch.zeros(1, dtype=torch.long)]
    with pytest.raises(TypeError, match="gt_bboxes"):
        head.loss(
            feats,
            {"gt_bboxes": torch.zeros(1, 4), "gt_labels": labels, "img_metas": [meta(64, 64)]},
        )
    with pytest.raises(ValueError, match="gt_bboxes"):
        head.loss(
            feats,
            {
                "gt_bboxes": [torch.tensor([[5.0, 5, 1, 1]])],
                "gt_labels": labels,
                "img_metas": [meta(64, 64)],
            },
        )
    with pytest.raises(ValueError, match="feats"):
        head(feats[:3])
    with pytest.raises(ValueError, match="num_convs"):
        RPNHead(4, 4, num_convs=0)
    with pytest.raises(ValueError, match="test_cfg"):
        RPNHead(4, 4, test_cfg={"nms": 0.7})
