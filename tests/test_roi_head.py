"""RoI extractor and RoI head: level mapping, RoIAlign, hand-derived targets and losses, positives, NMS."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.codetr.aux_heads import roi_positives
from labkit.heads.nms import multiclass_nms
from labkit.heads.roi_extractor import RoIExtractor, bbox2roi, map_roi_levels
from labkit.heads.roi_head import Shared2FCBBoxHead, StandardRoIHead
from labkit.losses import GIoULoss

STRIDES = (4, 8, 16, 32)


def square_rois(sides: list[float]) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, 0.0, s, s] for s in sides])


def test_map_roi_levels_follows_mmdetection_formula():
    # floor(log2(sqrt(w h) / 56 + 1e-6)) clamped to 0..3
    rois = square_rois([10, 56, 111, 112, 223, 224, 447, 448, 1000])
    assert map_roi_levels(rois, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    tall = torch.tensor([[0.0, 0.0, 0.0, 112.0, 448.0]])  # scale sqrt(112 * 448) = 224
    assert map_roi_levels(tall, 4).tolist() == [2]
    # Co-DETR's finest_scale 112 shifts everything one level down
    assert map_roi_levels(square_rois([56, 224, 448]), 4, finest_scale=112).tolist() == [0, 1, 2]
    assert map_roi_levels(square_rois([448]), 2).tolist() == [1]


def test_bbox2roi_prepends_image_index():
    rois = bbox2roi(
        [torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4), torch.tensor([[5.0, 6, 7, 8]])]
    )
    assert rois.tolist() == [[0.0, 1, 2, 3, 4], [2.0, 5, 6, 7, 8]]


def constant_feats(requires_grad: bool = False) -> list[torch.Tensor]:
    """64x64 input: level l holds (l + 1) in image 0 and 10 (l + 1) in image 1, 3 channels."""
    feats = []
    for lvl, s in enumerate(STRIDES):
        f = torch.empty(2, 3, 64 // s, 64 // s)
        f[0], f[1] = lvl + 1, 10 * (lvl + 1)
        feats.append(f.requires_grad_(requires_grad))
    return feats


def test_roi_align_shapes_and_constant_features():
    extractor = RoIExtractor(STRIDES, output_size=7, sampling_ratio=0, finest_scale=8)
    # finest_scale 8: scales 4 / 20 / 40 / 60 map to levels 0 / 1 / 2 / 2 (clamped at 3 otherwise)
    rois = torch.tensor(
        [
            [0.0, 10, 10, 14, 14],
            [1.0, 10, 10, 30, 30],
            [0.0, 4, 4, 44, 44],
            [1.0, 2, 2, 62, 62],
        ]
    )
    out = extractor(constant_feats(), rois)
    assert out.shape == (4, 3, 7, 7)
    expected = torch.tensor([1.0, 20.0, 3.0, 30.0])
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), expected)
    torch.testing.assert_close(out.amin(dim=(1, 2, 3)), expected)
    # extra levels beyond the strides are ignored (Co-DETR passes 5 maps, RoIs use 4)
    more = constant_feats() + [torch.full((2, 3, 1, 1), 99.0)]
    torch.testing.assert_close(extractor(more, rois), out)


def test_single_level_and_unused_levels_keep_gradient():
    single = RoIExtractor([8], output_size=2)
    feats = constant_feats()
    out = single([feats[1]], torch.tensor([[1.0, 0, 0, 32, 32]]))
    torch.testing.assert_close(out, torch.full((1, 3, 2, 2), 20.0))
    assert single([feats[1]], torch.zeros(0, 5)).shape == (0, 3, 2, 2)

    feats = constant_feats(requires_grad=True)
    extractor = RoIExtractor(STRIDES, output_size=7)
    extractor(feats, torch.tensor([[0.0, 0, 0, 20, 20]])).sum().backward()
    assert all(f.grad is not None for f in feats)  # every level stays in the graph (DDP)
    assert float(feats[0].grad.sum()) == pytest.approx(3 * 49)
    assert float(feats[3].grad.abs().sum()) == 0.0


def test_roi_extractor_bad_input():
    extractor = RoIExtractor(STRIDES)
    with pytest.raises(ValueError, match="rois"):
        extractor(constant_feats(), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="rois"):
        extractor(constant_feats(), [[0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="feats"):
        extractor(constant_feats()[:2], torch.zeros(0, 5))
    with pytest.raises(ValueError, match="featmap_strides"):
        RoIExtractor([])


# ----------------------------------------------------------------------------- RoI head

GT = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
# IoU with GT: 1520 / 1680 = 0.905 (positive), 400 / 2224 = 0.18 and 0 (negatives)
PROPOSALS = torch.tensor([[12.0, 10.0, 52.0, 50.0], [30.0, 30.0, 62.0, 62.0], [0.0, 0.0, 8.0, 8.0]])


def meta(scale: float = 1.0) -> dict:
    return {
        "img_shape": (64, 64),
        "pad_shape": (64, 64),
        "batch_input_shape": (64, 64),
        "scale_factor": (scale,) * 4,
    }


def batch_of(gts: list, labels: list) -> dict:
    return {"gt_bboxes": gts, "gt_labels": labels, "img_metas": [meta() for _ in gts]}


def make_roi_head(**head_kwargs) -> StandardRoIHead:
    torch.manual_seed(0)
    return StandardRoIHead(RoIExtractor(STRIDES), Shared2FCBBoxHead(3, 4, 7, 16, **head_kwargs))


def feats_for(batch_size: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch_size, 4, 64 // s, 64 // s) for s in STRIDES]


def zero_fcs(head: Shared2FCBBoxHead, reg_bias: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        for fc in (head.fc_cls, head.fc_reg):
            fc.weight.zero_()
            fc.bias.zero_()
        if reg_bias is not None:
            head.fc_reg.bias.copy_(reg_bias)


def test_targets_labels_background_and_class_specific_l1():
    roi = make_roi_head()
    res = roi.sample([PROPOSALS], [GT], [torch.tensor([2])])[0]
    # the GT is prepended as a proposal: positives = GT, proposal 0; negatives = proposals 1, 2
    assert res.pos_inds.tolist() == [0, 1] and res.neg_inds.tolist() == [2, 3]
    labels, label_weights, bbox_targets, bbox_weights = roi.bbox_head.get_targets([res])
    assert labels.tolist() == [2, 2, 3, 3]  # background = C = 3
    assert label_weights.tolist() == [1.0] * 4
    # deltas / stds (0.1, 0.1, 0.2, 0.2): proposal 0 centre x 32 -> GT 30, width 40: dx = -0.05 / 0.1
    torch.testing.assert_close(
        bbox_targets, torch.tensor([[0.0] * 4, [-0.5, 0, 0, 0], [0.0] * 4, [0.0] * 4])
    )
    assert bbox_weights[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]

    # zero logits: CE = log 4; class 2's deltas (-0.5, 0, 0, 0), other classes' 1.0
    bias = torch.ones(12)
    bias[8:12] = torch.tensor([-0.5, 0.0, 0.0, 0.0])
    zero_fcs(roi.bbox_head, bias)
    losses = roi.loss(feats_for(1), [PROPOSALS], batch_of([GT], [torch.tensor([2])]))
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(math.log(4.0)))
    # |(-0.5) - 0| + |(-0.5) - (-0.5)| over 4 sampled RoIs (mmdetection's avg_factor)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.5 / 4))
    assert float(losses["acc"]) == 0.0  # uniform logits pick class 0


def test_giou_loss_on_decoded_boxes():
    roi = make_roi_head(
        reg_class_agnostic=True, reg_decoded_bbox=True, loss_bbox=GIoULoss(loss_weight=10.0)
    )
    zero_fcs(roi.bbox_head)
    res = roi.sample([PROPOSALS], [GT], [torch.tensor([2])])[0]
    _, _, bbox_targets, _ = roi.bbox_head.get_targets([res])
    torch.testing.assert_close(bbox_targets[:2], GT.expand(2, 4))  # decoded targets = GT boxes
    losses = roi.loss(feats_for(1), [PROPOSALS], batch_of([GT], [torch.tensor([2])]))
    # zero deltas decode to the RoIs: GIoU(GT, GT) = 1; proposal 0: IoU 1520/1680, enclosure = union
    giou = 1520 / 1680
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(10.0 * (1 - giou) / 4))


def loss_and_positives(roi, feats, proposals, batch):
    """The RoI head's losses and the positives Co-DETR takes from its targets."""
    losses, targets = roi.loss_and_targets(feats, proposals, batch)
    return losses, roi_positives(targets)


