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

    Colour follows the aspect ratio, line width the scale, so the ratio-major / scale-minor
    order of ``generator.base_anchors[level]`` (``[A, 4]``) can be read off the legend.

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
    ax.legend(fontsize=7, loc="lower right")
    return ax


def plot_level_grids(
    img: Any,
    generator: AnchorGenerator,
    featmap_sizes: Sequence[tuple[int, int]],
    cell_xy: tuple[float, float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    size: float = 3.0,
) -> tuple[Any, np.ndarray]:
    """One panel per level: the anchor centres (one dot per cell) and the anchors of one cell.

    Args:
        img: the image the anchors are laid over (anything :func:`show_image` takes).
        featmap_sizes: ``(h, w)`` per level (e.g. from :func:`featmap_sizes_from_shape`).
        cell_xy: a pixel; the cell containing it on each level shows its anchors (default:
            the image centre).

    Returns:
        ``(fig, axes)``.
    """
    priors = generator.grid_priors(featmap_sizes)
    fig, axes = grid(generator.num_levels, ncols=generator.num_levels, size=size)
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
    return fig, axes


def plot_valid_flags(
    valid_flags: Sequence[Tensor],
    generator: AnchorGenerator,
    featmap_sizes: Sequence[tuple[int, int]],
    pad_shape: tuple[int, int],
    size: float = 3.0,
) -> tuple[Any, np.ndarray]:
    """Valid cells per level for one image of a padded batch, with its ``pad_shape`` outlined.

    Args:
        valid_flags: from ``generator.valid_flags(featmap_sizes, pad_shape)``.

    Returns:
        ``(fig, axes)``.
    """
    fig, axes = grid(generator.num_levels, ncols=generator.num_levels, size=size)
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
) -> tuple[Any, np.ndarray]:
    """Per level, the best anchor IoU of each cell with one ground-truth box, over the image.

    Cells whose best anchor reaches ``pos_iou_thr`` are outlined: those are the positives a
    MaxIoU assigner would give this object. ``window`` (pixels) zooms every panel on a square
    around the box, for small objects.

    Returns:
        ``(fig, axes)``.
    """
    maps = iou_per_cell(generator, featmap_sizes, gt_bbox)
    fig, axes = grid(generator.num_levels, ncols=generator.num_levels, size=size)
    for lvl, (ax, iou) in enumerate(zip(axes, maps, strict=True)):
        fh, fw = iou.shape
        stride_w, stride_h = generator.strides[lvl]
        extent = (0, fw * stride_w, fh * stride_h, 0)
        if img is not None:
            show_image(img, ax=ax, mean=mean, std=std)
        ax.imshow(iou.cpu().numpy(), cmap="magma", vmin=0, vmax=1, alpha=0.75, extent=extent)
        pos = (iou >= pos_iou_thr).nonzero().tolist()
        boxes = [
            [c * stride_w, r * stride_h, (c + 1) * stride_w, (r + 1) * stride_h] for r, c in pos
        ]
        draw_boxes(ax, boxes, color="cyan", linewidth=0.8)
        draw_boxes(ax, gt_bbox.view(1, 4), color="white", linestyle="--", linewidth=1)
        if window is None:
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
        else:
            bx, by = float(gt_bbox[0] + gt_bbox[2]) / 2, float(gt_bbox[1] + gt_bbox[3]) / 2
            ax.set_xlim(bx - window / 2, bx + window / 2)
            ax.set_ylim(by + window / 2, by - window / 2)
        ax.set_title(f"stride {stride_w}: max IoU {float(iou.max()):.2f}")
        ax.set_xticks([])
        ax.set_yticks([])
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

    Returns:
        One dict per size: ``size``, ``mean_pos`` (positives per object), ``zero_pos`` (fraction
        of objects with no positive), ``mean_ignored``, ``mean_max_iou``.
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
        rows.append(
            {
                "size": float(size),
                "mean_pos": float(pos.mean()),
                "zero_pos": float((pos == 0).float().mean()),
                "mean_ignored": float(ignored.mean()),
                "mean_max_iou": float(ious.max(0).values.mean()),
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
    twin.axhline(0.5, color="0.6", linewidth=0.6)
    twin.set_ylim(0, 1)
    twin.set_ylabel("best anchor IoU")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
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
