"""``labkit.convert.from_mmdet`` against mmdetection 3.3.0's and Co-DETR's own outputs (fixtures).

Each ``tests/fixtures/mmdet/<case>.pt`` (written by ``benchmarks/mmdet_fixtures.py`` with
mmdetection installed, ``co_deformable_detr.pt`` by ``benchmarks/codetr_fixtures.py`` with
Sense-X/Co-DETR's own code on mmdetection 2.25 / mmcv 1.7) holds the model's key names and
shapes, the seed of its stand-in weights, and what that model computed on a seeded input: head
outputs per level (per decoder layer for Deformable-DETR and Co-DETR, plus the two-stage
encoder proposals; for RepPoints the class logits, init and refined points, and pseudo boxes;
for Co-DETR also its auxiliary heads' outputs on the encoder maps) and detections after its own
post-processing. Here the weights are rebuilt with the same ``seeded_state_dict``, converted,
and labkit must compute the same numbers.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from labkit.convert import from_mmdet, mmdet_key_map, seeded_state_dict
from labkit.convert.mmdet_keys import MMDET_RECIPES, RESNET_LAYOUTS
from labkit.detectors.base import padding_mask_of
from labkit.heads.roi_extractor import bbox2roi

FIXTURES = Path(__file__).parent / "fixtures" / "mmdet"
WITH_FIXTURE = sorted(p.stem for p in FIXTURES.glob("*.pt"))
# case -> (with_box_refine, as_two_stage, mixed_selection) of the fixture's model
DETR_SETTINGS = {
    "deformable_detr": (False, False, False),
    "deformable_detr_refine": (True, False, False),
    "deformable_detr_refine_twostage": (True, True, False),
    "co_deformable_detr": (True, True, True),
}
DETR_CASES = [c for c in WITH_FIXTURE if c in DETR_SETTINGS]
DENSE_CASES = [c for c in WITH_FIXTURE if c not in DETR_CASES and c != "faster_rcnn"]
REPPOINTS_CASES = [c for c in WITH_FIXTURE if c.startswith("reppoints")]
RTOL = 1e-4


@functools.cache
def fixture(case: str) -> dict:
    return torch.load(FIXTURES / f"{case}.pt", map_location="cpu", weights_only=True)


def mmdet_state(case: str) -> dict[str, torch.Tensor]:
    """The fixture model's mmdetection state dict, rebuilt from its key names, shapes and seed
    (keys of one shared parameter, ``tied``, hold one tensor as in the saved model)."""
    f = fixture(case)
    shapes = dict(zip(f["keys"], f["shapes"], strict=True))
    return seeded_state_dict(shapes, f["seed"], f.get("tied"))


def inputs(recipe: str) -> tuple[torch.Tensor, dict]:
    f = fixture(recipe)
    img = torch.randn(f["input_shape"], generator=torch.Generator().manual_seed(f["input_seed"]))
    metas = [{k: tuple(v) for k, v in f["img_meta"].items()}]
    return img, {"img": img, "img_metas": metas}


@functools.cache
def converted(case: str) -> torch.nn.Module:
    f = fixture(case)
    return from_mmdet(mmdet_state(case), f.get("recipe", case), **f["from_mmdet_kwargs"])


def assert_levels_close(actual: list, expected: list, name: str) -> None:
    """Per level, relative tolerance ``RTOL`` of the level's largest magnitude."""
    assert len(actual) == len(expected), name
    for level, (a, e) in enumerate(zip(actual, expected, strict=True)):
        atol = RTOL * float(e.abs().max().clamp(min=1.0))
        torch.testing.assert_close(a.float(), e, rtol=RTOL, atol=atol, msg=f"{name}[{level}]")


