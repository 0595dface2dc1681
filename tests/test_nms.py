"""multiclass_nms / batched_nms: hand-derived cases for mmdetection's and mmcv's semantics."""

from __future__ import annotations

import pytest
import torch

from labkit.heads.dense_head import TestConfig
from labkit.heads.nms import batched_nms, multiclass_nms

CFG = TestConfig(score_thr=0.05, iou_threshold=0.5, max_per_img=100)
# A and B overlap: intersection [1, 0, 10, 10] = 90, union 100 + 100 - 90 = 110, IoU 0.82 > 0.5
A, B = [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]


def test_score_factors_multiply_after_the_threshold():
    # one class (+ background), three far-apart boxes, score_thr 0.05
    boxes = torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10], [40.0, 0, 50, 10]])
    scores = torch.tensor([[0.5, 0.5], [0.04, 0.96], [0.25, 0.75]])
    factors = torch.tensor([0.0625, 2.0, 1.0])
    out = multiclass_nms(boxes, scores, CFG, score_factors=factors, return_inds=True)
    # raw scores tested first: box 0 (0.5) and box 2 (0.25) pass, box 1 (0.04) does not;
    # then products: box 0 -> 0.5 * 0.0625 = 0.03125 (below 0.05, kept anyway), box 2 -> 0.25.
    # (Multiplying first would have kept box 1 (0.08) and box 2 and dropped box 0.)
    torch.testing.assert_close(out["scores"], torch.tensor([0.25, 0.03125]))
    assert out["inds"].tolist() == [2, 0] and out["labels"].tolist() == [0, 0]
    torch.testing.assert_close(out["boxes"], boxes[[2, 0]])


def test_score_factors_rank_the_nms():
    boxes = torch.tensor([A, B])
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    # no factors: A (0.9) suppresses B (0.6)
    assert multiclass_nms(boxes, scores, CFG, return_inds=True)["inds"].tolist() == [0]
    # factors: A -> 0.9 * 0.25 = 0.225, B -> 0.6 * 0.5 = 0.3, so B now suppresses A
    out = multiclass_nms(
        boxes, scores, CFG, score_factors=torch.tensor([0.25, 0.5]), return_inds=True
    )
    assert out["inds"].tolist() == [1]
    torch.testing.assert_close(out["scores"], torch.tensor([0.3]))
    torch.testing.assert_close(out["boxes"], torch.tensor([B]))


def test_class_agnostic_versus_per_class():
    boxes = torch.tensor([A, B])
    # A is class 0 (0.7), B is class 1 (0.6); the pairs (A, 1) and (B, 0) score 0
    scores = torch.tensor([[0.7, 0.0, 0.3], [0.0, 0.6, 0.4]])
    per_class = multiclass_nms(boxes, scores, CFG, return_inds=True)
    # different classes never suppress each other: both kept, inds 0 * 2 + 0 and 1 * 2 + 1
    assert per_class["inds"].tolist() == [0, 3] and per_class["labels"].tolist() == [0, 1]
    torch.testing.assert_close(per_class["scores"], torch.tensor([0.7, 0.6]))
    agnostic = multiclass_nms(boxes, scores, CFG, class_agnostic=True, return_inds=True)
    # one NMS over both: A (0.7) suppresses B (IoU 0.82)
    assert agnostic["inds"].tolist() == [0] and agnostic["labels"].tolist() == [0]
    torch.testing.assert_close(agnostic["boxes"], torch.tensor([A]))


def test_batched_nms_offsets_keep_classes_apart_at_large_coordinates():
    box = [9000.0, 9000.0, 10000.0, 10000.0]
    boxes, scores = torch.tensor([box, box]), torch.tensor([0.9, 0.8])
    # max coordinate 10000: class 79 is shifted by 79 * 10001 = 790079, far from class 0
    assert batched_nms(boxes, scores, torch.tensor([0, 79]), 0.5).tolist() == [0, 1]
    # same class, IoU 1: the lower score goes
    assert batched_nms(boxes, scores, torch.tensor([3, 3]), 0.5).tolist() == [0]
    assert batched_nms(boxes, scores, torch.tensor([0, 79]), 0.5, class_agnostic=True).tolist() == [
        0
    ]
    # kept indices come by descending score whatever the input order
    assert batched_nms(boxes, torch.tensor([0.2, 0.7]), torch.tensor([0, 1]), 0.5).tolist() == [
        1,
        0,
    ]
    assert batched_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5
    ).shape == (0,)


def test_multiclass_nms_offset_trick_across_classes():
    # one box, both classes scoring: the two pairs have the same box (IoU 1) and both stay
    out = multiclass_nms(
        torch.tensor([[1000.0, 1000, 2000, 2000]]), torch.tensor([[0.5, 0.45, 0.05]]), CFG
    )
    assert out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([0.5, 0.45]))
    # b0 = [0, 0, 1000, 1000] is class 1, b1 = [1001, 1001, 2001, 2001] is class 0. A fixed
    # offset of 1001 per class would move b0 exactly onto b1; mmcv's offset is
    # max_coordinate + 1 = 2002, so b0 moves to [2002, 2002, 3002, 3002] and overlaps nothing.
    boxes = torch.tensor([[0.0, 0, 1000, 1000], [1001.0, 1001, 2001, 2001]])
    scores = torch.tensor([[0.0, 0.9, 0.1], [0.8, 0.0, 0.2]])
    out = multiclass_nms(boxes, scores, CFG, return_inds=True)
    assert out["inds"].tolist() == [1, 2] and out["labels"].tolist() == [1, 0]


