"""labkit.grading checks: correct functions pass, wrong ones get messages a student can act on."""

from __future__ import annotations

import math

import pytest
import torch

import labkit.grading as grading
from labkit.anchors import AnchorGenerator, featmap_sizes_from_shape
from labkit.assigners.max_iou import assign_wrt_overlaps
from labkit.boxes import bbox_overlaps
from labkit.detr.ms_deform_attn import sampling_locations_from_offsets
from labkit.grading.feedback import CheckFailed, compare, format_value
from labkit.heads.fcos import centerness_target


def _iou_plus_one(b1, b2):
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    a1 = (b1[:, 2] - b1[:, 0] + 1) * (b1[:, 3] - b1[:, 1] + 1)
    a2 = (b2[:, 2] - b2[:, 0] + 1) * (b2[:, 3] - b2[:, 1] + 1)
    return overlap / (a1[:, None] + a2[None, :] - overlap)


def _not_implemented(*args):
    raise NotImplementedError("Exercise 1 (pairwise_iou): write my_box_iou")


def _bilinear(value_map, x, y):
    h, w = value_map.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= xi < w and 0 <= yi < h:
                total += wy * wx * float(value_map[yi, xi])
    return total


def _std(c):
    return c.std(0) if len(c) > 1 else torch.full_like(c[0], float("nan"))


RETINA = AnchorGenerator(
    strides=[8, 16, 32, 64, 128], ratios=[0.5, 1.0, 2.0], octave_base_scale=4, scales_per_octave=3
)
SIZES = featmap_sizes_from_shape((512, 512), RETINA.strides)


