"""What notebook 03 measures on a trained FCOS: predicted centerness against its target."""

from __future__ import annotations

import torch
from torch import Tensor

from labkit.heads.dense_head import flatten_levels
from labkit.heads.fcos import centerness_target

__all__ = ["centerness_pairs"]


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