def test_positives_equal_sampled_positive_rois_and_matched_gts():
    roi = make_roi_head()
    gts = [GT, torch.tensor([[30.0, 30.0, 62.0, 62.0], [0.0, 0.0, 9.0, 9.0]])]
    labels = [torch.tensor([2]), torch.tensor([0, 1])]
    feats = [f.requires_grad_() for f in feats_for(2)]
    torch.manual_seed(0)
    losses, pos = loss_and_positives(roi, feats, [PROPOSALS, PROPOSALS], batch_of(gts, labels))
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(pos.coords[0], torch.cat([GT, PROPOSALS[:1]]))
    assert pos.labels[0].tolist() == [2, 2]
    torch.testing.assert_close(pos.targets[0], GT.expand(2, 4))
    # image 1: GTs first, then proposal 1 (IoU 1 with GT 0) and proposal 2 (IoU 64/81 with GT 1)
    torch.testing.assert_close(pos.coords[1], torch.cat([gts[1], PROPOSALS[1:]]))
    assert pos.labels[1].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(pos.targets[1], torch.cat([gts[1], gts[1]]))
    # features: the positives' RoIAlign grids averaged, with gradient
    rois = bbox2roi(pos.coords)
    expected = roi.bbox_roi_extractor(feats, rois).mean(dim=(2, 3))
    torch.testing.assert_close(torch.cat(pos.feats), expected)
    assert pos.feats[0].shape == (2, 4) and pos.feats[0].requires_grad


