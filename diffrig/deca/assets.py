"""Find the files of a DECA data folder, with errors that say what is missing and where to get it."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from diffrig.deca.files import DECA_FILES
from diffrig.errors import AssetError
from diffrig.paths import default_deca_dir

BUILTIN = "builtin"


def describe(name: str) -> tuple[str, str] | None:
    """(what the file is, where users get it) for a DECA file name, None for other names."""
    entry = DECA_FILES.get(name)
    return (entry[0], entry[1]) if entry else None


def missing_asset_error(path: str | PathLike) -> AssetError:
    """The error for a file that is not there, naming it, what it is and where to get it."""
    path = Path(path)
    info = describe(path.name)
    if info is None:
        return AssetError(f"{path} does not exist")
    what, source = info
    return AssetError(f"{path} does not exist: it is the {what}; get it from {source}")


def malformed_asset_error(path: str | PathLike, reason: object) -> AssetError:
    """The error for a file that is there but cannot be read as what it should be."""
    path = Path(path)
    info = describe(path.name)
    where = f" Replace it with the original from {info[1]}." if info else ""
    what = f"a valid {info[0]}" if info else "readable"
    return AssetError(f"{path} is not {what} ({reason}).{where}")


def resolve_deca_dir(path: str | PathLike | None = None) -> Path:
    """The DECA data folder to use: ``path``, the default (``DIFFRIG_DECA_DIR`` or ``./data``) when
    None, or the generated built-in asset set for ``"builtin"``."""
    if path is not None and str(path) == BUILTIN:
        from diffrig.deca.builtin import ensure_builtin

        return Path(ensure_builtin())
    folder = Path(path) if path is not None else default_deca_dir()
    if not folder.is_dir():
        needed = ", ".join(name for name, (_, _, required) in DECA_FILES.items() if required)
        raise AssetError(
            f"DECA data folder {folder} does not exist. Put DECA's files there ({needed}; see "
            f"DECA's README) or use '{BUILTIN}' for diffrig's procedural stand-in set"
        )
    return folder


def asset_path(folder: str | PathLike, name: str) -> Path:
    """``folder / name``, which must be an existing file (else AssetError saying where to get it)."""
    path = Path(folder) / name
    if not path.is_file():
        raise missing_asset_error(path)
    return path
