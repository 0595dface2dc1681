"""Checkpoints: atomic save (temp file + os.replace) and loading with errors that name the problem."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows). A crash or a
    full disk mid-save therefore leaves the previous checkpoint intact, never half a file.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Atomically make ``dst`` a copy of ``src`` (a hard link when the filesystem allows)."""
    src, dst = Path(src), Path(dst)
    tmp = _temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_model_state(model: nn.Module, state_dict: dict, strict: bool = True) -> dict:
    """Load ``state_dict`` into ``model``, naming missing, unexpected and mis-shaped keys.

    With ``strict=False`` only the keys that exist with the same shape are loaded and a
    warning lists the rest. Returns ``{"missing": [...], "unexpected": [...], "shape": [...]}``.
    """
    model = unwrap_model(model)
    state_dict = _strip_prefix(_strip_prefix(state_dict, "module."), "_orig_mod.")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [
        f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    report = {"missing": missing, "unexpected": unexpected, "shape": shape}
    problems = [
        f"{label} keys: {_listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shape))
        if keys
    ]
    if problems and strict:
        raise ValueError(
            "checkpoint does not match the model: "
            + "; ".join(problems)
            + " (pass strict=False to load the matching keys only)"
        )
    if problems:
        warnings.warn("checkpoint partly loaded: " + "; ".join(problems), stacklevel=2)
    bad = {s.split(" ")[0] for s in shape}
    model.load_state_dict(
        {k: v for k, v in state_dict.items() if k in own and k not in bad}, strict=False
    )
    return report


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    weights_only: bool = True,
) -> dict:
    """Read a checkpoint and restore whatever is given (model, optimizer, AMP grad scaler).

    Accepts labkit checkpoints (a dict with a ``"model"`` state dict, see
    :func:`labkit.engine.train.train`) and plain state dicts. ``DataParallel``'s
    ``module.`` prefix is removed. Raises ``FileNotFoundError`` naming the path,
    ``ValueError`` for a file that is not a checkpoint or whose keys do not match (naming them).

    Returns:
        The whole checkpoint dict (``epoch``, ``iter``, ``recipe``, ``config``, ... when
        saved by the train loop).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {os.fspath(path)!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # pickle errors come in many types; say which file failed
        raise ValueError(
            f"path: could not read {os.fspath(path)!r} as a torch checkpoint: {err}"
        ) from err
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"path: {os.fspath(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict"
        )
    if "model" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {"model": ckpt}  # a bare state dict
        else:
            raise ValueError(
                f"path: {os.fspath(path)!r} has no 'model' entry (keys: {_listing(sorted(ckpt))})"
            )
    if model is not None:
        load_model_state(model, ckpt["model"], strict=strict)
    if optimizer is not None:
        if "optimizer" not in ckpt:
            raise ValueError(
                f"optimizer: {os.fspath(path)!r} has no optimizer state to resume from"
            )
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt
