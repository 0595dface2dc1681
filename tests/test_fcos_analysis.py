"""Notebook 03's trained-model analysis: centerness pairs of FCOS's positive points."""

import math

import numpy as np
import pytest
import torch

from labkit.heads.fcos import centerness_target
from labkit.lessons.fcos_analysis import centerness_pairs
from labkit.recipes import fcos


def _batch():
    img = torch.zeros(2, 3, 128, 128)
    metas = [{"img_shape": (128, 128), "pad_shape": (128, 128), "scale_factor": (1.0,) * 4}] * 2
    return {
        "img": img,
        "img_metas": metas,
        "gt_bboxes": [torch.tensor([[10.0, 20.0, 70.0, 90.0]]), torch.zeros(0, 4)],
        "gt_labels": [torch.tensor([3]), torch.zeros(0, dtype=torch.long)],
    }


def test_pairs_are_the_positives_of_the_loss_with_their_targets():
    torch.manual_seed(0)
    model = fcos(5, backbone="tiny").train()
    pairs = centerness_pairs(model, _batch())
    _, targets = model.loss_and_targets(_batch())
    assert model.training  # restored
    n = sum(len(p) for p in targets.pos_inds)
    assert n > 0 and all(v.shape == (n,) for v in pairs.values())
    expected = centerness_target(targets.bbox_targets[0, targets.pos_inds[0]])
    torch.testing.assert_close(pairs["target"], expected)
    assert ((pairs["predicted"] > 0) & (pairs["predicted"] < 1)).all()
    assert ((pairs["score"] > 0) & (pairs["score"] < 1)).all()
    assert set(pairs["level"].tolist()) <= set(range(5))


def test_plot_draws_one_series_per_level_and_the_diagonal():
    import matplotlib

    matplotlib.use("Agg")
    from labkit.viz.anchor_free import plot_centerness_pairs

    pairs = {
        "target": torch.tensor([0.1, 0.5, 0.9, 0.3]),
        "predicted": torch.tensor([0.5, 0.2, 0.8, 0.3]),
        "level": torch.tensor([0, 0, 1, 1]),
    }
    ax = plot_centerness_pairs(pairs)
    assert len(ax.collections) == 2 and len(ax.lines) == 1
    # deviations from the means (0.45, 0.45): sum dx*dy = 0.15, sum dx^2 = 0.35, sum dy^2 = 0.21,
    # r = 0.15 / sqrt(0.35 * 0.21) = 0.553
    assert ax.get_title() == "4 positive points, Pearson r = 0.55"


def test_fit_by_level_gives_r_bias_and_share_below_the_diagonal():
    from labkit.lessons.fcos_analysis import centerness_fit_by_level

    pairs = {
        "target": torch.tensor([0.1, 0.5, 0.9, 0.2, 0.8, 0.4]),
        "predicted": torch.tensor([0.2, 0.5, 0.8, 0.1, 0.5, 0.6]),
        "level": torch.tensor([0, 0, 0, 1, 1, 3]),
    }
    fit = centerness_fit_by_level(pairs)
    assert list(fit) == ["P3", "P4", "P6", "all"]
    # P3: deviations (-0.4, 0, 0.4) and (-0.3, 0, 0.3) -> r = 1; errors (+0.1, 0, -0.1)
    assert fit["P3"]["n"] == 3 and fit["P3"]["r"] == pytest.approx(1.0)
    assert fit["P3"]["bias"] == pytest.approx(0.0, abs=1e-6)
    assert fit["P3"]["below"] == pytest.approx(1 / 3)
    # P4: both rise -> r = 1; errors (-0.1, -0.3): bias -0.2, both under the diagonal
    assert fit["P4"]["r"] == pytest.approx(1.0) and fit["P4"]["bias"] == pytest.approx(-0.2)
    assert fit["P4"]["below"] == 1.0
    # one point has no correlation
    assert fit["P6"]["n"] == 1 and math.isnan(fit["P6"]["r"])
    assert fit["P6"]["bias"] == pytest.approx(0.2) and fit["P6"]["below"] == 0.0
    # pooled: the six points together (numpy's corrcoef as the reference)
    expected_r = np.corrcoef([0.1, 0.5, 0.9, 0.2, 0.8, 0.4], [0.2, 0.5, 0.8, 0.1, 0.5, 0.6])[0, 1]
    assert fit["all"]["n"] == 6 and fit["all"]["r"] == pytest.approx(expected_r)
    assert fit["all"]["bias"] == pytest.approx((0.1 + 0 - 0.1 - 0.1 - 0.3 + 0.2) / 6)
    assert fit["all"]["below"] == pytest.approx(3 / 6)
