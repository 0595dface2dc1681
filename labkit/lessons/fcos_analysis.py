"""What notebook 03 measures on a trained FCOS: predicted centerness against its target."""

from __future__ import annotations

import torch
from torch import Tensor

from labkit.heads.dense_head import flatten_levels
from labkit.heads.fcos import centerness_target

__all__ = ["centerness_fit_by_level", "centerness_pairs"]


@torch.no_grad()
def centerness_pairs(model: torch.nn.Module, batch: dict) -> dict[str, Tensor]:
    """For every positive point of ``batch`` (FCOS's own assignment): its centerness target and
    the model's predicted centerness (sigmoid), plus its classification score for the GT class.

    Returns ``{"target": Tensor[P], "predicted": Tensor[P], "score": Tensor[P],
    "level": LongTensor[P]}`` over all images.
    """
    was_training = model.training
    model.eval()
    _, targets = model.loss_and_targets(batch)
    inputs = model.inputs(batch)
    cls_scores, _, centernesses = model(inputs["img"])
    model.train(was_training)
    ctr = flatten_levels(centernesses, 1)[..., 0].sigmoid()  # [B, N]
    cls = flatten_levels(cls_scores, cls_scores[0].shape[1]).sigmoid()  # [B, N, C]
    level_of_point = torch.cat(
        [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(targets.num_level_points)]
    ).to(ctr.device)
    out = {"target": [], "predicted": [], "score": [], "level": []}
    for i, pos in enumerate(targets.pos_inds):
        out["target"].append(centerness_target(targets.bbox_targets[i, pos]))
        out["predicted"].append(ctr[i, pos])
        out["score"].append(cls[i, pos, targets.labels[i, pos]])
        out["level"].append(level_of_point[pos])
    return {k: torch.cat(v).cpu() for k, v in out.items()}


def centerness_fit_by_level(pairs: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """How closely the predicted centerness follows its target, per FPN level and pooled.

    Args:
        pairs: :func:`centerness_pairs`' output; uses ``"target"`` and ``"predicted"``
            (Tensor[P]) and ``"level"`` (LongTensor[P], 0 = P3).

    Returns:
        ``{"P3": row, ..., "all": row}`` for the levels present (finest first), each row
        ``{"n": points, "r": Pearson's r (NaN below two points or without spread),
        "bias": mean of predicted - target, "below": fraction of points with predicted <
        target (under the diagonal of the scatter)}``.
    """
    target, predicted, level = pairs["target"], pairs["predicted"], pairs["level"]
    groups = {f"P{lvl + 3}": level == lvl for lvl in sorted(level.unique().tolist())}
    groups["all"] = torch.ones_like(level, dtype=torch.bool)
    out = {}
    for name, sel in groups.items():
        t, p = target[sel].double(), predicted[sel].double()
        n = len(t)
        r = float(torch.corrcoef(torch.stack([t, p]))[0, 1]) if n > 1 else float("nan")
        out[name] = {
            "n": n,
            "r": r,
            "bias": float((p - t).mean()) if n else float("nan"),
            "below": float((p < t).double().mean()) if n else float("nan"),
        }
    return out
