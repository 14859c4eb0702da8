"""Command line of the training scripts: a YAML config, then any setting overridden by a flag.

Every :class:`TrainConfig` setting is a flag of the same name (``--lr 1e-5``, ``--resume latest``,
``--mixed_precision fp16``); model architecture options use the official names (``--image_size``,
``--num_channels``, ``--latent_dim``, ``--encoder_type`` ...). Flags left out keep the file's value.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys

from accelerate import PartialState

from diffrig.cliargs import str2bool
from diffrig.errors import DiffrigError
from diffrig.models import DiffusionRigModel
from diffrig.training.config import FIELDS, TrainConfig, load_config
from diffrig.training.trainer import train

# the official scripts/train.py spellings, accepted as well
OFFICIAL_ALIASES = {"checkpoint_every": ["--save_interval"], "log_every": ["--log_interval"], "output_dir": ["--log_dir"]}


def _model_defaults() -> dict:
    parameters = inspect.signature(DiffusionRigModel.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name not in ("self", "use_checkpoint")}


def build_parser(description: str, aliases: dict[str, list[str]] | None = None) -> argparse.ArgumentParser:
    aliases = {**OFFICIAL_ALIASES, **(aliases or {})}
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML settings file (flags below override its values)")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="no progress bar, warnings and errors only")
    defaults = TrainConfig()
    group = parser.add_argument_group("training settings (see configs/*.yaml)")
    for name in FIELDS:
        if name in ("model", "stage"):
            continue
        default = getattr(defaults, name)
        kind = str2bool if isinstance(default, bool) else type(default)
        group.add_argument(f"--{name}", *aliases.get(name, []), dest=name, type=kind,
                           help=FIELDS[name].metadata["help"],
                           metavar="BOOL" if kind is str2bool else kind.__name__.upper())
    group = parser.add_argument_group("model architecture (official names; ignored when loading a model dir)")
    for name, default in _model_defaults().items():
        kind = str2bool if isinstance(default, bool) else type(default)
        group.add_argument(f"--{name}", dest=f"model.{name}", type=kind,
                           metavar="BOOL" if kind is str2bool else kind.__name__.upper())
    return parser


def configure_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(argv: list[str] | None, *, stage: int, default_config: str, description: str,
        aliases: dict[str, list[str]] | None = None) -> int:
    """Parse, train, and turn a DiffrigError into one line on stderr and exit status 1."""
    args = vars(build_parser(description, aliases).parse_args(argv))
    config_path = args.pop("config", default_config)
    quiet = args.pop("quiet")
    model = {key.split(".", 1)[1]: args.pop(key) for key in list(args) if key.startswith("model.")}
    overrides = {**args, "stage": stage, **({"model": model} if model else {})}
    configure_logging(quiet)
    try:
        result = train(load_config(config_path, overrides), progress=not quiet)
    except DiffrigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted without saving", file=sys.stderr)
        return 130
    if not PartialState().is_main_process:
        return 0
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}; continue with --resume latest")
    else:
        print(f"finished at step {result.step}; model in {result.model_dir}")
    return 0
