"""Figures of the zoo's recorded runs: a comparison shown with its seed spread."""

from __future__ import annotations

from typing import Any

from labkit import zoo
from labkit.lessons import recorded
from labkit.viz.draw import class_color

__all__ = ["plot_recorded_comparison"]


def plot_recorded_comparison(
    names: list[str],
    metric: str = "AP",
    labels: dict[str, str] | None = None,
    root: Any = None,
    figsize: tuple[float, float] = (10.5, 3.8),
) -> Any:
    """Two panels for zoo names ``names``: left, the validation ``metric`` during training, one
    thin line per recorded seed (one colour per name); right, the final ``metric`` of every seed
    (dots) with the mean ± sample std (bar and whisker). Names without a trained seed are listed
    as "not trained" in the right panel's labels.

    Returns the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    labels = labels or {}
    fig, (curves, finals) = plt.subplots(1, 2, figsize=figsize, width_ratios=(1.5, 1))
    ticks = []
    for i, name in enumerate(names):
        color = class_color(i)
        summary = zoo.compare([name], metric, root)[0]
        label = labels.get(name, name)
        for j, seed in enumerate(summary["seeds"]):
            xs, ys = recorded.val_curve(name, seed, metric, root)
            curves.plot(xs, ys, "-o", color=color, lw=1.2, ms=3, alpha=0.85,
                        label=label if j == 0 else None)  # fmt: skip
        values = summary["values"]
        finals.scatter([i] * len(values), values, color=color, s=22, zorder=3)
        if summary["std"] is not None:
            finals.errorbar(i + 0.18, summary["mean"], yerr=summary["std"], fmt="s", color=color,
                            ms=5, capsize=4, lw=1.4)  # fmt: skip
        ticks.append(f"{label}\n(n = {summary['n']})" if values else f"{label}\nnot trained")
    curves.set_xlabel("training iteration")
    curves.set_ylabel(f"val {metric}")
    curves.set_title(f"recorded runs: val {metric} per seed", fontsize=10)
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=8)
    finals.set_xticks(range(len(names)), ticks, fontsize=8)
    finals.set_xlim(-0.6, len(names) - 0.4)
    finals.set_ylabel(f"final val {metric}")
    finals.set_title("dots: seeds; square and whisker: mean ± std", fontsize=10)
    finals.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
