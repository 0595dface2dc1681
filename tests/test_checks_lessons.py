"""The checks of notebooks 02, 03 and 06's third exercises: the reference passes, typical
mistakes fail with the hint that names them, a stub scores 0."""

import pytest
import torch

from labkit import grading
from labkit.grading import checks_lessons as cl
from labkit.grading.feedback import CheckFailed


def _hints(result):
    return [line for m in result.messages for line in m.splitlines() if line.startswith("hint:")]


def _stub(*args):
    raise NotImplementedError("write your code here")


# --- 02: the ATSS assigner ---------------------------------------------------------------


def _atss_reference(priors, num_level_priors, gt_bboxes, topk):
    from labkit.assigners import ATSSAssigner

    return ATSSAssigner(topk=topk).assign(priors, num_level_priors, gt_bboxes).gt_inds


@pytest.mark.parametrize("seed", [0, 1])
def test_atss_reference_passes(seed):
    assert grading.check_atss_assign(_atss_reference, seed=seed).passed
    assert grading.EXERCISES["atss_assign"] is grading.check_atss_assign


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        ({"per_level": False}, "on each level separately"),
        ({"centre_inside": False}, "centre lies inside the GT"),
        ({"unbiased": False}, "unbiased"),
        ({"conflict": "last_gt"}, "the GT it overlaps most"),
        ({"conflict": "first_gt"}, "the GT it overlaps most"),
        ({"one_based": False}, "1-based"),
    ],
)
def test_atss_mistakes_get_their_hint(mistake, hint):
    def wrong(priors, num_level_priors, gt_bboxes, topk):
        return cl.atss_variant(priors, num_level_priors, gt_bboxes, topk, **mistake)

    result = grading.check_atss_assign(wrong, raise_on_fail=False)
    assert not result.passed
    assert any(hint in h for h in _hints(result)), _hints(result)


def test_atss_stub_scores_zero():
    result = grading.check_atss_assign(_stub, raise_on_fail=False)
    assert result.score == 0.0
    with pytest.raises(CheckFailed):
        grading.check_atss_assign(_stub)


# --- 03: FCOS targets of every point -----------------------------------------------------


def _fcos_reference(points, gt_bboxes, regress_ranges):
    from labkit.heads.fcos import fcos_targets_single

    n, k = len(points), len(gt_bboxes)
    _, targets, gt_inds = fcos_targets_single(
        points, gt_bboxes, torch.zeros(k, dtype=torch.long), regress_ranges,
        torch.full((n,), 8.0), 1, return_gt_inds=True,
    )  # fmt: skip
    return gt_inds, torch.where(gt_inds[:, None] >= 0, targets, torch.zeros_like(targets))


@pytest.mark.parametrize("seed", [0, 1])
def test_fcos_reference_passes(seed):
    assert grading.check_fcos_point_targets(_fcos_reference, seed=seed).passed


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        ({"smallest": False}, "SMALLEST area"),
        ({"strict": False}, "strictly inside"),
        ({"inclusive": False}, "includes both ends"),
        ({"zero_background": False}, "background points get bbox_targets (0, 0, 0, 0)"),
        ({"background": 0}, "gt_ind -1"),
    ],
)
def test_fcos_mistakes_get_their_hint(mistake, hint):
    def wrong(points, gt_bboxes, regress_ranges):
        return cl.fcos_variant(points, gt_bboxes, regress_ranges, **mistake)

    result = grading.check_fcos_point_targets(wrong, raise_on_fail=False)
    assert not result.passed
    assert any(hint in h for h in _hints(result)), _hints(result)


def test_fcos_swapped_targets_are_named():
    def swapped(points, gt_bboxes, regress_ranges):
        gt_inds, targets = _fcos_reference(points, gt_bboxes, regress_ranges)
        return gt_inds, targets[:, [2, 3, 0, 1]]

    result = grading.check_fcos_point_targets(swapped, raise_on_fail=False)
    assert not result.passed
    assert any("gt_inds are right" in h for h in _hints(result))


def test_fcos_stub_scores_zero():
    assert grading.check_fcos_point_targets(_stub, raise_on_fail=False).score == 0.0


# --- 06: a padded query group ------------------------------------------------------------


def _group_reference(labels, num_classes):
    from labkit.codetr.positive_queries import pad_positives
    from labkit.codetr.positives import AuxPositives

    n = [len(lab) for lab in labels]
    positives = AuxPositives(
        coords=[torch.zeros(p, 4) for p in n],
        labels=list(labels),
        targets=[torch.zeros(p, 4) for p in n],
    )
    out = pad_positives(positives, [{"img_shape": (32, 32)}] * len(labels), num_classes)
    return out.labels, out.label_weights, out.attn_mask


@pytest.mark.parametrize("seed", [0, 1])
def test_query_group_reference_passes(seed):
    assert grading.check_query_group(_group_reference, seed=seed).passed


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        ({"min_coords": 1}, "at least min_coords = 9"),
        ({"drop_invalid": False}, "dropped before padding"),
        ({"pad_label": 0}, "background label num_classes"),
        ({"self_attend": False}, "attends to itself"),
        ({"pad_sees_real": True}, "must not attend to the real queries"),
        ({"invert": True}, "True in attn_mask means blocked"),
    ],
)
def test_query_group_mistakes_get_their_hint(mistake, hint):
    def wrong(labels, num_classes):
        return cl.query_group_variant(labels, num_classes, **mistake)

    result = grading.check_query_group(wrong, raise_on_fail=False)
    assert not result.passed
    assert any(hint in h for h in _hints(result)), _hints(result)


def test_query_group_stub_scores_zero():
    assert grading.check_query_group(_stub, raise_on_fail=False).score == 0.0


def test_checks_do_not_print_the_answer_formula():
    """A failure report shows inputs, expected vs got and a hint, never labkit's source."""
    result = grading.check_query_group(
        lambda labels, c: cl.query_group_variant(labels, c, invert=True), raise_on_fail=False
    )
    report = result.report()
    assert "padding_attn_mask" not in report and "torch.eye" not in report


def test_hbm_floor_check_passes_the_reference_and_names_a_missing_term():
    from labkit.grading.checks_lessons import check_hbm_floor
    from labkit.lessons.attention_cost import hbm_floor_us

    def reference(bs, num_queries, num_keys, num_heads, head_dims, num_levels, num_points,
                  dtype_bytes, bandwidth_tb_s):  # fmt: skip
        return hbm_floor_us(bs, num_queries, num_keys, num_heads, head_dims, num_levels,
                            num_points, dtype_bytes, bandwidth_tb_s)  # fmt: skip

    assert check_hbm_floor(reference).passed and check_hbm_floor(reference, seed=1).passed

    def no_weights(bs, num_queries, num_keys, num_heads, head_dims, num_levels, num_points,
                   dtype_bytes, bandwidth_tb_s):  # fmt: skip
        samples = bs * num_queries * num_heads * num_levels * num_points
        return reference(bs, num_queries, num_keys, num_heads, head_dims, num_levels,
                         num_points, dtype_bytes, bandwidth_tb_s) - samples * 4 / (bandwidth_tb_s * 1e12) * 1e6  # fmt: skip

    result = check_hbm_floor(no_weights, raise_on_fail=False)
    assert result.score == 0.0
    assert any("attention weights are read too" in m for m in result.messages)

    def stub(*args):
        raise NotImplementedError

    assert check_hbm_floor(stub, raise_on_fail=False).score == 0.0
