"""Faster R-CNN end to end: detector interface, Co-DETR auxiliary variant on arbitrary maps, overfit."""

from __future__ import annotations

import pytest
import torch
from toy_batches import solid_box_batch

from labkit.assigners import RandomSampler
from labkit.boxes import bbox_overlaps
from labkit.codetr.aux_heads import codetr_faster_rcnn_head, roi_positives
from labkit.detectors.two_stage import TwoStageDetector
from labkit.engine.train import parse_losses
from labkit.losses import GIoULoss
from labkit.recipes import faster_rcnn

SIZE = 128


def two_images(size: int = SIZE, scale: float = 1.0) -> dict:
    """Two flat images with solid boxes (``toy_batches.solid_box_batch``) and a padding mask."""
    k = size / 128
    gts = [
        torch.tensor([[15.0, 20.0, 55.0, 60.0], [70.0, 30.0, 115.0, 100.0]]) * k,
        torch.tensor([[30.0, 15.0, 100.0, 55.0], [10.0, 75.0, 45.0, 120.0]]) * k,
    ]
    batch = solid_box_batch(gts, [torch.tensor([0, 2]), torch.tensor([1, 3])], size, scale)
    batch["padding_mask"] = torch.zeros(2, size, size, dtype=torch.bool)
    return batch


def tiny_model() -> TwoStageDetector:
    torch.manual_seed(0)
    model = faster_rcnn(5, backbone="tiny")
    # 64 sampled RoIs per image instead of 512 keeps RoIAlign's CPU backward quick in tests
    model.head.roi_head.sampler = RandomSampler(64, 0.25)
    return model


def test_detector_interface_and_recipe():
    model = tiny_model()
    assert model.recipe == (
        "faster_rcnn",
        {
            "num_classes": 5,
            "backbone": "tiny",
            "backbone_weights": None,
            "fpn_channels": None,
            "fc_out_channels": None,
            "rpn_test_cfg": None,
            "rcnn_test_cfg": None,
        },
    )
    assert model.num_classes == 5
    feats = model.extract_feat(torch.zeros(1, 3, SIZE, SIZE))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]  # P2-P6, strides 4-64
    assert model.head.roi_head.bbox_head.fc_reg.out_features == 20  # class-specific
    batch = two_images()
    losses = model.loss(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}
    total, logged = parse_losses(losses)
    expected = sum(v for k, v in losses.items() if k != "acc")
    torch.testing.assert_close(total, expected)
    assert "acc" in logged
    losses, targets = model.loss_and_targets(batch)
    positives = roi_positives(targets.roi)
    assert positives.num_images == 2 and min(positives.num_positives) >= 2  # GTs added as proposals
    model.eval()
    out = model.predict(batch)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[1] == 4 and out[0]["labels"].dtype == torch.long
    assert out[0]["boxes"].shape[0] <= 100


def test_predict_rescales_to_original_pixels():
    model = tiny_model().eval()
    model.head.roi_head.test_cfg.score_thr = 0.0
    plain = model.predict(two_images(), rescale=False)
    halved = model.predict(two_images(scale=2.0), rescale=True)
    torch.testing.assert_close(halved[0]["boxes"], plain[0]["boxes"] / 2)


def test_empty_gt_batch_trains():
    model = tiny_model()
    batch = two_images()
    batch["gt_bboxes"] = [torch.zeros(0, 4), torch.zeros(0, 4)]
    batch["gt_labels"] = [torch.zeros(0, dtype=torch.long)] * 2
    losses, targets = model.loss_and_targets(batch)
    positives = roi_positives(targets.roi)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_rpn_bbox"].detach()) == 0.0
    assert float(losses["loss_bbox"].detach()) == 0.0
    assert positives.num_positives == [0, 0]
    parse_losses(losses)[0].backward()


