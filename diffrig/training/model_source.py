"""Where a run's model comes from: a new one from architecture options, a diffrig model dir, or an
official ``model*.pt`` (converted without loss through :mod:`diffrig.models`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from diffrig.errors import CheckpointError, DiffrigError
from diffrig.models import DiffusionRigModel, load_official_checkpoint

logger = logging.getLogger(__name__)


def new_model(options: dict) -> DiffusionRigModel:
    try:
        return DiffusionRigModel(**options)
    except (TypeError, ValueError) as error:
        raise DiffrigError(f"invalid model options {options}: {error}") from None


def load_model(path: str, options: dict | None = None, must_match: Sequence[str] = ()) -> DiffusionRigModel:
    """A diffrig model directory (``save_pretrained``) or an official checkpoint file.

    An official ``.pt`` stores weights only: ``options`` (official names) give its architecture.
    A model directory carries its own configuration; ``options`` are not used for it: one that
    differs from the directory's is a warning, or a CheckpointError when it is named in ``must_match``.
    """
    source = Path(path)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise CheckpointError(f"{source} is not a diffrig model directory (no config.json); pass a "
                                  "directory written by save_pretrained or an official model*.pt")
        try:
            model = DiffusionRigModel.from_pretrained(source)
        except (OSError, ValueError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"cannot load the model in {source}: {first}") from None
        ignored = {k: v for k, v in (options or {}).items() if k in model.config and model.config[k] != v}
        for name in must_match:
            if name in ignored:
                raise CheckpointError(f"wrong {name.replace('_', ' ')}: the model in {source} has {name} "
                                      f"{model.config[name]}, not {ignored[name]}")
        if ignored:
            logger.warning("%s carries its own architecture; these model options are not used: %s", source, ignored)
        return model
    if source.is_file():
        return load_official_checkpoint(source, **(options or {}))
    raise CheckpointError(f"model {source} not found: pass a diffrig model directory or an official model*.pt")