def _anchor_center(level, flat_index):
    row, col = divmod(flat_index // RETINA.num_base_anchors[level], SIZES[level][1])
    return (col * RETINA.strides[level][0], row * RETINA.strides[level][1])


def _fcos_positive(point, box, regress_range):
    x, y = point
    d = (x - box[0], y - box[1], box[2] - x, box[3] - y)
    return min(d) > 0 and regress_range[0] <= max(d) <= regress_range[1]


def _query_logits(boxes, img_hw):
    from labkit.boxes import normalize_bboxes
    from labkit.detr.transformer import inverse_sigmoid

    return inverse_sigmoid(normalize_bboxes(boxes, img_hw))


CORRECT = {
    "pairwise_iou": lambda b1, b2: bbox_overlaps(b1, b2),
    "base_anchors": lambda base, r, s: AnchorGenerator([base], r, s).base_anchors[0],
    "anchor_center": _anchor_center,
    "max_iou_assign": lambda ov, p, n, m: assign_wrt_overlaps(ov, None, p, n, m).gt_inds,
    "atss_threshold": lambda c: (c.mean(0) + _std(c), c >= c.mean(0) + _std(c)),
    "sampling_locations": sampling_locations_from_offsets,
    "bilinear_sample": _bilinear,
    "centerness_target": lambda t: centerness_target(t),
    "fcos_positive": _fcos_positive,
    "positive_query_logits": _query_logits,
    "count_positives": lambda n, groups, layers: layers * (n + sum(groups)),
}


@pytest.mark.parametrize("exercise", sorted(CORRECT))
def test_correct_function_passes_every_case(exercise):
    result = grading.EXERCISES[exercise](CORRECT[exercise])
    assert result.passed and result.score == 1.0 and result.messages == []
    assert len(result.cases) >= 6  # edge cases and random ones
    assert grading.EXERCISES[exercise] is getattr(grading, f"check_{exercise}")


@pytest.mark.parametrize("exercise", sorted(CORRECT))
def test_not_implemented_scores_zero_with_one_clear_message(exercise):
    with pytest.raises(AssertionError) as info:
        grading.EXERCISES[exercise](_not_implemented)
    assert isinstance(info.value, CheckFailed)
    text = str(info.value)
    assert "not implemented yet" in text and "raise NotImplementedError" in text
    assert text.count("raised NotImplementedError") == 1  # stopped after the first case
    result = grading.EXERCISES[exercise](_not_implemented, raise_on_fail=False)
    assert not result.passed and result.score == 0.0 and len(result.messages) == 1


def test_wrong_iou_message_shows_input_expected_got_and_diagnosis():
    result = grading.check_pairwise_iou(_iou_plus_one, raise_on_fail=False)
    assert not result.passed and 0 < result.score < 1
    touching = next(m for m in result.messages if m.startswith("boxes touching along the edge"))
    assert "boxes1 = tensor([[0.0, 0.0, 10.0, 10.0]], float32)" in touching
    assert "boxes2 = tensor([[10.0, 0.0, 20.0, 10.0]], float32)" in touching
    assert "expected tensor([[0.0]], float32)" in touching
    assert "got      tensor([[0.0476]], float32)" in touching
    assert "'+1' pixel convention" in touching
    with pytest.raises(AssertionError, match="boxes touching along the edge"):
        grading.check_pairwise_iou(_iou_plus_one)


def test_nan_from_zero_area_boxes_is_explained_and_located():
    def no_eps(b1, b2):
        lt = torch.max(b1[:, None, :2], b2[None, :, :2])
        rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        a1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
        a2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
        return overlap / (a1[:, None] + a2[None, :] - overlap)

    result = grading.check_pairwise_iou(no_eps, raise_on_fail=False)
    msg = next(m for m in result.messages if m.startswith("two zero-area boxes"))
    assert "got nan" in msg and "clamp the union at eps" in msg
    random_msg = next(m for m in result.messages if m.startswith("random boxes"))
    assert "that entry comes from boxes1[" in random_msg  # the pair behind the bad entry


def test_shape_dtype_and_exception_messages():
    transposed = grading.check_pairwise_iou(lambda a, b: bbox_overlaps(b, a), raise_on_fail=False)
    assert any("shape should be [3, 2], got [2, 3] (transposed?" in m for m in transposed.messages)

    as_float = grading.check_max_iou_assign(
        lambda ov, p, n, m: assign_wrt_overlaps(ov, None, p, n, m).gt_inds.float(),
        raise_on_fail=False,
    )
    assert as_float.score == 0.0
    assert "dtype should be integer (torch.int64), got torch.float32" in as_float.messages[0]

    def crashes(boxes1, boxes2):
        return boxes1[:, None] @ boxes2

    text = grading.check_pairwise_iou(crashes, raise_on_fail=False).messages[0]
    assert "raised an exception" in text and "in crashes" in text
    assert "return boxes1[:, None] @ boxes2" in text and "RuntimeError" in text
    assert "labkit/grading" not in text  # the tail shows the student's frames only


def test_in_place_modification_is_reported():
    def clamps_input(boxes1, boxes2):
        boxes1.clamp_(min=1.0)
        return bbox_overlaps(boxes1, boxes2)

    result = grading.check_pairwise_iou(clamps_input, raise_on_fail=False)
    assert any("modified its input boxes1 in place" in m for m in result.messages)


@pytest.mark.parametrize(
    ("exercise", "wrong", "hint"),
    [
        (
            "base_anchors",
            lambda base, r, s: AnchorGenerator([base], r, s, scale_major=False).base_anchors[0],
            "ratio-major, scales innermost",
        ),
        (
            "anchor_center",
            lambda level, i: tuple(reversed(_anchor_center(level, i))),
            "x and y are swapped",
        ),
        (
            "anchor_center",
            lambda level, i: (
                i % SIZES[level][1] * RETINA.strides[level][0],
                i // SIZES[level][1] * RETINA.strides[level][1],
            ),
            "divide the flat index by the anchors per cell",
        ),
        (
            "max_iou_assign",
            lambda ov, p, n, m: (
                assign_wrt_overlaps(ov, None, p, n, m, match_low_quality=False).gt_inds
            ),
            "step 4 is missing",
        ),
        (
            "atss_threshold",
            lambda c: (
                c.mean(0) + c.std(0, unbiased=False),
                c >= c.mean(0) + c.std(0, unbiased=False),
            ),
            "unbiased std",
        ),
        (
            "sampling_locations",
            lambda r, o, s: sampling_locations_from_offsets(r, o, s.flip(-1)),
            "spatial_shapes is (h, w)",
        ),
        (
            "centerness_target",
            lambda t: centerness_target(t) ** 2,
            "take the square root",
        ),
        (
            "fcos_positive",
            lambda p, b, rr: _fcos_positive(p, b, (rr[0] + 1e-3, rr[1] - 1e-3)),
            "the regress range includes both ends",
        ),
        (
            "positive_query_logits",
            lambda b, hw: _query_logits(b, hw[::-1]),
            "img_hw is (h, w)",
        ),
        (
            "count_positives",
            lambda n, groups, layers: n + sum(groups),
            "count every decoder layer",
        ),
    ],
)
def test_common_mistakes_get_a_hint(exercise, wrong, hint):
    result = grading.EXERCISES[exercise](wrong, raise_on_fail=False)
    assert not result.passed
    assert any(f"hint: {hint}" in m or hint in m for m in result.messages), result.report()


def test_seed_changes_the_random_cases_only():
    a = grading.check_pairwise_iou(CORRECT["pairwise_iou"], seed=0)
    b = grading.check_pairwise_iou(CORRECT["pairwise_iou"], seed=1)
    names_a = [c.name for c in a.cases]
    names_b = [c.name for c in b.cases]
    assert names_a[:11] == names_b[:11] and names_a[11:] != names_b[11:]


def test_compare_and_format_value():
    assert compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7])) is None
    assert "expected a torch.Tensor, got list" in compare([1.0], torch.tensor([1.0]))
    assert compare((3, 4), torch.tensor([3.0, 4.0]), coerce=True) is None
    assert "expected a tuple of 2 values" in compare(
        torch.zeros(2), (torch.zeros(2), torch.zeros(2))
    )
    big = format_value(torch.zeros(50, 4))
    assert big.startswith("Tensor[50, 4] float32, starting [[0.0, 0.0, 0.0, 0.0]")
    with pytest.raises(TypeError, match="student_fn"):
        grading.check_pairwise_iou("my_box_iou")


