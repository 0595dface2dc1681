"""MaxIoUAssigner: each step on hand-made overlaps, ignore boxes, empty inputs, loop reference."""

from __future__ import annotations

import pytest
import torch

from labkit.assigners import AssignResult, MaxIoUAssigner
from labkit.assigners.max_iou import assign_wrt_overlaps, low_quality_reference


def assign(overlaps, pos=0.5, neg=0.4, **kw):
    labels = torch.arange(10, 10 + len(overlaps))
    return assign_wrt_overlaps(torch.tensor(overlaps), labels, pos, neg, **kw)


def test_negatives_float_and_range():
    ov = [[0.0, 0.1, 0.3, 0.6]]
    # float: [0, 0.3) negative, [0.3, 0.5) ignored, >= 0.5 positive
    r = assign(ov, 0.5, 0.3, match_low_quality=False)
    assert r.gt_inds.tolist() == [0, 0, -1, 1]
    # (low, high): only [0.1, 0.3) negative; IoU 0 stays ignored
    r = assign(ov, 0.5, (0.1, 0.3), match_low_quality=False)
    assert r.gt_inds.tolist() == [-1, 0, -1, 1]
    assert r.labels.tolist() == [-1, -1, -1, 10]
    torch.testing.assert_close(r.max_overlaps, torch.tensor([0.0, 0.1, 0.3, 0.6]))


def test_positives_take_the_best_gt():
    ov = [[0.6, 0.1, 0.7], [0.8, 0.0, 0.2]]
    r = assign(ov, match_low_quality=False)
    assert r.gt_inds.tolist() == [2, 0, 1]
    assert r.labels.tolist() == [11, -1, 10]
    assert r.num_gts == 2 and r.num_preds == 3


def test_low_quality_match_overwrites_a_better_gt():
    # Prior 0 overlaps GT1 0.9 and GT2 0.8; GT2's best prior is prior 0 too. Step 3 gives it
    # to GT1, step 4 writes GT1 then GT2: the later GT wins (mmdetection's documented quirk).
    ov = [[0.9, 0.2, 0.0], [0.8, 0.1, 0.3]]
    r = assign(ov)
    assert r.gt_inds.tolist() == [2, 0, 0]
    assert r.labels.tolist() == [11, -1, -1]
    # max_overlaps still reports the best IoU (with GT1)
    assert r.max_overlaps[0].item() == pytest.approx(0.9)
    assert assign(ov, match_low_quality=False).gt_inds.tolist() == [1, 0, 0]


def test_low_quality_rescues_a_gt_below_the_positive_threshold():
    ov = [[0.3, 0.45, 0.1]]
    r = assign(ov)  # best prior (0.45) becomes positive though < pos_iou_thr
    assert r.gt_inds.tolist() == [0, 1, 0]


def test_gt_max_assign_all_ties():
    ov = [[0.3, 0.3, 0.1]]
    assert assign(ov, 0.5, 0.2).gt_inds.tolist() == [1, 1, 0]
    # only the first argmax without gt_max_assign_all; the tied prior stays ignored
    assert assign(ov, 0.5, 0.2, gt_max_assign_all=False).gt_inds.tolist() == [1, -1, 0]


def test_min_pos_iou():
    ov = [[0.15, 0.1]]
    assert assign(ov, 0.5, 0.4, min_pos_iou=0.2).gt_inds.tolist() == [0, 0]
    assert assign(ov, 0.5, 0.4, min_pos_iou=0.15).gt_inds.tolist() == [1, 0]


def test_min_pos_iou_zero_quirk_gt_without_overlap_claims_every_zero_prior():
    # GT2 overlaps nothing; with min_pos_iou = 0 and gt_max_assign_all it claims every prior
    # at its "best" IoU 0 -- even prior 0, a clean 0.7 positive of GT1. mmdetection too.
    ov = [[0.7, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert assign(ov).gt_inds.tolist() == [2, 2, 2]
    assert assign(ov, min_pos_iou=0.01).gt_inds.tolist() == [1, 0, 0]


def test_batched_step4_equals_the_loop_over_gts():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        k, n = torch.randint(1, 8, (2,), generator=gen).tolist()
        n *= 5
        # quantized IoUs: plenty of ties between priors and between GTs
        ov = torch.randint(0, 6, (k, n), generator=gen).float() / 10
        for assign_all in (True, False):
            for min_pos in (0.0, 0.3):
                r = assign_wrt_overlaps(ov, None, 0.5, 0.2, min_pos, assign_all, False)
                ref = low_quality_reference(r.gt_inds, ov, min_pos, assign_all)
                fast = assign_wrt_overlaps(ov, None, 0.5, 0.2, min_pos, assign_all, True)
                assert torch.equal(fast.gt_inds, ref), (trial, assign_all, min_pos)


def test_assign_from_boxes_and_ignore_regions():
    priors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 with GT
            [5.0, 0.0, 15.0, 10.0],  # IoU 50 / 150 = 1/3
            [30.0, 0.0, 40.0, 10.0],  # IoU 0, inside the ignore box
            [60.0, 0.0, 70.0, 10.0],  # IoU 0
        ]
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    ignore = torch.tensor([[28.0, 0.0, 50.0, 10.0]])
    assigner = MaxIoUAssigner(0.5, 0.3, ignore_iof_thr=0.5)
    r = assigner.assign(priors, gt, torch.tensor([4]), gt_bboxes_ignore=ignore)
    assert r.gt_inds.tolist() == [1, -1, -1, 0]
    assert r.labels.tolist() == [4, -1, -1, -1]
    torch.testing.assert_close(r.max_overlaps, torch.tensor([1.0, 1 / 3, -1.0, 0.0]))
    # IoF relative to the ignore box instead: 10 * 10 / (22 * 10) < 0.5, nothing ignored
    r = MaxIoUAssigner(0.5, 0.3, ignore_iof_thr=0.5, ignore_wrt_candidates=False).assign(
        priors, gt, gt_bboxes_ignore=ignore
    )
    assert r.gt_inds.tolist() == [1, -1, 0, 0] and r.labels is None


def test_empty_gt_and_empty_priors():
    priors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 9.0]])
    r = MaxIoUAssigner(0.5, 0.4).assign(priors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert r.gt_inds.tolist() == [0, 0]
    assert r.max_overlaps.tolist() == [0.0, 0.0]
    assert r.labels.tolist() == [-1, -1]
    r = MaxIoUAssigner(0.5, 0.4).assign(torch.zeros(0, 4), priors, torch.tensor([1, 2]))
    assert r.gt_inds.shape == (0,) and r.labels.shape == (0,) and r.num_gts == 2


def test_gpu_assign_thr_runs_on_cpu_and_keeps_the_result():
    priors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 61.0, 61.0]])
    a = MaxIoUAssigner(0.5, 0.4).assign(priors, gts)
    b = MaxIoUAssigner(0.5, 0.4, gpu_assign_thr=1).assign(priors, gts)
    assert torch.equal(a.gt_inds, b.gt_inds) and a.gt_inds.tolist() == [1, 2]