def test_bad_input_names_the_argument():
    model = tiny_model()
    with pytest.raises(TypeError, match="batch"):
        model.loss([1, 2])
    batch = two_images()
    batch["gt_labels"] = [torch.tensor([0, 5]), torch.tensor([1, 3])]
    with pytest.raises(ValueError, match=r"gt_labels\[0\]"):
        model.loss(batch)
    batch = two_images()
    batch["gt_bboxes"][1] = torch.tensor([[float("nan"), 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"gt_bboxes\[1\]"):
        model.loss(batch)
    batch = two_images()
    del batch["img_metas"]
    with pytest.raises(ValueError, match="img_metas"):
        model.predict(batch)


def test_codetr_head_runs_on_any_maps_with_scaled_losses():
    """Co-DETR's settings on five 32-channel maps at strides 8-128 (encoder memory + a stride-2 level)."""
    batch = two_images()
    torch.manual_seed(2)
    feats = [torch.randn(2, 32, SIZE // s, SIZE // s) for s in (8, 16, 32, 64, 128)]
    results = {}
    for scale in (1.0, 12.0):
        torch.manual_seed(0)
        head = codetr_faster_rcnn_head(5, 32, loss_scale=scale, fc_out_channels=64)
        torch.manual_seed(1)
        losses, targets = head.loss_and_targets(feats, batch)
        results[scale] = (losses, roi_positives(targets.roi))
    rpn, roi = head.rpn_head, head.roi_head
    assert rpn.num_base_priors == 9 and rpn.train_proposal_cfg.nms_pre == 4000
    assert roi.bbox_roi_extractor.featmap_strides == [8, 16, 32, 64]
    assert roi.bbox_roi_extractor.finest_scale == 112
    assert (
        isinstance(roi.bbox_head.loss_bbox, GIoULoss) and roi.bbox_head.loss_bbox.loss_weight == 120
    )
    assert roi.bbox_head.reg_decoded_bbox and not roi.bbox_head.reg_class_agnostic
    assert roi.test_cfg.score_thr == 0.0
    (l1, p1), (l12, p12) = results[1.0], results[12.0]
    for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"):
        torch.testing.assert_close(l12[key], 12 * l1[key])
    for a, b in zip(p1.coords, p12.coords, strict=True):
        torch.testing.assert_close(a, b)
    # positives: real classes, matched GT boxes of the image, IoU >= 0.5 with them
    for i in range(2):
        assert set(p1.labels[i].tolist()) <= set(batch["gt_labels"][i].tolist())
        iou = bbox_overlaps(p1.coords[i], p1.targets[i], is_aligned=True)
        assert bool((iou >= 0.5).all())
        assert p1.feats[i].shape == (p1.coords[i].shape[0], 32)
        # the GTs come first (added as proposals)
        torch.testing.assert_close(p1.coords[i][:2], batch["gt_bboxes"][i])
    coords, targets = p1.normalized(batch["img_metas"])
    for c, t in zip(coords, targets, strict=True):  # DETR frame: cxcywh in [0, 1]
        assert bool(((c >= 0) & (c <= 1)).all()) and bool(((t >= 0) & (t <= 1)).all())


def test_resnet_backbone_builds_and_runs():
    torch.manual_seed(0)
    model = faster_rcnn(5, backbone="resnet18", fpn_channels=32, fc_out_channels=64)
    model.head.roi_head.sampler = RandomSampler(32, 0.25)
    batch = two_images(size=64)
    losses = model.loss(batch)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_overfit_two_images_then_detect_them():
    model = tiny_model()
    batch = two_images()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    totals = []
    for _ in range(30):
        total, _ = parse_losses(model.loss(batch))
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert totals[-1] < 0.4 * totals[0]
    model.eval()
    results = model.predict(batch)
    for res, gts, labels in zip(results, batch["gt_bboxes"], batch["gt_labels"], strict=True):
        for gt, label in zip(gts, labels, strict=True):
            same = res["labels"] == label
            assert same.any(), f"class {int(label)} not detected"
            assert float(bbox_overlaps(gt[None], res["boxes"][same]).max()) > 0.5
