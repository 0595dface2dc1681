"""CocoDetection: mmdetection's parsing rules, label remapping, ignore boxes, clear errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.data import CocoDetection, load_image
from labkit.data.coco import validate_coco

FIXTURES = Path(__file__).parent / "fixtures" / "coco"
ANN = FIXTURES / "instances_tiny.json"
IMAGES = FIXTURES / "images"


@pytest.fixture()
def ds() -> CocoDetection:
    return CocoDetection(ANN, IMAGES)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _base() -> dict:
    return json.loads(ANN.read_text())


def test_category_ids_follow_json_order(ds):
    # mmdetection: cat_ids = coco.get_cat_ids() (JSON order), cat2label = enumerate(cat_ids)
    assert ds.cat_ids == [18, 1, 44]
    assert ds.classes == ["dog", "person", "bottle"]
    assert ds.num_classes == 3
    assert ds.cat2label == {18: 0, 1: 1, 44: 2}


def test_images_in_json_order_and_empty_images_kept(ds):
    assert ds.image_ids == [7, 3, 5]
    assert len(ds) == 3
    empty = ds[2]
    assert empty["gt_bboxes"].shape == (0, 4)
    assert empty["gt_labels"].shape == (0,)
    assert empty["gt_bboxes_ignore"].shape == (0, 4)


def test_boxes_xywh_to_xyxy_labels_and_crowd_as_ignore(ds):
    item = ds[0]
    torch.testing.assert_close(
        item["gt_bboxes"], torch.tensor([[2.5, 3.0, 12.5, 15.0], [20.0, 5.0, 35.5, 25.0]])
    )
    assert item["gt_labels"].tolist() == [1, 0]
    assert item["gt_labels"].dtype == torch.int64
    torch.testing.assert_close(item["gt_bboxes_ignore"], torch.tensor([[0.0, 0.0, 40.0, 30.0]]))


def test_mmdet_skip_rules(ds):
    # image 3: w < 1, area 0, outside the image and "ignore" are all skipped; one box remains
    ann = ds.get_ann_info(1)
    np.testing.assert_array_equal(ann["bboxes"], [[2.0, 30.0, 18.0, 49.0]])
    assert ann["labels"].tolist() == [2]
    assert ann["bboxes_ignore"].shape == (0, 4)


def test_item_meta_and_image(ds):
    item = ds[1]
    assert item["img"].shape == (3, 50, 20)
    assert item["img"].dtype == torch.float32
    assert item["img"].max() <= 255
    meta = item["img_meta"]
    assert meta["image_id"] == 3
    assert meta["file_name"] == "b.png"
    assert meta["ori_shape"] == meta["img_shape"] == meta["pad_shape"] == (50, 20)
    assert meta["scale_factor"] == (1.0, 1.0, 1.0, 1.0)
    assert meta["flip"] is False and meta["flip_direction"] is None
    raw = load_image(IMAGES / "b.png")
    assert raw.dtype == np.uint8 and raw.shape == (50, 20, 3)
    np.testing.assert_array_equal(item["img"].permute(1, 2, 0).numpy(), raw.astype(np.float32))


def test_pycocotools_index_available(ds):
    assert sorted(ds.coco.getImgIds()) == [3, 5, 7]
    assert len(ds.coco.getAnnIds(imgIds=[3])) == 5


def test_filter_empty_drops_images_without_annotations():
    ds = CocoDetection(ANN, IMAGES, filter_empty=True)
    assert ds.image_ids == [7, 3]


def test_classes_subset_keeps_json_order_and_skips_others():
    ds = CocoDetection(ANN, IMAGES, classes=["bottle", "dog"])
    assert ds.cat_ids == [18, 44]
    assert ds.classes == ["dog", "bottle"]
    item = ds[0]
    assert item["gt_labels"].tolist() == [0]  # the person box is skipped
    assert item["gt_bboxes_ignore"].shape == (1, 4)


def test_round_trip_written_json(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    shutil.copy(IMAGES / "a.png", img_dir / "x.png")
    boxes = [[1.0, 2.0, 5.0, 6.0], [10.0, 0.0, 29.0, 30.0]]
    data = {
        "images": [{"id": 1, "file_name": "x.png", "width": 40, "height": 30}],
        "categories": [{"id": 2, "name": "b"}, {"id": 9, "name": "a"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": c,
                "bbox": [x, y, x2 - x, y2 - y],
                "area": 1,
            }
            for i, ((x, y, x2, y2), c) in enumerate(zip(boxes, [9, 2], strict=True))
        ],
    }
    ds = CocoDetection(_write(tmp_path, data), img_dir)
    item = ds[0]
    torch.testing.assert_close(item["gt_bboxes"], torch.tensor(boxes))
    assert item["gt_labels"].tolist() == [1, 0]


def test_transforms_are_applied(ds):
    seen = []

    def mark(item):
        seen.append(item["img_meta"]["image_id"])
        return item

    out = CocoDetection(ANN, IMAGES, transforms=mark)[0]
    assert seen == [7]
    assert isinstance(out["img"], np.ndarray)  # the user's pipeline decides the output


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d.pop("images"), "'images'"),
        (lambda d: d.pop("categories"), "'categories'"),
        (lambda d: d["images"][0].pop("file_name"), "images[0] has no 'file_name'"),
        (lambda d: d["images"][1].update(width=0), "images[1].width"),
        (lambda d: d["annotations"][2].pop("bbox"), "annotations[2] has no 'bbox'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0].bbox"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, "a", 4]), "annotations[1].bbox"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, float("nan"), 4]), "annotations[1].bbox"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, -3, 4]), "annotations[1].bbox"),
        (lambda d: d["annotations"][3].update(category_id=99), "annotations[3].category_id"),
        (lambda d: d["annotations"][3].update(image_id=42), "annotations[3].image_id"),
        (lambda d: d["annotations"][4].update(id=1), "annotations[4].id"),
        (lambda d: d["categories"][1].update(id=18), "categories[1].id"),
        (lambda d: d["categories"][0].pop("name"), "categories[0] has no 'name'"),
    ],
)
def test_malformed_json_names_file_and_field(tmp_path, edit, field):
    data = _base()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        CocoDetection(path, IMAGES)
    assert field in str(err.value)
    assert str(path) in str(err.value)


def test_missing_image_file_named(tmp_path):
    data = _base()
    data["images"][2]["file_name"] = "nope.png"
    with pytest.raises(ValueError, match="nope.png"):
        CocoDetection(_write(tmp_path, data), IMAGES)


def test_missing_or_invalid_json_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CocoDetection(tmp_path / "missing.json", IMAGES)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(bad, IMAGES)


def test_validate_accepts_missing_annotations():
    data = _base()
    data.pop("annotations")
    validate_coco(data)


def test_bad_arguments(ds):
    with pytest.raises(TypeError, match="transforms"):
        CocoDetection(ANN, IMAGES, transforms=3)
    with pytest.raises(ValueError, match="classes"):
        CocoDetection(ANN, IMAGES, classes=["zebra"])
    with pytest.raises(IndexError):
        ds[3]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as im:
        assert im.mode == "I;16"  # a real 16-bit PNG, as PIL reads it
    img = load_image(tmp_path / "ramp.png")
    assert img.dtype == np.uint8 and img.shape == (256, 256, 3)
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(img[..., channel], expected)
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255
    # 257 input values per output level (half a level at 0 and at 255): not 99.6 % at 255.
    assert int((img[..., 0] == 255).sum()) == 129
    assert int((img[..., 0] == 128).sum()) == 257


def test_32bit_float_image_is_refused_naming_the_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"path: '.*f\.tif' is a 'F'-mode image"):
        load_image(tmp_path / "f.tif")


def test_decompression_bomb_names_the_file(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a.png is 40x30 = 1200 > 2 * 100
    with pytest.raises(Image.DecompressionBombError, match=r"path: '.*a\.png' is too large"):
        load_image(IMAGES / "a.png")


def test_json_size_disagreeing_with_the_file_warns_once_and_uses_the_file(tmp_path):
    data = _base()
    data["images"][0].update(width=10, height=10)  # a.png is really 40x30
    ds = CocoDetection(_write(tmp_path, data), IMAGES)
    # Against the JSON's 10x10 the box at x = 20..35.5 lies outside the image.
    assert ds.get_ann_info(0)["bboxes"].shape == (1, 4)
    with pytest.warns(UserWarning) as record:
        item = ds[0]
    assert [str(w.message) for w in record] == [
        f"{ds.ann_file}: image 'a.png' (id 7) is 40x30 (width x height) but the JSON says "
        "10x10; using the image's size"
    ]
    torch.testing.assert_close(
        item["gt_bboxes"], torch.tensor([[2.5, 3.0, 12.5, 15.0], [20.0, 5.0, 35.5, 25.0]])
    )
    assert item["gt_labels"].tolist() == [1, 0]
    assert item["img_meta"]["ori_shape"] == (30, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file: no second warning
        again = ds[0]
        ds[1]  # b.png matches its JSON entry: no warning
    torch.testing.assert_close(again["gt_bboxes"], item["gt_bboxes"])
