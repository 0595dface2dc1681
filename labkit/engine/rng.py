"""Capture and restore every random state a training step touches, for an exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The distinct torch Generators a loader draws from (its own, its sampler's, its batch
    sampler's sampler's): the shuffle order and the worker seeds come from these."""
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(
            getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None
        ),
    ]
    unique: list[torch.Generator] = []
    for gen in candidates:
        if gen is not None and all(gen is not g for g in unique):
            unique.append(gen)
    return unique


def _transform_generators(obj: Any, depth: int = 0) -> list[np.random.Generator]:
    """numpy Generators owned by the dataset's transforms (e.g. ``RandomFlip.rng``).

    Looks through ``.dataset``/``.datasets`` (Subset, ConcatDataset), ``.transforms``
    (Compose) and ``.rng``, a few levels deep. With ``num_workers=0`` these streams live in
    the main process and must be saved for an exact resume; in workers they are reseeded
    from the loader's generator, which is saved anyway.
    """
    if isinstance(obj, np.random.Generator):
        return [obj]
    if obj is None or depth > 4:
        return []
    found: list[np.random.Generator] = []
    for attr in ("dataset", "datasets", "transforms", "rng"):
        child = getattr(obj, attr, None)
        for item in child if isinstance(child, (list, tuple)) else [child]:
            found += _transform_generators(item, depth + 1)
    return found


def capture_rng(loader: DataLoader | None = None) -> dict:
    """Every random state a training step can touch: python, numpy, torch (CPU, CUDA), the
    loader's generators (shuffle order, worker seeds) and numpy Generators inside the
    dataset's transforms. Stored with plain types/tensors so ``torch.load(weights_only=True)``
    reads it back."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "loader": [g.get_state() for g in _loader_generators(loader)] if loader is not None else [],
        "transforms": [g.bit_generator.state for g in _transform_generators(loader)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, loader: DataLoader | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader is not None:
        for gen, gen_state in zip(_loader_generators(loader), state["loader"], strict=True):
            gen.set_state(gen_state)
        # strict=False: a resumed run may use a dataset whose transforms changed.
        transform_states = state.get("transforms", [])
        for gen, gen_state in zip(_transform_generators(loader), transform_states, strict=False):
            gen.bit_generator.state = gen_state
