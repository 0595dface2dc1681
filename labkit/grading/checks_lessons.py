"""Checks of the third exercises of notebooks 02, 03, 04 and 06: ATSS, FCOS targets, the HBM
floor of deformable attention, Co-DETR groups.

Same contract as :mod:`labkit.grading.checks`: the student's function runs on hand-picked edge
cases and seeded random inputs and is compared with labkit's own code; a wrong answer is
diagnosed by comparing it with the outputs of typical mistakes (the hints), never by showing
how to compute the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from labkit.grading.feedback import Case, CheckResult, format_value, run_cases

__all__ = ["check_atss_assign", "check_fcos_point_targets", "check_hbm_floor", "check_query_group"]


def _same(got: object, expected: Tensor) -> bool:
    if not isinstance(got, Tensor) or got.shape != expected.shape:
        return False
    if expected.is_floating_point():
        return bool(torch.allclose(got.detach().double(), expected.double(), atol=1e-4))
    return bool(torch.equal(got.detach(), expected))


def _first_wrong(got: object, candidates: Sequence[tuple[str, object]]) -> str | None:
    """The message of the first mistake whose output equals ``got``."""
    for message, value in candidates:
        if isinstance(value, tuple):
            if (
                isinstance(got, tuple | list)
                and len(got) == len(value)
                and all(_same(g, v) for g, v in zip(got, value, strict=True))
            ):
                return message
        elif _same(got, value):
            return message
    return None


# ---------------------------------------------------------------------------------------
# 02 ATSS: the whole assigner
# ---------------------------------------------------------------------------------------


def atss_variant(
    priors: Tensor,
    num_level_priors: Sequence[int],
    gt_bboxes: Tensor,
    topk: int,
    *,
    per_level: bool = True,
    centre_inside: bool = True,
    unbiased: bool = True,
    conflict: str = "max_iou",
    one_based: bool = True,
) -> Tensor:
    """ATSS ``gt_inds`` with switches for the typical mistakes (defaults: labkit's answer).

    ``conflict``: ``"max_iou"`` (right), ``"last_gt"`` (a later GT overwrites) or ``"first_gt"``.
    """
    from labkit.boxes import bbox_overlaps

    num_priors, num_gts = priors.shape[0], gt_bboxes.shape[0]
    gt_inds = torch.zeros(num_priors, dtype=torch.long)
    if num_gts == 0 or num_priors == 0:
        return gt_inds
    overlaps = bbox_overlaps(priors, gt_bboxes)  # [N, K]
    pc = (priors[:, :2] + priors[:, 2:]) / 2
    gc = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]) / 2
    dist = torch.cdist(pc, gc)  # [N, K]
    groups = [(0, num_priors)]
    if per_level:
        starts = torch.tensor([0, *num_level_priors]).cumsum(0).tolist()
        groups = list(zip(starts[:-1], starts[1:], strict=True))
    cand = torch.cat(
        [dist[a:b].topk(min(topk, b - a), dim=0, largest=False).indices + a for a, b in groups]
    )  # [C, K]
    cand_iou = overlaps.gather(0, cand)
    thr = cand_iou.mean(0) + cand_iou.std(0, unbiased=unbiased)
    is_pos = cand_iou >= thr
    if centre_inside:
        cx, cy = pc[cand, 0], pc[cand, 1]
        d = torch.stack(
            [cx - gt_bboxes[:, 0], cy - gt_bboxes[:, 1], gt_bboxes[:, 2] - cx, gt_bboxes[:, 3] - cy]
        )
        is_pos &= d.min(0).values > 0.01
    best = torch.full((num_priors,), -1.0)
    for k in range(num_gts):
        for p in cand[is_pos[:, k], k].tolist():
            iou = float(overlaps[p, k])
            take = {
                "max_iou": iou > best[p],
                "last_gt": True,
                "first_gt": best[p] < 0,
            }[conflict]
            if take:
                best[p] = max(iou, 0.0)
                gt_inds[p] = k + 1
    if not one_based:
        gt_inds = torch.where(gt_inds > 0, gt_inds - 1, gt_inds)
    return gt_inds


def _atss_hint(priors, num_level_priors, gt_bboxes, topk):
    def hint(got, expected):
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return f"return one gt_ind per prior: LongTensor[{priors.shape[0]}]"
        args = (priors, num_level_priors, gt_bboxes, topk)
        variants = [
            ("gt_inds are 1-based: 0 is negative, k the k-th GT", {"one_based": False}),
            ("take the topk nearest priors on each level separately", {"per_level": False}),
            (
                "a candidate is positive only if its centre lies inside the GT",
                {"centre_inside": False},
            ),
            ("the std is the unbiased one, as torch.std computes", {"unbiased": False}),
            (
                "a prior positive for several GTs goes to the GT it overlaps most",
                {"conflict": "last_gt"},
            ),
            (
                "a prior positive for several GTs goes to the GT it overlaps most",
                {"conflict": "first_gt"},
            ),
        ]
        outputs = []
        for message, switches in variants:
            try:
                outputs.append((message, atss_variant(*args, **switches)))
            except Exception:  # a variant that cannot run on this case diagnoses nothing
                continue
        found = _first_wrong(got, [(m, v) for m, v in outputs if not _same(v, expected)])
        if found:
            return found
        if bool(((got > 0) & (expected == 0)).any()):
            return "some of your positives fail the threshold (mean + std of the GT's candidates)"
        return None

    return hint


def _level_priors(g: torch.Generator, side: float, stride: int, extent: int) -> Tensor:
    """Square priors on a jittered grid (no two centres at the same distance from a GT)."""
    n = max(1, extent // stride)
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centres = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride
    centres = centres + (torch.rand(centres.shape, generator=g) - 0.5) * stride * 0.3
    return torch.cat([centres - side / 2, centres + side / 2], 1)


def _random_gts(g: torch.Generator, k: int, extent: int) -> Tensor:
    xy = torch.rand(k, 2, generator=g) * extent * 0.7
    wh = 6 + torch.rand(k, 2, generator=g) * (extent - xy - 6) * 0.8
    return torch.cat([xy, xy + wh], 1)


def check_atss_assign(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``atss_assign``: ``fn(priors[N, 4], num_level_priors, gt_bboxes[K, 4], topk) ->
    LongTensor[N]``.

    The whole ATSS rule (:class:`labkit.assigners.ATSSAssigner`): per level the ``topk`` priors
    whose centres are nearest to the GT centre are candidates, the GT's threshold is ``mean +
    std`` of their IoUs, a candidate is positive if its IoU reaches it and its centre lies
    inside the GT (more than 0.01 px from every side), and a prior positive for several GTs
    goes to the one it overlaps most. ``0`` negative, ``k >= 1`` the k-th GT.
    """
    from labkit.assigners import ATSSAssigner

    g = torch.Generator().manual_seed(15000 + seed)
    level0 = torch.tensor([[x, 0.0, x + 10, 10.0] for x in (0.0, 10.0, 20.0, 30.0)])
    level1 = torch.tensor([[0.0, 0.0, 20.0, 20.0], [20.0, 0.0, 40.0, 20.0]])
    two_levels = [_level_priors(g, 16.0, 8, 64), _level_priors(g, 32.0, 16, 64)]
    settings = [
        (
            "notebook's edge case: the threshold is above every candidate (no positive)",
            [level0, level1],
            [[0.0, 0.0, 20.0, 10.0]],
            2,
        ),
        ("one GT on two levels", two_levels, [[10.0, 12.0, 40.0, 36.0]], 3),
        (
            "two overlapping GTs that want the same priors",
            two_levels,
            [[8.0, 8.0, 40.0, 40.0], [12.0, 10.0, 44.0, 38.0]],
            4,
        ),
        (
            "three GTs; the first two want the same priors",
            two_levels,
            [[12.0, 10.0, 44.0, 38.0], [8.0, 8.0, 40.0, 40.0], [36.0, 36.0, 62.0, 60.0]],
            4,
        ),
        (
            "a level with fewer priors than topk",
            [two_levels[0], two_levels[1][:2]],
            [[4.0, 4.0, 30.0, 26.0]],
            5,
        ),
        ("no ground truth (K = 0): every prior negative", two_levels, [], 3),
    ]
    for i in range(num_random):
        levels = [_level_priors(g, 8.0 * s / 2, s, 96) for s in (8, 16, 32)]
        k = int(torch.randint(2, 7, (1,), generator=g))
        settings.append(
            (
                f"random: 3 levels, {k} GTs (seed {seed})",
                levels,
                _random_gts(g, k, 96).tolist(),
                3 + 2 * i,
            )
        )
    cases = []
    for name, levels, gts, topk in settings:
        priors = torch.cat(levels)
        nlp = [len(lv) for lv in levels]
        gt = torch.tensor(gts, dtype=torch.float32).reshape(-1, 4)
        expected = ATSSAssigner(topk=topk).assign(priors, nlp, gt).gt_inds

        def locate(idx, priors=priors):
            return f"priors[{idx[0]}] = {format_value(priors[idx[0]])}"

        cases.append(
            Case(
                name,
                {"priors": priors, "num_level_priors": nlp, "gt_bboxes": gt, "topk": topk},
                expected,
                locate,
                _atss_hint(priors, nlp, gt, topk),
            )
        )
    return run_cases("atss_assign", student_fn, cases, raise_on_fail=raise_on_fail)


# ---------------------------------------------------------------------------------------
# 03 FCOS: targets of every point of an image
# ---------------------------------------------------------------------------------------


def fcos_variant(
    points: Tensor,
    gt_bboxes: Tensor,
    regress_ranges: Tensor,
    *,
    smallest: bool = True,
    strict: bool = True,
    inclusive: bool = True,
    zero_background: bool = True,
    background: int = -1,
) -> tuple[Tensor, Tensor]:
    """FCOS ``(gt_inds, bbox_targets)`` with switches for the typical mistakes."""
    n, k = points.shape[0], gt_bboxes.shape[0]
    if k == 0:
        return torch.full((n,), background, dtype=torch.long), points.new_zeros(n, 4)
    x, y = points[:, :1], points[:, 1:]
    d = torch.stack(
        [x - gt_bboxes[:, 0], y - gt_bboxes[:, 1], gt_bboxes[:, 2] - x, gt_bboxes[:, 3] - y], -1
    )  # [N, K, 4]
    inside = d.min(-1).values > 0 if strict else d.min(-1).values >= 0
    m = d.max(-1).values
    lo, hi = regress_ranges[:, :1], regress_ranges[:, 1:]
    in_range = (m >= lo) & (m <= hi) if inclusive else (m > lo) & (m < hi)
    area = (gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1])
    ok = inside & in_range
    score = torch.where(ok, area if smallest else -area, torch.tensor(float("inf")))
    best, idx = score.min(1)
    pos = best != float("inf")
    gt_inds = torch.where(pos, idx, torch.full_like(idx, background))
    targets = d[torch.arange(n), idx]
    if zero_background:
        targets = torch.where(pos[:, None], targets, torch.zeros_like(targets))
    return gt_inds, targets


