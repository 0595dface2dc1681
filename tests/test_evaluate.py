"""COCO evaluation: perfect and hand-derived APs, empty results, label -> category-id mapping."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.engine.evaluate import coco_evaluate, evaluate, format_table, results_to_coco

IMG = [{"id": 1, "file_name": "a.png", "height": 300, "width": 300}]
ONE_CLASS = [{"id": 1, "name": "thing"}]


def _gt_results(ds, score=1.0):
    """Every ground-truth box returned as a detection of its own class."""
    label_of = {c: k for k, c in enumerate(ds.cat_ids)}
    out = []
    for image_id in ds.coco.getImgIds():
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[image_id]))
        boxes = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ]
        out.append(
            {
                "image_id": image_id,
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.full((len(anns),), score),
                "labels": torch.tensor(
                    [label_of[a["category_id"]] for a in anns], dtype=torch.long
                ),
            }
        )
    return out


def test_perfect_detections_give_ap_one(tiny_coco):
    m = coco_evaluate(_gt_results(tiny_coco), tiny_coco)
    for key in ("AP", "AP50", "AP75", "AR100", "AR1000"):
        assert m[key] == pytest.approx(1.0), key
    assert m["per_class"] == {"circle": pytest.approx(1.0), "square": pytest.approx(1.0)}
    assert m["num_detections"] == 3


def test_false_positive_ranked_in_the_middle(make_coco):
    # 2 GTs; ranked detections TP (0.9), FP (0.8), TP (0.7).
    # precision/recall after each: (1, 1/2), (1/2, 1/2), (2/3, 1). Interpolated precision is 1
    # for recall thresholds 0.00..0.50 (51 of the 101 points) and 2/3 for 0.51..1.00 (50 points),
    # so AP = (51 + 50 * 2/3) / 101 = 253/303 at every IoU threshold (the TPs match exactly).
    gts = [[10.0, 10.0, 60.0, 60.0], [150.0, 150.0, 250.0, 230.0]]
    ds = make_coco(IMG, [(1, 1, b) for b in gts], ONE_CLASS)
    res = [
        {
            "image_id": 1,
            "boxes": torch.tensor([gts[0], [100.0, 0.0, 140.0, 40.0], gts[1]]),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([0, 0, 0]),
        }
    ]
    m = coco_evaluate(res, ds)
    assert m["AP"] == pytest.approx(253 / 303)
    assert m["AP50"] == pytest.approx(253 / 303)
    assert m["AP75"] == pytest.approx(253 / 303)
    assert m["AR100"] == pytest.approx(1.0)
    assert m["per_class"]["thing"] == pytest.approx(253 / 303)
    # GT areas 2500 (medium: 32^2 < a <= 96^2) and 8000 (medium); no small or large GT -> -1.
    assert m["APm"] == pytest.approx(253 / 303)
    assert m["APs"] == -1.0 and m["APl"] == -1.0


def test_partial_overlap_counts_only_at_low_iou_thresholds(make_coco):
    # One GT, one detection with IoU 0.62: a TP for thresholds 0.50, 0.55, 0.60 only,
    # so AP = 3/10, AP50 = 1, AP75 = 0. Recall is 1 at those 3 thresholds -> AR = 0.3.
    ds = make_coco(IMG, [(1, 1, [0.0, 0.0, 100.0, 100.0])], ONE_CLASS)
    res = [{"image_id": 1, "boxes": [[0.0, 0.0, 100.0, 62.0]], "scores": [0.5], "labels": [0]}]
    m = coco_evaluate(res, ds)
    assert m["AP"] == pytest.approx(0.3)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["AR100"] == pytest.approx(0.3)
    assert m["APl"] == pytest.approx(0.3)  # area 10000 > 96^2


def test_images_without_detections_still_count(tiny_coco):
    # Only image 1 is answered: 2 of 3 GTs found, each class at full precision.
    res = [r for r in _gt_results(tiny_coco) if r["image_id"] == 1]
    m = coco_evaluate(res, tiny_coco)
    assert m["per_class"]["circle"] == pytest.approx(1.0)
    # square: 2 GTs, 1 found at precision 1 -> recall thresholds 0..0.5 (51/101) have precision 1.
    assert m["per_class"]["square"] == pytest.approx(51 / 101)
    assert m["AP"] == pytest.approx((1 + 51 / 101) / 2)


def test_empty_results_give_zeros(tiny_coco):
    for res in ([], [{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": [], "labels": []}]):
        m = coco_evaluate(res, tiny_coco)
        assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0
        assert m["per_class"] == {"circle": 0.0, "square": 0.0}
        assert m["num_detections"] == 0


def test_labels_map_to_noncontiguous_category_ids(tiny_coco):
    dets = results_to_coco(_gt_results(tiny_coco), tiny_coco)
    assert sorted({d["category_id"] for d in dets}) == [3, 7]
    first = next(d for d in dets if d["image_id"] == 2)
    assert first["category_id"] == 7
    assert first["bbox"] == pytest.approx([20.0, 30.0, 20.0, 15.0])  # xywh, no +1

    swapped = _gt_results(tiny_coco)
    for r in swapped:
        r["labels"] = 1 - r["labels"]
    m = coco_evaluate(swapped, tiny_coco)
    assert m["AP"] == pytest.approx(0.0)


def test_class_without_ground_truth_has_nan_ap(make_coco):
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    ds = make_coco(IMG, [(1, 1, [0.0, 0.0, 50.0, 50.0])], cats)
    res = [{"image_id": 1, "boxes": [[0.0, 0.0, 50.0, 50.0]], "scores": [0.9], "labels": [0]}]
    m = coco_evaluate(res, ds)
    assert m["per_class"]["a"] == pytest.approx(1.0)
    assert math.isnan(m["per_class"]["b"])
    assert m["AP"] == pytest.approx(1.0)  # pycocotools averages over classes with GT only


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"image_id": 99, "boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [0]}, "image_id 99"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [5]}, "labels"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [1.0, 0.5], "labels": [0]}, "lengths"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]]}, "missing keys"),
    ],
)
def test_bad_results_raise_naming_the_problem(tiny_coco, bad, match):
    with pytest.raises(ValueError, match=match):
        coco_evaluate([bad], tiny_coco)


def test_bad_dataset_raises_type_error():
    with pytest.raises(TypeError, match="dataset"):
        coco_evaluate([], object())


def test_format_table_lists_metrics_and_classes(tiny_coco):
    table = format_table(coco_evaluate(_gt_results(tiny_coco), tiny_coco))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["AP", "AP50", "AP75"]
    assert lines[1].split()[:3] == ["1.000", "1.000", "1.000"]
    assert any(line.split() == ["circle", "1.000", "1.000"] for line in lines)
    assert any(line.split() == ["square", "1.000", "1.000"] for line in lines)


class _EchoDetector(torch.nn.Module):
    """Predicts each image's ground truth (read from the batch) at score 1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def predict(self, batch, rescale=True):
        assert not self.training and not torch.is_grad_enabled()
        return [
            {"boxes": b, "scores": torch.ones(len(b)), "labels": lab}
            for b, lab in zip(batch["gt_bboxes"], batch["gt_labels"], strict=True)
        ]


