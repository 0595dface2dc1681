"""Co-DETR plots: one-to-one vs one-to-many positives, positive queries, per-layer counts, features."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from labkit.viz.draw import class_color, draw_boxes, draw_points, show_image

__all__ = [
    "draw_positives",
    "loss_family",
    "loss_family_curves",
    "plot_feature_maps",
    "plot_loss_families",
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
    ax.set_ylim(1.05, -0.05)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x / image width")
    ax.set_ylabel("y / image height (downwards)")
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


LOSS_FAMILIES = (
    "one-to-one decoder",
    "encoder proposals",
    "auxiliary heads",
    "positive queries",
)


def loss_family(key: str) -> str | None:
    """The family of a Co-DETR loss key, or ``None`` for the total ``loss`` and non-losses.

    * ``"positive queries"``: the extra query groups, ``[d{i}.]loss_*_aux{k}``;
    * ``"encoder proposals"``: the two-stage encoder loss, ``[d{i}.]enc_loss_*``;
    * ``"auxiliary heads"``: the one-to-many heads on the encoder memory, ``loss_rpn_*`` and the
      head-indexed ``loss_cls0``, ``loss_bbox1``, ``loss_centerness1``...;
    * ``"one-to-one decoder"``: the Hungarian-matched query head, ``[d{i}.]loss_{cls,bbox,iou}``.
    """
    name = re.sub(r"^d\d+\.", "", key)
    if re.search(r"_aux\d+$", name) and "loss" in name:
        return "positive queries"
    if name.startswith("enc_loss"):
        return "encoder proposals"
    if name.startswith("loss_rpn") or re.fullmatch(r"loss_[a-z_]+\d+", name):
        return "auxiliary heads"
    if name in ("loss_cls", "loss_bbox", "loss_iou"):
        return "one-to-one decoder"
    return None


def loss_family_curves(records: Sequence[dict], x_key: str = "iter") -> dict[str, tuple]:
    """Per family (:func:`loss_family`), the sum of its loss terms at each logged step.

    Returns:
        ``{family: (steps, sums, keys)}`` for the families present in ``records``, in
        :data:`LOSS_FAMILIES` order, ``keys`` the loss terms summed.
    """
    out: dict[str, tuple] = {}
    for family in LOSS_FAMILIES:
        keys = sorted(
            {k for r in records for k in r if loss_family(k) == family and _is_number(r[k])}
        )
        if not keys:
            continue
        steps, sums = [], []
        for i, r in enumerate(records):
            vals = [r[k] for k in keys if _is_number(r.get(k))]
            if vals:
                steps.append(r.get(x_key, i))
                sums.append(float(sum(vals)))
        out[family] = (steps, sums, keys)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def plot_loss_families(
    ax: Any, records: Sequence[dict], logy: bool = False, total: bool = True
) -> dict[str, tuple]:
    """One line per loss family (each the sum of its terms per step), plus the total ``loss``.

    Returns:
        :func:`loss_family_curves`'s dict, so a caller can print which terms each line sums.
    """
    curves = loss_family_curves(records)
    for j, (family, (steps, sums, keys)) in enumerate(curves.items()):
        ax.plot(steps, sums, color=class_color(j), label=f"{family} ({len(keys)} terms)")
    if total:
        pts = [
            (r.get("iter", i), r["loss"])
            for i, r in enumerate(records)
            if _is_number(r.get("loss"))
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color="k", linestyle="--", linewidth=1, label="total loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (sum over the family's terms)")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return curves


def plot_feature_maps(
    axes: Sequence[Any],
    maps: dict[str, tuple],
    titles: bool = True,
    shared_scale: bool = True,
    colorbar: bool = True,
) -> Any:
    """Feature-norm maps with the foreground outline, one axis per model.

    ``maps[name] = (norm Tensor[h, w], fg BoolTensor[h, w], valid BoolTensor[h, w])``.
    ``shared_scale``: one colour scale (min to max over every map's valid pixels) for all panels,
    so colours compare across models; ``colorbar``: one colour bar for the panels.

    Returns:
        The last image (a matplotlib ``AxesImage``), e.g. for a custom colour bar.
    """
    vmin = vmax = None
    if shared_scale:
        valid_vals = [
            norm.detach().cpu().numpy()[valid.cpu().numpy()] for norm, _, valid in maps.values()
        ]
        valid_vals = [v for v in valid_vals if v.size]
        if valid_vals:
            vmin = float(min(v.min() for v in valid_vals))
            vmax = float(max(v.max() for v in valid_vals))
    im = None
    for ax, (name, (norm, fg, valid)) in zip(axes, maps.items(), strict=True):
        arr = norm.detach().cpu().numpy().copy()
        arr[~valid.cpu().numpy()] = np.nan
        im = ax.imshow(arr, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.contour(fg.cpu().numpy().astype(float), levels=[0.5], colors="white", linewidths=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles:
            ax.set_title(name, fontsize=9)
    if colorbar and im is not None:
        axes = list(axes)
        label = "feature norm" + (" (shared scale)" if shared_scale else " (last panel)")
        axes[0].figure.colorbar(im, ax=axes, shrink=0.8, label=label)
    return im


SOURCE_LABELS = {
    "Hungarian": "Hungarian (one-to-one)",
    "atss": "ATSS head",
    "faster_rcnn": "Faster R-CNN head",
}


def plot_query_source(
    axes: Sequence[Any],
    img: torch.Tensor,
    gt_bboxes: torch.Tensor,
    sources: dict[str, Any],
    source: str,
    layer: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> None:
    """Two panels for one image: where ``source``'s positive queries start (left) and what
    decoder layer ``layer`` predicts for them (right), coloured by the object each one learns.

    ``sources`` is one image's entry of ``lessons.codetr_analysis.positive_queries_by_layer``;
    ``img: Tensor[3, H, W]`` (cropped to the valid region), ``gt_bboxes: Tensor[K, 4]``.
    """
    chosen = sources[source]
    counts = {name: len(s.start[layer]) for name, s in sources.items()}
    label = SOURCE_LABELS.get(source, source)
    draw_positives(axes[0], img, gt_bboxes, chosen.start[layer], chosen.targets[layer], mean=mean,
                   std=std, title=f"{label}: {counts[source]} positive queries start here")  # fmt: skip
    draw_positives(axes[1], img, gt_bboxes, chosen.predicted[layer], chosen.targets[layer],
                   mean=mean, std=std, title=f"... and decoder layer {layer} predicts")  # fmt: skip
    total = " + ".join(f"{counts[n]} {SOURCE_LABELS.get(n, n)}" for n in sources)
    axes[0].figure.suptitle(
        f"layer {layer} trains {sum(counts.values())} positive queries on this image: {total}",
        fontsize=10,
    )


def positive_query_explorer(
    batch_img: torch.Tensor,
    batch_gts: Sequence[torch.Tensor],
    image_shapes: Sequence[tuple[int, int]],
    by_layer: Sequence[dict[str, Any]],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> None:
    """Explorer: pick an image, a source of positive queries (Hungarian or an auxiliary head)
    and a decoder layer; see which queries are positive, where they start and what they predict.

    ``batch_img: Tensor[B, 3, H, W]``, ``batch_gts``: per image ``Tensor[K_i, 4]``,
    ``image_shapes``: per image ``(h, w)``, ``by_layer``: ``positive_queries_by_layer``'s list.
    """
    import matplotlib.pyplot as plt

    from labkit.notebook import explorer

    sources = list(by_layer[0])
    num_layers = len(by_layer[0][sources[0]].start)

    def draw(image: int, source: str, layer: int) -> None:
        h, w = image_shapes[image]
        fig, axes = plt.subplots(1, 2, figsize=(10, 5))
        plot_query_source(axes, batch_img[image][:, :h, :w], batch_gts[image], by_layer[image],
                          source, layer, mean=mean, std=std)  # fmt: skip
        fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the suptitle
        plt.show()

    defaults = {"image": 0, "source": sources[-1], "layer": num_layers - 1}
    explorer(
        draw,
        defaults,
        lambda widgets: {
            "image": widgets.IntSlider(value=0, min=0, max=len(by_layer) - 1, description="image"),
            "source": widgets.Dropdown(options=sources, value=sources[-1], description="source"),
            "layer": widgets.IntSlider(
                value=num_layers - 1, min=0, max=num_layers - 1, description="layer"
            ),  # fmt: skip
        },
    )
