"""Convert an official DiffusionRig checkpoint (model*.pt) into a diffrig model directory.

    python scripts/convert_official.py --checkpoint model005000.pt --output converted/ \
        [--image_size 256 --num_channels 128 ...]

Architecture flags take the official names and defaults (dash spellings work too); pass the
ones the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from diffrig.cliargs import str2bool
from diffrig.errors import DiffrigError
from diffrig.models import DiffusionRigModel, convert_official_checkpoint


def architecture_defaults() -> dict:
    """The model's configuration options with their (official) defaults."""
    parameters = inspect.signature(DiffusionRigModel.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name != "self"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official model*.pt (a torch.save'd state dict)")
    parser.add_argument("--output", required=True, help="directory to write config.json + safetensors into")
    group = parser.add_argument_group("architecture (official script_util names and defaults)")
    for name, default in architecture_defaults().items():
        kind = str2bool if isinstance(default, bool) else type(default)
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        metavar = "BOOL" if kind is str2bool else kind.__name__.upper()
        group.add_argument(*flags, dest=name, type=kind, default=default, metavar=metavar)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    checkpoint, output = args.pop("checkpoint"), args.pop("output")
    try:
        model = convert_official_checkpoint(checkpoint, output, **args)
    except DiffrigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {output} ({count:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
