"""Notebook 03's trained-model analysis: centerness pairs of FCOS's positive points."""

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
