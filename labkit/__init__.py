"""labkit: a small, readable PyTorch package for learning and researching object detection."""

from __future__ import annotations

import os
from typing import Any

import torch

__version__ = "0.1.0"
__all__ = ["__version__", "device", "show_source", "to_device"]


def device(preference: str | torch.device | None = None) -> torch.device:
    """Choose the torch device once for a whole notebook or script.

    Args:
        preference: ``"auto"``/``None`` (CUDA when available, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``. The environment variable ``LABKIT_DEVICE`` overrides
            ``"auto"``, so a batch run can move every notebook at once.

    Returns:
        The ``torch.device`` to put models and tensors on.
    """
    if isinstance(preference, torch.device):
        return preference
    if preference is None or preference == "auto":
        preference = os.environ.get("LABKIT_DEVICE", "auto")
    if not isinstance(preference, str):
        raise TypeError(f"device: expected a string or torch.device, got {type(preference)!r}")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(preference)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {preference!r} was asked for but CUDA is not available here")
    return chosen


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in ``obj`` (nested dicts, lists and tuples, e.g. a collated batch) to
    ``device``; everything else (image metas, numbers, strings) is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(value, device) for value in obj)
    return obj


def __getattr__(name: str):
    # Notebooks write ``labkit.show_source(fn)``; the notebook module (IPython, matplotlib) is
    # imported only when that is first used, so ``import labkit`` stays light.
    if name == "show_source":
        from labkit.notebook import show_source

        return show_source
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
