"""Pictures of deformable attention: initial offsets, point vs box references, a query's samples per level, costs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit.detr.ms_deform_attn import (
    MultiScaleDeformableAttention,
    sampling_locations_from_offsets,
)
from labkit.notebook import explorer
from labkit.viz.draw import draw_boxes, show_image

__all__ = [
    "capture_decoder_sampling",
    "plot_attention_cost",
    "plot_encoder_cost",
    "plot_initial_offsets",
    "plot_offset_scaling",
    "plot_query_sampling",
    "plot_sampling_statistics",
    "query_explorer",
]

_HEAD_CMAP = "tab10"


def _axes(ax: Any, figsize: tuple[float, float] = (4.0, 4.0)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def _head_colors(num_heads: int) -> np.ndarray:
    import matplotlib.pyplot as plt

    return plt.get_cmap(_HEAD_CMAP)(np.arange(num_heads) % 10)


def plot_initial_offsets(
    attn: MultiScaleDeformableAttention, level: int = 0, ax: Any = None
) -> Any:
    """The offsets (in pixels of a level) every query starts with: point ``i`` of head ``h``
    sits ``i + 1`` steps along direction ``2 pi h / num_heads`` (the ``sampling_offsets`` bias)."""
    ax = _axes(ax)
    bias = attn.sampling_offsets.bias.detach().view(
        attn.num_heads, attn.num_levels, attn.num_points, 2
    )
    colors = _head_colors(attn.num_heads)
    for h in range(attn.num_heads):
        pts = bias[h, level].numpy()
        ax.plot([0, *pts[:, 0]], [0, *pts[:, 1]], "-", color=colors[h], lw=0.8)
        ax.scatter(pts[:, 0], pts[:, 1], color=colors[h], s=18, label=f"head {h}", zorder=3)
    ax.scatter([0], [0], marker="+", color="k", s=80, zorder=4)
    ax.set_aspect("equal")
    ax.invert_yaxis()  # image convention: y grows downwards
    ax.set_xlabel("offset x (pixels)")
    ax.set_ylabel("offset y (pixels, positive = down)")
    ax.grid(alpha=0.3)
    ax.set_title(f"initial offsets (pixels of level {level})")
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    return ax


def plot_offset_scaling(
    spatial_shapes: Sequence[tuple[int, int]],
    offsets: Tensor,
    point: tuple[float, float] = (0.5, 0.5),
    boxes: Sequence[tuple[float, float]] = ((0.1, 0.1), (0.4, 0.3)),
    axes: Any = None,
) -> Any:
    """Where the same raw offsets land for a reference point and for reference boxes.

    Args:
        spatial_shapes: ``(h, w)`` of each level.
        offsets: Tensor[heads, P, 2] raw offsets, used on every level.
        point: the reference centre ``(x, y)`` in [0, 1].
        boxes: ``(w, h)`` of the reference boxes drawn (centred on ``point``).

    Left: a point reference divides offsets by each level's size, so coarse levels spread
    the samples farther. Right: a box reference scales them by ``box / (2 P)``, the same on
    every level, so the samples follow the box. Both panels are in normalized image
    coordinates, ``y`` growing downwards as in an image.
    """
    import matplotlib.cm as cm
    import matplotlib.pyplot as plt

    if axes is None:
        axes = plt.subplots(1, 2, figsize=(8.0, 4.0))[1]
    shapes = torch.tensor(spatial_shapes)
    offsets = offsets.detach().cpu()
    num_heads, num_points, _ = offsets.shape
    num_levels = len(spatial_shapes)
    off = offsets[None, None, :, None].expand(1, 1, num_heads, num_levels, num_points, 2)
    ref = torch.tensor(point).view(1, 1, 1, 2).expand(1, 1, num_levels, 2)
    locs = sampling_locations_from_offsets(ref, off, shapes)[0, 0]  # [heads, L, P, 2]
    for lvl in range(num_levels):
        c = cm.viridis(lvl / max(num_levels - 1, 1))
        pts = locs[:, lvl].reshape(-1, 2)
        h, w = spatial_shapes[lvl]
        axes[0].scatter(pts[:, 0], pts[:, 1], color=c, s=16, label=f"level {lvl} ({h}x{w})")
    axes[0].set_title("2-d reference point: offset / (w, h)")
    for i, (bw, bh) in enumerate(boxes):
        box = (
            torch.tensor([point[0], point[1], bw, bh]).view(1, 1, 1, 4).expand(1, 1, num_levels, 4)
        )
        pts = sampling_locations_from_offsets(box, off, shapes)[0, 0, :, 0].reshape(-1, 2)
        c = cm.plasma(0.2 + 0.5 * i)
        axes[1].scatter(pts[:, 0], pts[:, 1], color=c, s=16, label=f"box {bw:g} x {bh:g}")
        corners = [point[0] - bw / 2, point[1] - bh / 2, point[0] + bw / 2, point[1] + bh / 2]
        draw_boxes(axes[1], [corners], color=c, linewidth=1.0)
    axes[1].set_title("4-d reference box: offset / P * wh / 2 (any level)")
    for ax in axes:
        ax.scatter([point[0]], [point[1]], marker="+", color="k", s=80)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image convention: y grows downwards
        ax.set_xlabel("x (fraction of the image width)")
        ax.set_ylabel("y (fraction of the height, 0 = top)")
        ax.set_aspect("equal")
        ax.legend(fontsize=6, loc="lower right")
    return axes


@torch.no_grad()
def capture_decoder_sampling(model: Any, batch: dict, layer: int = -1) -> dict:
    """Run ``model`` (a ``DeformableDETR``) on ``batch`` and record what one decoder layer's
    cross-attention sampled.

    Returns:
        ``{"sampling_locations": Tensor[B, Q, heads, L, P, 2]`` (normalized to each padded
        level map), ``"attention_weights": Tensor[B, Q, heads, L, P]``, ``"reference_points":
        Tensor[B, Q, L, 2|4]`` (as the attention saw them), ``"sampling_offsets": Tensor[B, Q,
        heads, L, P, 2]`` (the raw offsets the layer predicted), ``"spatial_shapes"``,
        ``"pad_shape"`` ``(H, W)`` of the batch, ``"boxes"`` Tensor[B, Q, 4] normalized
        cxcywh and ``"scores"`` Tensor[B, Q] (best class probability) of the last layer}``.
    """
    attn = model.decoder.layers[layer].cross_attn
    seen: dict = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        seen.update(kwargs, query=args[0])

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        batch = model.inputs(batch, with_gt=False)
        out = model(batch["img"], batch["padding_mask"])
    finally:
        handle.remove()
    query = seen["query"] + seen["query_pos"]
    _, locations, weights = attn.sample(
        query,
        seen["value"],
        seen["reference_points"],
        seen["spatial_shapes"],
        seen["key_padding_mask"],
    )
    offsets = attn.sampling_offsets(query).view(*weights.shape, 2)  # [B, Q, heads, L, P, 2]
    return {
        "sampling_locations": locations.cpu(),
        "sampling_offsets": offsets.cpu(),
        "attention_weights": weights.cpu(),
        "reference_points": seen["reference_points"].cpu(),
        "spatial_shapes": seen["spatial_shapes"].cpu(),
        "pad_shape": tuple(batch["img"].shape[-2:]),
        "boxes": out["all_bbox_preds"][-1].cpu(),
        "scores": out["all_cls_scores"][-1].sigmoid().max(-1).values.cpu(),
    }


def plot_query_sampling(
    image: Tensor,
    capture: dict,
    query: int,
    batch_index: int = 0,
    img_shape: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    axes: Any = None,
    zoom: bool = True,
    max_area: float = 400.0,
    min_area: float = 6.0,
    legend: bool = True,
) -> Any:
    """A query's sampling points on every level, coloured by head, area by attention weight.

    Each panel is one level. A point's marker area is ``min_area + max_area * weight`` (pt²),
    the same scale for every query (by default 206 pt² for a weight of 0.5, 31 pt² for a
    uniform 1/16); heavier points are drawn first so light ones stay on top. Every marker has
    a black edge and the image is faded towards white, so a head whose colour matches the
    image stays visible. The predicted box is drawn in white and, for box references, the
    reference box the samples are placed around in dashed yellow.

    Args:
        image: Tensor[3, H, W] the (padded, normalized) input image.
        capture: from :func:`capture_decoder_sampling`.
        query: which decoder query.
        img_shape: unpadded ``(h, w)`` to scale the predicted box (default: the padded size).
        mean, std: to un-normalize the image for display.
        zoom: limit every panel to the query's boxes and sampling points (plus a margin)
            instead of the whole image.
        max_area, min_area: marker area (pt²) per unit of weight, and added to every point.
        legend: add a figure legend (one colour per head, the two boxes, marker sizes).
    """
    import matplotlib.pyplot as plt
    from matplotlib import patheffects
    from matplotlib.lines import Line2D

    locs = capture["sampling_locations"][batch_index, query]  # [heads, L, P, 2]
    weights = capture["attention_weights"][batch_index, query]  # [heads, L, P]
    num_heads, num_levels, _ = weights.shape
    if axes is None:
        axes = plt.subplots(1, num_levels, figsize=(3.0 * num_levels, 3.2))[1]
    pad_h, pad_w = capture["pad_shape"]
    h, w = img_shape or (pad_h, pad_w)
    box = capture["boxes"][batch_index, query]
    xyxy = [
        (box[0] - box[2] / 2) * w,
        (box[1] - box[3] / 2) * h,
        (box[0] + box[2] / 2) * w,
        (box[1] + box[3] / 2) * h,
    ]
    colors = _head_colors(num_heads)
    ref = capture["reference_points"][batch_index, query]  # [L, 2 | 4], normalized to the pad
    ref_boxes = None
    if ref.shape[-1] == 4:
        ref_boxes = [
            [
                float(r[0] - r[2] / 2) * pad_w, float(r[1] - r[3] / 2) * pad_h,
                float(r[0] + r[2] / 2) * pad_w, float(r[1] + r[3] / 2) * pad_h,
            ]
            for r in ref
        ]  # fmt: skip
    xs_all = [float(v) for v in (locs[..., 0] * pad_w).flatten()] + [float(xyxy[0]), float(xyxy[2])]
    ys_all = [float(v) for v in (locs[..., 1] * pad_h).flatten()] + [float(xyxy[1]), float(xyxy[3])]
    x0, x1, y0, y1 = min(xs_all), max(xs_all), min(ys_all), max(ys_all)
    half = 0.55 * max(x1 - x0, y1 - y0, 8.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    head_of_point = np.repeat(np.arange(num_heads), weights.shape[2])  # [heads * P]
    for lvl, ax in enumerate(np.atleast_1d(axes)):
        show_image(image, ax=ax, mean=mean, std=std)
        fade = plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, color="w", alpha=0.35, zorder=2)
        ax.add_patch(fade)  # a paler image lets every head's colour stand out
        lh, lw = capture["spatial_shapes"][lvl].tolist()
        w_lvl = weights[:, lvl].flatten().numpy()  # [heads * P]
        xy = (locs[:, lvl].reshape(-1, 2) * torch.tensor([pad_w, pad_h])).numpy()  # [heads * P, 2]
        order = np.argsort(-w_lvl, kind="stable")  # heaviest first: light points stay on top
        ax.scatter(
            xy[order, 0],
            xy[order, 1],
            s=min_area + max_area * w_lvl[order],
            color=colors[head_of_point[order]],
            alpha=0.9,
            edgecolors="k",
            linewidths=0.7,
            zorder=3,
        )
        drawn = draw_boxes(ax, [xyxy], color="w", linewidth=1.2)
        if ref_boxes is not None:
            drawn += draw_boxes(ax, [ref_boxes[lvl]], color="yellow", linewidth=1.0, linestyle="--")
        for rect in drawn:  # a dark outline keeps the light lines visible on the faded image
            rect.set_path_effects([patheffects.withStroke(linewidth=2.4, foreground="0.2")])
            rect.set_zorder(4)
        share = float(weights[:, lvl].sum() / weights.sum())
        ax.set_title(f"level {lvl} ({lh}x{lw}): {share:.0%} of weight", fontsize=8)
        if zoom:
            ax.set_xlim(cx - half, cx + half)
            ax.set_ylim(cy + half, cy - half)
        else:
            ax.set_xlim(0, pad_w)
            ax.set_ylim(pad_h, 0)
        ax.axis("off")
    if legend:
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colors[hd], markeredgecolor="k",
                   markeredgewidth=0.7, label=f"head {hd}")
            for hd in range(num_heads)
        ]  # fmt: skip
        handles += [
            Line2D([], [], marker="o", linestyle="", color="0.75", markeredgecolor="k",
                   markeredgewidth=0.7, markersize=float(np.sqrt(min_area + max_area * wt)),
                   label=f"weight {wt:g}{' (uniform)' if wt == 1 / 16 else ''}")
            for wt in (1 / 16, 0.25, 0.5)
        ]  # fmt: skip
        handles.append(Line2D([], [], color="0.4", linewidth=1.2, label="predicted box (white)"))
        if ref_boxes is not None:
            handles.append(
                Line2D([], [], color="gold", linestyle="--", label="reference box (yellow)")
            )
        fig = np.atleast_1d(axes)[0].figure
        fig.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.02),
            ncol=min(len(handles), 7), fontsize=7, frameon=False,
        )  # fmt: skip
    return axes


def query_explorer(image: Tensor, capture: dict, batch_index: int = 0, **plot_kwargs: Any) -> None:
    """An ipywidget (dropdown of queries, best-scoring first) redrawing :func:`plot_query_sampling`.

    In a headless batch run it draws the best-scoring query once (``labkit.notebook.explorer``).
    """
    import matplotlib.pyplot as plt

    scores = capture["scores"][batch_index]
    order = scores.argsort(descending=True).tolist()
    options = [(f"query {q} (score {float(scores[q]):.2f})", q) for q in order]

    def draw(query: int) -> None:
        plot_query_sampling(image, capture, query, batch_index, **plot_kwargs)
        plt.show()

    explorer(
        draw,
        {"query": order[0]},
        lambda widgets: {
            "query": widgets.Dropdown(options=options, value=order[0], description="query")
        },
    )


def plot_sampling_statistics(
    stats_by_model: dict[str, dict[str, Tensor]], num_points: int, axes: Any = None
) -> Any:
    """Three panels comparing models' decoder sampling (see
    :func:`labkit.lessons.deform_analysis.sampling_statistics`): the mean share of attention
    weight per level (bars; dashed: uniform ``1 / L``), the distribution of each query's largest
    weight (dashed: uniform ``1 / (L * P)``), and of the weight on points inside the query's own
    predicted box.

    Args:
        stats_by_model: model name -> statistics (``level_share`` Tensor[N, L], ``max_weight``
            Tensor[N], ``inside_box`` Tensor[N]).
        num_points: sampling points per level and head (``P``), for the uniform reference.
        axes: three matplotlib axes (default: a new 1 x 3 figure).

    Returns:
        The three axes.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        axes = plt.subplots(1, 3, figsize=(13.0, 3.6), layout="constrained")[1]
    names = list(stats_by_model)
    colors = plt.get_cmap("tab10")(np.arange(len(names)))
    num_levels = next(iter(stats_by_model.values()))["level_share"].shape[1]
    width = 0.8 / len(names)
    for i, (name, color) in enumerate(zip(names, colors, strict=True)):
        share = stats_by_model[name]["level_share"].mean(0).numpy()
        axes[0].bar(np.arange(num_levels) + (i - (len(names) - 1) / 2) * width, share, width,
                    color=color, label=name)  # fmt: skip
    axes[0].axhline(1 / num_levels, color="0.3", ls="--", lw=1, label="uniform")
    axes[0].set_xticks(np.arange(num_levels), [f"level {lvl}" for lvl in range(num_levels)])
    axes[0].set_ylabel("mean share of a query's weight")
    axes[0].set_title("weight per level")
    axes[0].legend(fontsize=8)
    for ax, key, title, ref in (
        (axes[1], "max_weight", "largest single weight of a query", 1 / (num_levels * num_points)),
        (axes[2], "inside_box", "weight inside the query's own box", None),
    ):
        bins = np.linspace(0, 1, 26)
        for name, color in zip(names, colors, strict=True):
            values = stats_by_model[name][key].numpy()
            label = f"{name} (mean {values.mean():.2f})"
            ax.hist(values, bins=bins, color=color, alpha=0.55, label=label)
        if ref is not None:
            ax.axvline(ref, color="0.3", ls="--", lw=1, label=f"uniform {ref:.3f}")
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("queries")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return axes