def test_positives_truncated_like_codetr_when_another_image_samples_fewer_rois():
    roi = make_roi_head()
    near = GT + torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [2, 0, 2, 0]])  # 3 more positives
    batch = batch_of([GT, torch.zeros(0, 4)], [torch.tensor([1]), torch.zeros(0, dtype=torch.long)])
    _, pos = loss_and_positives(roi, feats_for(2), [near, PROPOSALS[2:]], batch)
    # image 1 samples a single RoI, so every image keeps only its first sampled RoI
    assert pos.num_positives == [1, 0]
    torch.testing.assert_close(pos.coords[0], GT)


def test_empty_gt_images():
    roi = make_roi_head()
    batch = batch_of([GT, torch.zeros(0, 4)], [torch.tensor([2]), torch.zeros(0, dtype=torch.long)])
    losses, pos = loss_and_positives(roi, feats_for(2), [PROPOSALS, PROPOSALS], batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert pos.num_positives == [2, 0] and pos.feats[1].shape == (0, 4)
    # no GT anywhere: every RoI is background and the box loss is a zero kept in the graph
    none = batch_of([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    losses, pos = loss_and_positives(roi, feats_for(1), [PROPOSALS], none)
    assert float(losses["loss_bbox"].detach()) == 0.0 and torch.isfinite(losses["loss_cls"])
    assert pos.num_positives == [0]
    sum(v for k, v in losses.items() if "loss" in k).backward()
    # no proposals: the GT added as a proposal is the only RoI; nothing at all still works
    losses, pos = loss_and_positives(
        roi, feats_for(1), [torch.zeros(0, 4)], batch_of([GT], [torch.tensor([1])])
    )
    assert pos.num_positives == [1] and torch.isfinite(losses["loss_bbox"])
    losses, pos = loss_and_positives(roi, feats_for(1), [torch.zeros(0, 4)], none)
    assert set(losses) == {"loss_cls", "acc", "loss_bbox"} and pos.num_positives == [0]


def test_multiclass_nms_hand_case():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10]])  # IoU 90 / 110 = 0.82
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.05, 0.5, 0.45]])  # 2 classes + background
    from labkit.heads.dense_head import TestConfig

    cfg = TestConfig(score_thr=0.05, iou_threshold=0.5, max_per_img=100)
    out = multiclass_nms(boxes, scores, cfg)
    # (box 1, class 0) is not above 0.05; class 1's box 1 is suppressed by box 0
    torch.testing.assert_close(out["scores"], torch.tensor([0.6, 0.1]))
    assert out["labels"].tolist() == [1, 0]
    torch.testing.assert_close(out["boxes"], boxes[[0, 0]])
    out = multiclass_nms(
        boxes, scores, TestConfig(score_thr=0.05, iou_threshold=0.5, max_per_img=1)
    )
    assert out["labels"].tolist() == [1]
    # class-specific boxes [N, 4C]: each class uses its own column group
    per_class = torch.cat([boxes + 20, boxes], dim=1)
    out = multiclass_nms(per_class, scores, cfg)
    torch.testing.assert_close(out["boxes"], torch.stack([boxes[0], boxes[0] + 20]))


def test_predict_decodes_clips_and_rescales():
    roi = make_roi_head()
    zero_fcs(roi.bbox_head)
    with torch.no_grad():
        roi.bbox_head.fc_cls.bias[1] = 5.0
    props = torch.tensor([[10.0, 10.0, 50.0, 50.0], [40.0, 40.0, 80.0, 80.0]])
    out = roi.predict(feats_for(1), [props], [meta(scale=2.0)], rescale=True)[0]
    # zero deltas: boxes are the proposals clipped to 64x64, then halved (equal scores: any order)
    boxes = out["boxes"][out["boxes"][:, 0].argsort()]
    torch.testing.assert_close(
        boxes, torch.tensor([[5.0, 5.0, 25.0, 25.0], [20.0, 20.0, 32.0, 32.0]])
    )
    assert out["labels"].tolist() == [1, 1]
    p = math.exp(5) / (math.exp(5) + 3)
    torch.testing.assert_close(out["scores"], torch.tensor([p, p]))
    empty = roi.predict(feats_for(1), [torch.zeros(0, 4)], [meta()])[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.long


def test_roi_head_bad_input_names_the_argument():
    roi = make_roi_head()
    batch = batch_of([GT], [torch.tensor([2])])
    with pytest.raises(TypeError, match="proposals"):
        roi.loss(feats_for(1), PROPOSALS, batch)
    with pytest.raises(ValueError, match=r"proposals\[0\]"):
        roi.loss(feats_for(1), [PROPOSALS[:, :3]], batch)
    with pytest.raises(ValueError, match="proposals"):
        roi.loss(feats_for(1), [PROPOSALS, PROPOSALS], batch)
    with pytest.raises(ValueError, match=r"gt_labels\[0\]"):
        roi.loss(feats_for(1), [PROPOSALS], batch_of([GT], [torch.tensor([3])]))
    with pytest.raises(ValueError, match="num_classes"):
        Shared2FCBBoxHead(0)