def _fcos_hint(points, gt_bboxes, regress_ranges):
    def hint(got, expected):
        if not isinstance(got, tuple | list) or len(got) != 2:
            return "return a tuple (gt_inds LongTensor[N], bbox_targets Tensor[N, 4])"
        args = (points, gt_bboxes, regress_ranges)
        variants = [
            ("background points have gt_ind -1 (GTs are 0-based here)", {"background": 0}),
            ("a point inside several boxes goes to the box of SMALLEST area", {"smallest": False}),
            (
                "strictly inside: a point on a box edge (a distance of 0) is not positive",
                {"strict": False},
            ),
            (
                "the regress range includes both ends: low <= max(l, t, r, b) <= high",
                {"inclusive": False},
            ),
            ("background points get bbox_targets (0, 0, 0, 0)", {"zero_background": False}),
        ]
        outputs = [(m, fcos_variant(*args, **s)) for m, s in variants]
        outputs = [(m, v) for m, v in outputs if not all(map(_same, v, expected))]
        found = _first_wrong(got, outputs)
        if found:
            return found
        gi, tg = got
        if isinstance(gi, Tensor) and _same(gi, expected[0]):
            return "gt_inds are right; bbox_targets are (l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y)"
        for message, value in outputs:
            if _same(gi, value[0]):
                return message
        return None

    return hint


