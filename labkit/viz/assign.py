"""Plots and tables for notebook 02: who is positive under MaxIoU, ATSS and PAA, and why."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit.assigners.base import AssignResult
from labkit.assigners.gmm import COVARIANCE_TYPES
from labkit.assigners.paa import PAASelection, paa_select
from labkit.notebook import explorer
from labkit.viz.draw import draw_boxes, draw_points, level_color, show_image

__all__ = [
    "SIZE_BUCKETS",
    "assignment_explorer",
    "level_of_priors",
    "most_covariance_sensitive_gt",
    "paa_gmm_summary",
    "plot_atss_thresholds",
    "plot_covariance_types",
    "plot_paa_gmm",
    "plot_positives",
    "positives_by_size",
    "positives_per_level",
    "format_rows",
    "paa_result",
]

# COCO's object sizes by area: small < 32^2, medium < 96^2, large above.
SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))


def level_of_priors(num_level_priors: Sequence[int]) -> Tensor:
    """``LongTensor[N]``: the FPN level (0 = finest) of every prior."""
    counts = torch.as_tensor(list(num_level_priors))
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def positives_by_size(results: dict[str, AssignResult], gt_bboxes: Tensor) -> list[dict]:
    """Per assigner and COCO size bucket: GTs, mean positives per GT, GTs left without any.

    Args:
        results: ``{name: AssignResult}`` for the same priors and ``gt_bboxes: Tensor[K, 4]``.

    Returns:
        Rows ``{"assigner", "size", "gts", "pos_per_gt", "no_positive"}``.
    """
    area = _area(gt_bboxes.cpu())
    rows = []
    for name, result in results.items():
        gt_inds = result.gt_inds.cpu()
        per_gt = torch.bincount(gt_inds[gt_inds > 0] - 1, minlength=len(gt_bboxes))
        for size, lo, hi in SIZE_BUCKETS:
            sel = (area >= lo) & (area < hi)
            n = int(sel.sum())
            rows.append(
                {
                    "assigner": name,
                    "size": size,
                    "gts": n,
                    "pos_per_gt": float(per_gt[sel].float().mean()) if n else float("nan"),
                    "no_positive": int((per_gt[sel] == 0).sum()),
                }
            )
    return rows


def positives_per_level(
    results: dict[str, AssignResult], num_level_priors: Sequence[int]
) -> list[dict]:
    """Rows ``{"assigner", "P3", "P4", ...}``: positives on each level (levels named from P3)."""
    levels = level_of_priors(num_level_priors)
    rows = []
    for name, result in results.items():
        pos = result.gt_inds.cpu() > 0
        counts = torch.bincount(levels[pos], minlength=len(num_level_priors)).tolist()
        rows.append({"assigner": name, **{f"P{i + 3}": c for i, c in enumerate(counts)}})
    return rows


def format_rows(rows: list[dict], float_format: str = "{:.2f}") -> str:
    """A fixed-width text table of ``rows`` (deterministic, for ``NBVAL_CHECK_OUTPUT`` cells)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [
        [float_format.format(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys]
        for r in rows
    ]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot_positives(
    img: Tensor,
    priors: Tensor,
    num_level_priors: Sequence[int],
    result: AssignResult,
    gt_bboxes: Tensor,
    gt_labels: Tensor | None = None,
    ax: Any = None,
    title: str | None = None,
    show_boxes: bool = False,
    class_names: Sequence[str] | None = None,
    number_gts: bool = False,
) -> Any:
    """The image, its GTs, and the centres of every positive prior coloured by FPN level.

    A thin line joins each positive centre to the centre of its GT, so "which GT" stays
    readable where objects crowd. ``show_boxes`` also draws the positive priors themselves.
    ``number_gts`` writes each GT's index ``k`` (as in ``gt_inds = k + 1``) under its box's
    bottom-left corner.
    """
    ax = show_image(img, ax=ax, title=title)
    labels = None if gt_labels is None else gt_labels.cpu()
    draw_boxes(ax, gt_bboxes.cpu(), labels=labels, class_names=class_names, linewidth=1.2)
    if number_gts:
        for k, box in enumerate(gt_bboxes.cpu().tolist()):
            ax.text(box[0], box[3], str(k), color="white", fontsize=8, va="top")
    levels = level_of_priors(num_level_priors)
    pos = torch.nonzero(result.gt_inds.cpu() > 0).squeeze(1)
    priors = priors.cpu()
    centres = (priors[:, :2] + priors[:, 2:]) / 2
    gt_centres = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]).cpu() / 2
    gt_of = result.gt_inds.cpu()[pos] - 1
    for p, g in zip(pos.tolist(), gt_of.tolist(), strict=True):
        ax.plot(
            [centres[p, 0], gt_centres[g, 0]],
            [centres[p, 1], gt_centres[g, 1]],
            color=level_color(int(levels[p])),
            linewidth=0.5,
            alpha=0.6,
        )
    for lvl in range(len(num_level_priors)):
        sel = pos[levels[pos] == lvl]
        if len(sel):
            draw_points(ax, centres[sel], color=level_color(lvl), size=14, label=f"P{lvl + 3}")
            if show_boxes:
                draw_boxes(ax, priors[sel], color=level_color(lvl), linewidth=0.6, alpha=0.6)
    h, w = img.shape[-2:]
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    if len(pos):
        ax.legend(loc="lower right", fontsize=7, markerscale=1.2, framealpha=0.7)
    return ax


