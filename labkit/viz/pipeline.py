"""The whole-pipeline figure: image -> backbone -> FPN -> head -> assignment -> loss, and
head -> decode -> NMS, drawn from a ``lessons.pipeline.PipelineTrace``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from labkit.viz.draw import class_color, draw_boxes, level_color, show_image

__all__ = ["plot_pipeline"]


def _maps(ax: Any, maps: Sequence[Any], names: Sequence[str], title: str, cmap: str,
          vmin: float | None = None, vmax: float | None = None) -> None:  # fmt: skip
    """Small maps side by side inside ``ax``, each with its name and shape, sizes to scale."""
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    n = len(maps)
    widths = np.array([m.shape[-1] for m in maps], dtype=float)
    widths = np.maximum(widths / widths.max(), 0.12)  # keep the coarsest level visible
    gap = 0.03
    scale = (1 - gap * (n - 1)) / widths.sum()
    x = 0.0
    for m, name, wdt in zip(maps, names, widths, strict=True):
        size = wdt * scale
        inset = ax.inset_axes((x, 0.5 - size / 2, size, size))
        inset.imshow(np.asarray(m), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        inset.set_xticks([])
        inset.set_yticks([])
        inset.set_xlabel(name, fontsize=7, labelpad=2)
        x += size + gap


def _arrow(fig: Any, src: Any, dst: Any, text: str = "", start: str = "right",
           end: str = "left") -> None:  # fmt: skip
    from matplotlib.patches import ConnectionPatch

    points = {"right": (1.0, 0.5), "left": (0.0, 0.5), "bottom": (0.5, 0.0), "top": (0.5, 1.0),
              "left_of_labels": (-0.3, 0.5)}  # fmt: skip
    arrow = ConnectionPatch(points[start], points[end], coordsA="axes fraction",
                            coordsB="axes fraction", axesA=src, axesB=dst, arrowstyle="-|>",
                            mutation_scale=14, color="0.3", lw=1.3)  # fmt: skip
    fig.add_artist(arrow)
    if text:
        (x0, y0), (x1, y1) = (
            fig.transFigure.inverted().transform(a.transAxes.transform(points[p]))
            for a, p in ((src, start), (dst, end))
        )
        fig.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.012, text, ha="center", va="bottom", fontsize=8,
                 color="0.25", style="italic")  # fmt: skip


def plot_pipeline(
    trace: Any,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_boxes_before_nms: int = 100,
) -> Any:
    """Draw ``trace`` as a data-flow figure: top row image (with ground truth), backbone stages,
    FPN levels and the head's per-location best class probability; bottom row, for training,
    the assignment's positive anchor centres (coloured by level) and the losses, and, for
    inference, the decoded boxes before NMS and the detections after it.

    Returns the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 7.6))
    grid = fig.add_gridspec(2, 4, hspace=0.42, wspace=0.3, left=0.02, right=0.98, top=0.9,
                            bottom=0.05)  # fmt: skip
    top = [fig.add_subplot(grid[0, j]) for j in range(4)]
    bottom = [fig.add_subplot(grid[1, j]) for j in range(4)]
    h, w = trace.img.shape[-2:]

    show_image(
        trace.img,
        ax=top[0],
        mean=mean,
        std=std,
        title=f"image {h} x {w}, {len(trace.gt_bboxes)} ground-truth boxes",
    )
    top[0].title.set_fontsize(9)  # fmt: skip
    draw_boxes(top[0], trace.gt_bboxes, labels=trace.gt_labels, class_names=class_names)

    norms = [f.norm(dim=0).numpy() for f in trace.backbone]
    names = [f"C{3 + i}" for i in range(len(trace.backbone))]
    shapes = ", ".join(f"{f.shape[0]}x{f.shape[1]}x{f.shape[2]}" for f in trace.backbone)
    _maps(top[1], norms, names, f"backbone: feature norm per stage\n{shapes} (c x h x w)", "magma")
    norms = [f.norm(dim=0).numpy() for f in trace.fpn]
    names = [f"P{3 + i}" for i in range(len(trace.fpn))]
    sides = ", ".join(f"{f.shape[1]}x{f.shape[2]}" for f in trace.fpn)
    _maps(top[2], norms, names, f"FPN: {trace.fpn[0].shape[0]} channels on every level\n{sides}",
          "magma")  # fmt: skip
    names = [f"P{3 + i}" for i in range(len(trace.objectness))]
    _maps(top[3], [o.numpy() for o in trace.objectness], names,
          "head: best class probability per location\n(0 = dark purple, 1 = yellow)", "viridis",
          vmin=0.0, vmax=1.0)  # fmt: skip

    # Training: which anchors are positive, and the losses they produce.
    ax = show_image(trace.img, ax=bottom[0], mean=mean, std=std,
                    title=f"assignment: {len(trace.positive_anchors)} positive anchors")  # fmt: skip
    ax.title.set_fontsize(9)
    draw_boxes(ax, trace.gt_bboxes, color="white", linewidth=1.0)
    level_of = np.repeat(np.arange(len(trace.num_level_anchors)), trace.num_level_anchors)
    anchors = trace.anchors[trace.positive_anchors]
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).numpy()
    for lvl in np.unique(level_of[trace.positive_anchors.numpy()]):
        sel = level_of[trace.positive_anchors.numpy()] == lvl
        ax.scatter(centres[sel, 0], centres[sel, 1], s=10, color=level_color(int(lvl)),
                   label=f"P{3 + lvl}", edgecolors="black", linewidths=0.3)  # fmt: skip
    ax.legend(fontsize=7, loc="lower right", markerscale=1.5)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)

    ax = bottom[1]
    keys = list(trace.losses)
    ax.barh(
        range(len(keys)),
        [trace.losses[k] for k in keys],
        color=[class_color(i) for i in range(len(keys))],
    )
    ax.set_yticks(range(len(keys)), [k.removeprefix("loss_") for k in keys], fontsize=8)
    ax.invert_yaxis()
    for i, k in enumerate(keys):
        ax.text(trace.losses[k], i, f" {trace.losses[k]:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(trace.losses.values()) * 1.35)
    ax.set_xlabel("loss on this image", fontsize=8)
    ax.set_title(f"loss {sum(trace.losses.values()):.3f} = sum of the bars\n(cls on every anchor, "
                 "the others on the positives)", fontsize=9)  # fmt: skip
    ax.spines[["top", "right"]].set_visible(False)

    # Inference: decode every kept prediction, then NMS.
    before = trace.before_nms
    order = before["scores"].argsort(descending=True)[:max_boxes_before_nms]
    ax = show_image(trace.img, ax=bottom[2], mean=mean, std=std,
                    title=f"decode: {len(before['boxes'])} boxes above the score threshold"
                    f"\n(the {len(order)} best drawn)")  # fmt: skip
    ax.title.set_fontsize(9)
    draw_boxes(ax, before["boxes"][order], color="yellow", linewidth=0.5, alpha=0.4)
    after = trace.after_nms
    keep = after["scores"] >= 0.3
    ax = show_image(trace.img, ax=bottom[3], mean=mean, std=std,
                    title=f"NMS: {len(after['boxes'])} detections kept\n(the {int(keep.sum())} "
                    "with score >= 0.3 drawn)")  # fmt: skip
    ax.title.set_fontsize(9)
    draw_boxes(ax, after["boxes"][keep], labels=after["labels"][keep], scores=after["scores"][keep],
               class_names=class_names)  # fmt: skip

    _arrow(fig, top[0], top[1])
    _arrow(fig, top[1], top[2])
    _arrow(fig, top[2], top[3])
    _arrow(fig, top[3], bottom[0], "training", start="bottom", end="top")
    _arrow(fig, bottom[0], bottom[1], end="left_of_labels")
    _arrow(fig, top[3], bottom[2], "inference", start="bottom", end="top")
    _arrow(fig, bottom[2], bottom[3])
    return fig
