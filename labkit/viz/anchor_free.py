"""Anchor-free assignment pictures: FCOS positives per level, centerness heatmaps, ambiguity, and FoveaBox/FSAF/RepPoints/ATSS positives side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit.anchors import AnchorGenerator, PointGenerator
from labkit.heads.fcos import FCOS_REGRESS_RANGES, centerness_target, fcos_targets_single
from labkit.viz.draw import class_color, draw_boxes, grid, level_color, show_image

STRIDES = (8, 16, 32, 64, 128)


@dataclass
class PointAssignment:
    """Which prior location learns which GT, for one image, levels concatenated.

    Attributes:
        points: Tensor[N, 2] (x, y) of every prior (anchor centres for anchor-based methods).
        level: LongTensor[N] level index of every prior.
        gt_inds: LongTensor[N] 0-based GT index, -1 where the prior is not positive.
        bbox_targets: Tensor[N, 4] FCOS (l, t, r, b) targets (FCOS only, else None).
    """

    points: Tensor
    level: Tensor
    gt_inds: Tensor
    bbox_targets: Tensor | None = None

    def positives_per_gt(self, num_gts: int) -> Tensor:
        """LongTensor[K, L]: positives of every GT on every level."""
        num_levels = int(self.level.max()) + 1
        counts = torch.zeros(num_gts, num_levels, dtype=torch.long)
        pos = self.gt_inds >= 0
        counts.index_put_(
            (self.gt_inds[pos], self.level[pos]),
            torch.ones_like(self.gt_inds[pos]),
            accumulate=True,
        )
        return counts


def featmap_sizes(
    img_shape: tuple[int, int], strides: Sequence[int] = STRIDES
) -> list[tuple[int, int]]:
    """(h, w) of every level for an ``img_shape`` (h, w) input (ceil division, as the FPN pads)."""
    return [(-(-img_shape[0] // s), -(-img_shape[1] // s)) for s in strides]


def _levels_of(sizes: list[tuple[int, int]]) -> Tensor:
    return torch.cat([torch.full((h * w,), i, dtype=torch.long) for i, (h, w) in enumerate(sizes)])


def fcos_assignment(
    gt_bboxes: Tensor,
    img_shape: tuple[int, int],
    strides: Sequence[int] = STRIDES,
    regress_ranges: Sequence[tuple[float, float]] = FCOS_REGRESS_RANGES,
    center_sampling: bool = False,
    radius: float = 1.5,
) -> PointAssignment:
    """FCOS targets of one image (``fcos_targets_single``) with the GT index of every point."""
    sizes = featmap_sizes(img_shape, strides)
    pts = PointGenerator(strides, offset=0.5).grid_priors(sizes)
    points = torch.cat(pts)
    ranges = torch.cat(
        [p.new_tensor(r)[None].expand(len(p), 2) for p, r in zip(pts, regress_ranges, strict=True)]
    )
    stride_of = torch.cat(
        [p.new_full((len(p),), float(s)) for p, s in zip(pts, strides, strict=True)]
    )
    labels = torch.zeros(len(gt_bboxes), dtype=torch.long)
    _, targets, gt_inds = fcos_targets_single(
        points,
        gt_bboxes.float(),
        labels,
        ranges,
        stride_of,
        1,
        center_sampling,
        radius,
        return_gt_inds=True,
    )
    return PointAssignment(points, _levels_of(sizes), gt_inds, targets)


def atss_assignment(
    gt_bboxes: Tensor, img_shape: tuple[int, int], topk: int = 9
) -> PointAssignment:
    """ATSS (mmdetection's config: one 8 x stride square anchor per location) on one image."""
    from labkit.assigners import ATSSAssigner

    sizes = featmap_sizes(img_shape)
    gen = AnchorGenerator(
        strides=list(STRIDES), ratios=[1.0], octave_base_scale=8, scales_per_octave=1
    )
    anchors = gen.grid_priors(sizes)
    flat = torch.cat(anchors)
    res = ATSSAssigner(topk=topk).assign(flat, [len(a) for a in anchors], gt_bboxes.float())
    return PointAssignment((flat[:, :2] + flat[:, 2:]) / 2, _levels_of(sizes), res.gt_inds - 1)


def fovea_assignment(
    gt_bboxes: Tensor, img_shape: tuple[int, int], sigma: float = 0.4
) -> PointAssignment:
    """FoveaBox fovea cells (mmdetection's scale ranges and base edges) on one image."""
    from labkit.heads.fovea import fovea_targets_single

    sizes = featmap_sizes(img_shape)
    pts = PointGenerator(STRIDES, offset=0.5).grid_priors(sizes)
    labels = torch.zeros(len(gt_bboxes), dtype=torch.long)
    _, _, inds = fovea_targets_single(
        gt_bboxes.float(), labels, sizes, pts, 1, STRIDES, sigma=sigma, return_gt_inds=True
    )
    return PointAssignment(torch.cat(pts), _levels_of(sizes), torch.cat(inds))


def fsaf_assignment(gt_bboxes: Tensor, img_shape: tuple[int, int]) -> PointAssignment:
    """FSAF centre-region positives on *every* level (before online feature selection keeps one)."""
    from labkit.assigners.center_region import CenterRegionAssigner
    from labkit.heads.fsaf import fsaf_anchor_generator

    sizes = featmap_sizes(img_shape)
    anchors = torch.cat(fsaf_anchor_generator().grid_priors(sizes))
    labels = torch.zeros(len(gt_bboxes), dtype=torch.long)
    res = CenterRegionAssigner(0.2, 0.2, min_pos_iof=0.01).assign(
        anchors, gt_bboxes.float(), labels
    )
    return PointAssignment(
        (anchors[:, :2] + anchors[:, 2:]) / 2, _levels_of(sizes), res.gt_inds.clamp(min=0) - 1
    )


def reppoints_assignment(
    gt_bboxes: Tensor, img_shape: tuple[int, int], pos_num: int = 1
) -> PointAssignment:
    """RepPoints init-stage positives: ``PointAssigner(scale=4, pos_num)`` on points at offset 0."""
    from labkit.assigners.point import PointAssigner

    sizes = featmap_sizes(img_shape)
    pts = torch.cat(PointGenerator(STRIDES, offset=0.0).grid_priors(sizes, with_stride=True))
    res = PointAssigner(scale=4, pos_num=pos_num).assign(pts, gt_bboxes.float())
    return PointAssignment(pts[:, :2], _levels_of(sizes), res.gt_inds - 1)


def draw_assignment(
    ax: Any,
    img: Any,
    gt_bboxes: Tensor,
    assign: PointAssignment,
    title: str | None = None,
    dot_px: float = 7.0,
    legend: bool = False,
) -> Any:
    """Image, GT boxes (colour = GT index) and every positive prior in its GT's colour.

    Dots are sized in image pixels, so they keep their size relative to the point grid on
    any panel: a finest-level (stride 8) dot is ``dot_px`` pixels across (7 of the 8 between
    neighbours), a dot of level ``l`` ``dot_px * sqrt(1 + l)``, so coarser levels read as
    larger dots; a thin white edge keeps them visible on any object. ``legend`` adds one
    entry per GT ("GT k").
    """
    from matplotlib.collections import EllipseCollection

    show_image(img, ax, title=title)
    h, w = ax.get_images()[-1].get_array().shape[:2]
    for k, box in enumerate(gt_bboxes):
        draw_boxes(ax, box[None], color=class_color(k), linewidth=1.2)
        pos = assign.gt_inds == k
        for lvl in assign.level[pos].unique().tolist():
            sel = pos & (assign.level == lvl)
            pts = assign.points[sel].detach().cpu().numpy().reshape(-1, 2)
            diameter = np.full(len(pts), dot_px * (1 + lvl) ** 0.5)
            ax.add_collection(EllipseCollection(
                diameter, diameter, np.zeros(len(pts)), units="xy", offsets=pts,
                offset_transform=ax.transData, facecolors=[class_color(k)],
                edgecolors="white", linewidths=0.5, zorder=3,
            ))  # fmt: skip
        if legend:
            ax.scatter([], [], s=20, c=[class_color(k)], marker="s", label=f"GT {k}")
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return ax


def _gt_legend(
    fig: Any,
    gt_bboxes: Tensor,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    title: str = "objects (box and dot colour)",
) -> Any:
    """A figure legend under ``fig``: one entry per GT ("GT k", plus class and size when
    ``class_names`` and ``labels`` are given) in the GT's colour."""
    from matplotlib.patches import Patch

    handles = []
    for k, box in enumerate(gt_bboxes.tolist()):
        text = f"GT {k}"
        if class_names is not None and labels is not None:
            text += f": {class_names[int(labels[k])]} {box[2] - box[0]:.0f}x{box[3] - box[1]:.0f}"
        handles.append(Patch(facecolor=class_color(k), label=text))
    return fig.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(handles), 6) or 1, fontsize=8, frameon=False, title=title, title_fontsize=8,
    )  # fmt: skip