def plot_atss_thresholds(
    stats: dict[str, Tensor],
    num_level_priors: Sequence[int],
    gt_indices: Sequence[int],
    names: Sequence[str] | None = None,
    ax: Any = None,
) -> Any:
    """Candidate IoUs of some GTs (dots coloured by level) against their ``mean + std`` threshold.

    Args:
        stats: :meth:`labkit.assigners.ATSSAssigner.candidate_stats` output.
        gt_indices: which GTs (columns) to show, left to right.
        names: x-axis label per shown GT.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    levels = level_of_priors(num_level_priors)
    idxs, ious = stats["candidate_idxs"].cpu(), stats["candidate_overlaps"].cpu()
    for x, k in enumerate(gt_indices):
        lv = levels[idxs[:, k]]
        jitter = torch.linspace(-0.25, 0.25, len(lv))
        colours = [level_color(int(v)) for v in lv]
        ax.scatter(x + jitter, ious[:, k], c=colours, s=14, linewidths=0)
        for key, style in (("mean", ":"), ("threshold", "-")):
            v = float(stats[key][k])
            ax.hlines(v, x - 0.35, x + 0.35, colors="k", linestyles=style, linewidth=1.2)
        if not bool((ious[:, k] >= stats["threshold"][k]).any()):
            ax.text(x, float(stats["threshold"][k]) + 0.02, "none pass", ha="center", fontsize=7)
    ax.set_xticks(range(len(gt_indices)))
    ax.set_xticklabels(names if names is not None else [f"GT {k}" for k in gt_indices], fontsize=8)
    ax.set_ylabel("IoU of candidate")
    handles = [
        plt.Line2D([], [], color="k", linestyle=":", label="mean"),
        plt.Line2D([], [], color="k", linestyle="-", label="mean + std"),
    ]
    handles += [
        plt.Line2D([], [], marker="o", linestyle="", color=level_color(i), label=f"P{i + 3}")
        for i in range(len(num_level_priors))
    ]
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="upper right")
    return ax


def _gaussian(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (x - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def plot_paa_gmm(
    selection: PAASelection,
    gt: int,
    ax: Any = None,
    title: str | None = None,
    bins: int = 12,
    legend: bool = True,
) -> Any:
    """Histogram of one GT's candidate losses, the two fitted Gaussians and the separation.

    Kept candidates are drawn green under the histogram, dropped ones red; the vertical line
    is the separation point (loss of the last kept candidate). ``legend=False`` leaves the
    legend out (several panels can share one, see :func:`plot_covariance_types`).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    mask = selection.cand_mask[gt].cpu()
    losses = selection.cand_losses[gt].cpu()[mask].numpy()
    keep = selection.keep[gt].cpu()[mask].numpy()
    ax.hist(losses, bins=bins, density=True, color="0.8", edgecolor="0.5", label="candidates")
    ax.scatter(
        losses[keep],
        np.zeros(keep.sum()) - 0.02,
        marker="|",
        s=120,
        color="tab:green",
        label="kept",
    )
    ax.scatter(
        losses[~keep],
        np.zeros((~keep).sum()) - 0.02,
        marker="|",
        s=120,
        color="tab:red",
        label="dropped",
    )
    if bool(selection.fitted[gt]):
        row = int(selection.fitted[:gt].sum())  # GMM rows exist for fitted GTs only
        w = selection.gmm.weights[row].cpu().numpy()
        mu = selection.gmm.means[row].cpu().numpy()
        var = selection.gmm.variances[row].cpu().numpy()
        span = max(losses.max() - losses.min(), 1e-3)
        xs = np.linspace(losses.min() - 0.2 * span, losses.max() + 0.2 * span, 300)
        comps = [w[c] * _gaussian(xs, mu[c], var[c]) for c in (0, 1)]
        ax.plot(xs, comps[0], color="tab:green", label="component 0 (positive)")
        ax.plot(xs, comps[1], color="tab:red", label="component 1 (negative)")
        ax.plot(xs, comps[0] + comps[1], color="k", linewidth=0.8, linestyle="--", label="mixture")
        sep = float(selection.separation_loss[gt])
        if math.isfinite(sep):
            ax.axvline(sep, color="tab:blue", linewidth=1.2, label="separation")
    ax.set_xlabel("candidate loss (cls + box)")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=8, framealpha=0.8)
    return ax


