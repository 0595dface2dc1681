"""Deformable-DETR's encoder and decoder (post-norm layers, batch-first, mmdetection 3.x behaviour)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from labkit.detr.ms_deform_attn import MultiScaleDeformableAttention

__all__ = [
    "FFN",
    "DeformableDetrDecoder",
    "DeformableDetrDecoderLayer",
    "DeformableDetrEncoder",
    "DeformableDetrEncoderLayer",
    "encoder_reference_points",
    "inverse_sigmoid",
    "valid_ratios_from_mask",
]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios_from_mask(mask: Tensor) -> Tensor:
    """Fraction of each feature map that is image, not padding.

    Args:
        mask: BoolTensor[B, H, W], True = padding (padding is bottom-right).

    Returns:
        Tensor[B, 2]: ``(valid_w / W, valid_h / H)``, read off the first row and column.
    """
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Each encoder query's reference point is its own pixel centre, seen from every level.

    Args:
        spatial_shapes: LongTensor[L, 2] ``(h, w)``.
        valid_ratios: Tensor[B, L, 2] from :func:`valid_ratios_from_mask`.

    Returns:
        Tensor[B, sum(h*w), L, 2]: ``(x, y)`` normalized by the valid extent of the query's
        level, then rescaled by each level's valid ratio, so the point lands on the same image
        position in every level's (padded) map.
    """
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


class FFN(nn.Module):
    """``x + dropout(fc2(dropout(relu(fc1(x)))))`` (mmcv's FFN with two layers)."""

    def __init__(
        self, embed_dims: int = 256, feedforward_channels: int = 1024, ffn_drop: float = 0.1
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dims, feedforward_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(ffn_drop),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x: Tensor[..., embed_dims]`` -> same shape."""
        return x + self.layers(x)


class DeformableDetrEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN; LayerNorm after each (post-norm)."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        feedforward_channels: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dims, num_heads, num_levels, num_points, dropout=dropout, batch_first=True
        )
        self.ffn = FFN(embed_dims, feedforward_channels, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(2))

    def forward(
        self, query: Tensor, query_pos: Tensor, key_padding_mask: Tensor | None, **attn_kwargs
    ) -> Tensor:
        """``query, query_pos: Tensor[B, sum(hw), C]`` -> ``Tensor[B, sum(hw), C]``."""
        query = self.self_attn(
            query,
            value=query,
            query_pos=query_pos,
            key_padding_mask=key_padding_mask,
            **attn_kwargs,
        )
        query = self.norms[0](query)
        return self.norms[1](self.ffn(query))


class DeformableDetrEncoder(nn.Module):
    """A stack of encoder layers; each pixel attends from its own reference point."""

    def __init__(self, num_layers: int = 6, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableDetrEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        key_padding_mask: Tensor | None,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
    ) -> Tensor:
        """``query`` (flattened multi-level features) ``Tensor[B, sum(hw), C]`` -> memory, same shape."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            query = layer(
                query,
                query_pos,
                key_padding_mask,
                reference_points=reference_points,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
            )
        return query


class DeformableDetrDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the memory, FFN (post-norm)."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        feedforward_channels: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(
            embed_dims, num_heads, dropout=dropout, batch_first=True
        )
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dims, num_heads, num_levels, num_points, dropout=dropout, batch_first=True
        )
        self.ffn = FFN(embed_dims, feedforward_channels, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """``query, query_pos: Tensor[B, Q, C]``, ``value: Tensor[B, sum(hw), C]``,
        ``reference_points: Tensor[B, Q, L, 2 or 4]`` -> ``Tensor[B, Q, C]``."""
        q = k = query + query_pos
        query = query + self.self_attn(q, k, query, attn_mask=self_attn_mask, need_weights=False)[0]
        query = self.norms[0](query)
        query = self.cross_attn(
            query,
            value=value,
            query_pos=query_pos,
            key_padding_mask=key_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        query = self.norms[1](query)
        return self.norms[2](self.ffn(query))


class DeformableDetrDecoder(nn.Module):
    """Decoder layers with optional iterative box refinement.

    With ``reg_branches`` (one per layer), layer ``i``'s box prediction is added (in logit
    space) to its reference and becomes layer ``i + 1``'s reference, detached so each layer
    learns its own correction.

    ``look_forward_twice`` (Co-DETR, DINO): the returned references keep their gradient, so
    layer ``i``'s box head also learns from layer ``i + 1``'s loss; the next layer's input
    stays detached either way.
    """

    def __init__(self, num_layers: int = 6, look_forward_twice: bool = False, **layer_kwargs) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.layers = nn.ModuleList(
            DeformableDetrDecoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        reg_branches: nn.ModuleList | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run every layer.

        Args:
            query, query_pos: Tensor[B, Q, C].
            value: encoder memory Tensor[B, sum(hw), C].
            reference_points: Tensor[B, Q, 2] points or Tensor[B, Q, 4] boxes, normalized to
                the valid image.

        Returns:
            ``hidden_states`` Tensor[num_layers, B, Q, C] and ``references``
            Tensor[num_layers, B, Q, 2 or 4] (the reference after each layer).
        """
        intermediate, intermediate_refs = [], []
        for layer_id, layer in enumerate(self.layers):
            # References are relative to the valid image; the attention samples the padded map.
            if reference_points.shape[-1] == 4:
                ref_input = (
                    reference_points[:, :, None]
                    * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
                )
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            query = layer(
                query, query_pos, value, key_padding_mask, ref_input, spatial_shapes,
                level_start_index, self_attn_mask,
            )  # fmt: skip
            new_refs = reference_points
            if reg_branches is not None:
                delta = reg_branches[layer_id](query)
                if reference_points.shape[-1] == 4:
                    new_refs = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_refs = delta.clone()
                    new_refs[..., :2] = delta[..., :2] + inverse_sigmoid(reference_points)
                    new_refs = new_refs.sigmoid()
                reference_points = new_refs.detach()
            intermediate.append(query)
            intermediate_refs.append(new_refs if self.look_forward_twice else reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_refs)
