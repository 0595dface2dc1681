"""A JSON-lines training log: one JSON object per line, flushed as it is written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return os.fspath(value)
    raise TypeError(f"record: value of type {type(value).__name__} is not JSON serialisable")


def _finite(value: Any) -> Any:
    # JSON has no NaN/inf; write null so every line stays parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class JsonlLogger:
    """Append records to ``path`` (``None``: keep nothing on disk) as one JSON object per line.

    Lines are flushed immediately so ``tail -f`` and a crashed run both show every record.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict) -> None:
        """Write one record (tensors and numpy scalars become numbers, NaN becomes null)."""
        if self._file is None:
            return
        line = json.dumps(_finite(json.loads(json.dumps(record, default=_jsonable))))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (further ``log`` calls are ignored)."""
        if self._file is not None:
            self._file.close()
            self._file = None
