"""Process-group arithmetic that losses need: the mean of a value over all training processes.

The launch side (``torchrun`` environment, process groups, DDP wrapping) is
``labkit.engine.distributed``; this module stays below the heads so a loss can average its
``avg_factor`` over processes, as mmdetection's ``reduce_mean`` does.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["reduce_mean"]


def reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` (any shape) over all processes; ``tensor`` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return tensor