def plot_levels(
    img: Any,
    gt_bboxes: Tensor,
    assign: PointAssignment,
    strides: Sequence[int] = STRIDES,
    title: str | None = None,
    size: float = 2.6,
    ncols: int | None = None,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
) -> Any:
    """One panel per level: the positives each GT gets there (level = regress range at work).

    Colour encodes the object (GT index, as boxes and dots), never the level: panel titles
    are black and a figure legend names the objects ("GT k", plus the class and size when
    ``class_names`` and ``labels`` are given). ``ncols``: panels per row (default one row).
    """
    ncols = len(strides) if ncols is None else ncols
    fig, axes = grid(len(strides), ncols=ncols, size=size, title=title)
    for lvl, (ax, s) in enumerate(zip(axes, strides, strict=True)):
        sub = assign.level == lvl
        one = PointAssignment(assign.points[sub], assign.level[sub], assign.gt_inds[sub])
        draw_assignment(
            ax, img, gt_bboxes, one, title=f"stride {s}: {int((one.gt_inds >= 0).sum())} pos"
        )
    fig.tight_layout()
    _gt_legend(fig, gt_bboxes, class_names, labels)
    return fig


def plot_assignments(
    img: Any,
    gt_bboxes: Tensor,
    assignments: dict[str, PointAssignment],
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    size: float = 3.5,
) -> Any:
    """One panel per method (``assignments``: name -> its :class:`PointAssignment` of the
    same image), all levels together, with a legend of the objects under the figure.

    Colour is the object (GT index), dot size the level (:func:`draw_assignment`).
    ``class_names`` and ``labels`` (LongTensor[K]) add each object's class and size.
    """
    fig, axes = grid(len(assignments), ncols=len(assignments), size=size)
    for ax, (name, assign) in zip(axes, assignments.items(), strict=True):
        draw_assignment(ax, img, gt_bboxes, assign, title=name)
    fig.tight_layout()
    _gt_legend(fig, gt_bboxes, class_names, labels,
               title="objects (box and dot colour); a larger dot is a coarser level")  # fmt: skip
    return fig


