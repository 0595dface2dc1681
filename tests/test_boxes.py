"""Box conversions, overlaps and coders against hand-derived values (mmdetection 3.x semantics)."""

import math

import pytest
import torch

from labkit.boxes import (
    DeltaXYWHBBoxCoder,
    DistancePointBBoxCoder,
    bbox2distance,
    bbox_cxcywh_to_xyxy,
    bbox_overlaps,
    bbox_overlaps_reference,
    bbox_xywh_to_xyxy,
    bbox_xyxy_to_cxcywh,
    bbox_xyxy_to_xywh,
    delta2bbox,
    denormalize_bboxes,
    distance2bbox,
    normalize_bboxes,
)

T = torch.tensor


def close(actual, expected, atol=1e-4):
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


# ----------------------------------------------------------------------------- conversions


def test_conversions_known_values():
    xyxy = T([[10.0, 20.0, 30.0, 60.0]])
    close(bbox_xyxy_to_cxcywh(xyxy), [[20.0, 40.0, 20.0, 40.0]])
    close(bbox_xyxy_to_xywh(xyxy), [[10.0, 20.0, 20.0, 40.0]])
    close(bbox_cxcywh_to_xyxy(T([[20.0, 40.0, 20.0, 40.0]])), xyxy)
    close(bbox_xywh_to_xyxy(T([[10.0, 20.0, 20.0, 40.0]])), xyxy)


def test_conversions_round_trip_with_batch_dims():
    boxes = torch.rand(2, 5, 4) * 50
    boxes[..., 2:] += boxes[..., :2]
    close(bbox_cxcywh_to_xyxy(bbox_xyxy_to_cxcywh(boxes)), boxes)
    close(bbox_xywh_to_xyxy(bbox_xyxy_to_xywh(boxes)), boxes)
    assert bbox_xyxy_to_cxcywh(torch.zeros(0, 4)).shape == (0, 4)


def test_normalize_uses_h_w_order():
    # img_shape is (h, w) = (100, 200): x is divided by 200, y by 100.
    norm = normalize_bboxes(T([[0.0, 0.0, 100.0, 50.0]]), (100, 200))
    close(norm, [[0.25, 0.25, 0.5, 0.5]])
    close(denormalize_bboxes(norm, (100, 200)), [[0.0, 0.0, 100.0, 50.0]])


