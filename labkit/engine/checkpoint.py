"""Checkpoints: atomic save (temp file + os.replace) and loading with errors that name the problem.

Every checkpoint written by :func:`save_checkpoint` carries a SHA-256 of its tensors (names,
dtypes, shapes and bytes) under :data:`CHECKSUM_KEY`; :func:`load_checkpoint` recomputes it
and refuses a damaged file ("checkpoint is corrupt: ..."). Files written before the
checksum existed load as before, unverified.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import glob
import hashlib
import os
import shutil
import warnings
from collections.abc import Iterator
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


CHECKSUM_KEY = "labkit_checksum"  # {"algorithm": "sha256", "tensors": hex digest}


def _tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts / lists / tuples, with its path, in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}/{key!r}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}/{i}")


def tensor_checksum(state: dict) -> str:
    """SHA-256 (hex) over the path, dtype, shape and bytes of every tensor in ``state``
    (the :data:`CHECKSUM_KEY` entry excluded)."""
    digest = hashlib.sha256()
    for name, tensor in _tensors({k: v for k, v in state.items() if k != CHECKSUM_KEY}):
        tensor = tensor.detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():
            flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(flat.numpy()))
    return digest.hexdigest()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _remove_stale_temps(path: Path) -> None:
    """Delete ``.<name>.tmp.<pid>`` files a killed save of ``path`` left behind."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp.*"):
        stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically, with a checksum of its tensors.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows). A crash or a
    full disk mid-save therefore leaves the previous checkpoint intact, never half a file;
    a failed write raises ``OSError`` naming ``path`` and saying so, and the temporary
    files of earlier killed saves of ``path`` are removed. ``state`` itself is not
    modified; the file holds it plus :data:`CHECKSUM_KEY`.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    state = {**state, CHECKSUM_KEY: {"algorithm": "sha256", "tensors": tensor_checksum(state)}}
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        # torch's zip writer reports a full disk as RuntimeError("[enforce fail at
        # inline_container.cc ...] PytorchStreamWriter failed writing file ..."); other
        # RuntimeErrors are not about the file and pass through unchanged.
        if not isinstance(err, OSError) and not any(
            mark in str(err) for mark in ("inline_container", "PytorchStreamWriter")
        ):
            raise
        code = getattr(err, "errno", None)
        if code is None and isinstance(err, OSError) and err.args and isinstance(err.args[0], int):
            code = err.args[0]  # OSError(errno.ENOSPC) sets args only
        reason = str(err)
        if code and os.strerror(code) not in reason:
            reason = f"{os.strerror(code)}: {reason}"
        previous = (
            "the previous checkpoint at that path is intact"
            if path.exists()
            else "no file was written at that path"
        )
        new = OSError(
            f"path: could not save the checkpoint {os.fspath(path)!r} ({reason}); {previous}"
        )
        new.errno = code if code is not None else errno_module.EIO
        raise new from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Atomically make ``dst`` an independent copy of ``src`` (never a hard link: damage to
    one file must not reach the other, and each carries its own checksum)."""
    src, dst = Path(src), Path(dst)
    _remove_stale_temps(dst)
    tmp = _temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
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
    stored = ckpt.pop(CHECKSUM_KEY, None)  # absent in files saved before checksums existed
    if stored is not None:
        actual = tensor_checksum(ckpt)
        expected = stored.get("tensors") if isinstance(stored, dict) else None
        if actual != expected:
            raise ValueError(
                f"path: checkpoint is corrupt: {os.fspath(path)!r} was damaged after it was "
                f"saved (sha256 of its tensors is {actual}, the file recorded {expected}); "
                "resume from or load another checkpoint (e.g. an earlier epoch_N.pth)"
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
