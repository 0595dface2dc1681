"""Files written atomically: a temporary file in the same folder, then one rename over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then rename over ``path``.

    A reader (or a crashed run) never sees a half-written notebook or page.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden name, same suffix: papermill and nbconvert check the extension.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; publish like a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
