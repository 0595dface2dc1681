"""Notebook 04's sampling statistics on a hand-built capture."""

import pytest
import torch

from labkit.lessons.deform_analysis import (
    query_spread,
    sampling_statistics,
    summarize_sampling,
)


def _capture():
    # one image, three queries, one head, two levels, two points; a 100 x 200 (h x w) padded batch
    weights = torch.tensor(
        [
            [[[0.5, 0.25], [0.125, 0.125]]],  # query 0
            [[[0.25, 0.25], [0.25, 0.25]]],  # query 1: uniform
            [[[0.0, 0.0], [0.0, 1.0]]],  # query 2: everything on one coarse point
        ]
    )[None]  # [1, 3, 1, 2, 2]
    offsets = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).view(1, 3, 1, 2, 2, 2)
    locations = torch.full((1, 3, 1, 2, 2, 2), 0.5)
    locations[0, 0, 0, 0, 1] = torch.tensor([0.9, 0.5])  # query 0, level 0, point 1: outside
    locations[0, 2, 0, 1, 1] = torch.tensor([0.5, 0.05])  # query 2's only weight: outside
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1]]])
    scores = torch.tensor([[0.9, 0.1, 0.5]])
    return {"attention_weights": weights, "sampling_locations": locations, "boxes": boxes,
            "scores": scores, "pad_shape": (100, 200), "sampling_offsets": offsets}  # fmt: skip


