"""Notebook 04's sampling statistics on a hand-built capture."""

import pytest
import torch

from labkit.lessons.deform_analysis import sampling_statistics, summarize_sampling


def _capture():
    # one image, three queries, one head, two levels, two points; a 100 x 200 (h x w) padded batch
    weights = torch.tensor(
        [
            [[[0.5, 0.25], [0.125, 0.125]]],  # query 0
            [[[0.25, 0.25], [0.25, 0.25]]],  # query 1: uniform
            [[[0.0, 0.0], [0.0, 1.0]]],  # query 2: everything on one coarse point
        ]
    )[None]  # [1, 3, 1, 2, 2]
    locations = torch.full((1, 3, 1, 2, 2, 2), 0.5)
    locations[0, 0, 0, 0, 1] = torch.tensor([0.9, 0.5])  # query 0, level 0, point 1: outside
    locations[0, 2, 0, 1, 1] = torch.tensor([0.5, 0.05])  # query 2's only weight: outside
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1]]])
    scores = torch.tensor([[0.9, 0.1, 0.5]])
    return {"attention_weights": weights, "sampling_locations": locations, "boxes": boxes,
            "scores": scores, "pad_shape": (100, 200)}  # fmt: skip


def test_statistics_of_the_best_queries_by_hand():
    stats = sampling_statistics(_capture(), top_k=2)  # queries 0 and 2, best first
    torch.testing.assert_close(stats["score"], torch.tensor([0.9, 0.5]))
    torch.testing.assert_close(stats["level_share"], torch.tensor([[0.75, 0.25], [0.0, 1.0]]))
    torch.testing.assert_close(stats["max_weight"], torch.tensor([0.5, 1.0]))
    # query 0: the 0.25-weight point at x = 0.9 lies outside its box (x in [0.4, 0.6])
    torch.testing.assert_close(stats["inside_box"], torch.tensor([0.75, 0.0]))
    # sqrt(0.2 * 200 * 0.4 * 100) = 40; sqrt(0.1 * 200 * 0.1 * 100) = sqrt(200)
    torch.testing.assert_close(stats["box_size"], torch.tensor([40.0, 200**0.5]))


def test_top_k_beyond_the_queries_keeps_them_all_and_summaries_concatenate():
    stats = sampling_statistics(_capture(), top_k=10)
    torch.testing.assert_close(stats["max_weight"], torch.tensor([0.5, 1.0, 0.25]))
    torch.testing.assert_close(stats["inside_box"], torch.tensor([0.75, 0.0, 1.0]))
    both = summarize_sampling([stats, sampling_statistics(_capture(), top_k=1)])
    assert both["level_share"].shape == (4, 2)
    torch.testing.assert_close(both["score"], torch.tensor([0.9, 0.5, 0.1, 0.9]))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="top_k"):
        sampling_statistics(_capture(), top_k=0)
    with pytest.raises(ValueError, match="stats"):
        summarize_sampling([])


def test_plot_shows_the_mean_level_shares_and_the_uniform_references():
    import matplotlib

    matplotlib.use("Agg")
    from labkit.viz.deform import plot_sampling_statistics

    stats = sampling_statistics(_capture(), top_k=2)
    axes = plot_sampling_statistics({"trained": stats}, num_points=2)
    heights = [patch.get_height() for patch in axes[0].patches]
    assert heights == pytest.approx([0.375, 0.625])  # mean of (0.75, 0.25) and (0, 1)
    assert axes[0].lines[0].get_ydata()[0] == pytest.approx(0.5)  # uniform over 2 levels
    assert axes[1].lines[0].get_xdata()[0] == pytest.approx(0.25)  # uniform over 2 x 2 points
    assert "mean 0.38" in axes[2].get_legend().get_texts()[0].get_text()  # inside: (0.75 + 0) / 2
