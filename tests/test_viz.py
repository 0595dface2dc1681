"""Drawing helpers: stable colours, denormalization, artists actually drawn."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image

from labkit import viz

MEAN = (123.675, 116.28, 103.53)  # mmdetection's ImageNet statistics, 0-255 units
STD = (58.395, 57.12, 57.375)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_colours_are_stable_distinct_and_cycle():
    assert viz.class_color(0) == pytest.approx(to_rgba("#1f77b4")[:3])
    assert viz.class_color(3) == viz.class_color(13) == viz.class_color(np.int64(3))
    assert len({viz.class_color(i) for i in range(10)}) == 10
    assert len({viz.level_color(i) for i in range(5)}) == 5
    assert viz.level_color(0) != viz.level_color(1)
    for c in (*viz.CLASS_COLORS, *viz.LEVEL_COLORS):
        assert all(0.0 <= v <= 1.0 for v in c)


def test_denormalize_chw_tensor_in_pixel_units():
    rgb = torch.tensor([[10.0, 200.0], [0.0, 255.0]])  # [H=2, W=2] per channel below
    img = torch.stack([rgb, rgb / 2, 255 - rgb])  # [3, 2, 2]
    normed = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    arr = viz.to_image_array(normed, mean=MEAN, std=STD)
    assert arr.shape == (2, 2, 3)
    np.testing.assert_allclose(arr, img.permute(1, 2, 0).numpy() / 255, atol=1e-5)


def test_denormalize_unit_statistics_and_clipping():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    normed = torch.tensor([-2.0, 0.0, 4.0]).view(3, 1, 1)  # -> 0.0, 0.5, 1.5 (clipped to 1)
    arr = viz.to_image_array(normed, mean=mean, std=std)
    np.testing.assert_allclose(arr[0, 0], [0.0, 0.5, 1.0])


def test_image_inputs_pass_through():
    u8 = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert viz.to_image_array(u8) is u8
    np.testing.assert_array_equal(viz.to_image_array(Image.fromarray(u8)), u8)
    np.testing.assert_allclose(viz.to_image_array(np.full((2, 2, 3), 255.0)), 1.0)
    with pytest.raises(ValueError, match="mean, std"):
        viz.to_image_array(torch.zeros(3, 2, 2), mean=MEAN)
    with pytest.raises(ValueError, match="img"):
        viz.to_image_array(torch.zeros(2, 3, 4, 5))


def test_show_image_draws_the_denormalized_array():
    img = torch.zeros(3, 4, 6)
    ax = viz.show_image(img, mean=(0.2, 0.4, 0.6), std=(1, 1, 1), title="t")
    (im,) = ax.get_images()
    np.testing.assert_allclose(im.get_array()[0, 0], [0.2, 0.4, 0.6], atol=1e-6)
    assert im.get_array().shape == (4, 6, 3)
    assert ax.get_title() == "t" and list(ax.get_xticks()) == []


def test_draw_boxes_geometry_colours_and_captions():
    _, ax = plt.subplots()
    boxes = torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 6.0, 9.0]])
    rects = viz.draw_boxes(ax, boxes, labels=[1, 0], scores=[0.5, 0.25], class_names=["a", "b"])
    assert len(rects) == 2 and len(ax.patches) == 2
    assert rects[0].get_xy() == (1.0, 2.0)
    assert (rects[0].get_width(), rects[0].get_height()) == (10.0, 20.0)
    assert rects[0].get_edgecolor()[:3] == pytest.approx(viz.class_color(1))
    assert rects[1].get_edgecolor()[:3] == pytest.approx(viz.class_color(0))
    assert [t.get_text() for t in ax.texts] == ["b 0.50", "a 0.25"]


def test_draw_boxes_stacks_captions_of_boxes_sharing_a_corner():
    # per-class NMS can keep one box twice (two classes): both captions must stay readable
    _, ax = plt.subplots()
    box = [60.0, 277.0, 127.0, 396.0]
    viz.draw_boxes(
        ax, [box, box, [5, 108, 39, 154]], labels=[1, 0, 1], scores=[0.46, 0.44, 0.32],
        class_names=["ellipse", "rectangle"], fontsize=7,
    )  # fmt: skip
    texts = ax.texts
    assert [t.get_text() for t in texts] == ["rectangle 0.46", "ellipse 0.44", "rectangle 0.32"]
    assert texts[0].get_position() == (60.0, 277.0) and texts[2].get_position() == (5, 108)
    # the second caption at that corner sits one line (7 pt + 3 pt padding) above the first
    assert texts[1].xy == (60.0, 277.0)
    assert texts[1].xyann == (0, 10) and texts[1].anncoords == "offset points"


def test_draw_boxes_fixed_colour_style_and_no_captions():
    _, ax = plt.subplots()
    rects = viz.draw_boxes(ax, [[0, 0, 1, 1]], color="white", linestyle="--", linewidth=3)
    assert rects[0].get_edgecolor() == to_rgba("white")
    assert rects[0].get_linestyle() == "--" and rects[0].get_linewidth() == 3
    assert len(ax.texts) == 0
    assert viz.draw_boxes(ax, torch.zeros(0, 4)) == []


def test_draw_boxes_rejects_mismatched_inputs():
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="labels"):
        viz.draw_boxes(ax, [[0, 0, 1, 1]], labels=[0, 1])
    with pytest.raises(ValueError, match="boxes"):
        viz.draw_boxes(ax, [[0, 0, 1]])
    with pytest.raises(TypeError, match="boxes"):
        viz.draw_boxes(ax, "boxes")


def test_draw_points():
    _, ax = plt.subplots()
    pts = viz.draw_points(ax, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), color=viz.level_color(2))
    np.testing.assert_array_equal(pts.get_offsets(), [[1.0, 2.0], [3.0, 4.0]])
    assert tuple(pts.get_facecolor()[0][:3]) == pytest.approx(viz.level_color(2))


def test_grid_has_fixed_size_and_hides_spare_axes():
    fig, axes = viz.grid(5, size=2.0)
    assert len(axes) == 5
    assert tuple(fig.get_size_inches()) == (8.0, 4.0)  # 4 columns x 2 rows of 2 inches
    assert sum(ax.get_visible() for ax in fig.axes) == 5
    with pytest.raises(ValueError, match="n"):
        viz.grid(0)


def test_plot_loss_curves_from_jsonl(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [
        {"iter": 10, "loss": 3.0, "loss_cls": 2.0, "lr": 0.1},
        {"iter": 20, "loss": 2.0, "loss_cls": 1.5},
        {"epoch": 1, "AP": 0.1},  # evaluation line: no loss
        {"iter": 30, "loss": 1.0, "loss_cls": 0.5},
    ]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ax = viz.plot_loss_curves(log)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"loss", "loss_cls"}
    np.testing.assert_array_equal(lines["loss"].get_xdata(), [10, 20, 30])
    np.testing.assert_array_equal(lines["loss_cls"].get_ydata(), [2.0, 1.5, 0.5])
    assert ax.get_xlabel() == "iter"
    ax2 = viz.plot_loss_curves([{"epoch": 0, "loss_box": 1.0}, {"epoch": 1, "loss_box": 0.5}])
    assert ax2.get_xlabel() == "epoch"


def test_show_detections_applies_score_threshold():
    img = np.zeros((50, 50, 3), dtype=np.uint8)
    result = {
        "boxes": torch.tensor([[1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]),
        "scores": torch.tensor([0.9, 0.1]),
        "labels": torch.tensor([2, 0]),
    }
    ax = viz.show_detections(img, result, class_names=["x", "y", "z"], score_thr=0.3)
    assert len(ax.patches) == 1
    assert [t.get_text() for t in ax.texts] == ["z 0.90"]
    ax = viz.show_detections(img, result, score_thr=0.0, gt_bboxes=[[0, 0, 5, 5]])
    assert len(ax.patches) == 3


def test_draw_level_grid_lines_and_prior_centres():
    _, ax = plt.subplots()
    vlines, hlines, centres = viz.draw_level_grid(
        ax, (40, 64), stride=16, level=1, center_offset=0.5
    )
    assert len(vlines.get_segments()) == 5  # x = 0, 16, 32, 48, 64
    assert len(hlines.get_segments()) == 3  # y = 0, 16, 32 (40 is not a multiple)
    assert tuple(vlines.get_colors()[0][:3]) == pytest.approx(viz.level_color(1))
    # ceil(40/16) = 3 rows x 4 columns of centres, x fastest, at (k + 0.5) * 16
    offsets = centres.get_offsets()
    assert offsets.shape == (12, 2)
    np.testing.assert_array_equal(offsets[:5], [[8, 8], [24, 8], [40, 8], [56, 8], [8, 24]])
    assert len(viz.draw_level_grid(ax, (40, 64), stride=8)) == 2
    with pytest.raises(ValueError, match="stride"):
        viz.draw_level_grid(ax, (40, 64), stride=0)


def test_detr_matching_figures_draw_the_matching():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.lessons.detr_matching import cost_terms, toy_problem
    from labkit.viz import detr as detr_viz

    problem = toy_problem()
    gt_inds = torch.tensor([1, 2, 3, 0, 0, 0, 0, 0])
    axes = detr_viz.plot_cost_terms(cost_terms(problem), gt_inds)
    assert [ax.get_title() for ax in axes] == ["class", "l1", "giou", "total"]
    # one red outline per matched query on every panel
    assert all(len(ax.patches) == 3 for ax in axes)
    ax = detr_viz.plot_matching(problem, gt_inds)
    assert len(ax.patches) == 3 + 8  # ground truths + predictions
    assert len(ax.lines) == 3  # one line per match
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["ground truth (one colour each)", "matched prediction (its object's colour)",
                      "prediction centre to object centre", "unmatched prediction"]  # fmt: skip
    before = detr_viz.plot_matching(problem, torch.zeros(8, dtype=torch.long))
    assert [t.get_text() for t in before.get_legend().get_texts()] == [
        "ground truth (one colour each)", "unmatched prediction"]  # fmt: skip
    record = {
        "step": [1, 2, 3, 4, 5],
        "flip_fraction": [1.0, 0.5, 0.5, 0.0, 0.5],
        "loss": [5, 4, 3, 2, 1],
    }
    ax = detr_viz.plot_matching_flips(record, window=2)
    assert [round(y, 3) for y in ax.lines[1].get_ydata()] == [0.75, 0.5, 0.25, 0.25]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "this step", "mean of 2 steps", "training loss (right axis)"]  # fmt: skip
    plt.close("all")


def test_the_covariance_sensitive_gt_is_the_one_whose_kept_count_moves_most():
    from types import SimpleNamespace

    from labkit.viz.assign import most_covariance_sensitive_gt

    def sel(kept_per_gt, candidates):
        keep = torch.zeros(len(kept_per_gt), 10, dtype=torch.bool)
        cand = torch.zeros(len(kept_per_gt), 10, dtype=torch.bool)
        for k, (n, c) in enumerate(zip(kept_per_gt, candidates, strict=True)):
            keep[k, :n] = True
            cand[k, :c] = True
        return SimpleNamespace(keep=keep, cand_mask=cand)

    # GT 1 moves 3 -> 6, GT 2 moves 2 -> 4 (ties with GT 0's 0 spread broken by spread first)
    sels = {"full": sel([5, 3, 2], [9, 8, 9]), "tied": sel([5, 6, 4], [9, 8, 9])}
    assert most_covariance_sensitive_gt(sels) == 1
    # equal spreads: more candidates wins, then the lower index
    sels = {"full": sel([1, 1, 1], [4, 7, 7]), "tied": sel([2, 2, 2], [4, 7, 7])}
    assert most_covariance_sensitive_gt(sels) == 1


def test_cost_explorer_title_names_the_three_weights(monkeypatch):
    from labkit.lessons.detr_matching import toy_problem
    from labkit.viz import detr as detr_viz

    monkeypatch.setenv("LABKIT_HEADLESS", "1")
    monkeypatch.setattr(plt, "show", lambda: None)
    detr_viz.cost_explorer(toy_problem())
    titles = [ax.get_title() for ax in plt.gcf().axes]
    assert "weights: class 2.0, L1 5.0, GIoU 2.0" in titles


def test_paa_gmm_summary_reports_groups_and_components():
    from types import SimpleNamespace

    from labkit.viz.assign import paa_gmm_summary

    # GT 0: one candidate, not fitted; GT 1: three candidates, two kept
    selection = SimpleNamespace(
        cand_losses=torch.tensor([[0.5, 0.0, 0.0], [0.1, 0.2, 0.9]], dtype=torch.float64),
        cand_mask=torch.tensor([[True, False, False], [True, True, True]]),
        keep=torch.tensor([[False, False, False], [True, True, False]]),
        fitted=torch.tensor([False, True]),
        gmm=SimpleNamespace(
            means=torch.tensor([[0.15, 0.9]]),
            variances=torch.tensor([[0.0025, 1e-4]]),
            n_iter=torch.tensor([4]),
        ),
    )
    assert paa_gmm_summary(selection, 1) == (
        "GT 1: kept 2 with losses 0.10-0.20; dropped 1 with loss 0.90; "
        "component 0 mean 0.15 sd 0.05, component 1 mean 0.90 sd 0.01; 4 EM iterations"
    )
    assert paa_gmm_summary(selection, 0) == (
        "GT 0: kept 0; dropped 1 with loss 0.50; no mixture fitted (fewer than two candidates)"
    )