def test_evaluate_runs_predict_and_restores_mode(tiny_coco):
    loader = []
    for r in _gt_results(tiny_coco):
        loader.append(
            {
                "img": torch.zeros(1, 3, 8, 8),
                "gt_bboxes": [r["boxes"]],
                "gt_labels": [r["labels"]],
                "img_metas": [{"image_id": r["image_id"]}],
            }
        )
    model = _EchoDetector().train()
    m = evaluate(model, loader, tiny_coco, device="cpu", progress=False)
    assert m["AP"] == pytest.approx(1.0)
    assert model.training


def _write_coco_files(tmp_path):
    """Three 64x48 images on disk with a COCO JSON: category ids 5 and 2 (JSON order), a crowd box."""
    import json

    from PIL import Image

    images, anns = [], []
    boxes = {1: [(5, [4, 4, 20, 10])], 2: [(2, [10, 12, 30, 20]), (5, [0, 0, 8, 8])], 3: []}
    for image_id, objs in boxes.items():
        name = f"{image_id:03d}.png"
        Image.new("RGB", (64, 48)).save(tmp_path / name)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
        for cat, bbox in objs:
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                 "area": bbox[2] * bbox[3], "iscrowd": 0}
            )  # fmt: skip
    anns.append(
        {
            "id": 99,
            "image_id": 3,
            "category_id": 2,
            "bbox": [1, 1, 40, 40],
            "area": 1600,
            "iscrowd": 1,
        }
    )
    cats = [{"id": 5, "name": "star"}, {"id": 2, "name": "moon"}]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_file


def test_with_labkit_coco_dataset_and_subsets(tmp_path):
    from torch.utils.data import Subset

    from labkit.data import CocoDetection

    ds = CocoDetection(_write_coco_files(tmp_path), tmp_path)
    assert ds.cat_ids == [5, 2] and list(ds.classes) == ["star", "moon"]
    results = []
    for idx in range(len(ds)):
        ann = ds.get_ann_info(idx)
        results.append(
            {
                "image_id": ds.image_ids[idx],
                "boxes": torch.from_numpy(ann["bboxes"]),
                "scores": torch.ones(len(ann["labels"])),
                "labels": torch.from_numpy(ann["labels"]),
            }
        )
    # A detection on the crowd region of image 3 is ignored, not a false positive.
    results[2] = {"image_id": 3, "boxes": [[2.0, 2.0, 30.0, 30.0]], "scores": [0.9], "labels": [1]}
    m = coco_evaluate(results, ds)
    assert m["AP"] == pytest.approx(1.0)
    assert m["per_class"] == {"star": pytest.approx(1.0), "moon": pytest.approx(1.0)}
    dets = results_to_coco(results[:1], ds)
    assert dets == [{"image_id": 1, "bbox": [4.0, 4.0, 20.0, 10.0], "score": 1.0, "category_id": 5}]

    # Quick runs evaluate a few images: a Subset scores only its own images...
    assert coco_evaluate(results[:1], Subset(ds, [0]))["AP"] == pytest.approx(1.0)
    # ...while the full dataset counts image 2's two objects as missed.
    full = coco_evaluate(results[:1], ds)
    assert full["per_class"]["moon"] == pytest.approx(0.0)
    assert full["per_class"]["star"] == pytest.approx(51 / 101)  # 1 of 2 stars found
    assert coco_evaluate(results[:1], ds, img_ids=[1])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="img_ids"):
        coco_evaluate(results, ds, img_ids=[42])
