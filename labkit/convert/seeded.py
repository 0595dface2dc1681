"""Seeded stand-in weights for a state dict, from its key names and shapes alone (no real weights).

The mmdetection conformance fixtures (``benchmarks/mmdet_fixtures.py``) store only key names,
shapes and a seed; the fixture script and ``tests/test_convert_mmdet.py`` both call
:func:`seeded_state_dict` to rebuild the very same tensors, so no weights are ever stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["seeded_state_dict"]


def seeded_state_dict(
    shapes: Mapping[str, Sequence[int]], seed: int = 0, tied: Mapping[str, str] | None = None
) -> dict[str, Tensor]:
    """Deterministic float32 tensors for every key of ``shapes`` (``{key: shape}``).

    Keys are visited in sorted order; key number ``i`` draws from
    ``torch.Generator().manual_seed(seed + i)``, so a tensor depends only on the sorted key
    list, its shape and ``seed``. Values are chosen so a deep network stays in a sensible
    range (scores neither all 0 nor all 1), by the key's last name and the shape:

    - ``num_batches_tracked``: 0 (int64);
    - ``running_var``: U(0.5, 1.5); ``running_mean``: N(0, 0.1);
    - 2-D and larger (conv / linear weights): N(0, 1 / fan_in), fan_in = ``prod(shape[1:])``;
    - other ``weight`` and ``scale`` (norm scales, FCOS/ATSS ``Scale``): 1 + N(0, 0.05);
    - everything else (biases, ``moment_transfer``): N(0, 0.05).

    ``tied`` (``{key: source_key}``) names keys of one shared parameter (Deformable-DETR's
    prediction branches without box refinement are one module listed once per layer): each
    such key then holds ``source_key``'s tensor, as the saved model would.

    Returns:
        ``{key: Tensor[shape]}`` in sorted key order.
    """
    state = {}
    for index, key in enumerate(sorted(shapes)):
        shape = tuple(int(s) for s in shapes[key])
        g = torch.Generator().manual_seed(int(seed) + index)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            value = torch.zeros(shape, dtype=torch.long)
        elif leaf == "running_var":
            value = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "running_mean":
            value = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif leaf in ("weight", "scale"):
            value = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            value = 0.05 * torch.randn(shape, generator=g)
        state[key] = value
    for key, source in (tied or {}).items():
        if key not in state or source not in state or state[key].shape != state[source].shape:
            raise ValueError(f"tied: {key!r} -> {source!r} are not two keys of one shape")
        state[key] = state[source]
    return state
