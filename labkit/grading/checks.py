"""One check per notebook exercise: edge cases and seeded random inputs against labkit's own code.

Every check takes the student's function (and, where the exercise uses notebook state, that
state), runs it on small hand-picked edge cases and on seeded random inputs, and compares
with labkit. It prints a report in a notebook, returns a
:class:`~labkit.grading.feedback.CheckResult` and raises
:class:`~labkit.grading.feedback.CheckFailed` (an ``AssertionError``) when a case fails,
unless ``raise_on_fail=False``. ``seed`` changes the random cases (hidden tests use other
seeds than the visible ones).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from labkit.grading.checks_detr import (
    check_hungarian_gt_inds,
    check_matching_cost,
    check_one_to_many_gt_inds,
)
from labkit.grading.checks_lessons import (
    check_atss_assign,
    check_fcos_point_targets,
    check_hbm_floor,
    check_query_group,
)
from labkit.grading.feedback import Case, CheckResult, format_value, run_cases

__all__ = [
    "EXERCISES",
    "check_anchor_center",
    "check_atss_assign",
    "check_atss_threshold",
    "check_base_anchors",
    "check_bilinear_sample",
    "check_centerness_target",
    "check_count_positives",
    "check_fcos_point_targets",
    "check_fcos_positive",
    "check_hbm_floor",
    "check_hungarian_gt_inds",
    "check_matching_cost",
    "check_max_iou_assign",
    "check_one_to_many_gt_inds",
    "check_pairwise_iou",
    "check_positive_query_logits",
    "check_query_group",
    "check_sampling_locations",
]


def _boxes(rows: Sequence[Sequence[float]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def random_boxes(g: torch.Generator, n: int, size: float = 100.0, degenerate: int = 0) -> Tensor:
    """``n`` boxes with integer-ish corners in ``[0, size]``; the last ``degenerate`` have zero area.

    Integer corners make touching and nested pairs common, which is where IoU code breaks.
    """
    xy = torch.randint(0, int(size), (n, 2), generator=g).float()
    wh = torch.randint(0, int(size) // 2, (n, 2), generator=g).float()
    if degenerate:
        wh[n - degenerate :, torch.randint(0, 2, (1,), generator=g)] = 0.0
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------------------------------
# 01 anchors
# ---------------------------------------------------------------------------------------


def _iou_variant(
    b1: Tensor, b2: Tensor, plus_one: float = 0.0, clamp: bool = True, sub: bool = True
):
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    wh = rb - lt + plus_one
    wh = wh.clamp(min=0) if clamp else wh
    overlap = wh[..., 0] * wh[..., 1]
    a1 = (b1[:, 2] - b1[:, 0] + plus_one) * (b1[:, 3] - b1[:, 1] + plus_one)
    a2 = (b2[:, 2] - b2[:, 0] + plus_one) * (b2[:, 3] - b2[:, 1] + plus_one)
    union = a1[:, None] + a2[None, :] - (overlap if sub else 0)
    return overlap / union.clamp(min=1e-6)


def _iou_hint(b1: Tensor, b2: Tensor) -> Callable:
    def hint(got, expected):
        if not isinstance(got, Tensor) or got.shape != expected.shape or got.numel() == 0:
            return None
        got = got.detach().double()
        variants = [
            (dict(plus_one=1.0), "you used the old '+1' pixel convention; labkit has no +1"),
            (
                dict(clamp=False),
                "clamp the intersection's width and height at 0: disjoint "
                "boxes have no overlap, not a negative one",
            ),
            (dict(sub=False), "the union is area1 + area2 - overlap"),
        ]
        for kwargs, text in variants:
            alt = _iou_variant(b1, b2, **kwargs).double()
            if torch.allclose(got, alt, atol=1e-5, equal_nan=True):
                return text
        if torch.isnan(got).any():
            return "NaN: two zero-area boxes have union 0; clamp the union at eps"
        return None

    return hint


def check_pairwise_iou(
    student_fn: Callable, *, seed: int = 0, num_random: int = 4, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``pairwise_iou``: ``fn(boxes1[M, 4], boxes2[N, 4]) -> IoU[M, N]``.

    Compared with :func:`labkit.boxes.bbox_overlaps` on touching, nested, disjoint,
    zero-area and empty inputs, then on ``num_random`` random pairs of box sets.
    """
    from labkit.boxes import bbox_overlaps

    unit = [[0.0, 0.0, 10.0, 10.0]]
    pairs = [
        ("identical boxes (IoU 1)", unit, unit),
        ("disjoint boxes (IoU 0)", unit, [[20, 20, 30, 30]]),
        ("boxes touching along the edge x = 10 (IoU 0)", unit, [[10, 0, 20, 10]]),
        ("boxes touching at the corner (10, 10)", unit, [[10, 10, 20, 20]]),
        ("a box nested inside another", unit, [[2, 2, 5, 5]]),
        ("partial overlap", unit, [[5, 5, 15, 15]]),
        (
            "two zero-area boxes at the same point (IoU 0, not NaN)",
            [[30, 30, 30, 30]],
            [[30, 30, 30, 30]],
        ),
        ("a zero-area box inside a normal box", [[5, 5, 5, 5]], unit),
        (
            "3 x 2 boxes (M != N)",
            [[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 4, 4]],
            [[0, 0, 5, 5], [8, 2, 9, 3]],
        ),
        ("no boxes1 (M = 0): IoU of shape [0, N]", [], [[0, 0, 5, 5], [1, 1, 2, 2]]),
        ("no boxes2 (N = 0): IoU of shape [M, 0]", [[0, 0, 5, 5]], []),
    ]
    g = torch.Generator().manual_seed(1000 + seed)
    for i in range(num_random):
        m, n = (
            int(torch.randint(1, 12, (1,), generator=g)),
            int(torch.randint(1, 12, (1,), generator=g)),
        )
        b1, b2 = random_boxes(g, m, degenerate=i % 2), random_boxes(g, n, degenerate=1)
        pairs.append((f"random boxes (seed {seed}, {m} x {n})", b1, b2))
    cases = []
    for name, b1, b2 in pairs:
        b1, b2 = (
            _boxes(b1) if not isinstance(b1, Tensor) else b1,
            _boxes(b2) if not isinstance(b2, Tensor) else b2,
        )

        def locate(idx, b1=b1, b2=b2):
            i, j = idx
            return f"boxes1[{i}] = {format_value(b1[i])} and boxes2[{j}] = {format_value(b2[j])}"

        cases.append(
            Case(
                name, {"boxes1": b1, "boxes2": b2}, bbox_overlaps(b1, b2), locate, _iou_hint(b1, b2)
            )
        )
    return run_cases("pairwise_iou", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-5)


