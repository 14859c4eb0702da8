"""Edit photos with a DiffusionRig model: pose, light, expression or global latent from a target
photo, or a rig set by hand.

    python scripts/inference.py --source SOURCE_IMG_OR_DIR --target TARGET_IMG --modes pose light exp \
        --model_path MODEL_DIR_OR_OFFICIAL_PT --deca_dir data --meanshape personal.lmdb/mean_shape.safetensors \
        --timestep_respacing ddim20 --output_dir out/
    python scripts/inference.py --source me.png --yaw 30 --light left --jaw 15 --model_path MODEL --output_dir out/

Writes ``OUT/<source>_<mode>.png`` (``rig`` for the hand-set edit) and ``OUT/grid.png``
(source | target | buffers | results). The official flags are kept (``--modes pose,exp,light``,
``--use_ddim``, the architecture options of an official checkpoint); dash spellings work too.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from diffrig.cliargs import check_device, str2bool
from diffrig.errors import DiffrigError


def _flags(name: str) -> list[str]:
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def build_parser() -> argparse.ArgumentParser:
    from diffrig.diffusion import SCHEDULER_ALIASES
    from diffrig.models import DiffusionRigModel
    from diffrig.pipeline import ALIGN_CHOICES, DEFAULT_INVERT
    from diffrig.rigs import LIGHT_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = lambda name, **kw: parser.add_argument(*_flags(name), dest=name, **kw)  # noqa: E731
    add("source", required=True, help="a photo or a folder of photos to edit")
    add("target", help="the photo whose pose / light / expression / latent to take")
    add("modes", nargs="*", default=None,
        help="pose, light, expression (exp), latent; space- or comma-separated "
             "(default with a target: pose,exp,light)")
    add("model_path", required=True, help="a diffrig model folder, or an official model*.pt")
    add("output_dir", required=True, help="folder for the edited PNGs and the grid")
    add("deca_dir", help="DECA data folder, or 'builtin' (default: DIFFRIG_DECA_DIR or ./data)")
    add("meanshape", help="the album's mean shape (create_data's mean_shape.safetensors, or the official "
                          "mean_shape.pkl)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(*_flags("timestep_respacing"), dest="timestep_respacing", default="ddim20",
                          help="official DDIM spacing (default ddim20: 20 steps)")
    sampling.add_argument("--scheduler", default="ddim",
                          help=f"ddim (official), or a diffusers scheduler: {', '.join(SCHEDULER_ALIASES)} "
                               "or a class name")
    sampling.add_argument(*_flags("num_inference_steps"), dest="num_inference_steps", type=int, default=None,
                          help="steps of a diffusers scheduler (default: those of --timestep_respacing)")
    sampling.add_argument("--invert", action=argparse.BooleanOptionalAction, default=DEFAULT_INVERT,
                          help="start from the source's DDIM inversion (keeps hair, background, clothes) "
                               f"instead of the seeded noise (default: {DEFAULT_INVERT})")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the shared starting noise")
    sampling.add_argument(*_flags("batch_size"), dest="batch_size", type=int, default=8)
    sampling.add_argument(*_flags("use_ddim"), dest="use_ddim", type=str2bool, default=True,
                          help="official flag: false samples with the ancestral DDPM sampler")
    sampling.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    sampling.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                          help="bf16 samples on a bfloat16 copy of the model: with --compile ~7x faster "
                               "than the official sampler for one photo (H200)")
    sampling.add_argument(*_flags("cuda_graphs"), dest="cuda_graphs", action=argparse.BooleanOptionalAction,
                          default=True, help="replay each batch's DDIM loop as one CUDA graph (CUDA only)")
    sampling.add_argument("--compile", action="store_true",
                          help="torch.compile the model: about a minute for the first batch of each size, "
                               "then the fastest sampling (use with --precision bf16)")
    sampling.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    photos = parser.add_argument_group("photos")
    photos.add_argument("--align", choices=ALIGN_CHOICES, default="auto",
                        help="auto: align photos that are not square (default); always; never")
    photos.add_argument("--codes", choices=["deca", "ground_truth"], default="deca",
                        help="ground_truth: synthetic portraits' codes sidecars instead of DECA's encoder")

    rig = parser.add_argument_group("hand-set rig (no target needed; angles in degrees)")
    rig.add_argument("--yaw", type=float, help="head turn, positive towards the picture's right")
    rig.add_argument("--pitch", type=float, help="head tilt, positive downwards")
    rig.add_argument("--roll", type=float, help="head roll, positive towards the picture's left")
    rig.add_argument("--light", dest="hand_light", nargs="+",
                     help=f"a preset ({', '.join(LIGHT_PRESETS)}) or 9 / 27 SH coefficients, separated by "
                          "spaces or commas")
    rig.add_argument("--exp", "--expression", dest="hand_exp", nargs="+",
                     help="FLAME expression coefficients (up to 50), separated by spaces or commas "
                          "(--exp -1 0.5, or --exp=-1,0.5)")
    rig.add_argument("--jaw", type=float, help="jaw opening")

    official = parser.add_argument_group("architecture of an official checkpoint (official names)")
    parameters = inspect.signature(DiffusionRigModel.__init__).parameters
    for name, p in parameters.items():
        if name == "self":
            continue
        kind = str2bool if isinstance(p.default, bool) else type(p.default)
        official.add_argument(*_flags(name), dest=f"arch.{name}", type=kind, default=None,
                              metavar="BOOL" if kind is str2bool else kind.__name__.upper())
    official.add_argument(*_flags("diffusion_steps"), dest="diffusion_steps", type=int, default=1000)
    for name, kind in (("clip_denoised", str2bool), ("num_samples", int), ("noise_schedule", str)):
        official.add_argument(*_flags(name), dest=name, type=kind, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DiffrigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    import torch

    from diffrig.diffusion import make_schedule
    from diffrig.pipeline import RigEditPipeline, edit_files, list_photos, parse_modes
    from diffrig.rigs import HandRig

    architecture = {key[5:]: value for key, value in vars(args).items()
                    if key.startswith("arch.") and value is not None}
    light = " ".join(args.hand_light) if args.hand_light is not None else None
    expression = " ".join(args.hand_exp) if args.hand_exp is not None else None
    rig = HandRig(yaw=args.yaw, pitch=args.pitch, roll=args.roll, light=light, expression=expression, jaw=args.jaw)
    modes = parse_modes(args.modes if args.modes is not None else ("pose,exp,light" if args.target else ""))
    if not modes and rig.is_empty:
        raise DiffrigError("nothing to edit: give --target with --modes, or a hand-set rig (--yaw, --light, ...)")
    if modes and not args.target:
        raise DiffrigError(f"--modes {' '.join(modes)} take their values from a target photo: give --target")
    if args.batch_size < 1:
        raise DiffrigError(f"--batch_size must be at least 1, got {args.batch_size}")
    scheduler = args.scheduler if args.use_ddim else "ddpm"
    if scheduler.lower() != "ddim":
        from diffrig.diffusion import make_scheduler

        make_scheduler(scheduler)  # an unknown name fails here, before the model loads
        if args.invert:
            chosen = "--use_ddim false" if not args.use_ddim else f"--scheduler {args.scheduler}"
            raise DiffrigError(f"{chosen} cannot start from the source's DDIM inversion (the default): "
                               "add --no-invert, or keep the DDIM sampler")
    if args.noise_schedule not in (None, "linear"):
        raise DiffrigError(f"only the official linear noise schedule is supported, got {args.noise_schedule!r}")
    sources = list_photos(args.source)

    device = check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = RigEditPipeline.from_pretrained(args.model_path, deca_dir=args.deca_dir, meanshape=args.meanshape,
                                               device=device, **architecture)
    pipeline.schedule = make_schedule(args.diffusion_steps)
    if device.startswith("cuda"):
        bf16 = args.precision == "bf16"  # channels-last pays off in bf16 (the layouts edit_speed.py measures)
        pipeline.enable_fast_sampling(dtype=torch.bfloat16 if bf16 else None, channels_last=bf16,
                                      compile=args.compile, cuda_graphs=args.cuda_graphs)

    respacing, steps = args.timestep_respacing, args.num_inference_steps
    if scheduler.lower() != "ddim":
        from diffrig.diffusion import respaced_timesteps

        steps = steps or len(respaced_timesteps(respacing, args.diffusion_steps))
        respacing = None
    summary = edit_files(pipeline, sources, args.output_dir, target=args.target, modes=modes, rig=rig,
                         align=args.align, codes=args.codes, batch_size=args.batch_size, invert=args.invert,
                         num_inference_steps=steps or 20, scheduler=scheduler, timestep_respacing=respacing,
                         seed=args.seed, progress=not args.quiet)
    for path, reason in summary.failures:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{summary} in {args.output_dir}")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
