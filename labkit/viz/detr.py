"""Pictures of DETR's matching: predictions and ground truth, cost matrices, matching flips."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from labkit.notebook import explorer
from labkit.viz.draw import class_color

__all__ = [
    "cost_explorer",
    "plot_cost_terms",
    "plot_matching",
    "plot_matching_flips",
]


def plot_matching(
    problem: Any,
    gt_inds: Tensor,
    ax: Any = None,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
    legend: bool = True,
) -> Any:
    """The image frame with ground truths (thick, one colour each) and every prediction (thin
    grey, dotted, numbered); a prediction matched to ground truth ``j`` (``gt_inds: [N]``,
    ``j + 1``) is drawn solid in ``j``'s colour, with a line from its centre to ``j``'s centre
    (short when the boxes are close). ``legend`` explains these marks under the frame."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 4.2))
    h, w = problem.img_shape
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")
    ax.set_facecolor("0.97")
    for j, (box, label) in enumerate(zip(problem.gt_bboxes, problem.gt_labels, strict=True)):
        x1, y1, x2, y2 = box.tolist()
        name = class_names[int(label)] if class_names else f"class {int(label)}"
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=3, color=class_color(j)))
        ax.text(x1, y1 - 3, f"GT {j}: {name}", color=class_color(j), fontsize=8, weight="bold")
    for q, box in enumerate(problem.pred_bboxes):
        x1, y1, x2, y2 = box.tolist()
        j = int(gt_inds[q]) - 1
        color = class_color(j) if j >= 0 else "0.55"
        style = "-" if j >= 0 else ":"
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ls=style, color=color)
        )
        ax.text(x2 - 2, y2 - 3, f"q{q}", color=color, fontsize=7, ha="right")
        if j >= 0:
            g = problem.gt_bboxes[j]
            ax.plot([(x1 + x2) / 2, float(g[0] + g[2]) / 2], [(y1 + y2) / 2, float(g[1] + g[3]) / 2],
                    color=color, lw=0.8)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if legend:
        matched = bool((gt_inds > 0).any())
        entries = [(Line2D([], [], color="0.3", lw=3), "ground truth (one colour each)")]
        if matched:
            entries += [
                (Line2D([], [], color="0.3", lw=1.2), "matched prediction (its object's colour)"),
                (Line2D([], [], color="0.3", lw=0.8), "prediction centre to object centre"),
            ]  # fmt: skip
        if not bool((gt_inds > 0).all()):
            entries.append((Line2D([], [], color="0.55", lw=1.2, ls=":"), "unmatched prediction"))
        ax.legend(*zip(*entries, strict=True), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=2, fontsize=7, frameon=False)  # fmt: skip
    return ax


def plot_cost_terms(
    terms: dict[str, Tensor], gt_inds: Tensor, axes: Any = None, shared_scale: bool = False
) -> Any:
    """One heatmap per cost term (queries down, ground truths across) with the value in each
    cell; the matched cells (``gt_inds``) are outlined in black on every panel."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = list(terms)
    if axes is None:
        _, axes = plt.subplots(1, len(names), figsize=(3.1 * len(names), 3.9), squeeze=False)
        axes = axes[0]
    lo = min(float(t.min()) for t in terms.values()) if shared_scale else None
    hi = max(float(t.max()) for t in terms.values()) if shared_scale else None
    for ax, name in zip(axes, names, strict=True):
        cost = terms[name].detach().cpu()
        im = ax.imshow(cost.numpy(), cmap="viridis", aspect="auto", vmin=lo, vmax=hi)
        vmin, vmax = im.get_clim()
        for (q, j), value in zip(torch.cartesian_prod(*map(torch.arange, cost.shape)).tolist(),
                                 cost.flatten().tolist(), strict=True):  # fmt: skip
            bright = (value - vmin) / max(vmax - vmin, 1e-9) > 0.6  # viridis turns yellow
            ax.text(j, q, f"{value:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if bright else "white")  # fmt: skip
        for q in torch.nonzero(gt_inds > 0).view(-1).tolist():
            j = int(gt_inds[q]) - 1
            ax.add_patch(Rectangle((j - 0.5, q - 0.5), 1, 1, fill=False, lw=2.5, color="red"))
        ax.set_xticks(range(cost.shape[1]), [f"GT {j}" for j in range(cost.shape[1])], fontsize=8)
        ax.set_yticks(range(cost.shape[0]), [f"q{q}" for q in range(cost.shape[0])], fontsize=8)
        ax.set_title(name, fontsize=10)
        plt.colorbar(im, ax=ax, fraction=0.05)
    return axes


def plot_matching_flips(record: dict, ax: Any = None, window: int = 5) -> Any:
    """Share of probe ground truths whose matched query changed at each step, with a running
    mean over ``window`` steps, and the training loss on a second axis (one legend for all
    three)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.0, 3.2))
    steps, flips = record["step"], record["flip_fraction"]
    ax.plot(steps, flips, "o", ms=3, color="tab:blue", alpha=0.5, label="this step")
    if len(flips) >= window:
        kernel = torch.ones(window) / window
        smooth = torch.nn.functional.conv1d(torch.tensor(flips)[None, None], kernel[None, None])
        ax.plot(steps[window - 1 :], smooth[0, 0].tolist(), color="tab:blue", lw=2,
                label=f"mean of {window} steps")  # fmt: skip
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("GTs whose query changed", color="tab:blue")
    twin = ax.twinx()
    (loss_line,) = twin.plot(steps, record["loss"], color="tab:orange", lw=1, label="training loss")
    twin.set_ylabel("training loss", color="tab:orange")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + [loss_line], labels + ["training loss (right axis)"], fontsize=8,
              loc="lower left")  # fmt: skip
    return ax


def cost_explorer(problem: Any, class_names: Sequence[str] | None = None) -> None:
    """Sliders for the three cost weights; redraws the total cost and the matching it gives.

    In a headless batch run it draws Deformable-DETR's weights (2, 5, 2) once.
    """
    import matplotlib.pyplot as plt
    from scipy.optimize import linear_sum_assignment

    from labkit.lessons.detr_matching import cost_terms

    def draw(w_class: float, w_l1: float, w_giou: float) -> None:
        terms = cost_terms(problem, (w_class, w_l1, w_giou))
        rows, cols = linear_sum_assignment(terms["total"].numpy())
        gt_inds = torch.zeros(problem.pred_bboxes.shape[0], dtype=torch.long)
        gt_inds[torch.as_tensor(rows)] = torch.as_tensor(cols) + 1
        fig, (a, b) = plt.subplots(1, 2, figsize=(10.0, 3.9), width_ratios=(1.0, 1.4))
        plot_cost_terms({"total": terms["total"]}, gt_inds, axes=[a])
        plot_matching(problem, gt_inds, ax=b, title=f"weights: class {w_class}, L1 {w_l1}, GIoU {w_giou}",
                      class_names=class_names)  # fmt: skip
        plt.show()

    explorer(
        draw,
        {"w_class": 2.0, "w_l1": 5.0, "w_giou": 2.0},
        lambda widgets: {
            name: widgets.FloatSlider(value=v, min=0.0, max=10.0, step=0.5, description=name)
            for name, v in (("w_class", 2.0), ("w_l1", 5.0), ("w_giou", 2.0))
        },
    )
