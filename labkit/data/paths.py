"""Where generated datasets live: the repository's data/ folder, wherever the code is run from."""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """The ``data/`` folder: ``$LABKIT_DATA`` if set, else the checkout's ``data/`` (next to
    ``pyproject.toml``), else ``./data``.

    Notebooks run with their own folder as the working directory, so a plain relative
    ``"data/shapes"`` would scatter copies; this keeps one cache per checkout.
    """
    env = os.environ.get("LABKIT_DATA")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "labkit").is_dir():
        return checkout / "data"
    return Path("data")


def default_root(name: str, root: str | os.PathLike | None) -> str:
    """``root`` as a string, or ``data_root() / name`` when it is ``None``."""
    return os.fspath(data_root() / name if root is None else root)