def per_class_case() -> tuple[torch.Tensor, torch.Tensor]:
    """3 boxes x 2 classes, class-specific boxes [3, 8]: pair (i, c) is the disjoint box
    ``[100 i + 50 c, 0, 100 i + 50 c + 10, 10]``."""
    pairs = [
        [100.0 * i + 50 * c, 0, 100.0 * i + 50 * c + 10, 10] for i in range(3) for c in range(2)
    ]
    boxes = torch.tensor(pairs).reshape(3, 8)
    scores = torch.tensor([[0.9, 0.02, 0.08], [0.3, 0.6, 0.1], [0.01, 0.2, 0.79]])
    return boxes, scores


def test_return_inds_are_box_times_c_plus_class():
    boxes, scores = per_class_case()
    out = multiclass_nms(boxes, scores, CFG, return_inds=True)
    # above 0.05: (0,0) 0.9 -> 0, (1,0) 0.3 -> 2, (1,1) 0.6 -> 3, (2,1) 0.2 -> 5; all disjoint
    assert out["inds"].tolist() == [0, 3, 2, 5]
    assert out["labels"].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.6, 0.3, 0.2]))
    expected = torch.tensor(
        [[0.0, 0, 10, 10], [150.0, 0, 160, 10], [100.0, 0, 110, 10], [250.0, 0, 260, 10]]
    )
    torch.testing.assert_close(out["boxes"], expected)
    assert set(multiclass_nms(boxes, scores, CFG)) == {"boxes", "scores", "labels"}


def test_max_num():
    boxes, scores = per_class_case()
    cfg = TestConfig(score_thr=0.05, iou_threshold=0.5, max_per_img=2)
    assert multiclass_nms(boxes, scores, cfg, return_inds=True)["inds"].tolist() == [0, 3]
    for keep_all in (0, -1):  # mmdetection's max_num <= 0: no cap
        cfg = TestConfig(score_thr=0.05, iou_threshold=0.5, max_per_img=keep_all)
        assert multiclass_nms(boxes, scores, cfg, return_inds=True)["inds"].tolist() == [0, 3, 2, 5]


def test_threshold_is_strict():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10]])
    scores = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    cfg = TestConfig(score_thr=0.5, iou_threshold=0.5, max_per_img=100)
    assert multiclass_nms(boxes, scores, cfg, return_inds=True)["inds"].tolist() == [1]


@pytest.mark.parametrize("width", [4, 8])
def test_empty_input_and_nothing_above_threshold(width):
    out = multiclass_nms(
        torch.zeros(0, width),
        torch.zeros(0, 3),
        CFG,
        score_factors=torch.zeros(0),
        return_inds=True,
    )
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,)
    assert out["labels"].shape == (0,) and out["labels"].dtype == torch.long
    assert out["inds"].shape == (0,) and out["inds"].dtype == torch.long
    low = torch.full((2, 3), 0.01)
    out = multiclass_nms(torch.zeros(2, width), low, CFG, return_inds=True)
    assert out["boxes"].shape == (0, 4) and out["inds"].numel() == 0


def test_bad_shapes_name_the_argument():
    boxes, scores = torch.zeros(3, 4), torch.rand(3, 3)
    with pytest.raises(ValueError, match="multi_scores"):
        multiclass_nms(boxes, torch.rand(3), CFG)  # not 2-D
    with pytest.raises(ValueError, match="multi_scores"):
        multiclass_nms(boxes, torch.rand(3, 0), CFG)  # no background column
    with pytest.raises(ValueError, match="multi_bboxes"):
        multiclass_nms(torch.zeros(2, 4), scores, CFG)  # N mismatch
    with pytest.raises(ValueError, match="multi_bboxes"):
        multiclass_nms(torch.zeros(3, 6), scores, CFG)  # neither 4 nor 4 * 2
    with pytest.raises(ValueError, match="multi_bboxes"):
        multiclass_nms(torch.zeros(3, 2, 4), scores, CFG)  # not 2-D
    with pytest.raises(ValueError, match="score_factors"):
        multiclass_nms(boxes, scores, CFG, score_factors=torch.ones(2))
    with pytest.raises(ValueError, match="score_factors"):
        multiclass_nms(boxes, scores, CFG, score_factors=torch.ones(3, 1))
    with pytest.raises(TypeError, match="multi_scores"):
        multiclass_nms(boxes, [[0.5, 0.5]], CFG)
    with pytest.raises(ValueError, match="scores"):
        batched_nms(boxes, torch.rand(2), torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(boxes, torch.rand(3), torch.zeros(2, dtype=torch.long), 0.5)
