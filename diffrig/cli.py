"""The ``diffrig`` console command: ``diffrig [info]``, ``diffrig demo [...]``, ``diffrig --version``."""

import argparse
import sys

from diffrig import __version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        from diffrig.demo import main as demo

        return demo(argv[1:])
    parser = argparse.ArgumentParser(prog="diffrig", description="DiffusionRig on current PyTorch.")
    parser.add_argument("--version", action="version", version=f"diffrig {__version__}")
    parser.add_argument("command", nargs="?", choices=["info", "demo"], default="info",
                        help="info: version and what is available (default); "
                             "demo: the whole pipeline on the synthetic world (see diffrig demo --help)")
    parser.parse_args(argv)
    from diffrig.info import report

    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
