"""A JSON-lines training log: one JSON object per line, flushed as it is written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from labkit.files import write_atomic


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

    def truncate(self, iteration: int) -> int:
        """Drop the records of steps after ``iteration`` (``"iter" > iteration``) and any line
        a kill cut short, so a run resumed from the checkpoint of step ``iteration`` does not
        log its steps twice. The file is rewritten atomically and reopened for appending.

        Returns:
            The number of lines dropped (0 without a file).
        """
        if self._file is None or self.path is None:
            return 0
        self._file.close()
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # half a line from a killed run
                    dropped += 1
                    continue
                step = record.get("iter") if isinstance(record, dict) else None
                if isinstance(step, int) and step > iteration:
                    dropped += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            write_atomic(self.path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        return dropped

    def close(self) -> None:
        """Close the file (further ``log`` calls are ignored)."""
        if self._file is not None:
            self._file.close()
            self._file = None