def centerness_grid(
    assign: PointAssignment, img_shape: tuple[int, int], level: int, stride: int
) -> np.ndarray:
    """Float array [h_l, w_l] of centerness targets on a level's positives (NaN elsewhere)."""
    h, w = featmap_sizes(img_shape, [stride])[0]
    values = np.full(h * w, np.nan)
    sub = (assign.level == level).nonzero().flatten()
    pos = assign.gt_inds[sub] >= 0
    if pos.any():
        values[sub[pos].numpy() - int(sub[0])] = centerness_target(
            assign.bbox_targets[sub[pos]]
        ).numpy()
    return values.reshape(h, w)


def plot_centerness(
    img: Any,
    gt_bboxes: Tensor,
    assign: PointAssignment,
    img_shape: tuple[int, int],
    strides: Sequence[int] = STRIDES,
) -> Any:
    """Centerness target of every positive point, one heatmap panel per level, over the image."""
    fig, axes = grid(
        len(strides), ncols=len(strides), size=2.6, title="centerness target of FCOS positives"
    )
    h, w = img_shape
    for lvl, (ax, s) in enumerate(zip(axes, strides, strict=True)):
        show_image(img, ax, title=f"stride {s}")
        cg = centerness_grid(assign, img_shape, lvl, s)
        hh, ww = cg.shape
        im = ax.imshow(cg, cmap="viridis", vmin=0, vmax=1, alpha=0.8, extent=(0, ww * s, hh * s, 0))
        draw_boxes(ax, gt_bboxes, color="white", linewidth=0.8)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    fig.colorbar(im, ax=list(axes), shrink=0.7, label="centerness")
    return fig


