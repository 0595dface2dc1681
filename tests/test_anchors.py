"""Anchor and point priors checked value by value (mmdetection 3.x ordering and values)."""

import math

import pytest
import torch

from labkit.anchors import (
    AnchorGenerator,
    PointGenerator,
    anchor_inside_flags,
    featmap_sizes_from_shape,
)

T = torch.tensor
R2 = math.sqrt(2)


def close(actual, expected, atol=1e-4):
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


def retinanet_generator():
    return AnchorGenerator(
        strides=[8, 16, 32, 64, 128],
        ratios=[0.5, 1.0, 2.0],
        octave_base_scale=4,
        scales_per_octave=3,
    )


# ----------------------------------------------------------------------------- base anchors


def test_base_anchors_ratio_major_scales_innermost():
    gen = AnchorGenerator(strides=[16], ratios=[0.5, 1.0, 2.0], scales=[1.0, 2.0])
    # ratio = h / w at constant area: ratio 0.5 -> w = 16 * sqrt(2), h = 16 / sqrt(2)
    half = [
        (8 * R2, 8 / R2),
        (16 * R2, 16 / R2),
        (8, 8),
        (16, 16),
        (8 / R2, 8 * R2),
        (16 / R2, 16 * R2),
    ]
    close(gen.base_anchors[0], [[-w, -h, w, h] for w, h in half])
    assert gen.num_base_anchors == [6] and gen.num_base_priors == [6]


def test_base_anchors_scale_major_false_puts_ratios_innermost():
    gen = AnchorGenerator(
        strides=[16], ratios=[0.5, 1.0, 2.0], scales=[1.0, 2.0], scale_major=False
    )
    half = [
        (8 * R2, 8 / R2),
        (8, 8),
        (8 / R2, 8 * R2),
        (16 * R2, 16 / R2),
        (16, 16),
        (16 / R2, 16 * R2),
    ]
    close(gen.base_anchors[0], [[-w, -h, w, h] for w, h in half])


def test_retinanet_octave_scales():
    gen = retinanet_generator()
    close(gen.scales, [4.0, 4 * 2 ** (1 / 3), 4 * 2 ** (2 / 3)])
    # stride 8, ratio 1: squares of side 32, 40.3, 50.8 centred on the cell's top-left pixel
    ratio1 = gen.base_anchors[0][3:6]
    close(
        ratio1, [[-s / 2, -s / 2, s / 2, s / 2] for s in (32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3))]
    )
    # each level is the previous one scaled by 2
    for lo, hi in zip(gen.base_anchors[:-1], gen.base_anchors[1:], strict=True):
        close(hi, lo * 2, atol=1e-3)


def test_center_offset_and_explicit_centers_and_base_sizes():
    gen = AnchorGenerator(strides=[16], ratios=[1.0], scales=[1.0], center_offset=0.5)
    close(gen.base_anchors[0], [[0.0, 0.0, 16.0, 16.0]])
    gen = AnchorGenerator(
        strides=[16], ratios=[1.0], scales=[1.0], centers=[(7.5, 7.5)], base_sizes=[9]
    )
    close(gen.base_anchors[0], [[3.0, 3.0, 12.0, 12.0]])


def test_rectangular_stride_uses_smaller_side_and_w_h_order():
    gen = AnchorGenerator(strides=[(8, 16)], ratios=[1.0], scales=[1.0])
    assert gen.base_sizes == [8]
    anchors = gen.grid_priors([(2, 2)])[0]
    # stride_w = 8 moves x, stride_h = 16 moves y
    close(anchors, [[-4.0, -4, 4, 4], [4, -4, 12, 4], [-4, 12, 4, 20], [4, 12, 12, 20]])


# ----------------------------------------------------------------------------- grid


