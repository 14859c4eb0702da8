"""Where diffrig looks for user files and keeps its caches.

``DIFFRIG_DECA_DIR``: the DECA data folder users download (default ``./data``, as in DECA's repo).
``DIFFRIG_CACHE``: generated files such as the built-in asset set (default ``~/.cache/diffrig``).
"""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of diffrig's caches; created on demand by whoever writes into it."""
    root = os.environ.get("DIFFRIG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffrig"
    )
    return Path(root)


def default_deca_dir() -> Path:
    """The DECA data folder used when none is given."""
    return Path(os.environ.get("DIFFRIG_DECA_DIR") or "data")