def centerness_field(box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """Centerness of every pixel centre of an (h, w) canvas for one box (0 outside it)."""
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]] + 0.5
    l, t = xs - box[0], ys - box[1]
    r, b = box[2] - xs, box[3] - ys
    inside = (np.minimum(np.minimum(l, r), np.minimum(t, b))) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.sqrt(np.minimum(l, r) / np.maximum(l, r) * np.minimum(t, b) / np.maximum(t, b))
    return np.where(inside, c, 0.0)


def plot_centerness_field(box: Sequence[float], size: tuple[int, int], ax: Any = None) -> Any:
    """Heatmap of :func:`centerness_field` (one xyxy ``box`` on an (h, w) canvas) in pixel
    coordinates, with the box outlined, labelled axes and a labelled colour bar."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.8))
    h, w = size
    im = ax.imshow(centerness_field(box, size), cmap="viridis", vmin=0, vmax=1,
                   extent=(0, w, h, 0))  # fmt: skip
    draw_boxes(ax, [list(box)], color="white", linewidth=0.8)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    ax.set_title(f"centerness target inside a {box[2] - box[0]:g} x {box[3] - box[1]:g} box")
    ax.figure.colorbar(im, ax=ax, label="centerness target (0 outside the box)")
    return ax


def ambiguous_points(
    gt_bboxes: Tensor, img_shape: tuple[int, int], strides: Sequence[int] = STRIDES
) -> Tensor:
    """BoolTensor[N]: points (all levels) strictly inside two or more GT boxes."""
    sizes = featmap_sizes(img_shape, strides)
    pts = torch.cat(PointGenerator(strides, offset=0.5).grid_priors(sizes))
    x, y = pts[:, 0, None], pts[:, 1, None]
    g = gt_bboxes.float()
    inside = (x > g[:, 0]) & (x < g[:, 2]) & (y > g[:, 1]) & (y < g[:, 3])
    return inside.sum(dim=1) >= 2


def plot_positive_counts(counts: dict[str, Tensor], gt_bboxes: Tensor, ax: Any = None) -> Any:
    """Grouped bars: positives per GT (sorted by size) for each method in ``counts`` (name -> LongTensor[K])."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8.0, 3.5))
    sizes = ((gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1])).sqrt()
    order = sizes.argsort()
    x = np.arange(len(order))
    width = 0.8 / max(len(counts), 1)
    for i, (name, c) in enumerate(counts.items()):
        ax.bar(x + i * width, c[order].numpy(), width, label=name)
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels([f"{int(s)}" for s in sizes[order]], fontsize=7)
    ax.set_xlabel("GT size sqrt(w*h), px")
    ax.set_ylabel("positive priors")
    ax.legend(fontsize=7)
    return ax


