"""Pictures of anchors: base anchors, per-level grids, valid flags, IoU heatmaps and an explorer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit.anchors import AnchorGenerator, featmap_sizes_from_shape
from labkit.boxes import bbox_overlaps
from labkit.notebook import explorer
from labkit.viz.draw import draw_boxes, draw_points, grid, level_color, show_image

__all__ = [
    "anchor_explorer",
    "iou_per_cell",
    "plot_anchor_centres_zoom",
    "plot_base_anchors",
    "plot_iou_heatmaps",
    "plot_level_grids",
    "plot_positives_by_size",
    "plot_valid_flags",
    "positives_by_size",
]


def _axes(ax: Any, figsize: tuple[float, float] = (4.0, 4.0)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def plot_base_anchors(generator: AnchorGenerator, level: int = 0, ax: Any = None) -> Any:
    """Draw the base anchors of one level around their common centre.

    Colour follows the aspect ratio, line width the scale (both in the legend), so the
    ratio-major / scale-minor order of ``generator.base_anchors[level]`` (``[A, 4]``) can be
    read off it. The axes are pixels relative to the anchors' common centre.

    Returns:
        The matplotlib ``Axes``.
    """
    ax = _axes(ax)
    base = generator.base_anchors[level]
    ratios, scales = generator.ratios.tolist(), generator.scales.tolist()
    for i, box in enumerate(base.tolist()):
        r, s = (i // len(scales), i % len(scales)) if generator.scale_major else (
            i % len(ratios), i // len(ratios))  # fmt: skip
        draw_boxes(ax, [box], color=level_color(r), linewidth=0.8 + 0.8 * s)
        if s == len(scales) - 1:
            ax.plot([], [], color=level_color(r), label=f"ratio h/w = {ratios[r]:g}")
    for s, scale in enumerate(scales):
        ax.plot([], [], color="0.4", linewidth=0.8 + 0.8 * s, label=f"scale {scale:.2f}")
    lim = float(base.abs().max()) * 1.1
    ax.set_xlim(-lim, lim)
    ax.set_ylim(lim, -lim)  # image coordinates: y grows downwards
    ax.set_aspect("equal")
    ax.axhline(0, color="0.8", linewidth=0.5)
    ax.axvline(0, color="0.8", linewidth=0.5)
    stride = generator.strides[level]
    ax.set_title(
        f"{len(base)} base anchors, stride {stride[0]}\nscales "
        + ", ".join(f"{s:.2f}" for s in scales)
    )
    ax.set_xlabel("x (pixels from the centre)")
    ax.set_ylabel("y (pixels from the centre)")
    # below the axes: inside, it would hide the widest anchors' edges
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return ax


def plot_level_grids(
    img: Any,
    generator: AnchorGenerator,
    featmap_sizes: Sequence[tuple[int, int]],
    cell_xy: tuple[float, float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    size: float = 3.0,
    ncols: int | None = None,
) -> tuple[Any, np.ndarray]:
    """One panel per level: the anchor centres (one dot per cell) and the anchors of one cell.

    A legend under the panels says what the dots, the boxes and the white dot are.

    Args:
        img: the image the anchors are laid over (anything :func:`show_image` takes).
        featmap_sizes: ``(h, w)`` per level (e.g. from :func:`featmap_sizes_from_shape`).
        cell_xy: a pixel; the cell containing it on each level shows its anchors (default:
            the image centre).
        ncols: panels per row (default: all levels in one row).

    Returns:
        ``(fig, axes)``.
    """
    priors = generator.grid_priors(featmap_sizes)
    ncols = generator.num_levels if ncols is None else ncols
    fig, axes = grid(generator.num_levels, ncols=ncols, size=size)
    h_img = featmap_sizes[0][0] * generator.strides[0][1]
    w_img = featmap_sizes[0][1] * generator.strides[0][0]
    cx, cy = cell_xy if cell_xy is not None else (w_img / 2, h_img / 2)
    for lvl, (ax, anchors, (fh, fw)) in enumerate(zip(axes, priors, featmap_sizes, strict=True)):
        show_image(img, ax=ax, mean=mean, std=std)
        a = generator.num_base_anchors[lvl]
        stride_w, stride_h = generator.strides[lvl]
        centres = ((anchors[:, :2] + anchors[:, 2:]) / 2)[::a]  # one per cell
        # dot area grows with the stride so fine grids stay a mesh rather than a blot
        dot = 1.5 * (min(stride_w, stride_h) / 16) ** 2
        draw_points(ax, centres, color=level_color(lvl), size=dot, alpha=0.8)
        col = min(int(cx // stride_w), fw - 1)
        row = min(int(cy // stride_h), fh - 1)
        start = (row * fw + col) * a  # x fastest, anchor innermost
        draw_boxes(ax, anchors[start : start + a], color=level_color(lvl), linewidth=1.2)
        draw_points(ax, centres[row * fw + col : row * fw + col + 1], color="white", size=12)
        margin = 0.3
        ax.set_xlim(-margin * w_img, (1 + margin) * w_img)
        ax.set_ylim((1 + margin) * h_img, -margin * h_img)
        ax.set_title(f"stride {stride_w}: {fh}x{fw} cells\n{anchors.shape[0]} anchors")
    from matplotlib.lines import Line2D

    a = generator.num_base_anchors[0]
    cell = (
        "the cell at the image centre" if cell_xy is None else f"the cell holding ({cx:g}, {cy:g})"
    )
    handles = [
        Line2D([], [], linestyle="", marker="o", color="0.4", markersize=4,
               label="anchor centres, one per cell (colour: level)"),
        Line2D([], [], color="0.4", linewidth=1.2, label=f"the {a} anchors of {cell}"),
        Line2D([], [], linestyle="", marker="o", markerfacecolor="white", markeredgecolor="0.4",
               markersize=5, label="their common centre"),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    return fig, axes


def plot_anchor_centres_zoom(
    img: Any,
    generator: AnchorGenerator,
    featmap_sizes: Sequence[tuple[int, int]],
    level: int = 0,
    cell: tuple[int, int] = (2, 2),
    num_cells: int = 5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    ax: Any = None,
) -> Any:
    """Zoom on a few cells of one level: grid lines, anchor centres, cell centres, one cell's anchors.

    The cell ``(row, col)`` of stride ``s`` covers pixels ``[col * s, (col + 1) * s)``. Its
    anchors are centred at ``(col * s, row * s) + center_offset * base_size`` (mmdetection's
    ``AnchorGenerator``; ``center_offset=0`` puts them on the cell's top-left corner). The
    plot reads the centres off ``generator.grid_priors`` rather than assuming them, and marks
    the cell centres ``((col + 0.5) s, (row + 0.5) s)`` for comparison.

    Args:
        cell: ``(row, col)`` whose anchors are drawn and which sits in the window.
        num_cells: the window is ``num_cells`` cells wide, starting at the top-left image corner.

    Returns:
        The matplotlib ``Axes``.
    """
    from matplotlib.patches import Rectangle

    ax = _axes(ax, figsize=(4.5, 4.5))
    anchors = generator.grid_priors(featmap_sizes)[level]
    fh, fw = featmap_sizes[level]
    a = generator.num_base_anchors[level]
    stride_w, stride_h = generator.strides[level]
    show_image(img, ax=ax, mean=mean, std=std)
    h_img, w_img = fh * stride_h, fw * stride_w
    xs = np.arange(0, w_img + 1, stride_w)
    ys = np.arange(0, h_img + 1, stride_h)
    ax.vlines(xs, 0, h_img, colors="0.6", linewidth=0.8)
    ax.hlines(ys, 0, w_img, colors="0.6", linewidth=0.8)
    row, col = cell
    ax.add_patch(
        Rectangle(
            (col * stride_w, row * stride_h), stride_w, stride_h,
            facecolor="white", alpha=0.35, edgecolor="white", linewidth=1.5,
        )
    )  # fmt: skip
    start = (row * fw + col) * a
    # A colour of their own: the grid lines are grey and the shading white.
    draw_boxes(ax, anchors[start : start + a], color="deepskyblue", linewidth=1.0, alpha=0.9)
    ax.plot([], [], color="deepskyblue", linewidth=1.0, label=f"the {a} anchors of the shaded cell")
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2)[::a]
    ax.scatter(
        centres[:, 0], centres[:, 1], s=36, c="red", edgecolors="white", linewidths=0.8,
        label="anchor centres (from grid_priors)", zorder=3,
    )  # fmt: skip
    gx, gy = np.meshgrid((np.arange(fw) + 0.5) * stride_w, (np.arange(fh) + 0.5) * stride_h)
    ax.scatter(
        gx.ravel(), gy.ravel(), s=36, c="yellow", marker="x", linewidths=1.5,
        label="cell centres", zorder=3,
    )  # fmt: skip
    lo = -0.5 * stride_w
    ax.set_xlim(lo, lo + num_cells * stride_w)
    ax.set_ylim(-0.5 * stride_h + num_cells * stride_h, -0.5 * stride_h)
    ax.set_xticks(xs[: num_cells + 1])
    ax.set_yticks(ys[: num_cells + 1])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("x (pixels)", fontsize=8)
    ax.set_ylabel("y (pixels)", fontsize=8)
    ax.set_title(
        f"stride {stride_w}, zoom: cell (row {row}, col {col}) shaded,\n"
        f"its {a} anchors centred on its top-left corner", fontsize=9
    )  # fmt: skip
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return ax


def plot_valid_flags(
    valid_flags: Sequence[Tensor],
    generator: AnchorGenerator,
    featmap_sizes: Sequence[tuple[int, int]],
    pad_shape: tuple[int, int],
    size: float = 3.0,
    ncols: int | None = None,
) -> tuple[Any, np.ndarray]:
    """Valid cells per level for one image of a padded batch, with its ``pad_shape`` outlined.

    Args:
        valid_flags: from ``generator.valid_flags(featmap_sizes, pad_shape)``.
        ncols: panels per row (default: all levels in one row).

    Returns:
        ``(fig, axes)``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ncols = generator.num_levels if ncols is None else ncols
    fig, axes = grid(generator.num_levels, ncols=ncols, size=size)
    for lvl, (ax, flags, (fh, fw)) in enumerate(zip(axes, valid_flags, featmap_sizes, strict=True)):
        a = generator.num_base_anchors[lvl]
        stride_w, stride_h = generator.strides[lvl]
        cells = flags.view(fh, fw, a)[..., 0].float().cpu().numpy()
        ax.imshow(
            cells, cmap="Greens", vmin=0, vmax=1.2, extent=(0, fw * stride_w, fh * stride_h, 0)
        )
        draw_boxes(
            ax, [[0, 0, pad_shape[1], pad_shape[0]]], color="black", linestyle="--", linewidth=1
        )
        ax.set_title(f"stride {stride_w}: {int(flags.sum())}/{flags.numel()} valid")
        ax.set_xticks([])
        ax.set_yticks([])
    green = plt.get_cmap("Greens")(1 / 1.2)
    handles = [
        Patch(facecolor=green, label="valid cell"),
        Patch(facecolor=plt.get_cmap("Greens")(0.0), edgecolor="0.7", label="invalid cell"),
        Line2D([], [], color="black", linestyle="--", label="pad_shape"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    return fig, axes


def iou_per_cell(
    generator: AnchorGenerator,
    featmap_sizes: Sequence[tuple[int, int]],
    gt_bbox: Tensor,
) -> list[Tensor]:
    """Best IoU with ``gt_bbox`` (``Tensor[4]``) over each cell's anchors: ``Tensor[H, W]`` per level."""
    maps = []
    for lvl, anchors in enumerate(generator.grid_priors(featmap_sizes)):
        ious = bbox_overlaps(anchors, gt_bbox.view(1, 4).to(anchors))[:, 0]  # [H * W * A]
        fh, fw = featmap_sizes[lvl]
        maps.append(ious.view(fh, fw, -1).amax(dim=-1))
    return maps


def plot_iou_heatmaps(
    generator: AnchorGenerator,
    featmap_sizes: Sequence[tuple[int, int]],
    gt_bbox: Tensor,
    img: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pos_iou_thr: float = 0.5,
    size: float = 3.0,
    window: float | None = None,
    ncols: int | None = None,
    colorbar: bool = True,
) -> tuple[Any, np.ndarray]:
    """Per level, the best anchor IoU of each cell with one ground-truth box, over the image.

    Cells whose best anchor reaches ``pos_iou_thr`` are outlined: those are the positives a
    MaxIoU assigner would give this object. Each coloured square is centred on the common
    centre of its cell's anchors (the cell's top-left corner for ``center_offset=0``), so the
    picture is not shifted by half a cell. ``window`` (pixels) zooms every panel on a square
    around the box, for small objects. ``ncols``: panels per row (default: one row);
    ``colorbar``: add one IoU colour bar shared by all panels.

    Returns:
        ``(fig, axes)``.
    """
    maps = iou_per_cell(generator, featmap_sizes, gt_bbox)
    ncols = generator.num_levels if ncols is None else ncols
    fig, axes = grid(generator.num_levels, ncols=ncols, size=size)
    mappable = None
    for lvl, (ax, iou) in enumerate(zip(axes, maps, strict=True)):
        fh, fw = iou.shape
        stride_w, stride_h = generator.strides[lvl]
        # squares centred on the anchor centres: (col * s, row * s) + center_offset * base size
        first = generator.base_anchors[lvl]
        ox = float(first[:, 0::2].mean()) - 0.5 * stride_w
        oy = float(first[:, 1::2].mean()) - 0.5 * stride_h
        extent = (ox, ox + fw * stride_w, oy + fh * stride_h, oy)
        if img is not None:
            show_image(img, ax=ax, mean=mean, std=std)
        mappable = ax.imshow(
            iou.cpu().numpy(), cmap="magma", vmin=0, vmax=1, alpha=0.75, extent=extent
        )
        pos = (iou >= pos_iou_thr).nonzero().tolist()
        boxes = [
            [ox + c * stride_w, oy + r * stride_h, ox + (c + 1) * stride_w, oy + (r + 1) * stride_h]
            for r, c in pos
        ]
        draw_boxes(ax, boxes, color="cyan", linewidth=0.8)
        draw_boxes(ax, gt_bbox.view(1, 4), color="white", linestyle="--", linewidth=1)
        if window is None:
            ax.set_xlim(0, fw * stride_w)
            ax.set_ylim(fh * stride_h, 0)
        else:
            bx, by = float(gt_bbox[0] + gt_bbox[2]) / 2, float(gt_bbox[1] + gt_bbox[3]) / 2
            ax.set_xlim(bx - window / 2, bx + window / 2)
            ax.set_ylim(by + window / 2, by - window / 2)
        ax.set_title(f"stride {stride_w}: max IoU {float(iou.max()):.2f}")
        ax.set_xticks([])
        ax.set_yticks([])
    if colorbar and mappable is not None:
        fig.colorbar(
            mappable, ax=list(fig.axes), shrink=0.8, label="best IoU of the cell's anchors"
        )
    return fig, axes


def positives_by_size(
    generator: AnchorGenerator,
    input_shape: tuple[int, int],
    sizes: Sequence[float],
    num_boxes: int = 20,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.4,
    seed: int = 0,
) -> list[dict]:
    """How many anchors a square object of each size gets at MaxIoU thresholds.

    For each size, ``num_boxes`` squares are placed at random (seeded) centres inside
    ``input_shape`` (``(h, w)``); for each square we count anchors with IoU ``>= pos_iou_thr``
    (positives) and with IoU in ``[neg_iou_thr, pos_iou_thr)`` (ignored by RetinaNet).
    ``mean_pos_low_quality`` adds MaxIoU's low-quality step for an object alone in the image
    (``match_low_quality=True``, ``gt_max_assign_all=True``, ``min_pos_iou=0``): every anchor
    tied at the object's best IoU is positive too.

    Returns:
        One dict per size: ``size``, ``mean_pos`` (positives per object), ``zero_pos`` (fraction
        of objects with no positive), ``mean_ignored``, ``mean_max_iou``,
        ``mean_pos_low_quality``, ``mean_tied_best`` (anchors tied at the best IoU).
    """
    h, w = input_shape
    anchors = torch.cat(
        generator.grid_priors(featmap_sizes_from_shape(input_shape, generator.strides))
    )
    g = torch.Generator().manual_seed(seed)
    rows = []
    for size in sizes:
        half = size / 2
        cx = half + torch.rand(num_boxes, generator=g) * (w - size)
        cy = half + torch.rand(num_boxes, generator=g) * (h - size)
        boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)
        ious = bbox_overlaps(anchors, boxes)  # [num_anchors, num_boxes]
        pos = (ious >= pos_iou_thr).sum(0).float()
        ignored = ((ious >= neg_iou_thr) & (ious < pos_iou_thr)).sum(0).float()
        best = ious.max(0).values
        tied = ious == best  # exact ties, as mmdetection's ``==`` test
        low_quality = ((ious >= pos_iou_thr) | tied).sum(0).float()
        rows.append(
            {
                "size": float(size),
                "mean_pos": float(pos.mean()),
                "zero_pos": float((pos == 0).float().mean()),
                "mean_ignored": float(ignored.mean()),
                "mean_max_iou": float(best.mean()),
                "mean_pos_low_quality": float(low_quality.mean()),
                "mean_tied_best": float(tied.sum(0).float().mean()),
            }
        )
    return rows


def plot_positives_by_size(rows: Sequence[dict], ax: Any = None) -> Any:
    """Plot :func:`positives_by_size` rows: positives per object and max IoU against object size."""
    ax = _axes(ax, (6.0, 3.5))
    sizes = [r["size"] for r in rows]
    ax.plot(
        sizes,
        [r["mean_pos"] for r in rows],
        "o-",
        color=level_color(0),
        label="anchors with IoU >= 0.5",
    )
    if all("mean_pos_low_quality" in r for r in rows):
        ax.plot(
            sizes,
            [r["mean_pos_low_quality"] for r in rows],
            "o:",
            color=level_color(1),
            label="positives with low-quality matches",
        )
    ax.plot(
        sizes,
        [r["mean_ignored"] for r in rows],
        "s--",
        color=level_color(2),
        label="0.4 <= IoU < 0.5 (ignored)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("object side (pixels)")
    ax.set_ylabel("anchors per object")
    twin = ax.twinx()
    twin.plot(sizes, [r["mean_max_iou"] for r in rows], "^:", color="0.3", label="best IoU")
    twin.axhline(0.5, color="0.4", linewidth=0.9, linestyle="--", label="IoU 0.5 (pos_iou_thr)")
    twin.text(sizes[-1], 0.51, "IoU = 0.5", ha="right", va="bottom", fontsize=8, color="0.3")
    twin.set_ylim(0, 1)
    twin.set_ylabel("best anchor IoU")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(
        lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left",
        bbox_to_anchor=(1.12, 1.0), borderaxespad=0.0, framealpha=0.9,
    )  # fmt: skip
    return ax


def anchor_explorer(
    img: Any = None,
    image_shape: tuple[int, int] = (512, 512),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> None:
    """An ipywidgets explorer: pick ratios, octave scales and a stride, see the anchors of a cell.

    The anchors of the cell under the image centre are drawn over ``img`` (or a blank canvas
    of ``image_shape``), with the number of anchors the level would have.

    In a headless batch run it draws once with the defaults (see ``labkit.notebook.explorer``).
    """
    import matplotlib.pyplot as plt

    h, w = image_shape
    ratio_choices = {
        "1": (1.0,),
        "0.5, 1, 2": (0.5, 1.0, 2.0),
        "0.25, 0.5, 1, 2, 4": (0.25, 0.5, 1.0, 2.0, 4.0),
    }

    def draw(ratios: str, octave_base_scale: float, scales_per_octave: int, stride: int) -> None:
        gen = AnchorGenerator(
            strides=[stride],
            ratios=ratio_choices[ratios],
            octave_base_scale=octave_base_scale,
            scales_per_octave=scales_per_octave,
        )
        fh, fw = featmap_sizes_from_shape((h, w), [stride])[0]
        row, col = min(h // 2 // stride, fh - 1), min(w // 2 // stride, fw - 1)
        anchors = gen.single_level_grid_priors((fh, fw), 0)
        a = gen.num_base_anchors[0]
        fig, ax = plt.subplots(figsize=(5.0, 5.0))
        if img is not None:
            show_image(img, ax=ax, mean=mean, std=std)
        else:
            ax.imshow(np.full((h, w), 0.9), cmap="gray", vmin=0, vmax=1)
        cell = anchors[(row * fw + col) * a : (row * fw + col + 1) * a]
        draw_boxes(ax, cell, color=level_color(0), linewidth=1.2)
        centres = ((anchors[:, :2] + anchors[:, 2:]) / 2)[::a]
        draw_points(ax, centres, color=level_color(3), size=2)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f"stride {stride}: {fh}x{fw} cells x {a} = {anchors.shape[0]} anchors")
        plt.show()

    defaults = {
        "ratios": "0.5, 1, 2",
        "octave_base_scale": 4.0,
        "scales_per_octave": 3,
        "stride": 32,
    }
    explorer(
        draw,
        defaults,
        lambda widgets: {
            "ratios": widgets.Dropdown(options=list(ratio_choices), value=defaults["ratios"]),
            "octave_base_scale": widgets.FloatSlider(value=4.0, min=1.0, max=8.0, step=0.5),
            "scales_per_octave": widgets.IntSlider(value=3, min=1, max=4),
            "stride": widgets.Dropdown(options=[8, 16, 32, 64, 128], value=32),
        },
    )
