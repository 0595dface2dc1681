"""What notebook 04 measures on a Deformable-DETR: how a decoder layer's sampling points and
attention weights sit, for a trained model against the same model at its initialisation, and how
much they vary from query to query."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["query_spread", "sampling_statistics", "summarize_sampling"]


@torch.no_grad()
def sampling_statistics(capture: dict, top_k: int = 10) -> dict[str, Tensor]:
    """Per query, for the ``top_k`` best-scoring queries of every image of one capture.

    Args:
        capture: from :func:`labkit.viz.deform.capture_decoder_sampling` (``sampling_locations``
            Tensor[B, Q, heads, L, P, 2] normalized to the padded maps, ``sampling_offsets``
            Tensor[B, Q, heads, L, P, 2] as the layer predicted them, ``attention_weights``
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
    take_xy = take[..., None].expand(-1, -1, *locations.shape[2:])
    loc = locations.gather(1, take_xy)
    offsets = capture["sampling_offsets"].float().gather(1, take_xy)  # [B, k, heads, L, P, 2]
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
        "weights": w,
        "offsets": offsets,
        "inside": inside,
    }
    return {name: value.flatten(0, 1).cpu() for name, value in out.items()}


def summarize_sampling(stats: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate several :func:`sampling_statistics` results (e.g. one per batch) into one,
    with the same keys and Tensor[N_total, ...] values."""
    stats = list(stats)
    if not stats:
        raise ValueError("stats: expected at least one sampling_statistics result")
    return {name: torch.cat([s[name] for s in stats]) for name in stats[0]}


def query_spread(stats: dict[str, Tensor]) -> dict[str, float]:
    """How much a layer's attention weights and offsets change from query to query, next to how
    much they differ between the sampling points of one query.

    Args:
        stats: :func:`sampling_statistics` (or :func:`summarize_sampling`) output with
            ``weights`` Tensor[N, heads, L, P] and ``offsets`` Tensor[N, heads, L, P, 2], N >= 2.

    Returns:
        ``weight_across_queries``: the standard deviation over the N queries of each weight,
        averaged over the ``heads * L * P`` weights; ``weight_across_points``: the standard
        deviation over those weights of their mean over the queries (the shared pattern);
        ``offset_across_queries`` / ``offset_across_points``: the same for every offset
        coordinate; ``same_largest``: the fraction of queries whose largest weight sits on the
        (head, level, point) most queries share; ``largest_index``: that point's flat index
        into ``heads * L * P``. Across-query spreads far below across-point spreads mean the
        queries all use (nearly) one pattern.
    """
    weights, offsets = stats["weights"].float(), stats["offsets"].float()
    if weights.shape[0] < 2:
        raise ValueError(f"stats: expected at least 2 queries, got {weights.shape[0]}")
    largest = weights.flatten(1).argmax(1)  # [N]
    mode = int(largest.mode().values)
    return {
        "weight_across_queries": float(weights.std(0).mean()),
        "weight_across_points": float(weights.mean(0).std()),
        "offset_across_queries": float(offsets.std(0).mean()),
        "offset_across_points": float(offsets.mean(0).std()),
        "same_largest": float((largest == mode).float().mean()),
        "largest_index": mode,
    }