def _loss_range(losses: Tensor) -> str:
    if len(losses) == 0:
        return ""
    if len(losses) == 1:
        return f" with loss {float(losses[0]):.2f}"
    return f" with losses {float(losses.min()):.2f}-{float(losses.max()):.2f}"


def paa_gmm_summary(selection: PAASelection, gt: int) -> str:
    """One GT's PAA outcome in a line: kept and dropped candidates and the two fitted Gaussians.

    Reads ``selection.cand_losses / cand_mask / keep: [K, M]`` at row ``gt`` and, when the GT
    was fitted, its GMM row (``means / variances: [2]``, component 0 = low loss, and ``n_iter``),
    e.g. ``"GT 0: kept 2 with losses 0.10-0.20; dropped 1 with loss 0.90; component 0 mean 0.15
    sd 0.05, component 1 mean 0.90 sd 0.01; 4 EM iterations"``. The standard deviations can be
    compared with the spread of the kept losses: a component much wider than its group has not
    separated it.
    """
    mask = selection.cand_mask[gt].cpu()
    losses = selection.cand_losses[gt].cpu()[mask]
    keep = selection.keep[gt].cpu()[mask]
    parts = []
    for word, group in (("kept", losses[keep]), ("dropped", losses[~keep])):
        parts.append(f"{word} {len(group)}{_loss_range(group)}")
    if bool(selection.fitted[gt]):
        row = int(selection.fitted[:gt].sum())  # GMM rows exist for fitted GTs only
        mu = selection.gmm.means[row].cpu().tolist()
        sd = selection.gmm.variances[row].cpu().sqrt().tolist()
        parts.append(", ".join(f"component {c} mean {mu[c]:.2f} sd {sd[c]:.2f}" for c in (0, 1)))
        parts.append(f"{int(selection.gmm.n_iter[row])} EM iterations")
    else:
        parts.append("no mixture fitted (fewer than two candidates)")
    return f"GT {gt}: " + "; ".join(parts)


def plot_covariance_types(
    pos_losses: Tensor,
    pos_inds: Tensor,
    pos_gt_inds: Tensor,
    num_level_anchors: Sequence[int],
    gt: int | None = None,
    topk: int = 9,
    size: float = 3.0,
) -> tuple[Any, dict[str, PAASelection]]:
    """The same GT's GMM fit under ``full``, ``tied``, ``diag`` and ``spherical`` side by side.

    ``gt=None`` picks the GT whose number of kept candidates differs most between the
    covariance types (:func:`most_covariance_sensitive_gt`), so the panels show a difference
    when there is one.

    Returns:
        ``(figure, {covariance_type: PAASelection})``.
    """
    import matplotlib.pyplot as plt

    selections = {
        cov: paa_select(pos_losses, pos_inds, pos_gt_inds, num_level_anchors, topk, cov)
        for cov in COVARIANCE_TYPES
    }
    if gt is None:
        gt = most_covariance_sensitive_gt(selections)
    fig, axes = plt.subplots(1, 4, figsize=(4 * size, size * 0.9), sharey=True)
    for ax, cov in zip(axes, COVARIANCE_TYPES, strict=True):
        sel = selections[cov]
        kept = int(sel.keep[gt].sum())
        plot_paa_gmm(sel, gt, ax=ax, title=f"{cov}: {kept} kept", legend=False)
        if ax is not axes[0]:
            ax.set_ylabel("")
    fig.suptitle(f"GT {gt}: {int(selections['diag'].cand_mask[gt].sum())} candidates, fitted with "
                 "each covariance type", fontsize=10)  # fmt: skip
    fig.tight_layout()
    # One legend for the four panels, under them, at a readable size.
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
        ncol=4, fontsize=8, frameon=False,
    )  # fmt: skip
    return fig, selections


