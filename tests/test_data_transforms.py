"""Transforms keep boxes and img_meta consistent with the image (mmdetection's rules)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    Pad,
    RandomFlip,
    Resize,
    ToTensor,
    rescale_size,
    test_transforms,
    train_transforms,
)


def make_item(h: int = 40, w: int = 60, boxes=None, ignore=None) -> dict:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    boxes = np.array(boxes if boxes is not None else [[4, 6, 20, 30], [30, 2, 60, 40]], np.float32)
    ignore = np.array(ignore if ignore is not None else [[1, 1, 9, 9]], np.float32)
    return {
        "img": img,
        "gt_bboxes": boxes.reshape(-1, 4),
        "gt_labels": np.arange(len(boxes), dtype=np.int64),
        "gt_bboxes_ignore": ignore.reshape(-1, 4),
        "img_meta": {
            "image_id": 1,
            "file_name": "x.png",
            "ori_shape": (h, w),
            "img_shape": (h, w),
            "pad_shape": (h, w),
            "scale_factor": (1.0, 1.0, 1.0, 1.0),
            "flip": False,
            "flip_direction": None,
        },
    }


@pytest.mark.parametrize(
    "old, scale, expected",
    [
        ((612, 612), (1333, 800), (800, 800)),  # the seed's COCO image: factor 1.3072
        ((480, 640), (1333, 800), (800, 1067)),  # short edge limit binds
        ((300, 1000), (1333, 800), (400, 1333)),  # long edge limit binds
        ((480, 640), (800, 1333), (800, 1067)),  # order of the pair does not matter
        ((100, 50), 0.5, (50, 25)),
        ((101, 51), 0.5, (51, 26)),  # int(x * s + 0.5)
    ],
)
def test_rescale_size_matches_mmcv(old, scale, expected):
    assert rescale_size(old, scale) == expected


def test_resize_keep_ratio_scales_boxes_by_scale_factor():
    item = make_item(40, 60)
    out = Resize((100, 100), keep_ratio=True)(item)
    # factor min(100/60, 100/40) = 5/3 -> (67, 100); w_scale = 100/60, h_scale = 67/40
    assert out["img"].shape == (67, 100, 3)
    meta = out["img_meta"]
    assert meta["img_shape"] == (67, 100) and meta["pad_shape"] == (67, 100)
    assert meta["ori_shape"] == (40, 60)
    sf = np.array(meta["scale_factor"])
    np.testing.assert_allclose(sf, [100 / 60, 67 / 40, 100 / 60, 67 / 40], rtol=1e-6)
    expected = item["gt_bboxes"] * sf.astype(np.float32)
    expected[:, 0::2] = expected[:, 0::2].clip(0, 100)
    expected[:, 1::2] = expected[:, 1::2].clip(0, 67)
    np.testing.assert_allclose(out["gt_bboxes"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["gt_bboxes_ignore"], item["gt_bboxes_ignore"] * sf, rtol=1e-6)
    assert out["img"].dtype == np.uint8
    assert item["img"].shape == (40, 60, 3)  # the input item is left untouched


def test_resize_int_scale_is_square_and_float_is_factor():
    item = make_item(40, 60)
    assert Resize(30)(item)["img_meta"]["img_shape"] == (20, 30)
    assert Resize(30, keep_ratio=False)(item)["img_meta"]["img_shape"] == (30, 30)
    assert Resize(0.5)(item)["img_meta"]["img_shape"] == (20, 30)


def test_resize_clips_boxes_to_image():
    item = make_item(40, 60, boxes=[[-5, -5, 70, 50]])
    out = Resize((80, 120), keep_ratio=False)(item)
    np.testing.assert_allclose(out["gt_bboxes"], [[0, 0, 120, 80]])
    out = Resize((80, 120), keep_ratio=False, clip_object_border=False)(item)
    np.testing.assert_allclose(out["gt_bboxes"], [[-10, -10, 140, 100]])


def test_resize_without_keep_ratio_and_chained_scale_factor():
    item = make_item(40, 60)
    out = Resize((20, 90), keep_ratio=False)(item)
    assert out["img"].shape == (20, 90, 3)
    assert out["img_meta"]["scale_factor"] == (1.5, 0.5, 1.5, 0.5)
    out2 = Resize((40, 45), keep_ratio=False)(out)
    np.testing.assert_allclose(out2["img_meta"]["scale_factor"], (0.75, 1.0, 0.75, 1.0))


def test_resize_keeps_constant_image_and_bilinear_values():
    item = make_item(4, 4)
    item["img"] = np.full((4, 4, 3), 77, np.uint8)
    assert (Resize((8, 8))(item)["img"] == 77).all()
    item["img"] = np.zeros((1, 2, 3), np.float32)
    item["img"][0, 1] = 10.0
    up = Resize((1, 4), keep_ratio=False)(item)["img"][0, :, 0]
    # half-pixel centres (cv2 / align_corners=False): 0, 2.5, 7.5, 10
    np.testing.assert_allclose(up, [0.0, 2.5, 7.5, 10.0])


def test_flip_rule_and_flip_twice_is_identity():
    item = make_item(40, 60)
    flip = RandomFlip(prob=1.0)
    once = flip(item)
    np.testing.assert_array_equal(once["img"], item["img"][:, ::-1])
    np.testing.assert_allclose(once["gt_bboxes"], [[40, 6, 56, 30], [0, 2, 30, 40]])
    np.testing.assert_allclose(once["gt_bboxes_ignore"], [[51, 1, 59, 9]])
    assert once["img_meta"]["flip"] is True
    assert once["img_meta"]["flip_direction"] == "horizontal"
    twice = flip(once)
    np.testing.assert_array_equal(twice["img"], item["img"])
    np.testing.assert_allclose(twice["gt_bboxes"], item["gt_bboxes"])


@pytest.mark.parametrize(
    "direction, expected",
    [("vertical", [[4, 10, 20, 34]]), ("diagonal", [[40, 10, 56, 34]])],
)
def test_flip_other_directions(direction, expected):
    item = make_item(40, 60, boxes=[[4, 6, 20, 30]])
    out = RandomFlip(1.0, direction)(item)
    np.testing.assert_allclose(out["gt_bboxes"], expected)
    img = item["img"][::-1]
    if direction == "diagonal":
        img = img[:, ::-1]
    np.testing.assert_array_equal(out["img"], img)


def test_flip_probability_and_seed():
    item = make_item()
    never = RandomFlip(prob=0.0)(item)
    assert never["img_meta"]["flip"] is False and never["img_meta"]["flip_direction"] is None
    np.testing.assert_array_equal(never["gt_bboxes"], item["gt_bboxes"])
    a = RandomFlip(0.5, seed=3)
    draws_a = [a(item)["img_meta"]["flip"] for _ in range(50)]
    b = RandomFlip(0.5, seed=3)
    draws_b = [b(item)["img_meta"]["flip"] for _ in range(50)]
    assert draws_a == draws_b
    assert 10 < sum(draws_a) < 40


def test_pad_does_not_move_boxes_and_records_pad_shape():
    item = make_item(40, 60)
    out = Pad(size_divisor=32)(item)
    assert out["img"].shape == (64, 64, 3)
    assert out["img_meta"]["pad_shape"] == (64, 64)
    assert out["img_meta"]["img_shape"] == (40, 60)
    np.testing.assert_array_equal(out["img"][:40, :60], item["img"])
    assert (out["img"][40:] == 0).all() and (out["img"][:, 60:] == 0).all()
    np.testing.assert_array_equal(out["gt_bboxes"], item["gt_bboxes"])
    fixed = Pad(size=(50, 70))(item)
    assert fixed["img"].shape == (50, 70, 3)
    square = Pad(pad_to_square=True)(item)
    assert square["img_meta"]["pad_shape"] == (60, 60)
    square32 = Pad(size_divisor=32, pad_to_square=True)(item)
    assert square32["img_meta"]["pad_shape"] == (64, 64)
    already = Pad(size_divisor=20)(item)
    assert already["img"].shape == (40, 60, 3)


def test_normalize_values_and_channel_order():
    item = make_item(4, 5)
    out = Normalize()(item)
    assert out["img"].dtype == np.float32
    expected = (item["img"].astype(np.float32) - np.array(IMAGENET_MEAN, np.float32)) / np.array(
        IMAGENET_STD, np.float32
    )
    np.testing.assert_allclose(out["img"], expected, rtol=1e-6)
    assert out["img_meta"]["img_norm_cfg"] == {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "to_rgb": True,
    }
    bgr = Normalize(mean=(0, 0, 0), std=(1, 1, 1), to_rgb=False)(item)
    np.testing.assert_array_equal(bgr["img"], item["img"][..., ::-1].astype(np.float32))


def test_to_tensor_layout_and_dtypes():
    item = make_item(4, 5)
    out = ToTensor()(item)
    assert out["img"].shape == (3, 4, 5) and out["img"].dtype == torch.float32
    assert torch.equal(out["img"][1], torch.from_numpy(item["img"][..., 1]).float())
    assert out["gt_bboxes"].dtype == torch.float32
    assert out["gt_labels"].dtype == torch.int64
    assert out["gt_bboxes_ignore"].shape == (1, 4)


def test_empty_boxes_flow_through():
    item = make_item(30, 50, boxes=np.zeros((0, 4)), ignore=np.zeros((0, 4)))
    item["gt_labels"] = np.zeros(0, np.int64)
    out = train_transforms((64, 64), flip_prob=1.0)(item)
    assert out["gt_bboxes"].shape == (0, 4)
    assert out["gt_labels"].shape == (0,)


def test_pipelines_end_to_end_consistent():
    item = make_item(40, 60)
    out = train_transforms((100, 100), size_divisor=32, flip_prob=1.0)(item)
    meta = out["img_meta"]
    assert out["img"].shape == (3, 96, 128)
    assert meta["img_shape"] == (67, 100) and meta["pad_shape"] == (96, 128)
    assert meta["flip"] is True
    # undo: unflip in img_shape, divide by scale_factor -> original boxes (up to clipping)
    boxes = out["gt_bboxes"].numpy().copy()
    boxes[:, [0, 2]] = 100 - boxes[:, [2, 0]]
    boxes /= np.array(meta["scale_factor"], np.float32)
    np.testing.assert_allclose(boxes, item["gt_bboxes"], rtol=1e-5, atol=1e-4)
    test = test_transforms((100, 100), size_divisor=32)(item)
    assert test["img_meta"]["flip"] is False
    assert test["img"].shape == (3, 96, 128)
    # padding is 0, which in normalized units is the mean colour
    assert (test["img"][:, 67:] == 0).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="scale"):
        Resize((100, -1))
    with pytest.raises(ValueError, match="scale"):
        Resize((100, 100, 3))
    with pytest.raises(ValueError, match="scale"):
        Resize(1.5, keep_ratio=False)
    with pytest.raises(ValueError, match="scale"):
        Resize(-2.0)
    with pytest.raises(TypeError, match="keep_ratio"):
        Resize((10, 10), keep_ratio="yes")
    with pytest.raises(ValueError, match="prob"):
        RandomFlip(1.5)
    with pytest.raises(ValueError, match="direction"):
        RandomFlip(0.5, "sideways")
    with pytest.raises(ValueError, match="std"):
        Normalize(std=(1, 0, 1))
    with pytest.raises(ValueError, match="mean"):
        Normalize(mean=(1, 2))
    with pytest.raises(ValueError, match="size, size_divisor"):
        Pad()
    with pytest.raises(ValueError, match="size, size_divisor"):
        Pad(size=(64, 64), size_divisor=32)
    with pytest.raises(ValueError, match="size"):
        Pad(size=(64, 64), pad_to_square=True)
    with pytest.raises(ValueError, match="size_divisor"):
        Pad(size_divisor=0)
    with pytest.raises(ValueError, match="size"):
        Pad(size=(10, 10))(make_item(40, 60))
    with pytest.raises(TypeError, match="transforms"):
        Compose([Resize((10, 10)), 3])


def test_bad_items_raise_clear_errors():
    with pytest.raises(TypeError, match="item dict"):
        Resize((10, 10))([1, 2])
    item = make_item()
    del item["img_meta"]
    with pytest.raises(ValueError, match="img_meta"):
        Pad(size_divisor=8)(item)
    item = make_item()
    item["img"] = torch.zeros(3, 4, 4)
    with pytest.raises(TypeError, match="ToTensor last"):
        RandomFlip(1.0)(item)
    item = make_item()
    item["img"] = item["img"][..., :2]
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        Normalize()(item)


def _crop_item():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 10.0, 50.0, 40.0], [150.0, 60.0, 190.0, 95.0]], dtype=np.float32)
    return {
        "img": img,
        "gt_bboxes": boxes,
        "gt_labels": np.array([2, 4]),
        "gt_bboxes_ignore": np.zeros((0, 4), dtype=np.float32),
        "img_meta": {"ori_shape": (100, 200), "img_shape": (100, 200)},
    }


def test_random_scale_crop_moves_clips_and_drops_boxes():
    from labkit.data.transforms import RandomScaleCrop

    crop = RandomScaleCrop(60, scale_range=(1.0, 1.0), min_visible=0.3, seed=0)
    out = crop(_crop_item())
    x0, y0 = out["img_meta"]["crop_offset"]
    assert out["img"].shape == (60, 60, 3) and out["img_meta"]["img_shape"] == (60, 60)
    # every kept box is the original one shifted by the offset and clipped to the window
    for box, label in zip(out["gt_bboxes"], out["gt_labels"], strict=True):
        original = _crop_item()["gt_bboxes"][[2, 4].index(int(label))]
        expected = np.clip(original - [x0, y0, x0, y0], 0, 60)
        np.testing.assert_allclose(box, expected)
        visible = (expected[2] - expected[0]) * (expected[3] - expected[1])
        assert visible >= 0.3 * (original[2] - original[0]) * (original[3] - original[1])
    # a 20-px box at the corner: some windows keep it, others cut it away
    crop.rng = np.random.default_rng(0)
    item = _crop_item()
    item["gt_bboxes"] = np.array([[0.0, 0.0, 20.0, 20.0]], dtype=np.float32)
    item["gt_labels"] = np.array([1])
    seen = {len(crop(dict(item))["gt_labels"]) for _ in range(30)}
    assert seen == {0, 1}  # the box survives some crops and not others


def test_random_scale_crop_scales_first_and_keeps_small_images_whole():
    from labkit.data.transforms import RandomScaleCrop

    out = RandomScaleCrop(500, scale_range=(0.5, 0.5), seed=0)(_crop_item())
    assert out["img"].shape == (50, 100, 3)  # smaller than the crop: kept whole
    np.testing.assert_allclose(out["gt_bboxes"][0], [5.0, 5.0, 25.0, 20.0])
    assert out["img_meta"]["scale_factor"] == (0.5, 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="scale_range"):
        RandomScaleCrop(32, scale_range=(1.0, 0.5))
    with pytest.raises(ValueError, match="crop_size"):
        RandomScaleCrop(0)


def test_crop_train_transforms_give_padded_tensors_and_resume_exactly():
    from labkit.data.transforms import crop_train_transforms
    from labkit.engine.rng import _transform_generators

    tf = crop_train_transforms(64, seed=3)
    out = tf(_crop_item())
    assert out["img"].shape[1:] == (64, 64) and out["img"].dtype == torch.float32
    # both random transforms expose their generators, so a resume replays the same crops
    assert len(_transform_generators(tf)) == 2
