"""The DETR notebook's checks: solutions pass, typical mistakes fail with the right hint."""

import pytest
import torch

from labkit import grading
from labkit.grading.feedback import CheckFailed
from labkit.lessons.detr_matching import one_to_many_gt_inds, one_to_many_report, toy_problem


def _reference_cost(cls_scores, pred_bboxes, gt_bboxes, gt_labels, img_shape):
    from labkit.assigners.hungarian import HungarianAssigner

    return HungarianAssigner().cost_matrix(
        cls_scores[None],
        pred_bboxes[None],
        gt_bboxes[None],
        gt_labels[None],
        torch.tensor([img_shape], dtype=torch.float32),
    )[0]


def test_reference_implementations_pass():
    assert grading.check_matching_cost(_reference_cost).passed
    assert grading.check_one_to_many_gt_inds(one_to_many_gt_inds, seed=1).passed


def test_a_missing_giou_term_is_named():
    from labkit.assigners.hungarian import HungarianAssigner, IoUCost

    def without_giou(cls_scores, pred_bboxes, gt_bboxes, gt_labels, img_shape):
        shape = torch.tensor([img_shape], dtype=torch.float32)
        giou = HungarianAssigner([IoUCost(weight=2.0)]).cost_matrix(
            cls_scores[None], pred_bboxes[None], gt_bboxes[None], gt_labels[None], shape
        )[0]
        return _reference_cost(cls_scores, pred_bboxes, gt_bboxes, gt_labels, img_shape) - giou

    result = grading.check_matching_cost(without_giou, raise_on_fail=False)
    assert not result.passed
    assert any("giou term is missing" in m for m in result.messages)


def test_greedy_matching_fails_where_the_notebook_says():
    def greedy(cost):
        gt_inds = torch.zeros(cost.shape[0], dtype=torch.long)
        free = set(range(cost.shape[0]))
        for j in range(cost.shape[1]):
            if not free:
                break
            q = min(free, key=lambda q: float(cost[q, j]))
            gt_inds[q] = j + 1
            free.remove(q)
        return gt_inds

    result = grading.check_hungarian_gt_inds(greedy, raise_on_fail=False)
    failed = [c.name for c in result.cases if not c.passed]
    assert "the notebook's example, where greedy fails" in failed
    assert any("not the smallest" in m for m in result.messages)


def test_one_based_gt_inds_are_required():
    from scipy.optimize import linear_sum_assignment

    def zero_based(cost):
        out = torch.zeros(cost.shape[0], dtype=torch.long)
        if cost.numel():
            rows, cols = linear_sum_assignment(cost.numpy())
            out[torch.as_tensor(rows)] = torch.as_tensor(cols)
        return out

    result = grading.check_hungarian_gt_inds(zero_based, raise_on_fail=False)
    assert any("1-based" in m for m in result.messages)


def test_one_to_many_contested_query_goes_to_the_cheapest_gt():
    def last_wins(cost, k):
        gt_inds = torch.zeros(cost.shape[0], dtype=torch.long)
        for j in range(cost.shape[1]):
            gt_inds[cost[:, j].topk(min(k, cost.shape[0]), largest=False).indices] = j + 1
        return gt_inds

    result = grading.check_one_to_many_gt_inds(last_wins, raise_on_fail=False)
    assert not result.passed
    assert any("contested query" in m for m in result.messages)
    with pytest.raises(CheckFailed):
        grading.check_one_to_many_gt_inds(last_wins)


def test_a_stub_scores_zero():
    def stub(*args):
        raise NotImplementedError("Exercise 1 (matching_cost): write your code here")

    assert grading.check_matching_cost(stub, raise_on_fail=False).score == 0.0


def test_toy_problem_matching_is_what_the_notebook_says():
    from labkit.assigners.hungarian import HungarianAssigner

    p = toy_problem()
    res = HungarianAssigner().assign(
        p.cls_scores, p.pred_bboxes, p.gt_bboxes, p.gt_labels, p.img_shape
    )
    # queries 0-2 answer objects 0-2; query 3 (object 0's box, wrong class) stays negative
    assert res.gt_inds.tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    cost = _reference_cost(p.cls_scores, p.pred_bboxes, p.gt_bboxes, p.gt_labels, p.img_shape)
    assert one_to_many_gt_inds(cost, 3).tolist() == [1, 2, 3, 1, 0, 1, 3, 0]


def test_one_to_many_report_names_kept_lost_and_background_queries():
    # GT 0 wants q0, q1; GT 1 wants q1 (cheaper for GT 1: 0.5 < 2.0) and q2; q3 is nobody's
    cost = torch.tensor([[1.0, 3.0], [2.0, 0.5], [4.0, 1.5], [5.0, 6.0]])
    assert one_to_many_gt_inds(cost, 2).tolist() == [1, 2, 2, 0]
    assert one_to_many_report(cost, 2).splitlines() == [
        "GT 0: cheapest q0 +1.00, q1 +2.00 -> keeps q0; loses q1 to GT 1 (+0.50)",
        "GT 1: cheapest q1 +0.50, q2 +1.50 -> keeps q1, q2",
        "background (in no ground truth's 2 cheapest): q3",
    ]
    # the notebook's toy problem: GT 1 keeps only q1, q4 and q7 stay background
    report = one_to_many_report(_reference_cost(*_toy_inputs()), 3).splitlines()
    assert report[1].startswith(
        "GT 1: cheapest q1 -1.47, q3 +6.75, q0 +6.99 -> keeps q1; loses q3 to GT 0"
    )
    assert report[-1] == "background (in no ground truth's 3 cheapest): q4, q7"


def _toy_inputs():
    p = toy_problem()
    return p.cls_scores, p.pred_bboxes, p.gt_bboxes, p.gt_labels, p.img_shape