def most_covariance_sensitive_gt(selections: dict[str, PAASelection]) -> int:
    """The GT whose kept-candidate count varies most across ``selections`` (one
    ``PAASelection`` per covariance type); ties go to the GT with more candidates, then the
    lower index."""
    kept = torch.stack([sel.keep.sum(1) for sel in selections.values()])  # [types, K]
    candidates = next(iter(selections.values())).cand_mask.sum(1)
    spread = kept.max(0).values - kept.min(0).values
    order = sorted(range(len(spread)), key=lambda k: (-int(spread[k]), -int(candidates[k]), k))
    return order[0]


def assignment_explorer(
    img: Tensor,
    priors: Tensor,
    num_level_priors: Sequence[int],
    gt_bboxes: Tensor,
    gt_labels: Tensor,
    pos_losses: Tensor | None = None,
    pos_inds: Tensor | None = None,
    pos_gt_inds: Tensor | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """ipywidgets sliders: MaxIoU thresholds, ATSS ``topk``, PAA covariance type, redrawn live.

    Boxes are labelled with their class name (``class_names``, else the class id) and their GT
    index. The PAA panel needs the first-stage positives and their losses (``pos_*``); without them
    it is left out. In a headless batch run it draws once with the defaults (see
    ``labkit.notebook.explorer``).
    """
    import matplotlib.pyplot as plt

    from labkit.assigners import ATSSAssigner, MaxIoUAssigner

    def redraw(pos_iou_thr, neg_iou_thr, topk, covariance_type):
        panels = 3 if pos_losses is not None else 2
        fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4))
        neg = min(neg_iou_thr, pos_iou_thr)
        maxiou = MaxIoUAssigner(pos_iou_thr, neg, min_pos_iou=0.0).assign(
            priors, gt_bboxes, gt_labels
        )
        atss = ATSSAssigner(topk).assign(priors, num_level_priors, gt_bboxes, gt_labels)
        for ax, (name, r) in zip(axes, (("MaxIoU", maxiou), ("ATSS", atss)), strict=False):
            n = int((r.gt_inds > 0).sum())
            plot_positives(
                img,
                priors,
                num_level_priors,
                r,
                gt_bboxes,
                gt_labels,
                ax=ax,
                title=f"{name}: {n} positives",
                class_names=class_names,
                number_gts=True,
            )
        if pos_losses is not None:
            sel = paa_select(
                pos_losses, pos_inds, pos_gt_inds, num_level_priors, topk, covariance_type
            )
            result = paa_result(sel, len(priors), len(gt_bboxes))
            plot_positives(
                img,
                priors,
                num_level_priors,
                result,
                gt_bboxes,
                gt_labels,
                ax=axes[2],
                title=f"PAA ({covariance_type}): {int(sel.keep.sum())} positives",
                class_names=class_names,
                number_gts=True,
            )
        fig.tight_layout()
        plt.show()

    defaults = {"pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "topk": 9, "covariance_type": "diag"}
    explorer(
        redraw,
        defaults,
        lambda widgets: {
            "pos_iou_thr": widgets.FloatSlider(value=0.5, min=0.1, max=0.9, step=0.05, description="pos_iou_thr"),
            "neg_iou_thr": widgets.FloatSlider(value=0.4, min=0.0, max=0.9, step=0.05, description="neg_iou_thr"),
            "topk": widgets.IntSlider(value=9, min=1, max=20, description="topk"),
            "covariance_type": widgets.Dropdown(options=list(COVARIANCE_TYPES), value="diag", description="covariance"),
        },
    )  # fmt: skip


def paa_result(selection: PAASelection, num_priors: int, num_gts: int) -> AssignResult:
    """An :class:`AssignResult` from a PAA selection: kept candidates positive, the rest 0."""
    gt_inds = torch.zeros(num_priors, dtype=torch.long)
    kept = selection.keep.nonzero().cpu()
    gt_inds[selection.cand_inds.cpu()[kept[:, 0], kept[:, 1]]] = kept[:, 0] + 1
    return AssignResult(num_gts, gt_inds, torch.zeros(num_priors))