def test_conversion_bad_input():
    with pytest.raises(ValueError, match="bboxes"):
        bbox_xyxy_to_cxcywh(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="bboxes"):
        bbox_xyxy_to_cxcywh([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="img_shape"):
        normalize_bboxes(torch.zeros(1, 4), (0, 10))


# ----------------------------------------------------------------------------- overlaps

A = [0.0, 0.0, 10.0, 10.0]


@pytest.mark.parametrize(
    "b1, b2, iou, iof, giou",
    [
        (A, [5.0, 5.0, 15.0, 15.0], 25 / 175, 25 / 100, 25 / 175 - (225 - 175) / 225),
        (A, [10.0, 0.0, 20.0, 10.0], 0.0, 0.0, 0.0),  # touching edges: no overlap, no gap
        (A, [0.0, 0.0, 20.0, 20.0], 0.25, 1.0, 0.25),  # nested: small inside big
        ([0.0, 0.0, 20.0, 20.0], A, 0.25, 0.25, 0.25),  # iof is over bboxes1's area
        (A, [20.0, 0.0, 30.0, 10.0], 0.0, 0.0, -1 / 3),  # disjoint: GIoU penalizes the gap
        (A, A, 1.0, 1.0, 1.0),
        ([5.0, 5.0, 5.0, 5.0], A, 0.0, 0.0, 0.0),  # zero-area point inside a box
        ([5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], 0.0, 0.0, 0.0),  # 0 / eps, not NaN
        ([0.0, 0.0, 10.0, 0.0], A, 0.0, 0.0, 0.0),  # zero-height line on the edge
    ],
)
def test_overlap_edge_cases(b1, b2, iou, iof, giou):
    for mode, expected in (("iou", iou), ("iof", iof), ("giou", giou)):
        pairwise = bbox_overlaps(T([b1]), T([b2]), mode)
        aligned = bbox_overlaps(T([b1]), T([b2]), mode, is_aligned=True)
        assert pairwise.shape == (1, 1) and aligned.shape == (1,)
        close(pairwise, [[expected]], atol=1e-6)
        close(aligned, [expected], atol=1e-6)


def test_giou_of_two_distant_points_uses_eps_union():
    # union = 0 is clamped to eps, enclosing area is 100: giou = 0 - (100 - eps) / 100.
    giou = bbox_overlaps(T([[0.0, 0.0, 0.0, 0.0]]), T([[10.0, 10.0, 10.0, 10.0]]), "giou")
    assert giou.item() == pytest.approx(-1 + 1e-8, abs=1e-7)
    # eps is a plain lower bound on the union: a bigger eps shrinks tiny IoUs.
    tiny = T([[0.0, 0.0, 0.001, 0.001]])
    assert bbox_overlaps(tiny, tiny).item() == pytest.approx(1.0, rel=1e-4)
    assert bbox_overlaps(tiny, tiny, eps=1e-5).item() == pytest.approx(0.1, rel=1e-3)


def test_mmdet_docstring_example():
    b1 = T([[0.0, 0, 10, 10], [10, 10, 20, 20], [32, 32, 38, 42]])
    b2 = T([[0.0, 0, 10, 20], [0, 10, 10, 19], [10, 10, 20, 20]])
    close(bbox_overlaps(b1, b2), [[0.5, 0, 0], [0, 0, 1], [0, 0, 0]])
    close(bbox_overlaps(b1, b2, is_aligned=True), [0.5, 0, 0])
    close(bbox_overlaps(b1, b2, "giou", is_aligned=True), [0.5, -10 / 200, -(896 - 160) / 896])


def test_empty_inputs_give_empty_outputs_of_the_right_shape():
    some = T([[0.0, 0, 10, 9]])
    empty = torch.zeros(0, 4)
    assert bbox_overlaps(empty, some).shape == (0, 1)
    assert bbox_overlaps(some, empty).shape == (1, 0)
    assert bbox_overlaps(empty, empty).shape == (0, 0)
    assert bbox_overlaps(empty, empty, is_aligned=True).shape == (0,)
    assert bbox_overlaps(torch.zeros(2, 0, 4), torch.zeros(2, 3, 4), "giou").shape == (2, 0, 3)
    assert bbox_overlaps(some, torch.zeros(0, 0)).shape == (1, 0)  # mmdet's [0, 0] "no boxes"


def random_boxes(*shape, scale=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g) * scale
    wh = torch.rand(*shape, 2, generator=g) * scale / 2
    wh[..., :3, :] = 0  # a few zero-area boxes on purpose
    return torch.cat([xy, xy + wh], dim=-1)


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
def test_batch_dims_match_per_image_results(mode):
    b1, b2 = random_boxes(2, 3, 7, seed=1), random_boxes(2, 3, 5, seed=2)
    out = bbox_overlaps(b1, b2, mode)
    assert out.shape == (2, 3, 7, 5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], bbox_overlaps(b1[i, j], b2[i, j], mode))
    aligned = bbox_overlaps(b1[..., :5, :], b2, mode, is_aligned=True)
    assert aligned.shape == (2, 3, 5)
    torch.testing.assert_close(aligned, out[..., :5, :].diagonal(dim1=-2, dim2=-1))


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
def test_fast_path_equals_reference_bit_for_bit(mode):
    b1, b2 = random_boxes(300, seed=3), random_boxes(40, seed=4)
    assert torch.equal(bbox_overlaps(b1, b2, mode), bbox_overlaps_reference(b1, b2, mode))
    assert torch.equal(
        bbox_overlaps(b1[:40], b2, mode, is_aligned=True),
        bbox_overlaps_reference(b1[:40], b2, mode, is_aligned=True),
    )


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
def test_autograd_path_equals_in_place_path(mode):
    # Without autograd the pairwise overlaps reuse buffers in place; with it they must not.
    b1, b2 = random_boxes(60, seed=12), random_boxes(9, seed=13)
    with_grad = bbox_overlaps(b1.clone().requires_grad_(), b2, mode)
    with_grad.sum().backward()
    assert torch.equal(with_grad.detach(), bbox_overlaps(b1, b2, mode))


