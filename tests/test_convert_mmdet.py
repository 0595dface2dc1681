"""``labkit.convert.from_mmdet`` against mmdetection 3.3.0's own outputs (stored fixtures).

Each ``tests/fixtures/mmdet/<recipe>.pt`` (written by ``benchmarks/mmdet_fixtures.py`` with
mmdetection installed) holds an mmdetection model's key names and shapes, the seed of its
stand-in weights, and what that model computed on a seeded input: head outputs per level and
detections after its own post-processing. Here the weights are rebuilt with the same
``seeded_state_dict``, converted, and labkit must compute the same numbers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from labkit.convert import from_mmdet, mmdet_key_map, seeded_state_dict
from labkit.convert.mmdet_keys import MMDET_RECIPES, RESNET_LAYOUTS
from labkit.heads.roi_extractor import bbox2roi

FIXTURES = Path(__file__).parent / "fixtures" / "mmdet"
WITH_FIXTURE = sorted(p.stem for p in FIXTURES.glob("*.pt"))
RTOL = 1e-4


@functools.cache
def fixture(recipe: str) -> dict:
    return torch.load(FIXTURES / f"{recipe}.pt", map_location="cpu", weights_only=True)


def mmdet_state(recipe: str) -> dict[str, torch.Tensor]:
    """The fixture model's mmdetection state dict, rebuilt from its key names, shapes and seed."""
    f = fixture(recipe)
    return seeded_state_dict(dict(zip(f["keys"], f["shapes"], strict=True)), f["seed"])


def inputs(recipe: str) -> tuple[torch.Tensor, dict]:
    f = fixture(recipe)
    img = torch.randn(f["input_shape"], generator=torch.Generator().manual_seed(f["input_seed"]))
    metas = [{k: tuple(v) for k, v in f["img_meta"].items()}]
    return img, {"img": img, "img_metas": metas}


@functools.cache
def converted(recipe: str) -> torch.nn.Module:
    return from_mmdet(mmdet_state(recipe), recipe, **fixture(recipe)["from_mmdet_kwargs"])


def assert_levels_close(actual: list, expected: list, name: str) -> None:
    """Per level, relative tolerance ``RTOL`` of the level's largest magnitude."""
    assert len(actual) == len(expected), name
    for level, (a, e) in enumerate(zip(actual, expected, strict=True)):
        atol = RTOL * float(e.abs().max().clamp(min=1.0))
        torch.testing.assert_close(a.float(), e, rtol=RTOL, atol=atol, msg=f"{name}[{level}]")


def assert_detections_close(actual: dict, expected: dict) -> None:
    assert actual["boxes"].shape == expected["boxes"].shape
    torch.testing.assert_close(actual["labels"], expected["labels"])
    torch.testing.assert_close(actual["scores"], expected["scores"], rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(actual["boxes"], expected["boxes"], rtol=RTOL, atol=1e-3)


def test_there_are_fixtures():
    assert set(WITH_FIXTURE) == set(MMDET_RECIPES)


@pytest.mark.parametrize("recipe", [r for r in WITH_FIXTURE if r != "faster_rcnn"])
def test_dense_head_outputs_and_detections_equal_mmdet(recipe):
    f = fixture(recipe)
    model = converted(recipe)
    img, batch = inputs(recipe)
    assert model.num_classes == 3
    with torch.no_grad():
        outs = model(img)
    assert len(outs) == len(f["outputs"])
    for name, out in zip(f["outputs"], outs, strict=True):
        assert_levels_close(out, f["outputs"][name], name)
    assert_detections_close(model.predict(batch)[0], f["detections"])


def test_faster_rcnn_outputs_and_detections_equal_mmdet():
    f = fixture("faster_rcnn")
    model = converted("faster_rcnn")
    img, batch = inputs("faster_rcnn")
    head = model.head
    with torch.no_grad():
        feats = model.extract_feat(img)
        rpn_cls, rpn_reg = head.rpn_head(feats)
        proposals = head.rpn_head.predict(feats, batch["img_metas"])[0]
        # the RoI head on mmdetection's own proposals, so its check does not hang on the RPN's
        rois = bbox2roi([f["proposals"]["boxes"]])
        cls_score, bbox_pred, _ = head.roi_head._bbox_forward(feats, rois)
    assert_levels_close(rpn_cls, f["outputs"]["rpn_cls_scores"], "rpn_cls_scores")
    assert_levels_close(rpn_reg, f["outputs"]["rpn_bbox_preds"], "rpn_bbox_preds")
    assert proposals["boxes"].shape == f["proposals"]["boxes"].shape
    torch.testing.assert_close(proposals["boxes"], f["proposals"]["boxes"], rtol=RTOL, atol=1e-3)
    torch.testing.assert_close(proposals["scores"], f["proposals"]["scores"], rtol=RTOL, atol=1e-5)
    assert_levels_close([cls_score], [f["roi_outputs"]["cls_score"]], "roi cls_score")
    assert_levels_close([bbox_pred], [f["roi_outputs"]["bbox_pred"]], "roi bbox_pred")
    assert_detections_close(model.predict(batch)[0], f["detections"])


def test_loads_an_mmdet_checkpoint_file(tmp_path):
    path = tmp_path / "atss.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": mmdet_state("atss")}, path)
    model = from_mmdet(path, "atss")
    expected = converted("atss").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not model.training


