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
