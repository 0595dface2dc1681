"""Co-DETR plots: one-to-one vs one-to-many positives, positive queries, per-layer counts, features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from labkit.viz.draw import class_color, draw_boxes, draw_points, show_image

__all__ = [
    "draw_positives",
    "plot_feature_maps",
    "plot_positives_per_layer",
    "plot_query_references",
    "plot_train_curves",
]


def _match(targets: torch.Tensor, gt_bboxes: torch.Tensor) -> np.ndarray:
    """Index of the ground truth equal to each target box (-1 if none)."""
    if len(targets) == 0 or len(gt_bboxes) == 0:
        return np.full(len(targets), -1)
    eq = (targets[:, None, :] == gt_bboxes[None, :, :].to(targets)).all(-1)
    idx = eq.float().argmax(-1)
    idx[~eq.any(-1)] = -1
    return idx.cpu().numpy()


def draw_positives(
    ax: Any,
    img: torch.Tensor,
    gt_bboxes: torch.Tensor,
    pos_boxes: torch.Tensor,
    pos_targets: torch.Tensor | None = None,
    title: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_boxes: int = 60,
) -> Any:
    """An image with its ground truths (thick) and the positive priors/queries (thin, dot at
    the centre), coloured by the ground truth each positive is assigned to.

    ``img: Tensor[3, H, W]``, ``gt_bboxes: Tensor[K, 4]``, ``pos_boxes / pos_targets: Tensor[P, 4]``
    (xyxy pixels; targets default to one positive per GT, in GT order). Only the first
    ``max_boxes`` positive boxes are outlined; every centre is drawn.
    """
    ax = show_image(img, ax=ax, mean=mean, std=std, title=title)
    gt_bboxes = gt_bboxes.detach().cpu()
    pos_boxes = pos_boxes.detach().cpu()
    gt_idx = (
        np.arange(len(pos_boxes))
        if pos_targets is None
        else _match(pos_targets.detach().cpu(), gt_bboxes)
    )
    for k in range(len(gt_bboxes)):
        draw_boxes(ax, gt_bboxes[k : k + 1], color=class_color(k), linewidth=2.5)
    for k in np.unique(gt_idx):
        sel = np.nonzero(gt_idx == k)[0]
        color = class_color(int(k)) if k >= 0 else (0.5, 0.5, 0.5)
        boxes = pos_boxes[sel[:max_boxes]]
        draw_boxes(ax, boxes, color=color, linewidth=0.7, alpha=0.6, linestyle="--")
        centres = (pos_boxes[sel, :2] + pos_boxes[sel, 2:]) / 2
        draw_points(ax, centres, color=color, size=14)
    h, w = img.shape[-2:]
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return ax


def plot_query_references(
    ax: Any, coords: torch.Tensor, label_weights: torch.Tensor, title: str | None = None
) -> Any:
    """One query group of one image in the normalized frame: real queries' reference boxes
    (solid) and the zero padding (crosses at the origin), ``coords: Tensor[M, 4]`` cxcywh."""
    coords = coords.detach().cpu()
    real = label_weights.detach().cpu() > 0
    xyxy = torch.cat([coords[:, :2] - coords[:, 2:] / 2, coords[:, :2] + coords[:, 2:] / 2], -1)
    draw_boxes(ax, xyxy[real], color=class_color(0), linewidth=0.8, alpha=0.7)
    draw_points(ax, coords[real, :2], color=class_color(0), size=10)
    if (~real).any():
        draw_points(ax, coords[~real, :2], color=(0.8, 0.1, 0.1), size=60, marker="X")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(1.05, -0.05)
    ax.set_aspect("equal")
    ax.set_title(title or f"{int(real.sum())} real + {int((~real).sum())} padded queries")
    return ax


def plot_positives_per_layer(ax: Any, counts: dict[str, list[int]], title: str = "") -> Any:
    """Stacked bars: positives per decoder layer by source (``positives_per_layer``'s dict)."""
    bottom = None
    for j, (name, values) in enumerate(counts.items()):
        x = np.arange(len(values))
        ax.bar(x, values, bottom=bottom, color=class_color(j), label=name)
        bottom = np.asarray(values) if bottom is None else bottom + np.asarray(values)
    ax.set_xticks(np.arange(len(bottom)))
    ax.set_xticklabels([f"layer {i}" for i in range(len(bottom))])
    ax.set_ylabel("positive queries")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_train_curves(ax: Any, histories: dict[str, Any], key: str = "loss_cls") -> Any:
    """``key`` against the step for several ``History`` objects (one line each)."""
    for j, (name, hist) in enumerate(histories.items()):
        steps = [r["iter"] for r in hist.train if key in r]
        values = [r[key] for r in hist.train if key in r]
        ax.plot(steps, values, label=name, color=class_color(j))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend(fontsize=8)
    return ax


def plot_feature_maps(axes: Sequence[Any], maps: dict[str, tuple], titles: bool = True) -> None:
    """Feature-norm maps with the foreground outline, one axis per model.

    ``maps[name] = (norm Tensor[h, w], fg BoolTensor[h, w], valid BoolTensor[h, w])``.
    """
    for ax, (name, (norm, fg, valid)) in zip(axes, maps.items(), strict=True):
        arr = norm.detach().cpu().numpy().copy()
        arr[~valid.cpu().numpy()] = np.nan
        ax.imshow(arr, cmap="viridis")
        ax.contour(fg.cpu().numpy().astype(float), levels=[0.5], colors="white", linewidths=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles:
            ax.set_title(name, fontsize=9)