def test_bad_input_names_the_argument():
    priors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="gt_bboxes"):
        MaxIoUAssigner(0.5, 0.4).assign(priors, torch.tensor([[5.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="gt_labels"):
        MaxIoUAssigner(0.5, 0.4).assign(priors, priors, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="priors"):
        MaxIoUAssigner(0.5, 0.4).assign(torch.zeros(3, 3), priors)
    with pytest.raises(ValueError, match="neg_iou_thr"):
        MaxIoUAssigner(0.5, (0.1, 0.2, 0.3))


def test_assign_result_add_gt_and_repr():
    r = AssignResult(
        2, torch.tensor([0, 1, -1]), torch.tensor([0.1, 0.7, 0.4]), torch.tensor([-1, 5, -1])
    )
    r.add_gt_(torch.tensor([5, 6]))
    assert r.gt_inds.tolist() == [1, 2, 0, 1, -1]
    assert r.max_overlaps.tolist()[:2] == [1.0, 1.0]
    assert r.labels.tolist() == [5, 6, -1, 5, -1]
    assert r.num_preds == 5
    assert "positive=3" in repr(r) and "ignored=1" in repr(r)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((float("nan"), 0.4), {}, r"pos_iou_thr: expected an IoU in \[0, 1\], got nan"),
        ((float("inf"), 0.4), {}, r"pos_iou_thr: expected an IoU in \[0, 1\], got inf"),
        ((1.5, 0.4), {}, r"pos_iou_thr: expected an IoU in \[0, 1\], got 1.5"),
        ((0.5, float("nan")), {}, r"neg_iou_thr: expected an IoU in \[0, 1\], got nan"),
        ((0.5, -0.1), {}, r"neg_iou_thr: expected an IoU in \[0, 1\], got -0.1"),
        ((0.5, (0.1, float("inf"))), {}, r"neg_iou_thr: expected an IoU in \[0, 1\], got \(0.1, inf\)"),
        ((0.5, (0.3, 0.1)), {}, r"neg_iou_thr: expected low <= high, got \(0.3, 0.1\)"),
        (
            (0.3, 0.6),
            {},
            r"neg_iou_thr: expected at most pos_iou_thr \(0.3\), got 0.6 \(a prior cannot be",
        ),
        ((0.5, (0.1, 0.6)), {}, r"neg_iou_thr: expected at most pos_iou_thr \(0.5\), got \(0.1, 0.6\)"),
        ((0.5, 0.4), {"min_pos_iou": float("nan")}, r"min_pos_iou: expected an IoU in \[0, 1\], got nan"),
        ((0.5, 0.4), {"min_pos_iou": -1.0}, r"min_pos_iou: expected an IoU in \[0, 1\], got -1.0"),
    ],
)  # fmt: skip
def test_bad_thresholds_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaxIoUAssigner(*args, **kwargs)


@pytest.mark.parametrize(
    ("pos", "neg", "min_pos"),
    [
        (0.5, 0.4, 0.0),  # RetinaNet
        (0.7, 0.3, 0.3),  # RPN
        (0.5, 0.5, 0.5),  # RoI head: equal thresholds
        (0.7, (0.3, 0.7), 0.3),  # a (low, high) range ending at pos
        (0.1, 0.1, 0.0),  # PAA's first stage
        (1.0, 0.2, 0.0),  # YOLOF-style GridAssigner extreme
        (0.7, 0.7, 0.3),  # Cascade RPN's second stage
    ],
)
def test_mmdetection_configurations_are_accepted(pos, neg, min_pos):
    assigner = MaxIoUAssigner(pos, neg, min_pos_iou=min_pos)
    assert assigner.pos_iou_thr == pos and assigner.min_pos_iou == min_pos
