"""Small argparse helpers shared by the command-line tools."""

import argparse


def str2bool(text: str) -> bool:
    """argparse type for the official scripts' boolean flags: true/false, yes/no, 1/0, t/f, y/n, on/off."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on", "t", "y"):
        return True
    if lowered in ("false", "no", "0", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def check_device(name: str | None) -> str | None:
    """A ``--device`` value, checked against this machine before any work starts (None stays None).

    Raises DiffrigError for a name torch does not know ("gpu") and for a CUDA device this machine
    does not have, so the command fails with one line instead of torch's traceback mid-run.
    """
    if name is None:
        return None
    import torch

    from diffrig.errors import DiffrigError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DiffrigError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffrigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DiffrigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
