"""Files written whole or not at all: through a temporary file beside the target, then renamed, so
an interrupted run or a full disk never leaves a truncated file that looks finished."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(stream)`` on a temporary file beside ``path`` and rename it to ``path``; on any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as stream:
            write(stream)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
