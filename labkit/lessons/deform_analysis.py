"""What notebook 04 measures on a Deformable-DETR: how a decoder layer's sampling points and
attention weights sit, for a trained model against the same model at its initialisation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["sampling_statistics", "summarize_sampling"]


@torch.no_grad()
def sampling_statistics(capture: dict, top_k: int = 10) -> dict[str, Tensor]:
    """Per query, for the ``top_k`` best-scoring queries of every image of one capture.

    Args:
        capture: from :func:`labkit.viz.deform.capture_decoder_sampling` (``sampling_locations``
            Tensor[B, Q, heads, L, P, 2] normalized to the padded maps, ``attention_weights``
            Tensor[B, Q, heads, L, P], ``boxes`` Tensor[B, Q, 4] normalized cxcywh, ``scores``
            Tensor[B, Q], ``pad_shape`` (H, W)).
        top_k: queries kept per image (all when ``top_k`` exceeds Q); must be >= 1.

    Returns:
        ``{"level_share": Tensor[N, L]`` (the query's attention weight per level, summed over
        heads and points, as a fraction of its total), ``"max_weight": Tensor[N]`` (its largest
        single weight; a head's weights sum to 1 over ``L * P`` points, so uniform weights give
        ``1 / (L * P)``), ``"inside_box": Tensor[N]`` (the fraction of its weight on points inside
        its own predicted box), ``"box_size": Tensor[N]`` (``sqrt(w * h)`` of that box in padded
        pixels), ``"score": Tensor[N]``}`` with ``N = B * min(top_k, Q)``, image by image.
    """
    if top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    weights = capture["attention_weights"].float()  # [B, Q, heads, L, P]
    locations = capture["sampling_locations"].float()  # [B, Q, heads, L, P, 2]
    boxes, scores = capture["boxes"].float(), capture["scores"].float()
    pad_h, pad_w = capture["pad_shape"]
    k = min(top_k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # [B, k]
    take = top[..., None, None, None].expand(-1, -1, *weights.shape[2:])
    w = weights.gather(1, take)  # [B, k, heads, L, P]
    loc = locations.gather(1, take[..., None].expand(-1, -1, *locations.shape[2:]))
    box = boxes.gather(1, top[..., None].expand(-1, -1, 4))  # [B, k, 4]
    total = w.sum(dim=(2, 3, 4))  # [B, k]
    level_share = w.sum(dim=(2, 4)) / total[..., None]  # [B, k, L]
    x1y1 = (box[..., :2] - box[..., 2:] / 2)[:, :, None, None, None]
    x2y2 = (box[..., :2] + box[..., 2:] / 2)[:, :, None, None, None]
    inside = ((loc >= x1y1) & (loc <= x2y2)).all(dim=-1)  # [B, k, heads, L, P]
    out = {
        "level_share": level_share,
        "max_weight": w.amax(dim=(2, 3, 4)),
        "inside_box": (w * inside).sum(dim=(2, 3, 4)) / total,
        "box_size": (box[..., 2] * pad_w * box[..., 3] * pad_h).sqrt(),
        "score": scores.gather(1, top),
    }
    return {name: value.flatten(0, 1).cpu() for name, value in out.items()}


def summarize_sampling(stats: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate several :func:`sampling_statistics` results (e.g. one per batch) into one,
    with the same keys and Tensor[N_total, ...] values."""
    stats = list(stats)
    if not stats:
        raise ValueError("stats: expected at least one sampling_statistics result")
    return {name: torch.cat([s[name] for s in stats]) for name in stats[0]}
