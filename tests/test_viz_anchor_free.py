"""Notebook 03's anchor-free pictures: what-if counts, dot sizes, the centerness field, legends."""

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import EllipseCollection  # noqa: E402

from labkit.viz import anchor_free as afv  # noqa: E402

# One 24 x 24 box in the corner of a 64 x 64 image: the stride-8 points strictly inside it are
# x, y in {4, 12, 20} (9 points, largest distance 12 at (12, 12), 20 elsewhere); the only
# stride-16 point inside is (8, 8), largest distance 16.
BOX = torch.tensor([[0.0, 0.0, 24.0, 24.0]])
SHAPE = (64, 64)


def test_what_if_counts_follow_radius_and_range_scale():
    settings = [
        {"center_sampling": True, "radius": 0.5},  # square (8, 16): only (12, 12)
        {"center_sampling": True, "radius": 1.5},  # (0, 24) clipped to the box: all 9
        {"center_sampling": False},
        # ranges x 0.25: P3 is [-1, 16], so only (12, 12) stays; P4 is [16, 32], both ends
        # inclusive, so the stride-16 point (8, 8) with largest distance 16 joins
        {"center_sampling": False, "range_scale": 0.25},
    ]
    counts = afv.fcos_what_if_counts(BOX, SHAPE, settings)
    assert counts.shape == (4, 1, 5)
    assert counts[:, 0].tolist() == [
        [1, 0, 0, 0, 0],
        [9, 0, 0, 0, 0],
        [9, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
    ]


def test_what_if_table_has_a_line_per_setting():
    settings = [
        {"center_sampling": True, "radius": 0.5},
        {"center_sampling": False, "range_scale": 0.25},
    ]
    lines = afv.fcos_what_if_table(BOX, SHAPE, settings).splitlines()
    assert lines[0].split()[:6] == ["setting", "P3", "P4", "P5", "P6", "P7"]
    assert lines[1].startswith("center sampling r 0.5, ranges x 1 ")
    assert lines[1].split()[-7:] == ["1", "0", "0", "0", "0", "[1]", "1"]
    assert lines[2].startswith("all points inside, ranges x 0.25 ")
    assert lines[2].split()[-7:] == ["1", "1", "0", "0", "0", "[2]", "2"]
    assert len(afv.fcos_what_if_table(BOX, SHAPE).splitlines()) == 1 + len(afv.WHAT_IF_SETTINGS)


def test_dots_are_sized_in_image_pixels_and_grow_with_the_level():
    assign = afv.fcos_assignment(BOX, SHAPE, regress_ranges=afv.scaled_regress_ranges(0.25))
    _, ax = plt.subplots()
    afv.draw_assignment(ax, torch.zeros(3, 64, 64), BOX, assign, dot_px=6.0)
    dots = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    assert len(dots) == 2  # one collection per level the GT is positive on
    np.testing.assert_allclose(dots[0].get_offsets(), [[12.0, 12.0]])
    np.testing.assert_allclose(dots[0].get_widths(), [6.0])
    np.testing.assert_allclose(dots[1].get_offsets(), [[8.0, 8.0]])
    np.testing.assert_allclose(dots[1].get_widths(), [6.0 * 2**0.5])  # level 1: x sqrt(2)
    plt.close("all")


def test_centerness_field_plot_is_labelled_and_in_pixel_coordinates():
    ax = afv.plot_centerness_field((2, 2, 8, 6), (8, 10))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (px)", "y (px)")
    assert ax.get_title() == "centerness target inside a 6 x 4 box"
    image = ax.get_images()[0]
    assert image.get_extent() == [0, 10, 8, 0]
    field = image.get_array()
    assert field.shape == (8, 10) and field[0, 0] == 0.0
    # pixel (row 3, col 4) has its centre at (4.5, 3.5): l, r = 2.5, 3.5; t, b = 1.5, 2.5
    assert field[3, 4] == pytest.approx(((2.5 / 3.5) * (1.5 / 2.5)) ** 0.5)
    colorbar_ax = [a for a in ax.figure.axes if a is not ax][0]
    assert colorbar_ax.get_ylabel() == "centerness target (0 outside the box)"
    plt.close("all")


def test_method_panels_share_a_legend_of_the_objects():
    boxes = torch.tensor([[0.0, 0.0, 24.0, 24.0], [30.0, 30.0, 60.0, 50.0]])
    assign = afv.fcos_assignment(boxes, SHAPE)
    fig = afv.plot_assignments(
        torch.zeros(3, 64, 64), boxes, {"A": assign, "B": assign}, class_names=["x", "y"],
        labels=torch.tensor([1, 0]),
    )  # fmt: skip
    assert [ax.get_title() for ax in fig.axes] == ["A", "B"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["GT 0: y 24x24", "GT 1: x 30x20"]
    assert legend.get_title().get_text().startswith("objects (box and dot colour)")
    plt.close("all")
