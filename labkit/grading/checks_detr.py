"""Checks of the DETR notebook's exercises: the matching cost, Hungarian matching, one-to-many.

Same contract as :mod:`labkit.grading.checks`: the student's function runs on hand-picked edge
cases and seeded random inputs and is compared with labkit's own code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from labkit.grading.feedback import Case, CheckResult, run_cases

__all__ = ["check_hungarian_gt_inds", "check_matching_cost", "check_one_to_many_gt_inds"]


def _reference_cost(cls_scores, pred_bboxes, gt_bboxes, gt_labels, img_shape) -> Tensor:
    from labkit.assigners.hungarian import HungarianAssigner

    shape = torch.tensor([img_shape], dtype=torch.float32)
    return HungarianAssigner().cost_matrix(
        cls_scores[None], pred_bboxes[None], gt_bboxes[None], gt_labels[None], shape
    )[0]


def _random_problem(g: torch.Generator, n: int, k: int, c: int, hw: tuple[int, int]) -> dict:
    h, w = hw

    def boxes(m: int) -> Tensor:
        xy = torch.rand(m, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh = 4 + torch.rand(m, 2, generator=g) * (torch.tensor([w, h]) - xy - 4) * 0.9
        return torch.cat([xy, xy + wh], 1)

    return {
        "cls_scores": torch.randn(n, c, generator=g) * 2,
        "pred_bboxes": boxes(n),
        "gt_bboxes": boxes(k),
        "gt_labels": torch.randint(0, c, (k,), generator=g),
        "img_shape": hw,
    }


def _cost_hint(args: dict) -> Callable[[object, object], str | None]:
    from labkit.assigners.hungarian import BBoxL1Cost, FocalLossCost, HungarianAssigner, IoUCost

    shape = torch.tensor([args["img_shape"]], dtype=torch.float32)

    def term(cost) -> Tensor:
        return HungarianAssigner([cost]).cost_matrix(
            args["cls_scores"][None],
            args["pred_bboxes"][None],
            args["gt_bboxes"][None],
            args["gt_labels"][None],
            shape,
        )[0]

    def hint(got, expected) -> str | None:
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return "return one cost per (query, ground truth) pair: shape [N, K]"
        parts = {
            "class": term(FocalLossCost(weight=2.0)),
            "l1": term(BBoxL1Cost(weight=5.0, box_format="xywh")),
            "giou": term(IoUCost(weight=2.0)),
        }
        for name, part in parts.items():
            if torch.allclose(got + part, expected, atol=1e-4):
                return f"the {name} term is missing (or has weight 0)"
            if torch.allclose(got - part, expected, atol=1e-4):
                return f"the {name} term has the wrong sign"
        l1_xyxy = term(BBoxL1Cost(weight=5.0, box_format="xyxy"))
        if torch.allclose(got - l1_xyxy + parts["l1"], expected, atol=1e-4):
            return "compare (cx, cy, w, h) boxes in the L1 term, not corners"
        return None

    return hint


def check_matching_cost(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``matching_cost``: ``fn(cls_scores[N, C], pred_bboxes[N, 4], gt_bboxes[K, 4],
    gt_labels[K], img_shape) -> Tensor[N, K]``.

    Deformable-DETR's cost: ``2 x`` focal classification cost + ``5 x`` L1 of ``(cx, cy, w, h)``
    normalized by the image size + ``2 x (-GIoU)`` of pixel boxes.
    """
    g = torch.Generator().manual_seed(12000 + seed)
    settings = [
        ("one query that fits one object exactly", 1, 1, 3, (100, 100)),
        ("more queries than objects", 6, 2, 4, (120, 200)),
        ("no ground truth (K = 0)", 4, 0, 3, (64, 64)),
    ]
    settings += [("random", int(n), int(k), 5, (240, 320)) for n, k in ((9, 3), (20, 7), (5, 5))]
    cases = []
    for i, (name, n, k, c, hw) in enumerate(settings[: 3 + num_random]):
        args = _random_problem(g, n, k, c, hw)
        if i == 0:
            args["pred_bboxes"] = args["gt_bboxes"].clone()
            args["cls_scores"][0, args["gt_labels"][0]] = 4.0
        expected = _reference_cost(**args)
        label = f"{name} (seed {seed})" if name == "random" else name
        cases.append(Case(label, args, expected, hint=_cost_hint(args)))
    return run_cases("matching_cost", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-4)