def plot_attention_cost(
    rows: Sequence[dict], axes: Any = None, memory_label: str = "memory (MiB)"
) -> Any:
    """Time and memory against the number of queries, one line per method.

    ``rows``: dicts with ``method``, ``num_queries``, ``ms`` and ``mib``.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        axes = plt.subplots(1, 2, figsize=(8.0, 3.2))[1]
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        xs = [r["num_queries"] for r in sel]
        axes[0].plot(xs, [r["ms"] for r in sel], "o-", label=method)
        axes[1].plot(xs, [r["mib"] for r in sel], "o-", label=method)
    for ax, ylabel in zip(axes, ("time (ms)", memory_label), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of queries")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return axes


def plot_encoder_cost(rows: Sequence[dict], axes: Any = None) -> Any:
    """Time and memory of encoder self-attention against the number of tokens, log-log, one
    line per method, with dashed guides growing like ``N`` and ``N^2`` from the first point.

    ``rows``: :func:`labkit.lessons.attention_cost.encoder_cost_sweep`'s dicts.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        axes = plt.subplots(1, 2, figsize=(10.0, 3.8))[1]
    colors = {"dense": "tab:red", "reference": "tab:blue", "kernel": "tab:green"}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        xs = [r["num_tokens"] for r in sel]
        for ax, key in zip(axes, ("ms", "mib"), strict=True):
            ys = [max(r[key], 1e-3) for r in sel]
            ax.plot(xs, ys, "o-", color=colors.get(method), label=method)
            if method == "dense":  # guides through dense attention's first point
                for power, style in ((1, ":"), (2, "--")):
                    guide = [ys[0] * (x / xs[0]) ** power for x in xs]
                    ax.plot(xs, guide, style, color="0.5", lw=1,
                            label=f"grows like N{'²' if power == 2 else ''}")  # fmt: skip
    memory = rows[0]["memory"] if rows else "analytic"
    for ax, ylabel in zip(axes, ("forward time (ms)", f"memory (MiB, {memory})"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N (queries = keys)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    return axes
