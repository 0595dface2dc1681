"""A learnable scalar that multiplies its input (mmdetection's ``Scale``), one per pyramid level."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Scale(nn.Module):
    """Multiply the input by one learnable scalar.

    Dense heads share their regression convs across pyramid levels; a per-level ``Scale``
    lets each level still pick its own output range (FCOS, ATSS, FoveaBox, ...).

    Args:
        scale: initial value of the scalar.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        """``x: Tensor[...]`` -> ``x * scale`` (same shape)."""
        return x * self.scale