def test_grid_mmdet_docstring_example():
    gen = AnchorGenerator([16, 32], [1.0], [1.0], [9, 18])
    level0, level1 = gen.grid_priors([(2, 2), (1, 1)])
    close(
        level0,
        [
            [-4.5, -4.5, 4.5, 4.5],
            [11.5, -4.5, 20.5, 4.5],
            [-4.5, 11.5, 4.5, 20.5],
            [11.5, 11.5, 20.5, 20.5],
        ],
    )
    close(level1, [[-9.0, -9.0, 9.0, 9.0]])


def test_grid_ordering_x_fastest_anchor_innermost():
    gen = AnchorGenerator(strides=[10], ratios=[1.0], scales=[1.0, 2.0])  # A = 2
    H, W, A = 3, 4, 2
    anchors = gen.grid_priors([(H, W)])[0]
    assert anchors.shape == (H * W * A, 4)
    for row in range(H):
        for col in range(W):
            for a, half in enumerate((5.0, 10.0)):
                cx, cy = col * 10.0, row * 10.0
                close(
                    anchors[(row * W + col) * A + a], [cx - half, cy - half, cx + half, cy + half]
                )


def test_grid_dtype_device_and_grid_anchors_alias():
    gen = retinanet_generator()
    sizes = [(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    priors = gen.grid_priors(sizes, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in priors)
    for a, b in zip(gen.grid_anchors(sizes, "cpu"), gen.grid_priors(sizes), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(gen.grid_anchors(sizes, device="cpu"), gen.grid_priors(sizes), strict=True):
        assert torch.equal(a, b)


def test_sparse_priors_match_grid():
    gen = retinanet_generator()
    grid = gen.grid_priors([(5, 7)] * 5)[2]
    idx = T([0, 8, 9, 62, 314])
    torch.testing.assert_close(gen.sparse_priors(idx, (5, 7), 2), grid[idx])


def test_seed_retinanet_counts_1216x800():
    gen = retinanet_generator()
    sizes = featmap_sizes_from_shape((1216, 800), [8, 16, 32, 64, 128])
    assert sizes == [(152, 100), (76, 50), (38, 25), (19, 13), (10, 7)]
    counts = [a.shape[0] for a in gen.grid_priors(sizes)]
    assert counts == [136800, 34200, 8550, 2223, 630]
    assert sum(counts) == 182403
    assert featmap_sizes_from_shape((800, 1344), [8, 16, 32, 64, 128]) == [
        (100, 168),
        (50, 84),
        (25, 42),
        (13, 21),
        (7, 11),
    ]
    assert featmap_sizes_from_shape((64, 48), [(8, 16)]) == [(4, 6)]


# ----------------------------------------------------------------------------- valid / inside


def test_valid_flags_under_padding():
    gen = AnchorGenerator(strides=[8], ratios=[1.0], scales=[1.0, 2.0])
    # batch padded to 32x32 -> 4x4 map; this image's own pad_shape is 20x12
    # valid rows ceil(20 / 8) = 3, valid cols ceil(12 / 8) = 2
    flags = gen.valid_flags([(4, 4)], (20, 12))[0]
    assert flags.dtype == torch.bool and flags.shape == (32,)
    cells = flags.view(4, 4, 2)
    assert (cells[..., 0] == cells[..., 1]).all()  # both anchors of a cell share the flag
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:3, :2] = True
    assert torch.equal(cells[..., 0], expected)
    # a pad_shape larger than the map never over-runs it; (h, w, c) shapes are fine
    assert gen.valid_flags([(4, 4)], (100, 100, 3))[0].all()


def test_valid_flags_seed_shapes():
    gen = retinanet_generator()
    sizes = featmap_sizes_from_shape((1216, 800), gen.strides)
    flags = gen.valid_flags(sizes, (800, 800))
    # rows ceil(800 / s), all columns valid
    expected = [100 * 100 * 9, 50 * 50 * 9, 25 * 25 * 9, 13 * 13 * 9, 7 * 7 * 9]
    assert [int(f.sum()) for f in flags] == expected


def test_anchor_inside_flags_allowed_border():
    anchors = T(
        [[0.0, 0, 10, 10], [-1, 0, 10, 10], [0, 0, 20, 10], [0, 0, 19.9, 30], [-5, -5, 24, 34]]
    )
    valid = T([True, True, True, True, False])
    # image is 30 high, 20 wide; x2 must be strictly < 20
    # and y2 strictly < 30: the 4th anchor (y2 == 30) is out
    assert anchor_inside_flags(anchors, valid, (30, 20)).tolist() == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert anchor_inside_flags(anchors, valid, (30, 20), allowed_border=1).tolist() == [
        True,
        True,
        True,
        True,
        False,
    ]
    # negative border: only the valid flags count
    assert (
        anchor_inside_flags(anchors, valid, (30, 20), allowed_border=-1).tolist() == valid.tolist()
    )
    with pytest.raises(ValueError, match="valid_flags"):
        anchor_inside_flags(anchors, valid[:3], (30, 20))
    with pytest.raises(ValueError, match="flat_anchors"):
        anchor_inside_flags(anchors[:, :3], valid, (30, 20))


# ----------------------------------------------------------------------------- points


def test_point_generator_values_and_order():
    gen = PointGenerator(strides=[8, 16])
    level0, level1 = gen.grid_priors([(2, 3), (1, 1)])
    close(level0, [[4.0, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]])
    close(level1, [[8.0, 8.0]])
    with_stride = gen.grid_priors([(2, 3), (1, 1)], with_stride=True)
    close(with_stride[1], [[8.0, 8.0, 16.0, 16.0]])
    assert with_stride[0].shape == (6, 4)
    assert gen.num_base_priors == [1, 1] and gen.num_levels == 2


def test_point_generator_offset_zero_and_rectangular_stride():
    close(PointGenerator([8], offset=0.0).grid_priors([(1, 2)])[0], [[0.0, 0.0], [8.0, 0.0]])
    pts = PointGenerator([(4, 8)]).grid_priors([(2, 1)], with_stride=True)[0]
    close(pts, [[2.0, 4.0, 4.0, 8.0], [2.0, 12.0, 4.0, 8.0]])


def test_point_valid_flags_and_sparse():
    gen = PointGenerator([8])
    flags = gen.valid_flags([(4, 4)], (20, 12))[0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:3, :2] = True
    assert torch.equal(flags, expected.view(-1))
    grid = gen.grid_priors([(4, 5)])[0]
    idx = T([0, 6, 19])
    torch.testing.assert_close(gen.sparse_priors(idx, (4, 5), 0), grid[idx])


# ----------------------------------------------------------------------------- bad input


def test_generator_bad_input():
    with pytest.raises(ValueError, match="scales"):
        AnchorGenerator([8], [1.0], scales=[1.0], octave_base_scale=4, scales_per_octave=3)
    with pytest.raises(ValueError, match="scales"):
        AnchorGenerator([8], [1.0])
    with pytest.raises(ValueError, match="center_offset"):
        AnchorGenerator([8], [1.0], [1.0], center_offset=1.5)
    with pytest.raises(ValueError, match="centers"):
        AnchorGenerator([8], [1.0], [1.0], centers=[(0, 0)], center_offset=0.5)
    with pytest.raises(ValueError, match="base_sizes"):
        AnchorGenerator([8, 16], [1.0], [1.0], base_sizes=[8])
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator([(8, 8, 8)], [1.0], [1.0])
    with pytest.raises(ValueError, match="ratios"):
        AnchorGenerator([8], [0.0], [1.0])
    gen = retinanet_generator()
    with pytest.raises(ValueError, match="featmap_sizes"):
        gen.grid_priors([(4, 4)] * 4)
    with pytest.raises(ValueError, match="featmap_sizes"):
        gen.valid_flags([(4, 4)] * 4, (32, 32))
    with pytest.raises(ValueError, match="featmap_sizes"):
        PointGenerator([8]).grid_priors([(4, 4, 4)])


def test_single_level_valid_flags():
    gen = AnchorGenerator(strides=[8], ratios=[1.0], scales=[1.0, 2.0])
    flags = gen.single_level_valid_flags((2, 3), (1, 2), 2)
    assert flags.tolist() == [True, True, True, True, False, False] + [False] * 6
    assert PointGenerator([8]).single_level_valid_flags((2, 3), (2, 1)).tolist() == [
        True, False, False, True, False, False,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="valid_size"):
        gen.single_level_valid_flags((2, 3), (3, 3), 2)


# ----------------------------------------------------------------------------- notebook helpers


def test_anchor_statistics_for_plots():
    from labkit.viz import anchors as anchor_viz

    gen = AnchorGenerator(strides=[16], ratios=[1.0], scales=[2.0])  # 32 x 32 anchors
    # a ground truth equal to the anchor of cell (row 1, col 2) has IoU 1 exactly there
    maps = anchor_viz.iou_per_cell(gen, [(4, 4)], T([16.0, 0.0, 48.0, 32.0]))
    assert maps[0].shape == (4, 4)
    assert maps[0][1, 2].item() == 1.0 and maps[0].max().item() == 1.0
    # IoU of that anchor with a shifted copy one cell over: overlap 16 x 32, union 48 x 32
    assert maps[0][1, 1].item() == pytest.approx(1 / 3)
    rows = anchor_viz.positives_by_size(gen, (64, 64), [8, 32], num_boxes=5)
    # an 8 x 8 object inside a 32 x 32 anchor has IoU <= 64 / 1024: never positive
    assert rows[0]["mean_pos"] == 0 and rows[0]["zero_pos"] == 1.0
    assert rows[0]["mean_max_iou"] <= 64 / 1024 + 1e-6
    assert rows[1]["mean_pos"] >= 1


def test_anchor_plots_draw_without_error():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.viz import anchors as anchor_viz

    gen = AnchorGenerator(strides=[16, 32], ratios=[0.5, 1.0, 2.0], scales=[1.0, 2.0])
    sizes = featmap_sizes_from_shape((64, 96), gen.strides)
    img = torch.rand(3, 64, 96)
    ax = anchor_viz.plot_base_anchors(gen, level=1)
    assert len(ax.patches) == 6
    _, axes = anchor_viz.plot_level_grids(img, gen, sizes, size=1.5)
    assert len(axes) == 2
    flags = gen.valid_flags(sizes, (40, 64))
    anchor_viz.plot_valid_flags(flags, gen, sizes, (40, 64), size=1.5)
    anchor_viz.plot_iou_heatmaps(
        gen, sizes, T([10.0, 10.0, 40.0, 30.0]), img=img, window=48, size=1.5
    )
    rows = anchor_viz.positives_by_size(gen, (64, 96), [16, 32], num_boxes=3)
    anchor_viz.plot_positives_by_size(rows)
    plt.close("all")


def test_anchor_figures_label_their_axes_and_explain_their_marks():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.viz import anchors as anchor_viz

    gen = AnchorGenerator(strides=[8, 16], ratios=[0.5, 1.0, 2.0], scales=[4.0, 8.0])
    ax = anchor_viz.plot_base_anchors(gen, level=0)
    assert ax.get_xlabel() == "x (pixels from the centre)"
    assert ax.get_ylabel() == "y (pixels from the centre)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "ratio h/w = 0.5", "ratio h/w = 1", "ratio h/w = 2", "scale 4.00", "scale 8.00"
    ]  # fmt: skip
    widths = [h.get_linewidth() for h in ax.get_legend().legend_handles[3:]]
    assert widths == pytest.approx([0.8, 1.6])  # the line width the scale's anchors are drawn with

    sizes = featmap_sizes_from_shape((64, 64), gen.strides)
    img = torch.rand(3, 64, 64)
    fig, _ = anchor_viz.plot_level_grids(img, gen, sizes, size=1.5)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "anchor centres, one per cell (colour: level)",
        "the 6 anchors of the cell at the image centre",
        "their common centre",
    ]
    ax = anchor_viz.plot_anchor_centres_zoom(img, gen, sizes, level=0, cell=(1, 1), num_cells=3)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (pixels)", "y (pixels)")
    plt.close("all")
