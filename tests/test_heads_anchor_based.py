"""RetinaNet / ATSS / PAA heads: shapes, init, hand-derived targets and losses, empty GT, score voting, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.anchors import AnchorGenerator
from labkit.boxes import DeltaXYWHBBoxCoder, bbox_overlaps
from labkit.heads.atss import ATSSHead, centerness_target
from labkit.heads.paa import PAAHead, score_voting
from labkit.heads.retina import RetinaNetHead
from labkit.recipes import atss, paa, retinanet

LEVELS = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def feats(batch=2, channels=8):
    return [torch.randn(batch, channels, h, w) for h, w in LEVELS]


def meta(h=128, w=128):
    return {
        "img_shape": (h, w),
        "pad_shape": (h, w),
        "batch_input_shape": (h, w),
        "scale_factor": (1.0, 1.0, 1.0, 1.0),
    }


def small(cls, **kwargs):
    torch.manual_seed(0)
    if cls is RetinaNetHead:
        return cls(3, 8, 8, 1, **kwargs)
    return cls(3, 8, 8, 1, num_groups=4, **kwargs)


@pytest.mark.parametrize(
    ("cls", "anchors", "extra"), [(RetinaNetHead, 9, 0), (ATSSHead, 1, 1), (PAAHead, 1, 1)]
)
def test_head_output_shapes_per_level(cls, anchors, extra):
    head = small(cls)
    outs = head(feats())
    assert len(outs) == 2 + extra
    for lvl, (h, w) in enumerate(LEVELS):
        assert outs[0][lvl].shape == (2, anchors * 3, h, w)
        assert outs[1][lvl].shape == (2, anchors * 4, h, w)
        if extra:
            assert outs[2][lvl].shape == (2, anchors, h, w)


@pytest.mark.parametrize("cls", [RetinaNetHead, ATSSHead])
def test_classifier_starts_at_prior_probability(cls):
    head = small(cls)
    conv = head.retina_cls if cls is RetinaNetHead else head.atss_cls
    assert torch.allclose(conv.bias.sigmoid(), torch.full_like(conv.bias, 0.01))
    assert conv.weight.std().item() == pytest.approx(0.01, rel=0.3)


def hand_head(**kwargs):
    """One level, stride 16, one 16 px anchor per cell centred in the cell: on a 2 x 2 map the
    anchors are a0 [0,0,16,16], a1 [16,0,32,16], a2 [0,16,16,32], a3 [16,16,32,32]."""
    gen = AnchorGenerator(
        strides=[16], ratios=[1.0], scales=[1.0], base_sizes=[16], center_offset=0.5
    )
    return RetinaNetHead(3, 4, 4, 1, anchor_generator=gen, **kwargs)


# GT1 [0,0,16,14] (label 2): IoU(a0) = 224/256 = 0.875 -> positive.
# GT2 [2,16,32,32] (label 0): IoU(a3) = 256/480 = 0.533 -> positive;
#   IoU(a2) = 224/512 = 0.4375 in [0.4, 0.5) -> ignored. a1 overlaps nothing -> negative.
HAND_GT = torch.tensor([[0.0, 0.0, 16.0, 14.0], [2.0, 16.0, 32.0, 32.0]])
HAND_LABELS = torch.tensor([2, 0])


def hand_targets(head, metas, gts, labels):
    anchors, valid = head.get_anchors([(2, 2)], metas, "cpu")
    return head.get_targets(anchors, valid, gts, metas, batch_gt_labels=labels)


def test_targets_hand_case_labels_weights_deltas_and_avg_factor():
    head = hand_head()
    metas = [meta(32, 32), meta(32, 32)]
    gts = [HAND_GT, torch.zeros(0, 4)]
    labels = [HAND_LABELS, torch.zeros(0, dtype=torch.long)]
    t = hand_targets(head, metas, gts, labels)
    assert t.labels.tolist() == [[2, 3, 3, 0], [3, 3, 3, 3]]
    assert t.label_weights.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]
    assert t.bbox_weights[0].tolist() == [[1] * 4, [0] * 4, [0] * 4, [1] * 4]
    assert t.bbox_weights[1].sum() == 0
    expected = torch.tensor(
        [
            # a0 (centre 8, 8, 16 x 16) -> GT1 (centre 8, 7, 16 x 14)
            [0.0, -1 / 16, 0.0, math.log(14 / 16)],
            # a3 (centre 24, 24) -> GT2 (centre 17, 24, 30 x 16)
            [-7 / 16, 0.0, math.log(30 / 16), 0.0],
        ]
    )
    assert torch.allclose(t.bbox_targets[0, [0, 3]], expected, atol=1e-6)
    assert t.bbox_targets[0, [1, 2]].abs().sum() == 0
    assert torch.allclose(
        t.bbox_targets[0, [0, 3]], DeltaXYWHBBoxCoder().encode(t.anchors[[0, 3]], HAND_GT)
    )
    # 2 positives in image 0, and max(0, 1) = 1 for the empty image 1
    assert t.avg_factor == 3.0
    assert t.num_pos == [2, 0]
    assert [p.tolist() for p in t.pos_inds] == [[0, 3], []]
    assert t.pos_gt_inds[0].tolist() == [0, 1]
    levels = t.per_level("labels")
    assert len(levels) == 1 and levels[0].shape == (2, 4)


def test_targets_outside_anchors_are_background_with_zero_weight():
    head = hand_head(allowed_border=0)
    metas = [meta(40, 24)]  # a1 and a3 reach x = 32 >= 24: outside
    t = hand_targets(head, metas, [HAND_GT], [HAND_LABELS])
    # only a0 and a2 are assigned: GT2's best inside anchor is now a2 (IoU 0.4375), which the
    # low-quality step (min_pos_iou 0) makes positive; a1, a3 are background with weight 0
    assert t.labels.tolist() == [[2, 3, 0, 3]]
    assert t.label_weights.tolist() == [[1, 0, 1, 0]]
    head.allowed_border = -1  # mmdetection's configs: keep every valid anchor
    t = hand_targets(head, metas, [HAND_GT], [HAND_LABELS])
    assert t.labels.tolist() == [[2, 3, 3, 0]]


def test_retinanet_loss_hand_values():
    head = hand_head()
    metas = [meta(32, 32)]
    cls_scores = [torch.zeros(1, 3, 2, 2, requires_grad=True)]
    bbox_preds = [torch.zeros(1, 4, 2, 2, requires_grad=True)]
    losses = head.loss_by_feat(
        cls_scores,
        bbox_preds,
        batch_gt_bboxes=[HAND_GT],
        batch_gt_labels=[HAND_LABELS],
        batch_img_metas=metas,
    )
    # logits 0 -> p = 0.5: a positive class costs 0.25 * 0.25 * ln 2, every other 0.75 * 0.25 * ln 2;
    # weighted anchors: a0, a3 (positives, 1 + 2 terms), a1 (negative, 3 terms); / avg_factor 2
    ln2 = math.log(2)
    pos_anchor = 0.0625 * ln2 + 2 * 0.1875 * ln2
    expected_cls = (2 * pos_anchor + 3 * 0.1875 * ln2) / 2
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    expected_bbox = (1 / 16 + abs(math.log(14 / 16)) + 7 / 16 + math.log(30 / 16)) / 2
    assert losses["loss_bbox"].item() == pytest.approx(expected_bbox, rel=1e-5)
    sum(losses.values()).backward()
    assert cls_scores[0].grad[0, :, 1, 0].abs().sum() == 0  # a2 ignored: no gradient


def test_centerness_target_hand_values():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0]])
    gts = torch.tensor([[0.0, 0.0, 32.0, 16.0], [0.0, 0.0, 32.0, 16.0]])
    # centre (8, 8): l 8, r 24, t 8, b 8 -> sqrt(8 / 24); centre (16, 8): perfectly centred
    assert centerness_target(anchors, gts).tolist() == pytest.approx([math.sqrt(1 / 3), 1.0])


def test_atss_bbox_loss_is_centerness_weighted_giou_over_centerness_sum():
    head = small(ATSSHead)
    head.loss_bbox.loss_weight = 1.0
    metas = [meta(), meta()]
    gts = [torch.tensor([[10.0, 20.0, 70.0, 90.0], [60.0, 50.0, 120.0, 100.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    outs = list(head(feats()))
    outs[1] = [torch.zeros_like(x) for x in outs[1]]  # zero deltas: decoded boxes = anchors
    losses = head.loss_by_feat(
        *outs, batch_gt_bboxes=gts, batch_gt_labels=labels, batch_img_metas=metas
    )
    t = head.targets_for(outs[0], gts, labels, metas)
    pos = t.pos_inds[0]
    assert len(pos) > 0 and len(t.pos_inds[1]) == 0
    anchors, targets = t.anchors[pos], t.bbox_targets[0, pos]
    c = centerness_target(anchors, targets)
    giou = bbox_overlaps(anchors, targets, mode="giou", is_aligned=True)
    expected = (c * (1 - giou)).sum() / c.sum().clamp(min=1)
    assert losses["loss_bbox"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert t.avg_factor == len(pos) + 1


@pytest.mark.parametrize("cls", [RetinaNetHead, ATSSHead, PAAHead])
def test_empty_gt_gives_finite_loss_and_zero_regression(cls):
    head = small(cls)
    outs = head(feats())
    losses = head.loss_by_feat(
        *outs,
        batch_gt_bboxes=[torch.zeros(0, 4), torch.zeros(0, 4)],
        batch_gt_labels=[torch.zeros(0, dtype=torch.long)] * 2,
        batch_img_metas=[meta(), meta()],
    )
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"] > 0
    for key, value in losses.items():
        if key != "loss_cls":
            assert value.item() == 0.0, key
    sum(losses.values()).backward()


def test_paa_candidate_losses_match_get_pos_loss_and_reassignment_keeps_subset():
    head = small(PAAHead)
    metas = [meta()]
    gts = [torch.tensor([[10.0, 20.0, 70.0, 90.0], [60.0, 50.0, 120.0, 100.0]])]
    labels = [torch.tensor([0, 2])]
    outs = head(feats(batch=1))
    (cand,) = head.candidate_losses(
        *outs, batch_gt_bboxes=gts, batch_gt_labels=labels, batch_img_metas=metas
    )
    # first stage is MaxIoU(0.1, 0.1): every anchor with IoU >= 0.1 is a candidate
    ious = bbox_overlaps(gts[0], cand.anchors)
    assert cand.pos_inds.tolist() == (ious.max(0).values >= 0.1).nonzero().view(-1).tolist()
    assert cand.pos_losses.shape == cand.pos_inds.shape
    assert (cand.pos_losses > 0).all()
    assert cand.labels[cand.pos_inds].tolist() == labels[0][cand.pos_gt_inds].tolist()
    losses = head.loss_by_feat(
        *outs, batch_gt_bboxes=gts, batch_gt_labels=labels, batch_img_metas=metas
    )
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_iou"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_paa_score_voting_hand_case():
    det_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    det_scores = torch.tensor([0.9, 0.8])
    det_labels = torch.tensor([1, 0])
    candidates = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0], [50.0, 50.0, 60.0, 60.0], [80, 80, 90, 90]]
    )
    scores = torch.tensor([[0.0, 0.9], [0.0, 0.5], [0.8, 0.0], [0.0, 0.6]])
    boxes, out_scores, out_labels = score_voting(
        det_boxes, det_scores, det_labels, candidates, scores, score_thr=0.05
    )
    # grouped by class: class 0 first; its only candidate is the box itself
    assert out_labels.tolist() == [0, 1]
    assert out_scores.tolist() == pytest.approx([0.8, 0.9])
    assert boxes[0].tolist() == [50.0, 50.0, 60.0, 60.0]
    # class 1: itself (IoU 1, weight 0.9) and the 10 x 12 box (IoU 100/120); [80..90] is disjoint
    w2 = math.exp(-((1 - 100 / 120) ** 2) / 0.025) * 0.5
    y2 = (0.9 * 10 + w2 * 12) / (0.9 + w2)
    assert boxes[1].tolist() == pytest.approx([0.0, 0.0, 10.0, y2], rel=1e-5)


def test_paa_predict_uses_sqrt_of_cls_times_iou():
    head = small(PAAHead, score_voting=False)
    cls_scores = [torch.full((1, 3, h, w), -20.0) for h, w in LEVELS]
    bbox_preds = [torch.zeros(1, 4, h, w) for h, w in LEVELS]
    iou_preds = [torch.full((1, 1, h, w), -20.0) for h, w in LEVELS]
    cls_scores[2][0, 1, 1, 2] = math.log(0.64 / 0.36)
    iou_preds[2][0, 0, 1, 2] = math.log(0.25 / 0.75)
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, iou_preds, batch_img_metas=[meta()])
    assert res["scores"].tolist() == pytest.approx([math.sqrt(0.64 * 0.25)], rel=1e-5)
    assert res["labels"].tolist() == [1]
    # level 2 (stride 32, 256 px anchor) at row 1, col 2: centre (64, 32), clipped to 128 x 128
    assert res["boxes"][0].tolist() == pytest.approx([0.0, 0.0, 128.0, 128.0])


@pytest.mark.parametrize("recipe", [retinanet, atss, paa])
def test_detector_loss_rejects_bad_gt_naming_the_argument(recipe):
    model = recipe(3, backbone="tiny")
    batch = {
        "img": torch.randn(1, 3, 64, 64),
        "img_metas": [meta(64, 64)],
        "gt_bboxes": [torch.zeros(1, 5)],
        "gt_labels": [torch.tensor([0])],
    }
    with pytest.raises(ValueError, match=r"gt_bboxes\[0\]"):
        model.loss(batch)
    batch["gt_bboxes"] = [torch.tensor([[1.0, float("nan"), 4.0, 4.0]])]
    with pytest.raises(ValueError, match=r"gt_bboxes\[0\]"):
        model.loss(batch)
    batch["gt_bboxes"] = [torch.tensor([[1.0, 1.0, 4.0, 4.0]])]
    batch["gt_labels"] = [torch.tensor([3])]
    with pytest.raises(ValueError, match=r"gt_labels\[0\]"):
        model.loss(batch)
    with pytest.raises(ValueError, match="img"):
        model.loss({**batch, "img": torch.randn(3, 64, 64)})


@pytest.mark.parametrize("recipe", [retinanet, atss, paa])
def test_recipe_records_itself_and_predicts_per_image(recipe):
    model = recipe(3, backbone="tiny", test_cfg={"score_thr": 0.0})
    name, kwargs = model.recipe
    assert name == recipe.__name__ and kwargs["num_classes"] == 3
    assert recipe(**kwargs).state_dict().keys() == model.state_dict().keys()
    model.eval()
    results = model.predict({"img": torch.randn(2, 3, 64, 64), "img_metas": [meta(64, 64)] * 2})
    assert len(results) == 2
    for res in results:
        assert set(res) == {"boxes", "scores", "labels"}
        assert res["boxes"].shape[1] == 4 and len(res["scores"]) == len(res["labels"]) > 0
