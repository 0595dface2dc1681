"""Dense-head base: flattening order, level/image reshuffles, unmap, top-k filter and inference."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.anchors import AnchorGenerator
from labkit.boxes import DeltaXYWHBBoxCoder
from labkit.heads.dense_head import (
    DenseHead,
    TestConfig,
    check_gt_instances,
    filter_scores_and_topk,
    flatten_level,
    flatten_levels,
    images_to_levels,
    levels_to_images,
    make_test_cfg,
    unmap,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class ToyHead(DenseHead):
    """No layers: ``forward`` returns whatever maps the test stored, to drive inference by hand."""

    def __init__(self, num_classes, strides, test_cfg):
        gen = AnchorGenerator(
            strides=strides, ratios=[1.0], scales=[1.0], base_sizes=[2 * s for s in strides]
        )
        super().__init__(num_classes, gen, DeltaXYWHBBoxCoder(), test_cfg)


def test_flatten_level_is_location_major_anchor_innermost():
    b, a, c, h, w = 2, 3, 4, 2, 5
    # value encodes (image, anchor, class, row, col)
    x = torch.zeros(b, a * c, h, w)
    for i in range(b):
        for ai in range(a):
            for ci in range(c):
                for r in range(h):
                    for q in range(w):
                        x[i, ai * c + ci, r, q] = i * 10000 + ai * 1000 + ci * 100 + r * 10 + q
    flat = flatten_level(x, c)
    assert flat.shape == (b, h * w * a, c)
    for i in range(b):
        for r in range(h):
            for q in range(w):
                for ai in range(a):
                    row = (r * w + q) * a + ai
                    expected = torch.tensor(
                        [i * 10000 + ai * 1000 + ci * 100 + r * 10 + q for ci in range(c)],
                        dtype=torch.float32,
                    )
                    assert torch.equal(flat[i, row], expected)
    two = flatten_levels([x, x[:, :, :1, :2]], c)
    assert two.shape == (b, h * w * a + 2 * a, c)
    assert torch.equal(two[:, : h * w * a], flat)


def test_images_to_levels_and_back():
    num_levels = [6, 3, 1]
    imgs = [torch.arange(10) + 100 * i for i in range(2)]
    levels = images_to_levels(imgs, num_levels)
    assert [lv.shape for lv in levels] == [(2, 6), (2, 3), (2, 1)]
    assert levels[1].tolist() == [[6, 7, 8], [106, 107, 108]]
    maps = [torch.randn(2, 3, 2, 3), torch.randn(2, 3, 1, 2)]
    per_image = levels_to_images(maps)
    assert len(per_image) == 2 and per_image[0].shape == (8, 3)
    assert torch.equal(per_image[1][:6], maps[0][1].permute(1, 2, 0).reshape(6, 3))
    assert torch.equal(per_image[1][6:], maps[1][1].permute(1, 2, 0).reshape(2, 3))


def test_unmap_fills_rows_outside_the_mask():
    inside = torch.tensor([True, False, True, False])
    labels = unmap(torch.tensor([3, 4]), 4, inside, fill=7)
    assert labels.tolist() == [3, 7, 4, 7]
    boxes = unmap(torch.ones(2, 4), 4, inside)
    assert boxes.sum(1).tolist() == [4.0, 0.0, 4.0, 0.0]


def test_filter_scores_and_topk_threshold_then_topk():
    scores = torch.tensor([[0.10, 0.90], [0.50, 0.05], [0.70, 0.30]])
    s, labels, keep, res = filter_scores_and_topk(
        scores, 0.1, 3, {"idx": torch.tensor([10, 11, 12])}
    )
    # 0.10 is not strictly above the threshold; the three best survivors remain
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert labels.tolist() == [1, 0, 0]
    assert keep.tolist() == [0, 2, 1]
    assert res["idx"].tolist() == [10, 12, 11]
    # mmdetection quirk kept: topk=-1 slices [: -1] and drops the lowest survivor
    s, _, _, _ = filter_scores_and_topk(scores, 0.1, -1)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.5])
    s, _, _, _ = filter_scores_and_topk(scores, 0.0, -1)
    assert len(s) == 5


def _maps(num_classes, sizes, hot):
    """Per-level logits at -20 except ``hot[(level, row, col, cls)] = prob``; zero deltas."""
    cls_scores = [torch.full((1, num_classes, h, w), -20.0) for h, w in sizes]
    for (lvl, r, q, c), p in hot.items():
        cls_scores[lvl][0, c, r, q] = logit(p)
    bbox_preds = [torch.zeros(1, 4, h, w) for h, w in sizes]
    return cls_scores, bbox_preds


def _meta(h=64, w=64, scale_factor=(1.0, 1.0, 1.0, 1.0)):
    return {"img_shape": (h, w), "scale_factor": scale_factor, "pad_shape": (h, w)}


def test_predict_nms_pre_is_per_level_and_score_thr_applies_first():
    head = ToyHead(2, [8, 16], TestConfig(nms_pre=2, score_thr=0.3, iou_threshold=0.5))
    hot = {
        (0, 0, 0, 0): 0.9,
        (0, 0, 4, 0): 0.8,
        (0, 4, 0, 1): 0.7,  # third on level 0: cut by nms_pre=2
        (0, 4, 4, 0): 0.2,  # below score_thr
        (1, 3, 3, 1): 0.6,  # level 1 has its own budget
    }
    cls_scores, bbox_preds = _maps(2, [(8, 8), (4, 4)], hot)
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[_meta()])
    assert res["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert res["labels"].tolist() == [0, 0, 1]
    # zero deltas decode to the anchors (clipped to the image): 16 px at stride 8, 32 at 16
    assert res["boxes"][0].tolist() == [0.0, 0.0, 8.0, 8.0]
    assert res["boxes"][1].tolist() == [24.0, 0.0, 40.0, 8.0]
    assert res["boxes"][2].tolist() == [32.0, 32.0, 64.0, 64.0]


def test_predict_batched_nms_per_class_and_max_per_img():
    head = ToyHead(2, [8], TestConfig(nms_pre=100, score_thr=0.05, iou_threshold=0.3))
    hot = {
        (0, 2, 2, 0): 0.9,
        (0, 2, 3, 0): 0.8,  # IoU 1/3 with the first, same class: suppressed
        (0, 2, 3, 1): 0.7,  # same box, other class: kept
        (0, 6, 6, 0): 0.6,
    }
    cls_scores, bbox_preds = _maps(2, [(8, 8)], hot)
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[_meta()])
    assert res["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert res["labels"].tolist() == [0, 1, 0]
    cfg = make_test_cfg({"max_per_img": 2, "iou_threshold": 0.3})
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[_meta()], cfg=cfg)
    assert res["scores"].tolist() == pytest.approx([0.9, 0.7])
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[_meta()], with_nms=False)
    assert len(res["scores"]) == 4


def test_predict_rescale_divides_by_scale_factor_and_score_factors_multiply():
    head = ToyHead(1, [8], TestConfig(nms_pre=10, score_thr=0.05, iou_threshold=0.5))
    cls_scores, bbox_preds = _maps(1, [(8, 8)], {(0, 3, 5, 0): 0.8})
    meta = _meta(scale_factor=(2.0, 0.5, 2.0, 0.5))
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[meta], rescale=True)
    assert res["boxes"][0].tolist() == pytest.approx([32 / 2, 16 / 0.5, 48 / 2, 32 / 0.5])
    factors = [torch.full((1, 1, 8, 8), logit(0.5))]
    (res,) = head.predict_by_feat(
        cls_scores, bbox_preds, factors, batch_img_metas=[meta], rescale=False
    )
    assert res["scores"].tolist() == pytest.approx([0.4])
    assert res["boxes"][0].tolist() == pytest.approx([32.0, 16.0, 48.0, 32.0])


def test_predict_min_bbox_size_and_empty_output():
    head = ToyHead(1, [8], TestConfig(nms_pre=10, score_thr=0.05, min_bbox_size=0))
    # the corner anchor is clipped to an 8 x 8 box: kept only while min_bbox_size < 8
    cls_scores, bbox_preds = _maps(1, [(8, 8)], {(0, 0, 0, 0): 0.9})
    head.test_cfg = TestConfig(nms_pre=10, score_thr=0.05, min_bbox_size=7.9)
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[_meta()])
    assert len(res["boxes"]) == 1
    head.test_cfg = TestConfig(nms_pre=10, score_thr=0.05, min_bbox_size=8.0)
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[_meta()])
    assert len(res["boxes"]) == 0 and res["labels"].dtype == torch.long
    head.test_cfg = TestConfig(score_thr=0.95)
    (res,) = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[_meta()])
    assert res["boxes"].shape == (0, 4)


def test_check_gt_instances_names_the_bad_argument():
    good = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    check_gt_instances(good, labels, 2)
    with pytest.raises(ValueError, match=r"gt_bboxes\[0\]"):
        check_gt_instances([torch.zeros(1, 5), good[1]], labels, 2)
    with pytest.raises(ValueError, match=r"gt_bboxes\[0\]"):
        check_gt_instances([torch.zeros(4), good[1]], labels, 2)
    with pytest.raises(ValueError, match=r"gt_bboxes\[1\]"):
        check_gt_instances([good[0], torch.tensor([[0.0, float("nan"), 1.0, 1.0]])], labels, 2)
    with pytest.raises(ValueError, match=r"gt_labels\[0\]"):
        check_gt_instances(good, [torch.tensor([2]), labels[1]], 2)
    with pytest.raises(TypeError, match="gt_bboxes"):
        check_gt_instances(torch.zeros(1, 4), labels, 2)
    with pytest.raises(ValueError, match="gt_labels"):
        check_gt_instances(good, labels[:1], 2)
