"""``labkit.lessons.trained``: the lessons' analyses on a user's own checkpoint and COCO data.

The end-to-end tests write what a user brings, on small local files: mmdetection-format
ResNet-50 ATSS, PAA and FCOS checkpoints (seeded stand-in weights under mmdetection's key
names, ``meta`` with the config text and 80 class names) and a COCO-format dataset of three
PNGs whose JSON lists 80 categories; then they run the functions notebooks 01-03 run.
"""

from __future__ import annotations

import json

import pytest
import torch

from labkit.convert import mmdet_key_map, seeded_state_dict
from labkit.data import SHAPES_CLASSES, collate, make_shapes
from labkit.lessons import trained
from labkit.lessons.trained import (
    analysis_dataset,
    analysis_sample,
    describe_trained,
    trained_model,
)
from labkit.recipes import build_model

NUM_CLASSES = 80
CLASSES = [*SHAPES_CLASSES, *(f"thing{i}" for i in range(NUM_CLASSES - len(SHAPES_CLASSES)))]
HEADS = {"atss": "ATSSHead", "paa": "PAAHead", "fcos": "FCOSHead"}
IMAGE = 128  # px, the exported images; the analyses resize them to mmdetection's 800 x 800


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Three shapes images exported as COCO (``make_shapes``), the JSON widened to 80
    categories (the shapes ids 1-5 first, as their annotations use) -> the ``data`` spec."""
    root = tmp_path_factory.mktemp("coco")
    make_shapes(root, num_train=0, num_val=3, image_size=IMAGE)
    ann = json.loads((root / "instances_val.json").read_text())
    ann["categories"] = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    (root / "annotations.json").write_text(json.dumps(ann))
    return f"{root / 'annotations.json'}:{root}", ann


def write_mmdet(path, recipe: str, depth: int = 50, classes=CLASSES, cfg: str | None = None):
    """An mmdetection 3.x checkpoint file of ``recipe`` (ResNet-``depth``): seeded weights under
    mmdetection's names, the class names in ``meta.dataset_meta``, the config text in
    ``meta.cfg``. Returns the mmdetection state dict."""
    own = build_model(recipe, len(classes), backbone=f"resnet{depth}").state_dict()
    key_map = mmdet_key_map(recipe, depth=depth)
    state = seeded_state_dict({mm: own[lk].shape for mm, lk in key_map.items()}, seed=0)
    head = f"bbox_head=dict(type='{HEADS[recipe]}', num_classes={len(classes)}"
    if recipe == "fcos":
        head += ", norm_on_bbox=True, centerness_on_reg=True"
    meta = {
        "mmdet_version": "3.3.0",
        "dataset_meta": {"classes": tuple(classes)},
        "cfg": f"model = dict(backbone=dict(type='ResNet', depth={depth}), {head}))",
    }
    if cfg is not None:  # "" for a checkpoint without config text
        meta["cfg"] = cfg
    torch.save({"meta": meta, "state_dict": state}, path)
    return state


@pytest.fixture(scope="module")
def mmdet_r50(tmp_path_factory):
    """``recipe -> (path, state)`` for ResNet-50 ATSS, PAA and FCOS, written on first use."""
    root, made = tmp_path_factory.mktemp("mmdet"), {}

    def get(recipe: str):
        if recipe not in made:
            path = root / f"{recipe}_r50_fpn_1x_coco.pth"
            made[recipe] = (str(path), write_mmdet(path, recipe))
        return made[recipe]

    return get


def assert_weights_are(model, state: dict, recipe: str, depth: int = 50) -> None:
    own = model.state_dict()
    key_map = mmdet_key_map(recipe, depth=depth)
    assert len(own) == len(state)
    for mm, lk in key_map.items():
        assert torch.equal(own[lk], state[mm]), mm


# ---------------------------------------------------------------------------------------------
# Default mode: exactly what the notebooks loaded before.


def test_default_is_the_zoo_model_on_the_shapes_val_split():
    from labkit import zoo
    from labkit.data import shapes_dataset, shapes_sample, test_transforms

    model = trained_model("paa")
    reference = zoo.load("paa", seed=0)
    assert not model.training
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, reference.state_dict()[k]) for k, a in model.state_dict().items())
    val = analysis_dataset("fcos")
    assert len(val) == 64 and val.classes == list(SHAPES_CLASSES)
    assert torch.equal(val[5]["img"], shapes_dataset("val", transforms=test_transforms())[5]["img"])
    sample = analysis_sample("paa", index=3)
    assert torch.equal(sample.item["img"], shapes_sample(seed=3)["img"])
    assert sample.batch["img"].shape == (1, 3, 512, 512) and sample.classes == list(SHAPES_CLASSES)
    assert sample.name == "shapes sample 3"
    assert describe_trained("paa") == (
        f"zoo paa seed 0: {zoo.manifest_row('paa', 0)['AP']:.3f} COCO AP on shapes val"
    )


# ---------------------------------------------------------------------------------------------
# Errors that name the argument.


def test_a_missing_file_names_the_argument_and_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=rf"^checkpoint: no file at 'x\.pth' \(relative to {tmp_path}\)"
    ):
        trained_model("paa", checkpoint="x.pth")
    with pytest.raises(FileNotFoundError, match=r"^data: no annotation file at 'val\.json'"):
        analysis_dataset("paa", "val.json")
    with pytest.raises(ValueError, match=r"^data: expected 'shapes', 'trees' or PATH\.json"):
        analysis_dataset("paa", "val.txt")
    with pytest.raises(ValueError, match=r"^zoo_name: expected one of"):
        trained_model("yolo")


def test_another_recipes_checkpoint_is_refused(tmp_path):
    # mmdetection FCOS for PAA's analysis: the keys tell
    fcos = tmp_path / "fcos_r18.pth"
    write_mmdet(fcos, "fcos", depth=18, classes=SHAPES_CLASSES)
    with pytest.raises(ValueError, match=r"^checkpoint: its config builds mmdetection's FCOSHead"):
        trained_model("paa", checkpoint=fcos)
    write_mmdet(fcos, "fcos", depth=18, classes=SHAPES_CLASSES, cfg="")  # no config text
    with pytest.raises(
        ValueError,
        match=r"^checkpoint: its keys look like mmdetection's fcos, but this analysis needs 'paa' "
        r"\(the zoo's 'paa'\)$",
    ):
        trained_model("paa", checkpoint=fcos)
    with pytest.raises(ValueError, match=r"^checkpoint: no 'bbox_head\.atss_cls\.weight', so not "):
        trained.load_mmdet_model(fcos, "paa")  # labkit eval --mmdet paa: the conversion says
    # mmdetection ATSS for PAA's: the same key names, so only the config text tells
    atss = tmp_path / "atss_r18.pth"
    write_mmdet(atss, "atss", depth=18, classes=SHAPES_CLASSES)
    with pytest.raises(
        ValueError,
        match=r"^checkpoint: its config builds mmdetection's ATSSHead \(labkit's 'atss'\), not "
        r"the PAAHead of 'paa'$",
    ):
        trained_model("paa", checkpoint=atss)
    write_mmdet(atss, "atss", depth=18, classes=SHAPES_CLASSES, cfg="{'type': 'ATSSHead'}")
    with pytest.raises(ValueError, match=r"builds mmdetection's ATSSHead"):  # a dict's repr
        trained_model("paa", checkpoint=atss)
    # a labkit checkpoint of another recipe (the zoo's FCOS)
    from labkit import zoo

    zoo_fcos = zoo.zoo_dir() / zoo.manifest_row("fcos", 0)["file"]
    with pytest.raises(
        ValueError, match=r"holds a labkit 'fcos' model, but this analysis needs 'paa'"
    ):
        trained_model("paa", checkpoint=zoo_fcos)
    with pytest.raises(ValueError, match=r"holds a labkit 'fcos' model"):
        analysis_sample("paa", checkpoint=zoo_fcos)


def test_an_mmdet_checkpoint_needs_data_with_its_classes(tmp_path, coco):
    spec, _ = coco
    path = tmp_path / "fcos_r18.pth"
    write_mmdet(path, "fcos", depth=18, classes=SHAPES_CLASSES)
    with pytest.raises(ValueError, match=r"^data: an mmdetection checkpoint names no data"):
        analysis_dataset("fcos", checkpoint=path)
    with pytest.raises(
        ValueError, match=r"^data: .* has 80 classes .* but the checkpoint's model predicts 5"
    ):
        analysis_dataset("fcos", spec, checkpoint=path)
    # the zoo's shapes model on 80-class data: refused the same way
    with pytest.raises(ValueError, match=r"^data: .* has 80 classes"):
        analysis_dataset("fcos", spec)


def test_a_labkit_checkpoint_brings_its_own_data(tmp_path, coco):
    from labkit.data import make_shapes
    from labkit.engine.checkpoint import save_checkpoint

    root = tmp_path / "shapes"
    make_shapes(root, num_train=0, num_val=2, image_size=IMAGE)
    model = build_model("paa", len(SHAPES_CLASSES), backbone="tiny")
    recipe = {
        "name": "paa",
        "kwargs": {"num_classes": len(SHAPES_CLASSES), "backbone": "tiny"},
        "data": f"{root / 'instances_val.json'}:{root}",
        "image_size": [96, 96],
        "classes": list(SHAPES_CLASSES),
    }
    path = save_checkpoint(tmp_path / "paa.pth", {"model": model.state_dict(), "recipe": recipe})
    loaded = trained_model("paa", checkpoint=path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    val = analysis_dataset("paa", checkpoint=path)  # no data: the checkpoint's
    assert len(val) == 2 and val[0]["img"].shape == (3, 96, 96)
    sample = analysis_sample("paa", checkpoint=path, index=1)
    assert sample.item["img"].shape == (3, 96, 96) and sample.item["img"].max() > 1.0  # 0-255
    assert torch.equal(sample.item["gt_bboxes"], sample.batch["gt_bboxes"][0])
    assert describe_trained("paa", path) == "paa.pth: a labkit checkpoint as labkit's 'paa'"
    with pytest.raises(ValueError, match=r"^data: .* has 80 classes"):
        analysis_dataset("paa", coco[0], checkpoint=path)
    bare = save_checkpoint(tmp_path / "bare.pth", {"model": model.state_dict()})
    with pytest.raises(ValueError, match=r"^checkpoint: .*bare\.pth stores no model recipe"):
        trained_model("paa", checkpoint=bare)


def test_the_deformable_attention_analysis_takes_either_detr_recipe(tmp_path):
    """Notebook 04 reads the decoder of any Deformable-DETR: the zoo's entry is Co-DETR's model
    without auxiliary heads, a user's may be mmdetection's plain Deformable-DETR."""
    from labkit.engine.checkpoint import save_checkpoint
    from labkit.lessons.trained import untrained_like

    kwargs = {"num_classes": len(SHAPES_CLASSES), "backbone": "tiny", "num_queries": 10}
    model = build_model("deformable_detr", **kwargs)
    recipe = {"name": "deformable_detr", "kwargs": kwargs, "classes": list(SHAPES_CLASSES)}
    path = save_checkpoint(tmp_path / "ddetr.pth", {"model": model.state_dict(), "recipe": recipe})
    loaded = trained_model("deformable_detr", checkpoint=path)
    assert loaded.recipe[0] == "deformable_detr"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    fresh = untrained_like(loaded, seed=3)
    assert fresh.recipe == loaded.recipe and not fresh.training
    assert fresh.state_dict().keys() == loaded.state_dict().keys()
    assert any(not torch.equal(v, loaded.state_dict()[k]) for k, v in fresh.state_dict().items())
    # an mmdetection checkpoint is told by its keys (read before any weight is converted)
    plain = {"state_dict": {"bbox_head.cls_branches.0.weight": torch.zeros(1)}}
    torch.save(plain, tmp_path / "mm_ddetr.pth")
    assert trained.checkpoint_recipe("deformable_detr", tmp_path / "mm_ddetr.pth")["name"] == (
        "deformable_detr"
    )
    co = {"state_dict": {"query_head.cls_branches.0.weight": torch.zeros(1)}}
    torch.save(co, tmp_path / "mm_codetr.pth")
    info = trained.checkpoint_recipe("deformable_detr", tmp_path / "mm_codetr.pth")
    assert (info["name"], info["format"]) == ("co_deformable_detr", "mmdet")
    # but not a dense detector
    with pytest.raises(ValueError, match=r"keys look like mmdetection's fcos, but this analysis"):
        torch.save({"state_dict": {"bbox_head.conv_centerness.weight": torch.zeros(1)}},
                   tmp_path / "mm_fcos.pth")  # fmt: skip
        trained.checkpoint_recipe("deformable_detr", tmp_path / "mm_fcos.pth")


# ---------------------------------------------------------------------------------------------
# End to end: ResNet-50 mmdetection checkpoints, 80-class COCO data, the notebooks' analyses.


@pytest.mark.slow
def test_notebook_01_pipeline_on_an_mmdet_atss(coco, mmdet_r50):
    import matplotlib.pyplot as plt

    from labkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from labkit.lessons.pipeline import trace_pipeline
    from labkit.viz.pipeline import plot_pipeline

    spec, ann = coco
    path, state = mmdet_r50("atss")
    model = trained_model("atss", checkpoint=path)
    assert_weights_are(model, state, "atss")
    assert model.num_classes == NUM_CLASSES and not model.training
    val = analysis_dataset("atss", spec, checkpoint=path)
    assert len(val) == 3 and val.classes == CLASSES
    item = val[min(5, len(val) - 1)]  # the notebook's pick
    assert item["img"].shape == (3, 800, 800)  # 128 px scaled to mmdetection's 800 short edge
    trace = trace_pipeline(model, collate([item]))
    # one anchor per location on 800 x 800: 100^2 + 50^2 + 25^2 + 13^2 + 7^2
    assert len(trace.anchors) == 13343 and trace.num_level_anchors == [10000, 2500, 625, 169, 49]
    assert [o.shape for o in trace.objectness] == [(100, 100), (50, 50), (25, 25), (13, 13), (7, 7)]
    assert [f.shape[0] for f in trace.fpn] == [256] * 5
    assert trace.gt_bboxes.shape[0] == sum(a["image_id"] == 3 for a in ann["annotations"])
    assert bool((trace.after_nms["labels"] < NUM_CLASSES).all())
    fig = plot_pipeline(trace, val.classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    plt.close("all")
    assert fig is not None


@pytest.mark.slow
def test_notebook_02_paa_candidates_on_an_mmdet_paa(coco, mmdet_r50):
    from labkit.assigners.paa import paa_select

    spec, ann = coco
    path, state = mmdet_r50("paa")
    sample = analysis_sample("paa", spec, checkpoint=path, index=0)
    item, batch = sample.item, sample.batch
    assert sample.classes == CLASSES and sample.name == "image 0: val/000000.png"
    assert item["img"].shape == (3, 800, 800) and float(item["img"].max()) > 1.0  # 0-255, drawable
    assert batch["img"].shape == (1, 3, 800, 800)
    boxes = torch.tensor([a["bbox"] for a in ann["annotations"] if a["image_id"] == 1])
    boxes[:, 2:] += boxes[:, :2]
    torch.testing.assert_close(item["gt_bboxes"], boxes * 800 / IMAGE)
    assert torch.equal(item["gt_bboxes"], batch["gt_bboxes"][0])
    model = trained_model("paa", checkpoint=path)
    assert_weights_are(model, state, "paa")
    assert describe_trained("paa", path) == (
        "paa_r50_fpn_1x_coco.pth: an mmdetection checkpoint as labkit's 'paa'"
    )
    with torch.no_grad():  # notebook 02, section 5
        outs = model(batch["img"])
        cand = model.head.candidate_losses(
            *outs,
            batch_gt_bboxes=[item["gt_bboxes"]],
            batch_gt_labels=[item["gt_labels"]],
            batch_img_metas=batch["img_metas"],
        )[0]
    assert len(cand.anchors) == 13343 and len(cand.pos_inds) > 0
    assert cand.pos_losses.shape == cand.pos_inds.shape == cand.pos_gt_inds.shape
    selection = paa_select(cand.pos_losses, cand.pos_inds, cand.pos_gt_inds, cand.num_level_anchors)
    assert selection.keep.shape[0] == len(boxes)
    assert 0 < int(selection.keep.sum()) <= len(cand.pos_inds)


@pytest.mark.slow
def test_notebook_03_centerness_on_an_mmdet_fcos(coco, mmdet_r50):
    from labkit.lessons.fcos_analysis import centerness_pairs

    spec, ann = coco
    path, state = mmdet_r50("fcos")
    model = trained_model("fcos", checkpoint=path)
    assert_weights_are(model, state, "fcos")
    val = analysis_dataset("fcos", spec, checkpoint=path)
    batch = collate([val[i] for i in range(min(8, len(val)))])  # the notebook's pick
    assert batch["img"].shape == (3, 3, 800, 800)
    pairs = centerness_pairs(model, batch)
    num = len(pairs["target"])
    assert num > 0 and all(v.shape == (num,) for v in pairs.values())
    assert 0 <= float(pairs["target"].min()) and float(pairs["target"].max()) <= 1
    assert 0 < float(pairs["predicted"].min()) and float(pairs["predicted"].max()) < 1
    assert set(pairs["level"].tolist()) <= set(range(5))


def test_the_trained_model_notebooks_take_checkpoint_and_data():
    """The parameters cell defines both as None and the analysis cells pass them on."""
    import ast
    from pathlib import Path

    import nbformat

    for name, zoo_name in (
        ("01", "atss"),
        ("02", "paa"),
        ("03", "fcos"),
        ("04", "deformable_detr"),
        ("06", "co_deformable_detr"),
    ):
        (path,) = (Path(__file__).parent.parent / "notebooks").glob(f"{name}_*.ipynb")
        book = nbformat.read(path, as_version=4)
        params = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
        assigned = {
            s.targets[0].id: ast.literal_eval(s.value) for s in ast.parse(params.source).body
        }
        assert assigned["checkpoint"] is None and assigned["data"] is None, path.name
        code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
        assert f'trained_model("{zoo_name}", checkpoint=checkpoint' in code, path.name
        assert ", data, checkpoint=checkpoint" in code, path.name
        if name != "06":  # 06 also probes the three zoo DETRs side by side
            assert "zoo.load(" not in code, path.name


def test_labkit_eval_shares_the_loading():
    from labkit.data import spec
    from labkit.engine import cli

    assert cli.build_dataset is trained.build_dataset is spec.build_dataset
    assert cli.check_classes is trained.check_classes is spec.check_classes
    assert cli.labkit_checkpoint is trained.labkit_checkpoint