def check_fcos_point_targets(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``fcos_point_targets``: ``fn(points[N, 2], gt_bboxes[K, 4], regress_ranges[N, 2])
    -> (gt_inds LongTensor[N], bbox_targets Tensor[N, 4])``.

    FCOS targets of one image without center sampling (:func:`labkit.heads.fcos.fcos_targets_single`
    with ``return_gt_inds=True``): a point is a candidate for a GT when it lies strictly inside
    it and ``max(l, t, r, b)`` is in its range (both ends included); among several candidates
    it takes the GT of smallest area (the lower index on a tie). ``gt_inds`` is 0-based, ``-1``
    for background; ``bbox_targets`` are the ``(l, t, r, b)`` distances to the assigned GT,
    zeros for background points.
    """
    from labkit.heads.fcos import fcos_targets_single

    def reference(points, gts, rr):
        k = len(gts)
        _, targets, gt_inds = fcos_targets_single(
            points, gts, torch.zeros(k, dtype=torch.long), rr, torch.full((len(points),), 8.0), 1,
            return_gt_inds=True,
        )  # fmt: skip
        return gt_inds, torch.where(gt_inds[:, None] >= 0, targets, torch.zeros_like(targets))

    def wide(n):
        return torch.tensor([[-1.0, 1e8]]).expand(n, 2).clone()

    grid = torch.stack(
        torch.meshgrid(torch.arange(0.0, 64, 8) + 4, torch.arange(0.0, 64, 8) + 4, indexing="xy"),
        -1,
    ).reshape(-1, 2)
    edge_pts = torch.tensor([[20.0, 30.0], [10.0, 30.0], [20.0, 10.0], [5.0, 5.0], [30.0, 50.0]])
    bound_pts = torch.tensor([[26.0, 30.0], [26.0, 30.0], [18.0, 30.0]])
    bound_rr = torch.tensor([[-1.0, 16.0], [16.0, 32.0], [-1.0, 16.0]])
    settings = [
        (
            "one box; points inside, on its edges and outside",
            edge_pts,
            [[10.0, 10.0, 50.0, 50.0]],
            wide(5),
        ),
        (
            "two nested boxes: the smaller one wins",
            grid,
            [[0.0, 0.0, 60.0, 60.0], [16.0, 16.0, 40.0, 36.0]],
            wide(64),
        ),
        (
            "max(l, t, r, b) exactly on the range bounds (both included)",
            bound_pts,
            [[10.0, 14.0, 42.0, 46.0]],
            bound_rr,
        ),
        (
            "two boxes of equal area overlapping: the lower index wins",
            grid,
            [[8.0, 8.0, 40.0, 40.0], [16.0, 16.0, 48.0, 48.0]],
            wide(64),
        ),
        ("no ground truth (K = 0)", grid[:6], [], wide(6)),
    ]
    g = torch.Generator().manual_seed(16000 + seed)
    levels = [(8, (-1.0, 32.0)), (16, (32.0, 64.0)), (32, (64.0, 1e8))]
    for _ in range(num_random):
        pts, rrs = [], []
        for s, rr in levels:
            c = torch.arange(0.0, 128, s) + s / 2
            p = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)
            pts.append(p)
            rrs.append(torch.tensor([rr]).expand(len(p), 2))
        k = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.randint(0, 100, (k, 2), generator=g).float()
        wh = torch.randint(4, 100, (k, 2), generator=g).float()
        boxes = torch.cat([xy, (xy + wh).clamp(max=128)], 1)
        settings.append(
            (
                f"random: 3 levels, {k} GTs (seed {seed})",
                torch.cat(pts),
                boxes.tolist(),
                torch.cat(rrs),
            )
        )
    cases = []
    for name, points, gts, rr in settings:
        gt = torch.tensor(gts, dtype=torch.float32).reshape(-1, 4)

        def locate(idx, points=points, rr=rr):
            return f"points[{idx[0]}] = {format_value(points[idx[0]])}, regress_range {format_value(rr[idx[0]])}"

        cases.append(
            Case(
                name,
                {"points": points, "gt_bboxes": gt, "regress_ranges": rr},
                reference(points, gt, rr),
                locate,
                _fcos_hint(points, gt, rr),
            )
        )
    return run_cases(
        "fcos_point_targets", student_fn, cases, raise_on_fail=raise_on_fail, atol=1e-4
    )


# ---------------------------------------------------------------------------------------
# 06 Co-DETR: one head's positives as a padded query group
# ---------------------------------------------------------------------------------------


def query_group_variant(
    labels: Sequence[Tensor],
    num_classes: int,
    *,
    min_coords: int = 9,
    drop_invalid: bool = True,
    pad_label: int | None = None,
    self_attend: bool = True,
    pad_sees_real: bool = False,
    invert: bool = False,
    max_pos_coords: int = 300,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(labels[B, M], label_weights[B, M], attn_mask[B, M, M])`` with mistake switches."""
    kept = [lab[(lab >= 0) & (lab < num_classes)] if drop_invalid else lab for lab in labels]
    size = max(min_coords, min(max_pos_coords, max((len(k) for k in kept), default=0)))
    b = len(kept)
    out = torch.full((b, size), num_classes if pad_label is None else pad_label, dtype=torch.long)
    weights = torch.zeros(b, size)
    masks = []
    idx = torch.arange(size)
    for i, k in enumerate(kept):
        k = k[:size]
        out[i, : len(k)] = k
        weights[i, : len(k)] = 1.0
        padded = idx >= len(k)
        mask = padded[None, :].expand(size, size).clone()
        if not pad_sees_real:
            mask |= padded[:, None] & ~padded[None, :]
        if self_attend:
            mask &= ~torch.eye(size, dtype=torch.bool)
        masks.append(~mask if invert else mask)
    attn = torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
    return out, weights, attn


def _group_hint(labels, num_classes):
    def hint(got, expected):
        if not isinstance(got, tuple | list) or len(got) != 3:
            return "return a tuple (labels LongTensor[B, M], label_weights Tensor[B, M], attn_mask BoolTensor[B, M, M])"
        m = expected[0].shape[1]
        if isinstance(got[0], Tensor) and got[0].dim() == 2 and got[0].shape[1] != m:
            return (
                f"the group size M should be {m}: the batch's largest number of (valid) positives, "
                "at least min_coords = 9 and at most 300"
            )
        variants = [
            (
                "positives labelled outside 0..num_classes-1 are dropped before padding",
                {"drop_invalid": False},
            ),
            ("padding gets the background label num_classes", {"pad_label": 0}),
            ("padding gets the background label num_classes", {"pad_label": -1}),
            ("True in attn_mask means blocked (not allowed to attend)", {"invert": True}),
            (
                "a padded query still attends to itself: a fully blocked row makes the softmax NaN",
                {"self_attend": False},
            ),
            ("padded queries must not attend to the real queries either", {"pad_sees_real": True}),
        ]
        outputs = [(msg, query_group_variant(labels, num_classes, **s)) for msg, s in variants]
        outputs = [(msg, v) for msg, v in outputs if not all(map(_same, v, expected))]
        found = _first_wrong(got, outputs)
        if found:
            return found
        for part, (name, e) in enumerate(
            zip(("labels", "label_weights", "attn_mask"), expected, strict=True)
        ):
            if part < len(got) and not _same(got[part], e):
                for msg, v in outputs:
                    if _same(got[part], v[part]):
                        return msg
                return (
                    f"{name} is wrong (labels and label_weights before it are right)"
                    if part
                    else None
                )
        return None

    return hint


def check_query_group(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``query_group``: ``fn(labels: list[LongTensor[P_i]], num_classes) -> (labels[B, M],
    label_weights[B, M], attn_mask[B, M, M])``.

    One auxiliary head's positives padded to a query group, as
    :func:`labkit.codetr.positive_queries.pad_positives` does: labels outside
    ``0..num_classes-1`` are dropped; ``M = max(9, min(300, max_i P_i))``; padding gets label
    ``num_classes`` and weight 0; in ``attn_mask`` (True = blocked) nobody attends to a padded
    query, a padded query does not attend to real ones, and every query attends to itself.
    The cases keep ``P_i <= 300`` (beyond, labkit subsamples at random).
    """
    from labkit.codetr.positive_queries import pad_positives
    from labkit.codetr.positives import AuxPositives

    def reference(labels, num_classes):
        n = [len(lab) for lab in labels]
        positives = AuxPositives(
            coords=[torch.zeros(p, 4) for p in n],
            labels=[lab.clone() for lab in labels],
            targets=[torch.zeros(p, 4) for p in n],
        )
        metas = [{"img_shape": (64, 64)} for _ in labels]
        out = pad_positives(positives, metas, num_classes)
        return out.labels, out.label_weights, out.attn_mask

    settings = [
        ("one image, 3 positives: padded to 9", [[2, 0, 1]], 3),
        ("two images, 12 and 4 positives: M = 12", [[0, 1, 2, 3] * 3, [3, 3, 1, 0]], 4),
        ("an image without positives", [[1] * 10, []], 2),
        (
            "labels outside 0..C-1 (background C, ignored -1) are dropped",
            [[0, 5, 1, -1, 2], [4, 4]],
            5,
        ),
    ]
    g = torch.Generator().manual_seed(17000 + seed)
    for _ in range(num_random):
        b = int(torch.randint(1, 5, (1,), generator=g))
        c = int(torch.randint(2, 8, (1,), generator=g))
        rows = []
        for _ in range(b):
            p = int(torch.randint(0, 40, (1,), generator=g))
            rows.append(torch.randint(0, c, (p,), generator=g).tolist())
        settings.append((f"random: {b} images, {c} classes (seed {seed})", rows, c))
    cases = []
    for name, rows, c in settings:
        labels = [torch.tensor(r, dtype=torch.long) for r in rows]
        cases.append(
            Case(
                name,
                {"labels": labels, "num_classes": c},
                reference(labels, c),
                hint=_group_hint(labels, c),
            )
        )
    return run_cases("query_group", student_fn, cases, raise_on_fail=raise_on_fail)


def check_hbm_floor(
    student_fn: Callable, *, seed: int = 0, num_random: int = 3, raise_on_fail: bool = True
) -> CheckResult:
    """Exercise ``hbm_floor``: ``fn(bs, num_queries, num_keys, num_heads, head_dims, num_levels,
    num_points, dtype_bytes, bandwidth_tb_s) -> float`` microseconds.

    The memory-traffic floor of one deformable-attention forward: every input read once (the
    value map in ``dtype_bytes``, sampling locations (x, y) and attention weights in float32)
    and the output written once, at ``bandwidth_tb_s`` TB/s
    (:func:`labkit.lessons.attention_cost.hbm_floor_us`).
    """
    from labkit.lessons.attention_cost import hbm_floor_us

    names = ("bs", "num_queries", "num_keys", "num_heads", "head_dims", "num_levels",
             "num_points", "dtype_bytes", "bandwidth_tb_s")  # fmt: skip
    settings = [
        ("the encoder at 800 x 1333 (section 8)", (2, 22223, 22223, 8, 32, 4, 4, 4, 3.35)),
        ("the decoder: 300 queries", (2, 300, 22223, 8, 32, 4, 4, 4, 3.35)),
        ("bfloat16 values (2 bytes), an H200 at 4.8 TB/s", (2, 22223, 22223, 8, 32, 4, 4, 2, 4.8)),
        ("one head, one level, one point", (1, 10, 100, 1, 32, 1, 1, 4, 1.0)),
    ]
    g = torch.Generator().manual_seed(18000 + seed)
    for _ in range(num_random):
        draw = [int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                ((1, 5), (1, 2000), (100, 30000), (1, 9), (8, 65), (1, 5), (1, 9))]  # fmt: skip
        settings.append((f"random (seed {seed})", (*draw, 4, 2.0)))
    cases = []
    for name, values in settings:
        args = dict(zip(names, values, strict=True))
        bs, nq, nk, heads, dims, levels, points, nbytes, bw = values
        samples = bs * nq * heads * levels * points

        def hint(got, expected, samples=samples, nbytes=nbytes, bw=bw):
            if not isinstance(got, (int, float)):
                return "return a number of microseconds"
            extra = {
                "the sampling locations": samples * 2 * 4,
                "the attention weights": samples * 4,
            }
            for what, nbytes_term in extra.items():
                if abs(got - (expected - nbytes_term / (bw * 1e12) * 1e6)) < 1e-6 * max(
                    expected, 1
                ):
                    return f"{what} are read too: count their bytes"
            if nbytes != 4 and abs(got - expected) > 0:
                return "locations and weights stay float32 whatever the value dtype"
            if abs(got * 1e6 - expected) < 1e-6 * expected:
                return "the result is in microseconds: divide bytes by bytes per second, times 1e6"
            return None

        cases.append(Case(name, args, hbm_floor_us(*values[:8], bandwidth_tb_s=bw), hint=hint))
    return run_cases("hbm_floor", student_fn, cases, raise_on_fail=raise_on_fail, rtol=1e-6)