def test_a_missing_key_is_named():
    state = mmdet_state("retinanet")
    del state["neck.fpn_convs.0.conv.bias"]
    with pytest.raises(
        ValueError,
        match=r"checkpoint: 1 labkit key left unfilled: neck\.fpn_convs\.0\.bias \(mmdet neck\.fpn_convs\.0\.conv\.bias\)",
    ):
        from_mmdet(state, "retinanet")


def test_an_extra_key_is_named():
    state = mmdet_state("retinanet")
    state["bbox_head.extra_conv.weight"] = torch.zeros(1)
    state["backbone.layer2.0.conv2.conv_offset.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"checkpoint: 2 keys not mapped: bbox_head\.extra_conv\.weight, backbone\.layer2\.0\.conv2\.conv_offset\.weight \(deformable",
    ):
        from_mmdet(state, "retinanet")


def test_a_shape_mismatch_and_a_wrong_class_count_are_named():
    state = mmdet_state("retinanet")
    state["neck.fpn_convs.0.conv.bias"] = torch.zeros(3)
    with pytest.raises(
        ValueError, match=r"1 key of another shape: neck\.fpn_convs\.0\.conv\.bias \(3,\)"
    ):
        from_mmdet(state, "retinanet")
    with pytest.raises(
        ValueError, match="num_classes: the checkpoint's classifier has 3 classes, got 5"
    ):
        from_mmdet(mmdet_state("retinanet"), "retinanet", num_classes=5)


def test_what_keys_cannot_show_is_refused_from_the_config():
    state = {"bbox_head.conv_cls.weight": torch.zeros(3, 256, 3, 3)}
    caffe = {"meta": {"cfg": "model = dict(backbone=dict(type='ResNet', style='caffe'))"}}
    with pytest.raises(ValueError, match="checkpoint: its config uses a caffe-style ResNet"):
        from_mmdet({**caffe, "state_dict": state}, "fcos")
    plain = {"meta": {"cfg": "bbox_head=dict(type='FCOSHead', centerness_on_reg=True)"}}
    with pytest.raises(
        ValueError, match="norm_on_bbox: the checkpoint's config has norm_on_bbox=False"
    ):
        from_mmdet({**plain, "state_dict": state}, "fcos")


@pytest.mark.parametrize("recipe", MMDET_RECIPES)
@pytest.mark.parametrize("depth", sorted(RESNET_LAYOUTS))
def test_key_maps_are_one_to_one(recipe, depth):
    key_map = mmdet_key_map(recipe, depth=depth)
    assert len(set(key_map.values())) == len(key_map)


def test_resnet101_key_map_fills_the_labkit_model():
    from labkit.recipes import build_model

    own = build_model("faster_rcnn", 3, backbone="resnet101").state_dict()
    assert set(mmdet_key_map("faster_rcnn", depth=101).values()) == set(own)
