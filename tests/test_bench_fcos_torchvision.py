"""benchmarks.bench_fcos_torchvision: torchvision's FCOS behind labkit's detector interface."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.bench_fcos_torchvision import LOSS_NAMES, build_models, main
from labkit.data import collate, shapes_dataset, test_transforms


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(scale_factor: float, size: int = 64) -> dict:
    torch.manual_seed(1)
    sf = (scale_factor,) * 4
    metas = [
        {"img_shape": (size, size), "pad_shape": (size, size), "scale_factor": sf},
        {"img_shape": (size, size - 16), "pad_shape": (size, size), "scale_factor": sf},
    ]
    return {"img": torch.randn(2, 3, size, size), "img_metas": metas}


def test_backbone_and_fpn_start_identical_but_not_shared():
    models = build_models(seed=0, image_size=64)
    lab, tv = models["labkit"], models["torchvision"]
    for part in ("backbone", "neck"):
        a, b = getattr(lab, part).state_dict(), getattr(tv, part).state_dict()
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}.{key}"
    lab_params = {id(p) for p in lab.parameters()}
    assert not any(id(p) in lab_params for p in tv.parameters()), "parameters must be copies"


def test_copied_head_gives_labkit_head_outputs_at_init():
    models = build_models(seed=0, image_size=64)
    lab, tv = models["labkit"], models["torchvision"]
    img = _batch(1.0)["img"]
    with torch.no_grad():
        cls_scores, bbox_preds, centernesses = lab(img)  # train mode: distances / stride
        out = tv.model.head(list(tv.model.backbone(img).values()))
    flat = [
        torch.cat([x.flatten(2).transpose(1, 2) for x in xs], 1)
        for xs in (cls_scores, bbox_preds, centernesses)
    ]
    torch.testing.assert_close(out["cls_logits"], flat[0])
    torch.testing.assert_close(out["bbox_regression"], flat[1])
    torch.testing.assert_close(out["bbox_ctrness"], flat[2])


def test_transform_leaves_images_and_boxes_unchanged():
    items = [shapes_dataset("train", transforms=test_transforms((64, 64)))[i] for i in range(2)]
    batch = collate(items)
    tv = build_models(seed=0, image_size=64)["torchvision"]
    images = tv.images_of(batch)
    targets = tv.targets_of(batch)
    tv.model.train()
    image_list, out_targets = tv.model.transform(images, [dict(t) for t in targets])
    assert torch.equal(image_list.tensors, batch["img"])
    assert image_list.image_sizes == [tuple(m["img_shape"]) for m in batch["img_metas"]]
    for t, o, boxes in zip(targets, out_targets, batch["gt_bboxes"], strict=True):
        assert torch.equal(o["boxes"], boxes) and torch.equal(o["labels"], t["labels"])
    dets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]])}]
    back = tv.model.transform.postprocess(dets, [(64, 64)], [(64, 64)])
    assert torch.equal(back[0]["boxes"], dets[0]["boxes"])


def test_loss_names_and_finite_values():
    items = [shapes_dataset("train", transforms=test_transforms((64, 64)))[i] for i in range(2)]
    tv = build_models(seed=0, image_size=64)["torchvision"]
    tv.eval()  # loss() must still return losses
    losses = tv.loss(collate(items))
    assert set(losses) == set(LOSS_NAMES.values())
    assert all(torch.isfinite(v) for v in losses.values())
    assert not tv.model.training  # mode restored


def test_torchvision_predictions_in_labkit_format_and_rescaled():
    tv = build_models(seed=0, image_size=64)["torchvision"].eval()
    tv.model.score_thresh = 0.0  # an untrained model: keep every candidate
    one = tv.predict(_batch(1.0), rescale=True)
    two = tv.predict(_batch(2.0), rescale=True)
    raw = tv.predict(_batch(2.0), rescale=False)
    assert len(one) == len(two) == 2
    for p1, p2, p_raw in zip(one, two, raw, strict=True):
        assert set(p1) == {"boxes", "scores", "labels"}
        k = p1["boxes"].shape[0]
        assert k > 0 and p1["boxes"].shape == (k, 4) and p1["scores"].shape == (k,)
        assert p1["labels"].dtype == torch.long and int(p1["labels"].max()) < 5
        torch.testing.assert_close(p2["boxes"], p1["boxes"] / 2)
        torch.testing.assert_close(p_raw["boxes"], p1["boxes"])
        torch.testing.assert_close(p2["scores"], p1["scores"])
        assert torch.equal(p2["labels"], p1["labels"])
    # boxes stay inside each image's own img_shape (the second image is 48 px wide)
    assert float(one[1]["boxes"][:, [0, 2]].max()) <= 48


def test_quick_run_prints_both_rows(capsys, tmp_path):
    out = tmp_path / "fcos.json"
    result = main(["--quick", "--threads", "1", "--output", str(out)])
    names = [row["implementation"] for row in result["rows"]]
    assert names == ["labkit", "torchvision"]
    for row in result["rows"]:
        for key in ("AP", "AP50"):
            assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (row["implementation"], key)
        assert row["steps"] == 2
    printed = capsys.readouterr().out
    assert "| labkit |" in printed and "| torchvision |" in printed
    assert "AP(labkit) / AP(torchvision)" in printed
    assert out.exists()


def test_variants_start_from_the_same_weights_and_differ_only_in_use():
    from benchmarks.bench_fcos_torchvision import build_models

    models = build_models(0, 64, variants=("all_three",))
    base, variant = models["labkit"], models["labkit+all_three"]
    for (name, a), (_, b) in zip(
        base.state_dict().items(), variant.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    head = variant.head
    assert head.bbox_loss_weight == "uniform" and head.prior_generator.offset == 0.0
    assert not any(p.requires_grad for p in head.scales.parameters())