def assert_detections_close(actual: dict, expected: dict) -> None:
    assert actual["boxes"].shape == expected["boxes"].shape
    torch.testing.assert_close(actual["labels"], expected["labels"])
    # Detections end a whole pipeline (for Faster R-CNN: RPN, RoIAlign, FC layers, softmax, the
    # exp of the size deltas): with torch on two threads the reduction order moves one Faster
    # R-CNN detection by 4e-5 in score and 1.6e-3 px (3.5e-4 relative) in a box corner. The
    # per-level outputs above are where the tight tolerances are.
    torch.testing.assert_close(actual["scores"], expected["scores"], rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(actual["boxes"], expected["boxes"], rtol=1e-3, atol=1e-3)


def test_there_are_fixtures():
    assert {fixture(case)["recipe"] for case in WITH_FIXTURE} == set(MMDET_RECIPES)
    assert DETR_CASES == sorted(DETR_SETTINGS)
    assert REPPOINTS_CASES == ["reppoints", "reppoints_gn_neck_head", "reppoints_minmax_gn_head"]


@pytest.mark.parametrize("recipe", DENSE_CASES)
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


@pytest.mark.parametrize("case", REPPOINTS_CASES)
def test_reppoints_settings_and_pseudo_boxes_equal_mmdet(case):
    # the dense test above compares these outputs per level, and the detections
    f = fixture(case)
    assert list(f["outputs"]) == ["cls_scores", "pts_preds_init", "pts_preds_refine"]
    model = converted(case)
    head = model.head
    settings = {  # case -> (transform, head norm, FPN norm)
        "reppoints": ("moment", None, None),
        "reppoints_gn_neck_head": ("moment", "gn", "gn"),  # the zoo's "gn-neck+head"
        "reppoints_minmax_gn_head": ("minmax", "gn", None),
    }
    assert (head.transform, head.norm, model.neck.norm) == settings[case]
    assert model.recipe[1]["fpn_norm"] == settings[case][2]
    assert head.stacked_convs == 3 and head.strides == [8, 16, 32, 64, 128]
    with torch.no_grad():
        _, _, pts_refine = converted(case)(inputs(case)[0])
        # mmdetection's eval-mode forward returns these instead of the refined points
        pseudo_bboxes = [head.points2bbox(p) for p in pts_refine]
    assert_levels_close(pseudo_bboxes, f["pseudo_bboxes"], "pseudo_bboxes")


def test_reppoints_transform_comes_from_the_checkpoint():
    state = mmdet_state("reppoints_minmax_gn_head")  # minmax: no moment_transfer
    with pytest.raises(
        ValueError,
        match="transform: the checkpoint has no bbox_head.moment_transfer, so its "
        "transform_method is 'minmax' or 'partial_minmax'",
    ):
        from_mmdet(state, "reppoints")
    with pytest.raises(ValueError, match="so it is not 'moment'; pass transform='minmax'"):
        from_mmdet(state, "reppoints", transform="moment")
    with pytest.raises(ValueError, match="norm: the checkpoint has norm='gn', got None"):
        from_mmdet(state, "reppoints", transform="minmax", norm=None)
    # the config text settles it: the fixture's model config, or a config file's text
    meta = {"cfg": fixture("reppoints_minmax_gn_head")["model_cfg"]}
    assert from_mmdet({"meta": meta, "state_dict": state}, "reppoints").head.transform == "minmax"
    meta = {"cfg": "model = dict(bbox_head=dict(transform_method='partial_minmax'))"}
    model = from_mmdet({"meta": meta, "state_dict": state}, "reppoints")
    assert model.head.transform == "partial_minmax"
    with pytest.raises(
        ValueError,
        match="its config has transform_method='minmax' but its state dict has "
        "bbox_head.moment_transfer",
    ):
        meta = {"cfg": "bbox_head=dict(type='RepPointsHead', transform_method='minmax')"}
        from_mmdet({"meta": meta, "state_dict": mmdet_state("reppoints")}, "reppoints")


def refused_reppoints(config: str, only: str = "") -> dict[str, torch.Tensor]:
    """Seeded weights under the keys of shipped mmdetection ``config``, which the ``reppoints``
    fixture lists as changes to its own keys (only those starting with ``only`` applied)."""
    f = fixture("reppoints")
    changes = f["refused"][config]
    shapes = dict(zip(f["keys"], f["shapes"], strict=True))
    for key in changes["removed"]:
        if key.startswith(only):
            del shapes[key]
    shapes |= {k: v for k, v in changes["shapes"].items() if k.startswith(only)}
    return seeded_state_dict(shapes, f["seed"])


def test_unsupported_reppoints_configs_are_refused():
    grid = "reppoints/reppoints-bbox_r50_fpn-gn_head-gn-grid_1x_coco.py"
    with pytest.raises(
        ValueError,
        match=r"checkpoint: its RepPoints head has use_grid_points=True \(the "
        r"'reppoints-bbox-...-grid' configs",
    ):
        from_mmdet(refused_reppoints(grid), "reppoints")
    # ... while that config's GroupNorm FPN (and head) are what labkit computes
    gn_fpn = refused_reppoints(grid, only="neck.")
    assert from_mmdet(gn_fpn, "reppoints").neck.norm == "gn"
    # what no key shows, from the config text (GroupNorm towers under a plain FPN)
    gn_head = {"meta": {"cfg": "norm_cfg = dict(type='GN', num_groups=16, requires_grad=True)"}}
    gn_head["state_dict"] = mmdet_state("reppoints_minmax_gn_head")
    with pytest.raises(
        ValueError, match=r"its RepPoints head has GroupNorm with num_groups=\[16\] in its config"
    ):
        from_mmdet(gn_head, "reppoints", transform="minmax")
    meta = {"cfg": "bbox_head=dict(type='RepPointsHead', center_init=False)"}
    with pytest.raises(ValueError, match="its RepPoints head has center_init=False"):
        from_mmdet({"meta": meta, "state_dict": mmdet_state("reppoints")}, "reppoints")
    meta = {"cfg": "bbox_head=dict(type='RepPointsHead', use_grid_points=True)"}
    with pytest.raises(ValueError, match="its RepPoints head has use_grid_points=True"):
        from_mmdet({"meta": meta, "state_dict": mmdet_state("reppoints")}, "reppoints")


def test_fpn_norm_comes_from_the_checkpoint_and_odd_fpn_norms_are_refused():
    gn = mmdet_state("reppoints_gn_neck_head")
    with pytest.raises(ValueError, match="fpn_norm: the checkpoint has fpn_norm='gn', got None"):
        from_mmdet(gn, "reppoints", fpn_norm=None)
    with pytest.raises(ValueError, match="fpn_norm: the checkpoint has fpn_norm=None, got 'gn'"):
        from_mmdet(mmdet_state("reppoints"), "reppoints", fpn_norm="gn")
    # a GroupNorm of another group count, from the FPN's own config (the head has none)
    neck_only = {k: v for k, v in gn.items() if not re.match(r"bbox_head\.\w+_convs\.\d+\.gn", k)}
    neck_only = neck_only | {
        k.replace(".conv.weight", ".conv.bias"): torch.zeros(v.shape[0])
        for k, v in gn.items()
        if re.match(r"bbox_head\.\w+_convs\.\d+\.conv\.weight", k)
    }
    assert from_mmdet(neck_only, "reppoints").head.norm is None
    meta = {"cfg": "neck=dict(type='FPN', norm_cfg=dict(type='GN', num_groups=8))"}
    with pytest.raises(
        ValueError,
        match=r"its FPN has GroupNorm with num_groups=\[8\] in its config; labkit's FPN has "
        r"no norm or a 32-group GroupNorm after every conv",
    ):
        from_mmdet({"meta": meta, "state_dict": neck_only}, "reppoints")
    # mmdetection's no_norm_on_lateral=True: the laterals keep their bias and have no norm
    lateral_bare = {k: v for k, v in gn.items() if not k.startswith("neck.lateral_convs.")}
    for k, v in gn.items():
        if m := re.match(r"(neck\.lateral_convs\.\d+)\.conv\.weight$", k):
            lateral_bare[k] = v
            lateral_bare[f"{m.group(1)}.conv.bias"] = torch.zeros(v.shape[0])
    with pytest.raises(
        ValueError,
        match=r"its FPN has a norm after some convs only \(3 convs without one: "
        r"neck\.lateral_convs\.0, neck\.lateral_convs\.1, neck\.lateral_convs\.2; "
        r"no_norm_on_lateral=True\?\)",
    ):
        from_mmdet(lateral_bare, "reppoints")
    batch_norm = {k.replace(".gn.", ".bn."): v for k, v in gn.items()}
    with pytest.raises(ValueError, match=r"its FPN has norm layers other than GroupNorm \(8 "):
        from_mmdet(batch_norm, "reppoints")
    # recipes without fpn_norm refuse a GroupNorm FPN by name
    retina = mmdet_state("retinanet")
    for k in [k for k in retina if re.match(r"neck\.\w+_convs\.\d+\.conv\.bias$", k)]:
        channels = retina.pop(k).shape[0]
        retina[k.replace(".conv.bias", ".gn.weight")] = torch.ones(channels)
        retina[k.replace(".conv.bias", ".gn.bias")] = torch.zeros(channels)
    with pytest.raises(
        ValueError,
        match=r"its FPN has GroupNorm layers \(8 modules: neck\.fpn_convs\.0.*'gn-neck' "
        r"configs\); labkit's retinanet recipe has a plain FPN \(fpn_norm='gn' is a reppoints "
        r"setting\)",
    ):
        from_mmdet(retina, "retinanet")


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


@pytest.mark.parametrize("case", DETR_CASES)
def test_deformable_detr_layers_proposals_and_detections_equal_mmdet(case):
    # co_deformable_detr: Co-DETR's query head (mixed selection, look-forward-twice), 20
    # queries, on a 112x144 image padded to 128x160
    f = fixture(case)
    model = converted(case)
    img, batch = inputs(case)
    settings = (model.with_box_refine, model.as_two_stage, model.mixed_selection)
    assert settings == DETR_SETTINGS[case]
    assert model.num_classes == 3 and model.num_queries == 20
    with torch.no_grad():
        out = model(img, padding_mask_of(batch))
    assert set(f["outputs"]) == {"all_cls_scores", "all_bbox_preds"} | (
        {"enc_outputs_class", "enc_outputs_coord"} if model.as_two_stage else set()
    )
    for name, expected in f["outputs"].items():
        if name.startswith("all_"):  # one entry per decoder layer
            assert_levels_close(list(out[name]), list(expected), name)
        else:
            assert_levels_close([out[name]], [expected], name)
    assert_detections_close(model.predict(batch)[0], f["detections"])


def test_deformable_detr_settings_come_from_the_checkpoint():
    state = mmdet_state("deformable_detr_refine")
    with pytest.raises(
        ValueError, match="with_box_refine: the checkpoint's per-layer cls/reg branches differ"
    ):
        from_mmdet(state, "deformable_detr", with_box_refine=False)
    with pytest.raises(ValueError, match="num_queries: the checkpoint has num_queries=20, got 300"):
        from_mmdet(state, "deformable_detr", num_queries=300)
    cfg = {"cfg": "model = dict(type='DeformableDETR', num_queries=20, with_box_refine=True)"}
    model = from_mmdet(
        {"meta": cfg, "state_dict": mmdet_state("deformable_detr_refine_twostage")},
        "deformable_detr",
    )
    assert model.num_queries == 20 and model.with_box_refine and model.as_two_stage
    del state["decoder.layers.5.norms.2.bias"]
    with pytest.raises(ValueError, match=r"decoder\.layers\.5\.norms\.2\.bias"):
        from_mmdet(state, "deformable_detr")


def test_co_deformable_detr_key_map_is_codetrs_state_dict():
    # the fixture lists the state dict of Co-DETR's own model (CoDETR with query_head,
    # rpn_head, roi_head.0, bbox_head.0; mmcv 1.x transformer layers), key for key
    f = fixture("co_deformable_detr")
    key_map = mmdet_key_map("co_deformable_detr")
    assert set(key_map) == set(f["keys"])
    own = converted("co_deformable_detr").state_dict()
    for key, shape in zip(f["keys"], f["shapes"], strict=True):
        assert tuple(own[key_map[key]].shape) == tuple(shape), key


def test_co_deformable_detr_aux_heads_equal_codetr():
    # only training runs them, but the weights they load must compute Co-DETR's function:
    # the extra stride-128 level on the encoder memory, ATSS and the RPN on the five maps,
    # and the RoI head (RoIAlign with finest_scale=112, shared 2-FC) on fixed RoIs that
    # reach all four RoI levels
    f = fixture("co_deformable_detr")
    aux = f["aux_outputs"]
    model = converted("co_deformable_detr")
    img, batch = inputs("co_deformable_detr")
    heads = {head.name: head.head for head in model.aux_heads}
    with torch.no_grad():
        maps = model.memory_maps(model(img, padding_mask_of(batch)))
        atss = heads["atss"](maps)
        rpn = heads["faster_rcnn"].rpn_head(maps)
        cls_score, bbox_pred, _ = heads["faster_rcnn"].roi_head._bbox_forward(
            maps, bbox2roi([aux["rois"]])
        )
    assert_levels_close([maps[-1]], [f["downsample"]], "downsample")
    for name, out in zip(aux["atss"], atss, strict=True):
        assert_levels_close(out, aux["atss"][name], f"atss {name}")
    for name, out in zip(aux["rpn"], rpn, strict=True):
        assert_levels_close(out, aux["rpn"][name], name)
    assert_levels_close([cls_score], [aux["roi"]["cls_score"]], "roi cls_score")
    assert_levels_close([bbox_pred], [aux["roi"]["bbox_pred"]], "roi bbox_pred")


def test_co_deformable_detr_settings_come_from_the_checkpoint():
    state = mmdet_state("co_deformable_detr")
    model = from_mmdet(state, "co_deformable_detr")  # max_per_img: the recipe's 100
    assert model.num_classes == 3 and model.num_queries == 20
    assert [head.name for head in model.aux_heads] == ["faster_rcnn", "atss"]
    own = model.state_dict()
    for mm, lk in mmdet_key_map("co_deformable_detr").items():
        assert torch.equal(own[lk], state[mm].to(own[lk].dtype)), mm
    dets = model.predict(inputs("co_deformable_detr")[1])[0]
    assert dets["boxes"].shape == (60, 4) and torch.isfinite(dets["boxes"]).all()
    with pytest.raises(ValueError, match="num_queries: the checkpoint has num_queries=20, got 300"):
        from_mmdet(state, "co_deformable_detr", num_queries=300)
    # a query head alone (no auxiliary heads) converts too
    plain = {
        k: v
        for k, v in state.items()
        if k.startswith(("backbone.", "neck.", "query_head."))
        and not k.startswith(("query_head.downsample", "query_head.transformer.head_pos"))
        and not any(p in k for p in ("aux_pos_trans", "pos_feats_"))
    }
    assert not len(from_mmdet(plain, "co_deformable_detr").aux_heads)
    shared = dict(state)
    for key in [k for k in state if k.startswith("query_head.cls_branches.")]:
        shared[key] = state["query_head.cls_branches.0." + key.rsplit(".", 1)[1]]
    for key in [k for k in state if k.startswith("query_head.reg_branches.")]:
        shared[key] = state["query_head.reg_branches.0." + key.split(".", 3)[3]]
    with pytest.raises(ValueError, match="shares one prediction branch"):
        from_mmdet(shared, "co_deformable_detr")


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
@pytest.mark.parametrize("two_stage", [False, True])
def test_key_maps_are_one_to_one(recipe, depth, two_stage):
    key_map = mmdet_key_map(recipe, depth=depth, two_stage=two_stage)
    assert len(set(key_map.values())) == len(key_map)


def test_resnet101_key_map_fills_the_labkit_model():
    from labkit.recipes import build_model

    own = build_model("faster_rcnn", 3, backbone="resnet101").state_dict()
    assert set(mmdet_key_map("faster_rcnn", depth=101).values()) == set(own)


@pytest.mark.parametrize("transform", ["moment", "minmax", "partial_minmax"])
@pytest.mark.parametrize("norm", [None, "gn"])
@pytest.mark.parametrize("fpn_norm", [None, "gn"])
def test_reppoints_key_maps_fill_the_labkit_model(norm, transform, fpn_norm):
    from labkit.recipes import build_model

    model = build_model(
        "reppoints", 3, backbone="resnet18", norm=norm, transform=transform, fpn_norm=fpn_norm
    )
    key_map = mmdet_key_map(
        "reppoints", depth=18, stacked_convs=3, norm=norm, transform=transform, fpn_norm=fpn_norm
    )
    assert set(key_map.values()) == set(model.state_dict())
    with pytest.raises(ValueError, match="norm: expected None or 'gn', got 'bn'"):
        mmdet_key_map("reppoints", norm="bn")
    with pytest.raises(ValueError, match="fpn_norm: expected None or 'gn', got 'bn'"):
        mmdet_key_map("reppoints", fpn_norm="bn")


def test_labkit_eval_runs_on_an_mmdet_checkpoint(tmp_path, capsys):
    import json

    from labkit.cli import main
    from labkit.recipes import build_model

    # an mmdetection-format RetinaNet (ResNet-18, the 5 shapes classes): seeded weights under
    # mmdetection's key names, shapes from a labkit model through the inverse map
    own = build_model("retinanet", 5, backbone="resnet18").state_dict()
    key_map = mmdet_key_map("retinanet", depth=18)
    state = seeded_state_dict({mm: own[lk].shape for mm, lk in key_map.items()}, seed=0)
    path, metrics = tmp_path / "retinanet_r18_shapes.pth", tmp_path / "metrics.json"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": state}, path)
    argv = ["eval", "--checkpoint", str(path), "--mmdet", "retinanet", "--data", "shapes"]
    argv += ["--image-size", "128", "--no-progress", "--device", "cpu", "--output", str(metrics)]
    assert main(argv) == 0
    header = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["AP", "AP50", "AP75"] for line in header)
    assert 0.0 <= json.loads(metrics.read_text())["AP"] <= 1.0
    with pytest.raises(SystemExit, match="--mmdet needs --data"):
        main(argv[:5] + ["--no-progress"])
    with pytest.raises(SystemExit, match="has 5 classes"):
        torch.save({"meta": {}, "state_dict": mmdet_state("retinanet")}, path)  # 3 classes
        main(argv)
