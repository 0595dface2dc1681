"""Notebook 01's whole-pipeline trace and notebook 06's positive queries per layer."""

import matplotlib
import pytest
import torch

from labkit.data import collate
from labkit.data.shapes import CLASSES, shapes_dataset
from labkit.data.transforms import test_transforms
from labkit.lessons.pipeline import PipelineTrace, pipeline_summary, trace_pipeline
from labkit.recipes import atss, fcos, retinanet

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def batch():
    val = shapes_dataset("val", transforms=test_transforms((128, 128)))
    return collate([val[0], val[1]])


def test_trace_keeps_every_stage_of_the_first_image(batch):
    torch.manual_seed(0)
    model = retinanet(len(CLASSES), backbone="tiny").train()
    trace = trace_pipeline(model, batch)
    assert model.training  # mode restored
    assert trace.img.shape == (3, 128, 128)
    assert [f.shape[-1] for f in trace.backbone] == [16, 8, 4]
    assert [f.shape[-1] for f in trace.fpn] == [16, 8, 4, 2, 1]
    assert [o.shape for o in trace.objectness] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(((o >= 0) & (o <= 1)).all() for o in trace.objectness)
    # 9 anchors per location over the five levels
    assert trace.num_level_anchors == [9 * s * s for s in (16, 8, 4, 2, 1)]
    assert len(trace.anchors) == sum(trace.num_level_anchors)
    # the same positives and losses as the head's own loss on the first image alone
    model.eval()
    one = {k: v[:1] for k, v in batch.items()}
    losses, targets = model.loss_and_targets(one)
    assert torch.equal(trace.positive_anchors, targets.pos_inds[0])
    assert trace.losses == pytest.approx({k: float(v.detach()) for k, v in losses.items()})
    # NMS only removes boxes
    assert len(trace.after_nms["boxes"]) <= len(trace.before_nms["boxes"])


def test_nms_removes_duplicates_of_a_confident_head(batch):
    torch.manual_seed(0)
    model = atss(len(CLASSES), backbone="tiny")
    torch.nn.init.constant_(model.head.atss_cls.bias, 2.0)  # every anchor scores ~0.88
    trace = trace_pipeline(model, batch)
    assert len(trace.before_nms["boxes"]) > len(trace.after_nms["boxes"]) > 0


def test_trace_refuses_a_head_without_anchors(batch):
    with pytest.raises(TypeError, match="model: .*anchor head"):
        trace_pipeline(fcos(len(CLASSES), backbone="tiny"), batch)


def test_pipeline_figure_draws_eight_panels_and_seven_arrows(batch):
    from labkit.viz.pipeline import plot_pipeline

    torch.manual_seed(0)
    fig = plot_pipeline(trace_pipeline(retinanet(len(CLASSES), backbone="tiny"), batch), CLASSES)
    panels = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    assert len(panels) == 8
    assert len(fig.artists) == 7  # the data-flow arrows
    assert "positive anchors" in panels[4].get_title()
    assert panels[5].get_xlabel() == "loss on this image"
    assert panels[5].get_title().startswith("loss ") and "sum of the bars" in panels[5].get_title()


def test_pipeline_summary_states_each_stage_and_the_confident_detections():
    from labkit.heads.dense_head import TestConfig

    boxes = torch.tensor([[59.6, 277.4, 127.3, 395.8], [59.6, 277.4, 127.3, 395.8], [0, 0, 9, 9]])
    trace = PipelineTrace(
        img=torch.zeros(3, 8, 8), gt_bboxes=torch.zeros(0, 4), gt_labels=torch.zeros(0).long(),
        backbone=[], fpn=[], objectness=[], anchors=torch.zeros(20, 4), num_level_anchors=[20],
        positive_anchors=torch.tensor([3, 4]), positive_gt=torch.tensor([0, 0]),
        losses={"loss_cls": 0.25, "loss_bbox": 0.5},
        before_nms={"boxes": torch.zeros(7, 4), "scores": torch.zeros(7), "labels": torch.zeros(7)},
        after_nms={"boxes": boxes, "scores": torch.tensor([0.44, 0.46, 0.1]),
                   "labels": torch.tensor([0, 1, 0])},
    )  # fmt: skip
    cfg = TestConfig(nms_pre=1000, score_thr=0.05, iou_threshold=0.6, max_per_img=100)
    assert pipeline_summary(trace, ["ellipse", "rectangle"], cfg).splitlines() == [
        "20 anchors, 2 positive; loss cls 0.250 + bbox 0.500 = 0.750",
        "7 boxes above the score threshold (class score > 0.05, at most 1000 per level); "
        "NMS at IoU 0.6 per class keeps 3 (at most 100)",
        "2 detections with score >= 0.3:",  # by descending score: one box, two classes
        "   rectangle 0.46  [60, 277, 127, 396]",
        "     ellipse 0.44  [60, 277, 127, 396]",
    ]
    lines = pipeline_summary(trace, min_score=0.05).splitlines()
    assert lines[1] == "7 boxes above the score threshold, 3 after NMS"
    assert lines[2:] == [
        "3 detections with score >= 0.05:",
        "           1 0.46  [60, 277, 127, 396]",
        "           0 0.44  [60, 277, 127, 396]",
        "           0 0.10  [0, 0, 9, 9]",
    ]


def test_positive_queries_by_layer_counts_each_source(batch):
    from labkit.lessons.codetr_analysis import positive_queries_by_layer
    from labkit.recipes import co_deformable_detr

    torch.manual_seed(0)
    model = co_deformable_detr(len(CLASSES), backbone="tiny", num_queries=30)
    per_image = positive_queries_by_layer(model, batch)
    _, groups = model.loss_and_targets(batch)
    layers = model.decoder.num_layers
    for i, sources in enumerate(per_image):
        assert list(sources) == ["Hungarian", "faster_rcnn", "atss"]
        hung = sources["Hungarian"]
        num_gts = len(batch["gt_bboxes"][i])
        assert [len(s) for s in hung.start] == [num_gts] * layers
        # Hungarian targets are the ground truths themselves, in GT order
        torch.testing.assert_close(hung.targets[-1], batch["gt_bboxes"][i])
        for k, name in enumerate(["faster_rcnn", "atss"]):
            num_pos = groups[k][1].num_pos[i]
            assert [len(s) for s in sources[name].predicted] == [num_pos] * layers