def _hungarian_reference(cost: Tensor) -> Tensor:
    from scipy.optimize import linear_sum_assignment

    gt_inds = torch.zeros(cost.shape[0], dtype=torch.long)
    if cost.numel():
        rows, cols = linear_sum_assignment(cost.numpy())
        gt_inds[torch.as_tensor(rows)] = torch.as_tensor(cols) + 1
    return gt_inds


def _gt_inds_hint(cost: Tensor) -> Callable[[object, object], str | None]:
    def hint(got, expected) -> str | None:
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return f"return one gt_ind per query: LongTensor[{cost.shape[0]}]"
        if torch.equal(got, (expected - 1).clamp(min=0)) or (got < 0).any():
            return "gt_inds are 1-based: 0 means negative, k means the k-th ground truth"
        matched = got[got > 0]
        if matched.unique().numel() != matched.numel():
            return "each ground truth may be matched to one query only"
        return "the total cost of your matching is not the smallest one"

    return hint


def check_hungarian_gt_inds(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``hungarian_gt_inds``: ``fn(cost[N, K]) -> LongTensor[N]``.

    The one-to-one matching of least total cost, in mmdetection's convention: ``0`` for a
    query matched to nothing, ``j + 1`` for the query matched to ground truth ``j``.
    """
    hand = [
        ("a 3 x 2 example", [[1.0, 5.0], [0.5, 0.6], [4.0, 3.0]]),
        ("the notebook's example, where greedy fails", [[1.0, 2.0], [2.0, 100.0]]),
        ("no ground truth (K = 0)", [[], [], []]),
        ("fewer queries than objects (N < K)", [[3.0, 1.0, 2.0]]),
    ]
    g = torch.Generator().manual_seed(13000 + seed)
    cases = []
    for name, rows in hand:
        cost = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), -1)
        cases.append(
            Case(name, {"cost": cost}, _hungarian_reference(cost), hint=_gt_inds_hint(cost))
        )
    for n, k in ((10, 4), (30, 12), (8, 8))[:num_random]:
        cost = torch.rand(n, k, generator=g) * 10
        cases.append(
            Case(
                f"random {n} x {k} (seed {seed})",
                {"cost": cost},
                _hungarian_reference(cost),
                hint=_gt_inds_hint(cost),
            )
        )
    return run_cases("hungarian_gt_inds", student_fn, cases, raise_on_fail=raise_on_fail)


def check_one_to_many_gt_inds(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``one_to_many_gt_inds``: ``fn(cost[N, K], k) -> LongTensor[N]``.

    Each ground truth takes its ``k`` cheapest queries; a query several ground truths want goes
    to the one for which it is cheapest (:func:`labkit.lessons.detr_matching.one_to_many_gt_inds`).
    """
    from labkit.lessons.detr_matching import one_to_many_gt_inds

    hand = [
        ("k = 1 without conflicts", [[0.1, 5.0], [5.0, 0.2], [3.0, 3.0]], 1),
        (
            "k = 2: both ground truths want query 2; it is cheaper for ground truth 0",
            [[0.1, 5.0], [0.5, 0.3], [0.2, 0.4], [9.0, 9.0]],
            2,
        ),
        ("k larger than the number of queries", [[1.0], [2.0]], 5),
        ("no ground truth (K = 0)", [[], []], 3),
    ]
    g = torch.Generator().manual_seed(14000 + seed)
    settings = [(name, torch.tensor(rows).reshape(len(rows), -1), k) for name, rows, k in hand]
    for n, m, k in ((20, 3, 4), (50, 8, 6), (12, 6, 3))[:num_random]:
        settings.append(
            (f"random {n} x {m}, k = {k} (seed {seed})", torch.rand(n, m, generator=g), k)
        )
    cases = []
    for name, cost, k in settings:

        def hint(got, expected, cost=cost, k=k) -> str | None:
            if not isinstance(got, Tensor) or got.shape != expected.shape:
                return f"return one gt_ind per query: LongTensor[{cost.shape[0]}]"
            if cost.shape[1] and (got > 0).sum() > k * cost.shape[1]:
                return f"each ground truth takes at most k = {k} queries"
            if torch.equal(got > 0, expected > 0):
                return "the right queries are positive; give a contested query to its cheapest ground truth"
            return "take the k cheapest queries of each ground truth (smallest cost in its column)"

        cases.append(Case(name, {"cost": cost, "k": k}, one_to_many_gt_inds(cost, k), hint=hint))
    return run_cases("one_to_many_gt_inds", student_fn, cases, raise_on_fail=raise_on_fail)