def scaled_regress_ranges(scale: float) -> tuple[tuple[float, float], ...]:
    """FCOS's regress ranges with every finite boundary (64, 128, 256, 512) times ``scale``."""
    return tuple(
        (lo if lo < 0 else lo * scale, hi if hi >= FCOS_REGRESS_RANGES[-1][1] else hi * scale)
        for lo, hi in FCOS_REGRESS_RANGES
    )


# The settings the explorer's text compares (notebook 03): radius 0.5 / 1.5 / 3 with center
# sampling, then all points inside with the regress ranges x 1, x 2 and x 0.5.
WHAT_IF_SETTINGS: tuple[dict[str, Any], ...] = (
    {"center_sampling": True, "radius": 0.5},
    {"center_sampling": True, "radius": 1.5},
    {"center_sampling": True, "radius": 3.0},
    {"center_sampling": False},
    {"center_sampling": False, "range_scale": 2.0},
    {"center_sampling": False, "range_scale": 0.5},
)


def fcos_what_if_counts(
    gt_bboxes: Tensor,
    img_shape: tuple[int, int],
    settings: Sequence[dict[str, Any]] = WHAT_IF_SETTINGS,
) -> Tensor:
    """LongTensor[S, K, L]: FCOS positives of every GT (K) on every level (L) for each of the
    S settings, a dict of ``center_sampling`` (default True), ``radius`` (strides, default 1.5)
    and ``range_scale`` (default 1; :func:`scaled_regress_ranges`), as the explorer draws them."""
    counts = []
    for setting in settings:
        assign = fcos_assignment(
            gt_bboxes, img_shape,
            regress_ranges=scaled_regress_ranges(setting.get("range_scale", 1.0)),
            center_sampling=setting.get("center_sampling", True),
            radius=setting.get("radius", 1.5),
        )  # fmt: skip
        counts.append(assign.positives_per_gt(len(gt_bboxes)))
    return torch.stack(counts)


def fcos_what_if_table(
    gt_bboxes: Tensor,
    img_shape: tuple[int, int],
    settings: Sequence[dict[str, Any]] = WHAT_IF_SETTINGS,
) -> str:
    """A text table of :func:`fcos_what_if_counts`, one line per setting: the positives on each
    level (P3-P7), of each GT, and in all."""
    counts = fcos_what_if_counts(gt_bboxes, img_shape, settings)
    levels = "".join(f"{f'P{i + 3}':>5}" for i in range(counts.shape[2]))
    lines = [f"{'setting':<34}{levels}   {'positives per GT':<28}all"]
    for setting, c in zip(settings, counts, strict=True):
        if setting.get("center_sampling", True):
            name = f"center sampling r {setting.get('radius', 1.5):g}"
        else:
            name = "all points inside"
        name += f", ranges x {setting.get('range_scale', 1.0):g}"
        per_level = "".join(f"{n:5d}" for n in c.sum(0).tolist())
        per_gt = str(c.sum(1).tolist())
        lines.append(f"{name:<34}{per_level}   {per_gt:<28}{int(c.sum()):>3}")
    return "\n".join(lines)