def test_iou_agrees_with_torchvision():
    torchvision = pytest.importorskip("torchvision")
    b1, b2 = random_boxes(500, seed=5)[3:], random_boxes(50, seed=6)[3:]
    torch.testing.assert_close(bbox_overlaps(b1, b2), torchvision.ops.box_iou(b1, b2))
    torch.testing.assert_close(
        bbox_overlaps(b1, b2, "giou"), torchvision.ops.generalized_box_iou(b1, b2)
    )


def test_overlaps_follow_dtype_and_support_gradients():
    b1 = random_boxes(4, seed=7).double().requires_grad_()
    b2 = random_boxes(4, seed=8).double()
    out = bbox_overlaps(b1, b2, "giou", is_aligned=True)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert torch.isfinite(b1.grad).all()


def test_overlap_bad_input_names_the_argument():
    good = T([A])
    with pytest.raises(ValueError, match="mode"):
        bbox_overlaps(good, good, mode="dice")
    with pytest.raises(ValueError, match="bboxes1.*NaN"):
        bbox_overlaps(T([[0.0, 0, float("nan"), 1]]), good)
    with pytest.raises(ValueError, match="bboxes2.*NaN or inf"):
        bbox_overlaps(good, T([[0.0, 0, float("inf"), 1]]))
    with pytest.raises(ValueError, match="bboxes2.*x2 >= x1"):
        bbox_overlaps(good, T([[5.0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="bboxes1.*shape"):
        bbox_overlaps(torch.zeros(3, 5), good)
    with pytest.raises(ValueError, match="bboxes1.*floating"):
        bbox_overlaps(torch.zeros(3, 4, dtype=torch.long), good)
    with pytest.raises(TypeError, match="bboxes2"):
        bbox_overlaps(good, [A])
    with pytest.raises(ValueError, match="batch dimensions"):
        bbox_overlaps(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match="is_aligned"):
        bbox_overlaps(torch.zeros(2, 4), torch.zeros(3, 4), is_aligned=True)
    # check=False skips the value checks (for predicted boxes in losses), not the shape checks.
    assert bbox_overlaps(good, T([[5.0, 0, 1, 1]]), check=False).shape == (1, 1)
    with pytest.raises(ValueError, match="bboxes1"):
        bbox_overlaps(torch.zeros(3, 5), good, check=False)


# ----------------------------------------------------------------------------- delta coder


def test_delta_encode_hand_values():
    anchor, gt = T([[0.0, 0.0, 10.0, 10.0]]), T([[5.0, 5.0, 15.0, 25.0]])
    # centre (5, 5) -> (10, 15), size 10x10 -> 10x20
    close(DeltaXYWHBBoxCoder().encode(anchor, gt), [[0.5, 1.0, 0.0, math.log(2)]])
    coder = DeltaXYWHBBoxCoder(target_means=(0.0, 0.5, 0.0, 0.0), target_stds=(0.1, 0.1, 0.2, 0.2))
    close(coder.encode(anchor, gt), [[5.0, 5.0, 0.0, math.log(2) / 0.2]])


def test_delta_encode_returns_float32_like_mmdet():
    anchor, gt = T([[0.0, 0.0, 10.0, 10.0]]).double(), T([[5.0, 5.0, 15.0, 25.0]]).double()
    assert DeltaXYWHBBoxCoder().encode(anchor, gt).dtype == torch.float32


def test_delta_round_trip_with_means_and_stds():
    coder = DeltaXYWHBBoxCoder(target_means=(0.1, -0.1, 0.2, 0.0), target_stds=(0.1, 0.1, 0.2, 0.2))
    anchors = random_boxes(50, seed=9)[3:] + T([0.0, 0.0, 1.0, 1.0])
    gts = random_boxes(50, seed=10)[3:] + T([0.0, 0.0, 1.0, 1.0])
    decoded = coder.decode(anchors, coder.encode(anchors, gts), wh_ratio_clip=1e-6)
    torch.testing.assert_close(decoded, gts, atol=1e-3, rtol=1e-4)


def test_delta_decode_mmdet_docstring_example():
    rois = T([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 5, 5]])
    deltas = T([[0.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, -1], [0.7, -1.9, -0.5, 0.3]])
    expected = [
        [0.0, 0.0, 1.0, 1.0],
        [0.1409, 0.1409, 2.8591, 2.8591],
        [0.0, 0.3161, 4.1945, 0.6839],
        [5.0, 5.0, 5.0, 5.0],
    ]
    close(DeltaXYWHBBoxCoder().decode(rois, deltas, max_shape=(32, 32, 3)), expected)


def test_delta_decode_wh_ratio_clip_and_border_clip():
    coder = DeltaXYWHBBoxCoder()
    roi, delta = T([[0.0, 0.0, 1.0, 1.0]]), T([[0.0, 0.0, 10.0, -10.0]])
    # |dw|, |dh| clamp at log(1000 / 16): width 1 -> 62.5, height 1 -> 1 / 62.5
    close(coder.decode(roi, delta), [[0.5 - 31.25, 0.5 - 0.008, 0.5 + 31.25, 0.5 + 0.008]])
    # max_shape is (h, w): x clipped to [0, 16], y to [0, 32]
    big = T([[-10.0, -10.0, 50.0, 50.0]])
    close(coder.decode(big, torch.zeros(1, 4), max_shape=(32, 16)), [[0.0, 0.0, 16.0, 32.0]])
    no_clip = DeltaXYWHBBoxCoder(clip_border=False)
    close(no_clip.decode(big, torch.zeros(1, 4), max_shape=(32, 16)), big)


def test_delta_decode_ctr_clamp_yolof():
    coder = DeltaXYWHBBoxCoder(add_ctr_clamp=True, ctr_clamp=32)
    roi = T([[0.0, 0.0, 100.0, 100.0]])
    # centre shift 100 px clamps to 32; dw = -10 is NOT clamped from below in this mode
    out = coder.decode(roi, T([[1.0, -1.0, -10.0, 0.0]]))
    w = 100 * math.exp(-10)
    close(out, [[82 - w / 2, 18 - 50, 82 + w / 2, 18 + 50]])


def test_delta_decode_class_specific_batched_and_empty():
    coder = DeltaXYWHBBoxCoder()
    rois = T([[0.0, 0, 10, 10], [10, 10, 30, 30]])
    deltas = torch.zeros(2, 8)  # two classes
    deltas[:, 4] = 1.0  # second class shifted right by one width
    out = coder.decode(rois, deltas)
    close(out, [[0.0, 0, 10, 10, 10, 0, 20, 10], [10, 10, 30, 30, 30, 10, 50, 30]])
    # batched: one (h, w) per image
    batched = coder.decode(
        rois.expand(2, 2, 4), deltas.expand(2, 2, 8), max_shape=[(100, 100), (20, 15)]
    )
    close(batched[0], out)
    close(batched[1], [[0.0, 0, 10, 10, 10, 0, 15, 10], [10, 10, 15, 20, 15, 10, 15, 20]])
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


def test_delta_coder_bad_input():
    coder = DeltaXYWHBBoxCoder()
    with pytest.raises(ValueError, match="pred_bboxes"):
        coder.decode(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pred_bboxes"):
        coder.decode(torch.zeros(3, 4), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="gt_bboxes"):
        coder.encode(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="target_stds"):
        DeltaXYWHBBoxCoder(target_stds=(1.0, 1.0))


# ----------------------------------------------------------------------------- distance coder


def test_distance_encode_hand_values_and_max_dis():
    points, boxes = (
        T([[5.0, 5.0], [30.0, 5.0]]),
        T([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.0]]),
    )
    close(bbox2distance(points, boxes), [[5.0, 5.0, 5.0, 15.0], [30.0, 5.0, -20.0, 15.0]])
    # clamp to [0, max_dis - eps]
    close(bbox2distance(points, boxes, max_dis=10), [[5.0, 5.0, 5.0, 9.9], [9.9, 5.0, 0.0, 9.9]])
    coder = DistancePointBBoxCoder()
    close(
        coder.encode(points, boxes, max_dis=16, eps=0.5),
        [[5.0, 5.0, 5.0, 15.0], [15.5, 5.0, 0.0, 15.0]],
    )


def test_distance_stride_normalization():
    points, boxes = T([[5.0, 5.0]]), T([[0.0, 0.0, 10.0, 20.0]])
    close(bbox2distance(points, boxes, stride=4), [[1.25, 1.25, 1.25, 3.75]])
    # normalization happens before the clamp (GFL clamps in stride units)
    close(bbox2distance(points, boxes, max_dis=3, eps=0.1, stride=4), [[1.25, 1.25, 1.25, 2.9]])
    # per-point strides, e.g. priors[:, 2] from PointGenerator(with_stride=True)
    per_point = bbox2distance(points.repeat(2, 1), boxes.repeat(2, 1), stride=T([1.0, 5.0]))
    close(per_point, [[5.0, 5.0, 5.0, 15.0], [1.0, 1.0, 1.0, 3.0]])
    close(distance2bbox(points, T([[1.25, 1.25, 1.25, 3.75]]), stride=4), boxes)


def test_distance_decode_round_trip_and_clip():
    coder = DistancePointBBoxCoder()
    points = T([[5.0, 5.0], [12.0, 30.0]])
    boxes = T([[0.0, 0.0, 10.0, 20.0], [2.0, 25.0, 40.0, 31.0]])
    close(coder.decode(points, coder.encode(points, boxes)), boxes)
    # max_shape (h, w) = (28, 32)
    close(
        coder.decode(points, coder.encode(points, boxes), max_shape=(28, 32)),
        [[0.0, 0, 10, 20], [2, 25, 32, 28]],
    )
    unclipped = DistancePointBBoxCoder(clip_border=False)
    close(unclipped.decode(points, coder.encode(points, boxes), max_shape=(28, 32)), boxes)
    batched = coder.decode(
        points.expand(2, 2, 2),
        coder.encode(points, boxes).expand(2, 2, 4),
        max_shape=[(100, 100), (10, 10)],
    )
    close(batched[0], boxes)
    close(batched[1], [[0.0, 0, 10, 10], [2, 10, 10, 10]])


def test_distance_coder_bad_input():
    coder = DistancePointBBoxCoder()
    with pytest.raises(ValueError, match="points"):
        coder.encode(torch.zeros(3, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="points, gt_bboxes"):
        coder.encode(torch.zeros(3, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pred_bboxes"):
        coder.decode(torch.zeros(3, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="max_shape"):
        distance2bbox(torch.zeros(3, 2), torch.zeros(3, 4), max_shape=[(10, 10), (5, 5)])


def test_delta2bbox_function_matches_coder():
    rois, deltas = (
        random_boxes(20, seed=11)[3:] + 1,
        torch.randn(17, 4, generator=torch.Generator().manual_seed(0)),
    )
    coder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(
        coder.decode(rois, deltas, max_shape=(64, 80)),
        delta2bbox(rois, deltas, stds=(0.1, 0.1, 0.2, 0.2), max_shape=(64, 80)),
    )


@pytest.mark.parametrize("check", [True, False])
def test_overlap_of_boxes_on_two_devices_names_both(check):
    on_cpu = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    on_meta = torch.empty(3, 4, device="meta")
    match = (
        r"^bboxes1, bboxes2: expected both on one device, got bboxes1 on cpu and bboxes2 on "
        r"meta \(move one with \.to\(other\.device\)\)$"
    )
    with pytest.raises(ValueError, match=match):
        bbox_overlaps(on_cpu, on_meta, check=check)
    with pytest.raises(ValueError, match="got bboxes1 on meta and bboxes2 on cpu"):
        bbox_overlaps(on_meta, on_cpu, is_aligned=True, check=check)
