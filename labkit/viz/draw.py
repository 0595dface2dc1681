"""Drawing basics every notebook shares: images, boxes, points, grids, loss curves, colours."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import patches

__all__ = [
    "CLASS_COLORS",
    "LEVEL_COLORS",
    "class_color",
    "draw_boxes",
    "draw_level_grid",
    "draw_points",
    "grid",
    "level_color",
    "plot_loss_curves",
    "show_detections",
    "show_image",
    "to_image_array",
]

# matplotlib's tab10, written out so colours never depend on the installed style.
CLASS_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    (int(h[1:3], 16) / 255, int(h[3:5], 16) / 255, int(h[5:7], 16) / 255)
    for h in (
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
        "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    )
)  # fmt: skip
# FPN levels (finest stride first): a warm-to-cool ramp so "small objects" read as one family.
LEVEL_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    (int(h[1:3], 16) / 255, int(h[3:5], 16) / 255, int(h[5:7], 16) / 255)
    for h in ("#e41a1c", "#ff7f00", "#4daf4a", "#377eb8", "#984ea3", "#a65628", "#f781bf")
)  # fmt: skip


def class_color(i: int) -> tuple[float, float, float]:
    """RGB colour (floats in [0, 1]) of class ``i``; the same class always gets the same colour."""
    return CLASS_COLORS[int(i) % len(CLASS_COLORS)]


def level_color(i: int) -> tuple[float, float, float]:
    """RGB colour of FPN level ``i`` (0 = finest stride)."""
    return LEVEL_COLORS[int(i) % len(LEVEL_COLORS)]


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, list | tuple):
        return np.asarray(x)
    raise TypeError(f"{name}: expected a tensor, array or list, got {type(x).__name__}")


def to_image_array(
    img: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """Turn an image into something ``imshow`` draws faithfully.

    Args:
        img: uint8 ``HWC``/``HW`` array or PIL image (shown as is), a float tensor
            ``[3, H, W]`` (CHW, as the data pipeline produces) or a float array ``[H, W, 3]``.
        mean, std: per-channel normalization to undo (``img * std + mean``). Values above 1
            mean the statistics are in 0-255 pixel units (mmdetection's convention).

    Returns:
        ``uint8 [H, W, 3]`` / ``[H, W]`` as given, or ``float [H, W, C]`` clipped to [0, 1].
    """
    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL image
        return np.asarray(img)
    arr = _as_numpy(img, "img")
    if arr.dtype == np.uint8:
        return arr
    if arr.ndim not in (2, 3):
        raise ValueError(f"img: expected [C, H, W], [H, W, C] or [H, W], got shape {arr.shape}")
    arr = arr.astype(np.float32)
    # Tensors come from the data pipeline, always CHW; arrays are HWC unless clearly CHW.
    chw = isinstance(img, torch.Tensor) or (
        arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4)
    )
    if arr.ndim == 3 and chw:
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if (mean is None) != (std is None):
        raise ValueError("mean, std: give both or neither")
    if mean is not None:
        mean_a = np.asarray(mean, dtype=np.float32)
        std_a = np.asarray(std, dtype=np.float32)
        arr = arr * std_a + mean_a
        if mean_a.max() > 1.0:
            arr = arr / 255.0
    elif arr.size and arr.max() > 1.0 and arr.min() >= 0.0:
        arr = arr / 255.0  # float pixels in 0-255
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return np.clip(arr, 0.0, 1.0)


def _new_axes(ax: Any, figsize: tuple[float, float] = (6.0, 4.0)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def show_image(
    img: Any,
    ax: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    title: str | None = None,
) -> Any:
    """Draw an image without ticks; normalized tensors are denormalized with ``mean``/``std``.

    Returns:
        The matplotlib ``Axes``.
    """
    ax = _new_axes(ax)
    arr = to_image_array(img, mean, std)
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return ax


def _boxes_array(boxes: Any, name: str = "boxes") -> np.ndarray:
    arr = _as_numpy(boxes, name).astype(np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {arr.shape}")
    return arr


def draw_boxes(
    ax: Any,
    boxes: Any,
    labels: Any = None,
    scores: Any = None,
    class_names: Sequence[str] | None = None,
    color: Any = None,
    linewidth: float = 1.5,
    linestyle: str = "-",
    alpha: float = 1.0,
    fontsize: float = 7,
) -> list[patches.Rectangle]:
    """Draw ``(x1, y1, x2, y2)`` pixel boxes on ``ax``, captioned with class name and score.

    Args:
        boxes: ``[N, 4]`` tensor, array or list.
        labels: ``[N]`` class indices ``0..C-1``; they pick the colour unless ``color`` is given.
        scores: ``[N]`` scores appended to the caption.
        class_names: names indexed by label, used in captions.
        color: one colour for every box (anything matplotlib accepts).

    Boxes with the same top-left corner (one box kept for two classes by per-class NMS) get
    their captions stacked upwards, one line each, instead of printed over each other.

    Returns:
        The rectangles added, in box order.
    """
    arr = _boxes_array(boxes)
    n = len(arr)
    lab = None if labels is None else _as_numpy(labels, "labels").reshape(-1).astype(int)
    sc = None if scores is None else _as_numpy(scores, "scores").reshape(-1).astype(float)
    for name, v in (("labels", lab), ("scores", sc)):
        if v is not None and len(v) != n:
            raise ValueError(f"{name}: expected {n} values (one per box), got {len(v)}")
    rects = []
    captions_at: dict[tuple[float, float], int] = {}  # corner -> captions already there
    for i, (x1, y1, x2, y2) in enumerate(arr):
        c = color if color is not None else class_color(lab[i] if lab is not None else 0)
        rect = patches.Rectangle(
            (x1, y1),
            x2 - x1,
            y2 - y1,
            fill=False,
            edgecolor=c,
            linewidth=linewidth,
            linestyle=linestyle,
            alpha=alpha,
        )
        ax.add_patch(rect)
        rects.append(rect)
        caption = []
        if lab is not None:
            has_name = class_names is not None and 0 <= lab[i] < len(class_names)
            caption.append(class_names[lab[i]] if has_name else str(lab[i]))
        if sc is not None:
            caption.append(f"{sc[i]:.2f}")
        if caption:
            corner = (round(float(x1), 1), round(float(y1), 1))
            below = captions_at.get(corner, 0)
            captions_at[corner] = below + 1
            style = {
                "fontsize": fontsize,
                "color": "white",
                "va": "bottom",
                "bbox": {"facecolor": c, "alpha": 0.7 * alpha, "pad": 1, "edgecolor": "none"},
            }
            if below == 0:
                ax.text(x1, y1, " ".join(caption), **style)
            else:  # one caption line (text + padding) up per caption already at this corner
                ax.annotate(" ".join(caption), (x1, y1), xytext=(0, below * (fontsize + 3)),
                            textcoords="offset points", annotation_clip=False, **style)  # fmt: skip
    return rects


def draw_points(
    ax: Any,
    points: Any,
    color: Any = None,
    size: float = 8,
    marker: str = "o",
    label: str | None = None,
    alpha: float = 1.0,
) -> Any:
    """Scatter ``[N, 2]`` ``(x, y)`` points (prior centres, RepPoints, sampling locations).

    Returns:
        The matplotlib ``PathCollection``.
    """
    arr = _as_numpy(points, "points").astype(np.float64).reshape(-1, 2)
    c = class_color(0) if color is None else color
    return ax.scatter(
        arr[:, 0], arr[:, 1], s=size, c=[c] if isinstance(c, tuple) else c,
        marker=marker, label=label, alpha=alpha, linewidths=0,
    )  # fmt: skip


def draw_level_grid(
    ax: Any,
    image_shape: tuple[int, int],
    stride: int,
    color: Any = None,
    level: int = 0,
    center_offset: float | None = None,
    linewidth: float = 0.5,
    alpha: float = 0.6,
) -> list[Any]:
    """Draw the cell grid of one FPN level (lines every ``stride`` pixels) over an ``(h, w)`` image.

    Args:
        color: line colour; defaults to ``level_color(level)``.
        center_offset: also mark the prior centres ``(k + center_offset) * stride``
            (0.0 for mmdetection's anchors, 0.5 for its point priors).

    Returns:
        The artists added: vertical lines, horizontal lines (and the centre points).
    """
    h, w = image_shape
    if not isinstance(stride, int | np.integer) or stride <= 0:
        raise ValueError(f"stride: expected a positive int, got {stride!r}")
    c = level_color(level) if color is None else color
    xs, ys = np.arange(0, w + 1, stride), np.arange(0, h + 1, stride)
    style = {"colors": [c], "linewidth": linewidth, "alpha": alpha}
    artists = [ax.vlines(xs, 0, h, **style), ax.hlines(ys, 0, w, **style)]
    if center_offset is not None:
        cx = (np.arange(-(-w // stride)) + center_offset) * stride
        cy = (np.arange(-(-h // stride)) + center_offset) * stride
        gx, gy = np.meshgrid(cx, cy)  # x varies fastest, as priors are ordered
        artists.append(draw_points(ax, np.stack([gx.ravel(), gy.ravel()], axis=1), color=c, size=4))
    return artists


def grid(
    n: int, ncols: int | None = None, size: float = 3.0, title: str | None = None, **kwargs: Any
) -> tuple[Any, np.ndarray]:
    """A figure with ``n`` panels of ``size`` x ``size`` inches; unused panels are hidden.

    Returns:
        ``(fig, axes)`` with ``axes`` a flat array of exactly ``n`` Axes.
    """
    import matplotlib.pyplot as plt

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    ncols = min(n, 4) if ncols is None else ncols
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False, **kwargs
    )
    flat = axes.reshape(-1)
    for ax in flat[n:]:
        ax.set_visible(False)
    if title is not None:
        fig.suptitle(title)
    return fig, flat[:n]


def _load_log(log: str | os.PathLike | Sequence[dict]) -> list[dict]:
    if isinstance(log, str | os.PathLike):
        lines = Path(log).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    return list(log)


def plot_loss_curves(
    log: str | os.PathLike | Sequence[dict], ax: Any = None, logy: bool = False
) -> Any:
    """Plot every ``loss*`` key of a JSON-lines training log against ``iter`` (or ``epoch``).

    Args:
        log: path to a ``.jsonl`` file or the records themselves; records without a given
            loss key (e.g. evaluation lines) are skipped for that curve.

    Returns:
        The matplotlib ``Axes`` (one line per loss key, labelled).
    """
    records = _load_log(log)
    ax = _new_axes(ax)
    xkey = next((k for k in ("iter", "epoch") if any(k in r for r in records)), None)
    keys = sorted({k for r in records for k in r if k.startswith("loss")})
    for j, key in enumerate(keys):
        pts = [
            (r.get(xkey, i) if xkey else i, r[key])
            for i, r in enumerate(records)
            if isinstance(r.get(key), int | float)
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=key, color=class_color(j), linewidth=1.5 if key == "loss" else 1)
    ax.set_xlabel(xkey or "step")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    if keys:
        ax.legend(fontsize=7)
    return ax


def show_detections(
    img: Any,
    result: dict,
    class_names: Sequence[str] | None = None,
    score_thr: float = 0.3,
    ax: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    gt_bboxes: Any = None,
) -> Any:
    """Draw an image with a detector's result ``{"boxes", "scores", "labels"}`` above ``score_thr``.

    Ground-truth boxes, if given, are drawn dashed in white underneath.

    Returns:
        The matplotlib ``Axes``.
    """
    ax = show_image(img, ax=ax, mean=mean, std=std)
    if gt_bboxes is not None:
        draw_boxes(ax, gt_bboxes, color="white", linestyle="--", linewidth=1)
    scores = _as_numpy(result["scores"], "result['scores']").reshape(-1)
    keep = scores >= score_thr
    boxes = _boxes_array(result["boxes"], "result['boxes']")[keep]
    labels = _as_numpy(result["labels"], "result['labels']").reshape(-1)[keep]
    draw_boxes(ax, boxes, labels=labels, scores=scores[keep], class_names=class_names)
    ax.set_title(f"{int(keep.sum())} detections, score >= {score_thr}")
    return ax
