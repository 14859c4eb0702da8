"""Typed errors raised by the library. CLIs print ``str(error)`` as one line and exit non-zero."""


class DiffrigError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class AssetError(DiffrigError):
    """A face-rig asset file (FLAME, DECA, masks, ...) is missing or malformed."""


class UnsafePickleError(DiffrigError):
    """A third-party pickle names a global outside the allowlist; it was not loaded."""


class DataError(DiffrigError):
    """An image, album or dataset cannot be used (unreadable, corrupt, wrong size, no face)."""


class CheckpointError(DiffrigError):
    """A model or training checkpoint is missing, incomplete or of another architecture."""