def plot_fcos_what_if(
    img: Any,
    gt_bboxes: Tensor,
    img_shape: tuple[int, int],
    center_sampling: bool = True,
    radius: float = 1.5,
    range_scale: float = 1.0,
    strides: Sequence[int] = STRIDES,
    size: float = 2.5,
) -> Any:
    """FCOS positives (top row) and their centerness targets (bottom row), one column per level.

    The setting under study: ``center_sampling`` with ``radius`` (in strides), and the regress
    range boundaries scaled by ``range_scale`` (:func:`scaled_regress_ranges`). The title gives
    the positives of each GT; the colour of a dot (and box) is its GT's.
    """
    import matplotlib.pyplot as plt

    ranges = scaled_regress_ranges(range_scale)
    assign = fcos_assignment(
        gt_bboxes, img_shape, strides, ranges, center_sampling=center_sampling, radius=radius
    )
    per_gt = assign.positives_per_gt(len(gt_bboxes)).sum(1).tolist()
    n = len(strides)
    fig, axes = plt.subplots(
        2, n, figsize=(size * n + 0.8, size * 2 + 0.9), squeeze=False, layout="constrained"
    )
    h, w = img_shape
    for lvl, s in enumerate(strides):
        sub = assign.level == lvl
        one = PointAssignment(assign.points[sub], assign.level[sub], assign.gt_inds[sub])
        lo, hi = ranges[lvl]
        hi_text = "inf" if hi >= FCOS_REGRESS_RANGES[-1][1] else f"{hi:.0f}"
        draw_assignment(
            axes[0, lvl], img, gt_bboxes, one,
            title=f"stride {s}, range [{lo:.0f}, {hi_text}]\n{int((one.gt_inds >= 0).sum())} positives",
        )  # fmt: skip
        ax = axes[1, lvl]
        show_image(img, ax, title=f"stride {s}: centerness")
        cg = centerness_grid(assign, img_shape, lvl, s)
        hh, ww = cg.shape
        im = ax.imshow(
            cg, cmap="viridis", vmin=0, vmax=1, alpha=0.85, extent=(0, ww * s, hh * s, 0)
        )
        draw_boxes(ax, gt_bboxes, color="white", linewidth=0.8)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    for ax in axes.flat:
        ax.title.set_fontsize(8)
    mode = f"center sampling, radius {radius:g} strides" if center_sampling else "all points inside"
    fig.suptitle(
        f"FCOS, {mode}, regress ranges x {range_scale:g}: {sum(per_gt)} positives, per GT {per_gt}",
        fontsize=10,
    )
    fig.colorbar(im, ax=list(axes[:, -1]), shrink=0.6, label="centerness target")
    return fig


def fcos_explorer(
    img: Any,
    gt_bboxes: Tensor,
    img_shape: tuple[int, int],
    center_sampling: bool = True,
    radius: float = 1.5,
    range_scale: float = 1.0,
) -> None:
    """ipywidgets: center sampling on/off, its radius (0.5-3 strides) and a scale of the regress
    ranges; redraws :func:`plot_fcos_what_if`. In a headless batch run it draws once with the
    given defaults (see ``labkit.notebook.explorer``)."""
    import matplotlib.pyplot as plt

    from labkit.notebook import explorer

    def redraw(center_sampling, radius, range_scale):
        plot_fcos_what_if(img, gt_bboxes, img_shape, center_sampling, radius, range_scale)
        plt.show()

    defaults = {"center_sampling": center_sampling, "radius": radius, "range_scale": range_scale}
    explorer(
        redraw,
        defaults,
        lambda widgets: {
            "center_sampling": widgets.Checkbox(value=center_sampling, description="center sampling"),
            "radius": widgets.FloatSlider(value=radius, min=0.5, max=3.0, step=0.25, description="radius"),
            "range_scale": widgets.FloatSlider(value=range_scale, min=0.5, max=2.0, step=0.25, description="ranges x"),
        },
    )  # fmt: skip


def plot_centerness_pairs(pairs: dict, ax: Any = None, title: str | None = None) -> Any:
    """Predicted centerness against its target for positive points (``lessons.fcos_analysis
    .centerness_pairs``), one colour per FPN level, with the diagonal and Pearson's r."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 4.2))
    target, predicted, level = pairs["target"], pairs["predicted"], pairs["level"]
    for lvl in level.unique().tolist():
        sel = level == lvl
        ax.scatter(target[sel].numpy(), predicted[sel].numpy(), s=8, alpha=0.6,
                   color=level_color(lvl), label=f"P{lvl + 3} (stride {STRIDES[lvl]})")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="0.4", lw=1, label="prediction = target")
    r = (
        float(torch.corrcoef(torch.stack([target, predicted]))[0, 1])
        if len(target) > 1
        else float("nan")
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("centerness target")
    ax.set_ylabel("predicted centerness (sigmoid)")
    ax.set_title(title or f"{len(target)} positive points, Pearson r = {r:.2f}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return ax