NOTEBOOK_SOLUTIONS = [
    ("01_anchors", "my_box_iou", "pairwise_iou"),
    ("01_anchors", "my_base_anchors", "base_anchors"),
    ("02_assignment", "my_max_iou", "max_iou_assign"),
    ("02_assignment", "my_atss_threshold", "atss_threshold"),
    ("02_assignment", "my_atss_assign", "atss_assign"),
    ("03_fcos_centerness", "my_centerness", "centerness_target"),
    ("03_fcos_centerness", "is_fcos_positive", "fcos_positive"),
    ("03_fcos_centerness", "fcos_point_targets", "fcos_point_targets"),
    ("04_deformable_attention", "my_sampling_locations", "sampling_locations"),
    ("04_deformable_attention", "bilinear", "bilinear_sample"),
    ("04_deformable_attention", "hbm_floor", "hbm_floor"),
    ("05_detr_hungarian", "matching_cost", "matching_cost"),
    ("05_detr_hungarian", "hungarian_gt_inds", "hungarian_gt_inds"),
    ("05_detr_hungarian", "one_to_many", "one_to_many_gt_inds"),
    ("06_codetr_auxiliary_queries", "boxes_to_query_logits", "positive_query_logits"),
    ("06_codetr_auxiliary_queries", "count_positives", "count_positives"),
    ("06_codetr_auxiliary_queries", "pad_query_group", "query_group"),
]


@pytest.mark.parametrize(("notebook", "function", "exercise"), NOTEBOOK_SOLUTIONS)
def test_each_notebook_solution_passes_its_check(notebook, function, exercise):
    """The instructor solutions in the notebooks meet the checks (visible and hidden seeds)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "notebooks" / f"{notebook}.ipynb"
    if not path.is_file():
        pytest.skip(f"{path.name} not in this checkout")
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]]
    source = next((s for s in cells if f"def {function}(" in s), None)
    if source is None:
        pytest.skip(f"{path.name} has no {function}")
    namespace = {"torch": torch, "math": math}
    exec(source, namespace)
    for seed in (0, 1):
        result = grading.EXERCISES[exercise](namespace[function], seed=seed)
        assert result.passed
