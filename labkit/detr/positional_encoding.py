"""Sine positional encodings: of feature-map pixels (with padding masks) and of proposal boxes."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinePositionalEncoding", "proposal_pos_embed"]


class SinePositionalEncoding(nn.Module):
    """DETR's 2-d sine encoding of pixel positions, counted over unpadded pixels only.

    The row (column) coordinate of a pixel is the number of valid pixels above (left of) it,
    inclusive; with ``normalize`` it becomes ``(y + offset) / (valid rows + eps) * scale``,
    so an image encodes the same whether or not it was padded. Each coordinate is divided by
    ``temperature ** (2 * (i // 2) / num_feats)`` and alternately passed through sin and cos.
    Deformable-DETR uses ``num_feats=128, normalize=True, offset=-0.5`` (pixel centres).

    Args:
        num_feats: channels per axis (output has ``2 * num_feats``).
        temperature, normalize, scale, eps, offset: as above (mmdetection's names).
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: int = 10000,
        normalize: bool = False,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """``mask: BoolTensor[B, H, W]`` (True = padding) -> ``Tensor[B, 2 * num_feats, H, W]``
        (y channels first, then x)."""
        if mask.dim() != 3:
            raise ValueError(f"mask: expected shape [B, H, W], got {tuple(mask.shape)}")
        not_mask = 1 - mask.to(torch.int)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        b, h, w = mask.shape
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even channels) and cos (odd channels)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).view(
            b, h, w, -1
        )
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).view(
            b, h, w, -1
        )
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def proposal_pos_embed(
    proposals: Tensor, num_pos_feats: int = 128, temperature: int = 10000
) -> Tensor:
    """Sine encoding of unactivated proposal boxes (two-stage Deformable-DETR).

    Args:
        proposals: Tensor[B, N, 4] box logits (``sigmoid`` gives normalized cx, cy, w, h).

    Returns:
        Tensor[B, N, 4 * num_pos_feats]: for each of the 4 coordinates, ``num_pos_feats``
        channels of interleaved sin/cos of ``sigmoid(x) * 2 pi / temperature**(2 (i//2) / n)``.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = proposals.sigmoid() * (2 * math.pi)
    pos = pos[:, :, :, None] / dim_t  # [B, N, 4, num_pos_feats]
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)
