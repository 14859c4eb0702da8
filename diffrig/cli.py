"""The ``diffrig`` console command."""

import argparse
import sys

from diffrig import __version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffrig", description="DiffusionRig on current PyTorch.")
    parser.add_argument("--version", action="version", version=f"diffrig {__version__}")
    parser.add_argument("command", nargs="?", choices=["info"], default="info",
                        help="info: version and what is available (default)")
    parser.parse_args(argv)
    from diffrig.info import report

    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