def test_statistics_of_the_best_queries_by_hand():
    stats = sampling_statistics(_capture(), top_k=2)  # queries 0 and 2, best first
    torch.testing.assert_close(stats["score"], torch.tensor([0.9, 0.5]))
    torch.testing.assert_close(stats["level_share"], torch.tensor([[0.75, 0.25], [0.0, 1.0]]))
    torch.testing.assert_close(stats["max_weight"], torch.tensor([0.5, 1.0]))
    # query 0: the 0.25-weight point at x = 0.9 lies outside its box (x in [0.4, 0.6])
    torch.testing.assert_close(stats["inside_box"], torch.tensor([0.75, 0.0]))
    # sqrt(0.2 * 200 * 0.4 * 100) = 40; sqrt(0.1 * 200 * 0.1 * 100) = sqrt(200)
    torch.testing.assert_close(stats["box_size"], torch.tensor([40.0, 200**0.5]))
    # per point: query 0 then query 2, as captured
    torch.testing.assert_close(stats["weights"][1, 0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(stats["offsets"][1].flatten(), torch.arange(16.0, 24.0))
    assert stats["inside"][0, 0].tolist() == [[True, False], [True, True]]


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


def test_query_spread_separates_a_shared_pattern_from_query_dependence():
    pattern = torch.tensor([0.7, 0.1, 0.1, 0.1]).view(1, 1, 2, 2)  # [1, heads, L, P]
    same = {"weights": pattern.expand(5, -1, -1, -1),
            "offsets": torch.arange(8.0).view(1, 1, 2, 2, 2).expand(5, -1, -1, -1, -1)}  # fmt: skip
    spread = query_spread(same)
    assert spread["weight_across_queries"] == 0.0
    assert spread["offset_across_queries"] == 0.0
    assert spread["weight_across_points"] == pytest.approx(0.3)  # std of (0.7, 0.1, 0.1, 0.1)
    assert spread["offset_across_points"] == pytest.approx(torch.arange(8.0).std().item())
    assert spread["same_largest"] == 1.0 and spread["largest_index"] == 0
    # two queries with opposite patterns: every weight differs by 0.6 between them
    flipped = torch.tensor([0.1, 0.1, 0.1, 0.7]).view(1, 1, 2, 2)
    two = {"weights": torch.cat([pattern, flipped]), "offsets": torch.zeros(2, 1, 2, 2, 2)}
    spread = query_spread(two)
    # per weight: std of (0.7, 0.1) = 0.4243 twice, std of (0.1, 0.1) = 0 twice
    assert spread["weight_across_queries"] == pytest.approx(0.6 / 2**0.5 / 2)
    assert spread["weight_across_points"] == pytest.approx(
        torch.tensor([0.4, 0.1, 0.1, 0.4]).std().item()
    )
    assert spread["same_largest"] == 0.5
    with pytest.raises(ValueError, match="stats"):
        query_spread({"weights": pattern, "offsets": torch.zeros(1, 1, 2, 2, 2)})


def test_query_sampling_marker_area_grows_with_the_weight():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.viz.deform import plot_query_sampling

    weights = torch.tensor([[[0.5, 0.25]], [[0.0, 0.25]]])  # [heads 2, L 1, P 2]
    capture = {
        "sampling_locations": torch.tensor([[0.2, 0.2], [0.4, 0.4], [0.6, 0.6], [0.8, 0.8]]).view(
            1, 1, 2, 1, 2, 2
        ),
        "attention_weights": weights.view(1, 1, 2, 1, 2),
        "reference_points": torch.tensor([0.5, 0.5, 0.6, 0.6]).view(1, 1, 1, 4),
        "spatial_shapes": torch.tensor([[4, 4]]),
        "pad_shape": (40, 40),
        "boxes": torch.tensor([0.5, 0.5, 0.5, 0.5]).view(1, 1, 4),
    }
    fig, ax = plt.subplots()
    plot_query_sampling(torch.zeros(3, 40, 40), capture, 0, axes=[ax], max_area=100, min_area=5)
    dots = ax.collections[0]
    # heaviest first; area = 5 + 100 * weight; head 0's 0.5 point at (8, 8) px
    assert dots.get_sizes().tolist() == pytest.approx([55.0, 30.0, 30.0, 5.0])
    assert dots.get_offsets()[0].tolist() == pytest.approx([8.0, 8.0])
    plt.close(fig)


def test_offset_figures_label_their_axes_in_image_convention():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.detr.ms_deform_attn import MultiScaleDeformableAttention
    from labkit.viz.deform import plot_initial_offsets, plot_offset_scaling

    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=1, num_points=2)
    ax = plot_initial_offsets(attn)
    assert "down" in ax.get_ylabel() and ax.get_xlabel()
    assert ax.yaxis_inverted()
    axes = plot_offset_scaling([(4, 4)], torch.ones(2, 2, 2))
    assert all(a.get_xlabel() and "top" in a.get_ylabel() and a.yaxis_inverted() for a in axes)
    plt.close("all")


def test_captured_offsets_give_the_captured_locations():
    from labkit.detr.ms_deform_attn import sampling_locations_from_offsets
    from labkit.recipes import deformable_detr
    from labkit.viz.deform import capture_decoder_sampling

    torch.manual_seed(0)
    model = deformable_detr(2, backbone="tiny", num_queries=5, embed_dims=32,
                            feedforward_channels=64, two_stage=True, with_box_refine=True).eval()  # fmt: skip
    torch.nn.init.normal_(model.decoder.layers[-1].cross_attn.sampling_offsets.weight, std=0.1)
    img = torch.randn(3, 128, 128)  # the stride-64 level needs more than one cell for GroupNorm
    meta = {"img_shape": (128, 128), "pad_shape": (128, 128), "scale_factor": (1.0, 1.0, 1.0, 1.0)}
    cap = capture_decoder_sampling(model, {"img": img[None], "img_metas": [meta]})
    assert cap["sampling_offsets"].shape == (1, 5, 8, 4, 4, 2)
    assert cap["sampling_offsets"].std(dim=1).mean() > 0  # the query changes its offsets
    locations = sampling_locations_from_offsets(
        cap["reference_points"], cap["sampling_offsets"], cap["spatial_shapes"]
    )
    torch.testing.assert_close(locations, cap["sampling_locations"])