def _base_anchor_hint(got, expected):
    if not isinstance(got, Tensor) or got.shape != expected.shape:
        return None
    got = got.detach().float()
    if torch.allclose(got, expected[:, [1, 0, 3, 2]], atol=1e-4):
        return "width and height are swapped: ratio = h / w, so h = base * scale * sqrt(ratio)"
    rows_match = all(any(torch.allclose(r, e, atol=1e-4) for e in expected) for r in got)
    if rows_match:
        return (
            "the right anchors in the wrong order: ratio-major, scales innermost (row = r * S + s)"
        )
    size = (expected[:, 2:] - expected[:, :2]).max()
    if torch.allclose(got - got[:, :2].mean(), expected - expected[:, :2].mean(), atol=1e-3):
        return (
            f"the anchors must be centred at (0, 0) (x1 = -w / 2 ...); largest side is {size:.1f}"
        )
    return None


def check_base_anchors(
    student_fn: Callable, *, seed: int = 0, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``base_anchors``: ``fn(base_size, ratios, scales) -> Tensor[R * S, 4]``.

    Compared with :class:`labkit.anchors.AnchorGenerator` ``.base_anchors[0]`` (centre
    (0, 0), ratio = h / w at constant area, ratio-major with scales innermost).
    """
    from labkit.anchors import AnchorGenerator

    octave = [4 * 2 ** (i / 3) for i in range(3)]
    settings = [
        ("one ratio, one scale", 8, [1.0], [1.0]),
        ("ratio 2 is a tall anchor (h / w = 2)", 16, [2.0], [1.0]),
        ("RetinaNet's stride-8 level (3 ratios x 3 octave scales)", 8, [0.5, 1.0, 2.0], octave),
        ("3 ratios x 2 scales: the order of the rows", 16, [0.25, 1.0, 3.0], [1.0, 2.0]),
        ("2 ratios x 3 scales: the order of the rows", 32, [0.5, 2.0], [1.0, 2.0, 4.0]),
        ("a base size that is not a power of two", 100, [4.0], [0.5]),
    ]
    g = torch.Generator().manual_seed(2000 + seed)
    for _ in range(2):
        ratios = sorted(round(float(r), 3) for r in torch.rand(3, generator=g) * 3 + 0.2)
        scales = [round(float(s), 3) for s in torch.rand(2, generator=g) * 4 + 0.5]
        base = int(torch.randint(4, 65, (1,), generator=g))
        settings.append((f"random ratios and scales (seed {seed})", base, ratios, scales))
    cases = [
        Case(
            name,
            {"base_size": base, "ratios": ratios, "scales": scales},
            AnchorGenerator(strides=[base], ratios=ratios, scales=scales).base_anchors[0],
            hint=_base_anchor_hint,
        )
        for name, base, ratios, scales in settings
    ]
    return run_cases("base_anchors", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-4)


def _retinanet_setup():
    from labkit.anchors import AnchorGenerator, featmap_sizes_from_shape

    gen = AnchorGenerator(
        strides=[8, 16, 32, 64, 128],
        ratios=[0.5, 1.0, 2.0],
        octave_base_scale=4,
        scales_per_octave=3,
    )
    return gen, featmap_sizes_from_shape((512, 512), gen.strides)


def check_anchor_center(
    student_fn: Callable,
    generator=None,
    featmap_sizes: Sequence[tuple[int, int]] | None = None,
    *,
    seed: int = 0,
    raise_on_fail: bool = True,
) -> CheckResult:
    """Exercise ``anchor_center``: ``fn(level, flat_index) -> (x, y)`` centre of that anchor.

    Args:
        generator: the notebook's :class:`~labkit.anchors.AnchorGenerator` (default:
            RetinaNet's, strides 8-128, 9 anchors per cell).
        featmap_sizes: the ``(h, w)`` per level the function assumes (default: a 512 x 512
            image).
    """
    if generator is None or featmap_sizes is None:
        generator, featmap_sizes = _retinanet_setup()
    levels = generator.grid_priors(featmap_sizes)
    num_levels = len(levels)
    a0, (h0, w0) = generator.num_base_anchors[0], featmap_sizes[0]
    picks = [
        (0, 0, "the first anchor of level 0"),
        (0, a0 - 1, "the last anchor of the first cell"),
        (0, a0, "the first anchor of the second cell (one step in x)"),
        (0, w0 * a0, "the first anchor of the second row (one step in y)"),
        (0, h0 * w0 * a0 - 1, "the last anchor of level 0"),
        (num_levels - 1, len(levels[-1]) - 1, "the last anchor of the last level"),
    ]
    g = torch.Generator().manual_seed(3000 + seed)
    for level in range(num_levels):
        idx = int(torch.randint(0, len(levels[level]), (1,), generator=g))
        picks.append((level, idx, f"a random anchor of level {level} (seed {seed})"))
    cases = []
    for level, idx, name in picks:
        box = levels[level][idx]
        stride = generator.strides[level]
        a = generator.num_base_anchors[level]
        w = featmap_sizes[level][1]

        def hint(got, expected, stride=stride, a=a, w=w, idx=idx):
            got = torch.as_tensor(got, dtype=torch.float32).reshape(-1)
            if torch.allclose(got, expected.flip(0), atol=1e-3):
                return "x and y are swapped: x goes with the column, y with the row"
            half = torch.tensor([stride[0] / 2, stride[1] / 2])
            if torch.allclose(got, expected + half, atol=1e-3):
                return "no half-stride offset: anchors sit on the cell's top-left corner (center_offset=0)"
            row, col = divmod(idx, w)
            if torch.allclose(
                got,
                torch.tensor([col * stride[0], row * stride[1]], dtype=torch.float32),
                atol=1e-3,
            ):
                return f"divide the flat index by the anchors per cell ({a}) first: the anchor index is innermost"
            return None

        cases.append(
            Case(name, {"level": level, "flat_index": idx}, (box[:2] + box[2:]) / 2, hint=hint)
        )
    return run_cases(
        "anchor_center", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-3, coerce=True
    )


# ---------------------------------------------------------------------------------------
# 02 assignment
# ---------------------------------------------------------------------------------------


def _max_iou_hint(overlaps, pos, neg, min_pos):
    from labkit.assigners.max_iou import assign_wrt_overlaps

    def hint(got, expected):
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return None
        got = got.detach().long()
        no_lq = assign_wrt_overlaps(overlaps, None, pos, neg, min_pos, match_low_quality=False)
        if torch.equal(got, no_lq.gt_inds):
            return "step 4 is missing: each GT also claims its best prior(s) if that IoU >= min_pos_iou"
        first_only = assign_wrt_overlaps(overlaps, None, pos, neg, min_pos, gt_max_assign_all=False)
        if torch.equal(got, first_only.gt_inds):
            return "in step 4 a GT claims EVERY prior tied at its best IoU, not only the first"
        if overlaps.shape[0] > 1:
            # Earlier GTs winning shared priors: run the GTs in reverse and map back.
            rev = assign_wrt_overlaps(overlaps.flip(0), None, pos, neg, min_pos).gt_inds
            k = overlaps.shape[0]
            rev = torch.where(rev > 0, k + 1 - rev, rev)
            if torch.equal(got, rev):
                return (
                    "when several GTs claim one prior in step 4, the LAST GT (highest index) wins"
                )
        return None

    return hint


def check_max_iou_assign(
    student_fn: Callable, *, seed: int = 0, num_random: int = 8, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``max_iou_assign``: ``fn(overlaps[K, N], pos_iou_thr, neg_iou_thr, min_pos_iou)
    -> gt_inds LongTensor[N]`` (0 negative, -1 ignored, k >= 1 the k-th GT).

    Compared with :func:`labkit.assigners.max_iou.assign_wrt_overlaps` (low-quality matches
    on, every tied prior claimed, later GTs winning) on hand cases and on random quantized
    matrices full of ties.
    """
    from labkit.assigners.max_iou import assign_wrt_overlaps

    settings = [
        ("a clear positive and a clear negative", [[0.9, 0.1]], 0.5, 0.4, 0.0),
        ("an IoU between the thresholds is ignored (-1)", [[0.45, 0.9]], 0.5, 0.4, 0.0),
        ("a GT with no IoU >= pos_iou_thr claims its best prior", [[0.3, 0.2, 0.1]], 0.5, 0.4, 0.2),
        ("min_pos_iou blocks a weak low-quality match", [[0.3, 0.2, 0.1]], 0.5, 0.4, 0.35),
        ("a GT claims every prior tied at its best IoU", [[0.3, 0.3, 0.1]], 0.5, 0.4, 0.2),
        (
            "two GTs claim the same prior: the later GT wins",
            [[0.3, 0.1], [0.3, 0.2]],
            0.5,
            0.4,
            0.1,
        ),
        ("step 4 overwrites a step-3 positive", [[0.9, 0.0], [0.6, 0.1]], 0.5, 0.4, 0.0),
        (
            "a prior in an ignore region (IoU -1) is never negative",
            [[-1.0, 0.2, 0.1]],
            0.5,
            0.4,
            0.15,
        ),
    ]
    g = torch.Generator().manual_seed(4000 + seed)
    for i in range(num_random):
        k, n = (
            int(torch.randint(1, 6, (1,), generator=g)),
            int(torch.randint(5, 31, (1,), generator=g)),
        )
        ov = (torch.randint(0, 8, (k, n), generator=g).float() / 10).tolist()
        pos, neg, min_pos = [(0.5, 0.4, 0.0), (0.5, 0.3, 0.2), (0.6, 0.3, 0.3), (0.4, 0.4, 0.1)][
            i % 4
        ]
        settings.append(
            (f"random {k} x {n} overlaps with ties (seed {seed})", ov, pos, neg, min_pos)
        )
    cases = []
    for name, ov, pos, neg, min_pos in settings:
        ov = torch.tensor(ov, dtype=torch.float32)
        expected = assign_wrt_overlaps(ov, None, pos, neg, min_pos).gt_inds

        def locate(idx, ov=ov):
            return f"prior {idx[0]}, whose IoUs with the GTs are overlaps[:, {idx[0]}] = {format_value(ov[:, idx[0]])}"

        cases.append(
            Case(
                name,
                {"overlaps": ov, "pos_iou_thr": pos, "neg_iou_thr": neg, "min_pos_iou": min_pos},
                expected,
                locate,
                _max_iou_hint(ov, pos, neg, min_pos),
            )
        )
    return run_cases("max_iou_assign", student_fn, cases, raise_on_fail=raise_on_fail)


def _atss_hint(cand):
    def hint(got, expected):
        if not isinstance(got, tuple | list) or not got or not isinstance(got[0], Tensor):
            return None
        thr = got[0].detach().double()
        c = cand.double()
        if thr.shape != expected[0].shape:
            return "one threshold per GT: reduce over the candidates (dim 0)"
        if torch.allclose(thr, c.mean(0) + c.std(0, unbiased=False), atol=1e-5, equal_nan=True):
            return "use the unbiased std (divide by C - 1), as torch.std does"
        if torch.allclose(thr, c.mean(0), atol=1e-5):
            return "the threshold is mean + std, not the mean alone"
        if c.shape[1] > 1 and torch.allclose(thr, (c.mean(1) + c.std(1))[: thr.numel()], atol=1e-5):
            return "reduce over dim 0 (candidates), not dim 1 (GTs)"
        return None

    return hint


def check_atss_threshold(
    student_fn: Callable, *, seed: int = 0, num_random: int = 4, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``atss_threshold``: ``fn(candidate_overlaps[C, K]) -> (threshold[K], passes[C, K])``.

    ``threshold = mean + std`` over the candidates of each GT (unbiased std, as
    :class:`labkit.assigners.ATSSAssigner`), ``passes = candidate_overlaps >= threshold``.
    Includes the edge case where the threshold exceeds every candidate and a single
    candidate (std NaN: nothing passes).
    """
    settings = [
        ("threshold above every candidate (ATSS's edge case)", [[0.5], [0.5], [0.0], [0.0]]),
        ("all candidates equal: std 0, every candidate passes (>=)", [[0.3], [0.3], [0.3]]),
        ("two candidates: the unbiased std divides by C - 1", [[0.2], [0.6]]),
        ("one candidate: std is NaN and nothing passes", [[0.7]]),
        (
            "three GTs at once (one column each)",
            [[0.1, 0.5, 0.0], [0.4, 0.5, 0.2], [0.3, 0.1, 0.9]],
        ),
    ]
    g = torch.Generator().manual_seed(5000 + seed)
    for _ in range(num_random):
        k = int(torch.randint(1, 7, (1,), generator=g))
        cand = (torch.rand(27, k, generator=g) ** 2).mul(100).round().div(100)
        settings.append((f"random 27 candidates x {k} GTs (seed {seed})", cand.tolist()))
    cases = []
    for name, cand in settings:
        cand = torch.tensor(cand, dtype=torch.float32)
        with warnings.catch_warnings():  # one candidate: std is NaN by design, no warning
            warnings.simplefilter("ignore", UserWarning)
            thr = cand.mean(0) + cand.std(0)

        def locate(idx, cand=cand):
            return f"GT {idx[-1]}, whose candidate IoUs are {format_value(cand[:, idx[-1]])}"

        cases.append(
            Case(
                name,
                {"candidate_overlaps": cand},
                (thr, cand >= thr[None]),
                locate,
                _atss_hint(cand),
            )
        )
    return run_cases("atss_threshold", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 03 FCOS
# ---------------------------------------------------------------------------------------


def _centerness_hint(targets):
    def hint(got, expected):
        if not isinstance(got, Tensor) or got.shape != expected.shape or not len(targets):
            return None
        got, t = got.detach().double(), targets.double()
        lr, tb = t[:, [0, 2]], t[:, [1, 3]]
        ratio = lr.min(1).values / lr.max(1).values * (tb.min(1).values / tb.max(1).values)
        if torch.allclose(got, ratio, atol=1e-5):
            return "take the square root of the product"
        paired = t[:, [0, 1]].min(1).values / t[:, [0, 1]].max(1).values
        paired = (paired * t[:, [2, 3]].min(1).values / t[:, [2, 3]].max(1).values).sqrt()
        if torch.allclose(got, paired, atol=1e-5):
            return "pair l with r (horizontal) and t with b (vertical): targets are (l, t, r, b)"
        return None

    return hint


def check_centerness_target(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``centerness_target``: ``fn(bbox_targets[P, 4]) -> Tensor[P]``.

    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` for ``(l, t, r, b)`` targets of
    positive points, compared with :func:`labkit.heads.fcos.centerness_target`.
    """
    from labkit.heads.fcos import centerness_target

    settings = [
        ("the exact centre of a box (l = r, t = b): 1", [[5.0, 3.0, 5.0, 3.0]]),
        ("near the left edge of a wide box", [[0.5, 10.0, 99.5, 10.0]]),
        ("off-centre in both directions", [[2.0, 6.0, 8.0, 2.0]]),
        ("l and r swapped give the same centerness", [[8.0, 2.0, 2.0, 6.0], [2.0, 2.0, 8.0, 6.0]]),
        ("no positive points (P = 0): an empty tensor", []),
    ]
    g = torch.Generator().manual_seed(8000 + seed)
    for _ in range(num_random):
        p = int(torch.randint(1, 20, (1,), generator=g))
        settings.append(
            (
                f"random {p} targets (seed {seed})",
                (torch.rand(p, 4, generator=g) * 50 + 0.1).tolist(),
            )
        )
    cases = []
    for name, rows in settings:
        t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)

        def locate(idx, t=t):
            return f"bbox_targets[{idx[0]}] = (l, t, r, b) = {format_value(t[idx[0]])}"

        cases.append(
            Case(name, {"bbox_targets": t}, centerness_target(t), locate, _centerness_hint(t))
        )
    return run_cases("centerness_target", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-5)


def check_fcos_positive(
    student_fn: Callable, *, seed: int = 0, num_random: int = 12, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``fcos_positive``: ``fn(point (x, y), box (x1, y1, x2, y2), regress_range (low,
    high)) -> bool``.

    True when the point lies strictly inside the box and ``max(l, t, r, b)`` is inside the
    range, both ends included: what :func:`labkit.heads.fcos.fcos_targets_single` decides
    for one point and one GT (no center sampling).
    """
    from labkit.heads.fcos import fcos_targets_single

    def reference(point, box, rr):
        labels, _ = fcos_targets_single(
            torch.tensor([point], dtype=torch.float32),
            torch.tensor([box], dtype=torch.float32),
            torch.tensor([0]),
            torch.tensor([rr], dtype=torch.float32),
            torch.tensor([8.0]),
            1,
        )
        return bool(labels[0] == 0)

    box = [30.0, 40.0, 130.0, 100.0]
    settings = [
        ("inside, max distance inside the range", [40.0, 50.0], box, (64.0, 128.0)),
        ("inside, max distance above the range", [40.0, 50.0], box, (-1.0, 64.0)),
        ("on the box's left edge (l = 0): not strictly inside", [30.0, 70.0], box, (-1.0, 128.0)),
        ("outside the box", [10.0, 10.0], box, (-1.0, 1e8)),
        ("max distance exactly the upper bound (inclusive)", [66.0, 70.0], box, (-1.0, 64.0)),
        ("max distance exactly the lower bound (inclusive)", [66.0, 70.0], box, (64.0, 128.0)),
    ]
    g = torch.Generator().manual_seed(9000 + seed)
    ranges = [(-1.0, 64.0), (64.0, 128.0), (30.0, 50.0), (128.0, 256.0)]
    for i in range(num_random):
        point = [float(v) for v in torch.randint(0, 160, (2,), generator=g)]
        settings.append((f"random point (seed {seed})", point, box, ranges[i % 4]))
    cases = []
    for name, point, b, rr in settings:
        l, t, r, bt = point[0] - b[0], point[1] - b[1], b[2] - point[0], b[3] - point[1]

        def hint(got, expected, d=(l, t, r, bt), rr=rr):
            if min(d) == 0 and got:
                return "strictly inside: a point on the box's edge (distance 0) is not positive"
            if max(d) in rr and expected and not got:
                return "the regress range includes both ends: low <= max(l, t, r, b) <= high"
            return f"(l, t, r, b) = {d}, max = {max(d)}"

        cases.append(
            Case(
                name,
                {"point": point, "box": b, "regress_range": rr},
                reference(point, b, rr),
                hint=hint,
            )
        )
    return run_cases("fcos_positive", student_fn, cases, raise_on_fail=raise_on_fail)


# ---------------------------------------------------------------------------------------
# 04 deformable attention
# ---------------------------------------------------------------------------------------


def _sampling_hint(ref, offsets, shapes):
    def hint(got, expected):
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return None
        got = got.detach().double()
        r, o = ref.double(), offsets.double()
        if ref.shape[-1] == 2:
            hw = shapes.double()[None, None, None, :, None, :]  # (h, w) used as (x, y) scale
            if torch.allclose(got, r[:, :, None, :, None, :] + o / hw, atol=1e-5):
                return "offsets are (x, y) but spatial_shapes is (h, w): divide x by w and y by h"
            return None
        p = o.shape[4]
        rr = r[:, :, None, :, None, :]
        for alt, text in (
            (
                rr[..., :2] + o * rr[..., 2:] * 0.5,
                "for boxes, divide the offsets by the number of points",
            ),
            (
                rr[..., :2] + o / p * rr[..., 2:],
                "for boxes the offsets are in half-box units: times w/2, h/2",
            ),
        ):
            if torch.allclose(got, alt, atol=1e-5):
                return text
        return None

    return hint


def check_sampling_locations(
    student_fn: Callable, *, seed: int = 0, num_random: int = 4, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``sampling_locations``: ``fn(reference_points, offsets, spatial_shapes)``.

    ``reference_points: [bs, nq, L, 2]`` points or ``[bs, nq, L, 4]`` boxes (normalized),
    ``offsets: [bs, nq, heads, L, P, 2]``, ``spatial_shapes: LongTensor[L, 2]`` ``(h, w)``;
    returns ``[bs, nq, heads, L, P, 2]``. Compared with
    :func:`labkit.detr.ms_deform_attn.sampling_locations_from_offsets`.
    """
    from labkit.detr.ms_deform_attn import sampling_locations_from_offsets

    def one(ref, off):
        return torch.tensor(ref, dtype=torch.float32).view(1, 1, -1, len(ref[0])), torch.tensor(
            off, dtype=torch.float32
        ).view(1, 1, 1, len(ref), -1, 2)

    settings = []
    ref, off = one([[0.5, 0.5]], [[1.0, 0.0]])
    settings.append(
        ("a point, offset (1, 0) on a 10 x 20 (h x w) level: x moves 1/20", ref, off, [[10, 20]])
    )
    ref, off = one([[0.25, 0.75]], [[2.0, 1.0]])
    settings.append(("a point on a non-square 4 x 16 level: x by w, y by h", ref, off, [[4, 16]]))
    ref, off = one([[0.3, 0.6]], [[0.0, 0.0]])
    settings.append(("zero offsets sample at the reference point", ref, off, [[7, 9]]))
    ref, off = one([[0.5, 0.5, 0.2, 0.4]], [[1.0, 1.0], [-2.0, 0.5]])
    settings.append(("a reference box with 2 points: offset / P * (w, h) / 2", ref, off, [[8, 8]]))
    ref, off = one([[0.1, 0.2], [0.1, 0.2]], [[1.0, 1.0], [1.0, 1.0]])
    settings.append(("the same offset on two levels (8 x 8 and 2 x 4)", ref, off, [[8, 8], [2, 4]]))
    g = torch.Generator().manual_seed(6000 + seed)
    for i in range(num_random):
        bs, nq, heads, levels, points = (
            int(torch.randint(1, n, (1,), generator=g)) for n in (3, 5, 4, 4, 5)
        )
        shapes = torch.randint(1, 30, (levels, 2), generator=g)
        dim = 2 if i % 2 == 0 else 4
        ref = torch.rand(bs, nq, levels, dim, generator=g)
        off = torch.randn(bs, nq, heads, levels, points, 2, generator=g) * 3
        kind = "points" if dim == 2 else "boxes"
        settings.append(
            (
                f"random {kind}, {levels} levels, {points} points (seed {seed})",
                ref,
                off,
                shapes.tolist(),
            )
        )
    cases = []
    for name, ref, off, shapes in settings:
        shapes = torch.tensor(shapes, dtype=torch.long)
        expected = sampling_locations_from_offsets(ref, off, shapes)
        cases.append(
            Case(
                name,
                {"reference_points": ref, "offsets": off, "spatial_shapes": shapes},
                expected,
                hint=_sampling_hint(ref, off, shapes),
            )
        )
    return run_cases(
        "sampling_locations", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-5
    )


def _grid_sample_at(
    value_map: Tensor, x: float, y: float, align_corners: bool = False, padding: str = "zeros"
) -> float:
    import torch.nn.functional as F

    grid = torch.tensor([[[[2 * x - 1, 2 * y - 1]]]], dtype=torch.float64)
    out = F.grid_sample(
        value_map.double()[None, None],
        grid,
        mode="bilinear",
        padding_mode=padding,
        align_corners=align_corners,
    )
    return float(out)


def check_bilinear_sample(
    student_fn: Callable, *, seed: int = 0, num_random: int = 6, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``bilinear_sample``: ``fn(value_map[h, w], x, y) -> float``.

    The value at normalized ``(x, y)`` exactly as ``grid_sample(align_corners=False,
    padding_mode="zeros")`` reads it (what multi-scale deformable attention uses): pixel
    ``j``'s centre is at ``(j + 0.5) / w``, neighbours outside the map count as 0.
    """
    g = torch.Generator().manual_seed(7000 + seed)
    vm = torch.arange(1.0, 16.0).view(3, 5)
    settings = [
        ("exactly on the centre of pixel (row 1, col 2)", vm, 2.5 / 5, 1.5 / 3),
        ("halfway between 4 pixel centres", vm, 2.0 / 5, 1.0 / 3),
        ("on the left edge of the map: half of the neighbours are outside", vm, 0.0, 0.5),
        ("a corner (0, 0): only one neighbour inside, weight 1/4", vm, 0.0, 0.0),
        ("far outside the map: 0", vm, -0.5, 0.5),
        ("just below the bottom edge", vm, 0.37, 1.1),
        ("a 1 x 1 map", torch.tensor([[4.0]]), 0.3, 0.6),
    ]
    for _ in range(num_random):
        h, w = (int(torch.randint(1, 8, (1,), generator=g)) for _ in range(2))
        m = torch.randn(h, w, generator=g).mul(10).round().div(10)
        x, y = (round(float(v), 3) for v in torch.rand(2, generator=g) * 1.2 - 0.1)
        settings.append((f"random {h} x {w} map (seed {seed})", m, x, y))
    cases = []
    for name, m, x, y in settings:

        def hint(got, expected, m=m, x=x, y=y):
            got = float(got)
            if math.isclose(got, _grid_sample_at(m, x, y, align_corners=True), abs_tol=1e-5):
                return "that is align_corners=True; here pixel j's centre is at (j + 0.5) / w: px = x * w - 0.5"
            if math.isclose(got, _grid_sample_at(m, x, y, padding="border"), abs_tol=1e-5):
                return "neighbours outside the map count as 0 (padding_mode='zeros'), do not clamp to the border"
            return None

        cases.append(
            Case(name, {"value_map": m, "x": x, "y": y}, _grid_sample_at(m, x, y), hint=hint)
        )
    return run_cases("bilinear_sample", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 05 Co-DETR
# ---------------------------------------------------------------------------------------


def _query_logits_hint(boxes, img_hw):
    from labkit.boxes import normalize_bboxes

    def hint(got, expected):
        if not isinstance(got, Tensor) or got.shape != expected.shape or not len(boxes):
            return None
        got = got.detach().float()
        h, w = img_hw
        if h != w and torch.allclose(got, _query_logits(boxes, (w, h)), atol=1e-4):
            return "img_hw is (h, w): divide x-coordinates by w and y-coordinates by h"
        if torch.allclose(got, normalize_bboxes(boxes, img_hw), atol=1e-4):
            return "apply the inverse sigmoid log(x / (1 - x)) to the normalized box"
        xyxy = boxes / boxes.new_tensor([w, h, w, h])
        x = xyxy.clamp(0, 1)
        if torch.allclose(got, torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5)), atol=1e-4):
            return "convert (x1, y1, x2, y2) to (cx, cy, w, h) before normalizing"
        return None

    return hint


def _query_logits(boxes: Tensor, img_hw) -> Tensor:
    from labkit.boxes import normalize_bboxes
    from labkit.detr.transformer import inverse_sigmoid

    return inverse_sigmoid(normalize_bboxes(boxes, img_hw))


def check_positive_query_logits(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``positive_query_logits``: ``fn(boxes[N, 4], img_hw) -> Tensor[N, 4]``.

    xyxy pixel boxes -> normalized ``(cx, cy, w, h)`` (by ``img_hw = (h, w)``) -> inverse
    sigmoid with ``x`` clamped to ``[1e-5, 1 - 1e-5]``: the reference points Co-DETR embeds
    as positive queries (:func:`labkit.boxes.normalize_bboxes` then
    :func:`labkit.detr.transformer.inverse_sigmoid`).
    """
    settings = [
        (
            "the worked example: (10, 20, 30, 60) in a 100 x 200 (h x w) image",
            [[10.0, 20, 30, 60]],
            (100, 200),
        ),
        ("a box covering the whole image (w = 1: clamped, not inf)", [[0.0, 0, 64, 48]], (48, 64)),
        ("a zero-width box (w = 0: clamped, not -inf)", [[5.0, 5, 5, 20]], (32, 32)),
        ("a tall image (h != w)", [[4.0, 10, 20, 90], [0.0, 0, 8, 8]], (120, 40)),
        ("no boxes (N = 0)", [], (64, 64)),
    ]
    g = torch.Generator().manual_seed(10000 + seed)
    for _ in range(num_random):
        h, w = (int(torch.randint(32, 800, (1,), generator=g)) for _ in range(2))
        n = int(torch.randint(1, 8, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - xy) * 0.9 + 1
        settings.append(
            (
                f"random boxes in a {h} x {w} image (seed {seed})",
                torch.cat([xy, xy + wh], 1).round().tolist(),
                (h, w),
            )
        )
    cases = []
    for name, rows, img_hw in settings:
        b = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)

        def locate(idx, b=b):
            return f"boxes[{idx[0]}] = {format_value(b[idx[0]])}, coordinate {'cx cy w h'.split()[idx[1]]}"

        cases.append(
            Case(
                name,
                {"boxes": b, "img_hw": img_hw},
                _query_logits(b, img_hw),
                locate,
                _query_logits_hint(b, img_hw),
            )
        )
    return run_cases(
        "positive_query_logits", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-4
    )


def check_count_positives(
    student_fn: Callable, *, seed: int = 0, num_random: int = 4, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``count_positives``: ``fn(num_gts, group_sizes, num_layers) -> int``.

    Positive queries the decoder trains on in one step: in every decoder layer, the
    ``num_gts`` one-to-one (Hungarian) positives plus each auxiliary group's positives.
    """

    def reference(num_gts, group_sizes, num_layers):
        return num_layers * (num_gts + sum(group_sizes))

    settings = [
        ("the notebook's example", 3, [10, 20], 6),
        ("Deformable-DETR: no auxiliary group", 5, [], 6),
        ("no ground truth: only auxiliary positives", 0, [9], 6),
        ("one decoder layer", 4, [7, 2], 1),
    ]
    g = torch.Generator().manual_seed(11000 + seed)
    for _ in range(num_random):
        groups = [
            int(v)
            for v in torch.randint(
                0, 300, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g
            )
        ]
        settings.append(
            (f"random (seed {seed})", int(torch.randint(0, 50, (1,), generator=g)), groups, 6)
        )
    cases = []
    for name, n, groups, layers in settings:

        def hint(got, expected, n=n, groups=groups, layers=layers):
            if got == n + sum(groups):
                return "count every decoder layer: each one is trained on all these positives"
            if got == layers * sum(groups):
                return "add the num_gts one-to-one (Hungarian) positives of each layer"
            return None

        cases.append(
            Case(
                name,
                {"num_gts": n, "group_sizes": groups, "num_layers": layers},
                reference(n, groups, layers),
                hint=hint,
            )
        )
    return run_cases("count_positives", student_fn, cases, raise_on_fail=raise_on_fail)


# Exercise id -> check; the grader and the docs list exercises from here.
EXERCISES: dict[str, Callable[..., CheckResult]] = {
    "pairwise_iou": check_pairwise_iou,
    "base_anchors": check_base_anchors,
    "anchor_center": check_anchor_center,
    "max_iou_assign": check_max_iou_assign,
    "atss_threshold": check_atss_threshold,
    "sampling_locations": check_sampling_locations,
    "bilinear_sample": check_bilinear_sample,
    "centerness_target": check_centerness_target,
    "fcos_positive": check_fcos_positive,
    "positive_query_logits": check_positive_query_logits,
    "count_positives": check_count_positives,
    "matching_cost": check_matching_cost,
    "hungarian_gt_inds": check_hungarian_gt_inds,
    "one_to_many_gt_inds": check_one_to_many_gt_inds,
    "atss_assign": check_atss_assign,
    "fcos_point_targets": check_fcos_point_targets,
    "query_group": check_query_group,
    "hbm_floor": check_hbm_floor,
}
