"""Command line of the synthetic world (also ``scripts/make_synthetic.py``)::

    python scripts/make_synthetic.py --identities 200 --per_identity 1 --size 64 --output_dir ffhq_like/
    python scripts/make_synthetic.py --identities 1 --first_identity 1000 --per_identity 20 --output_dir album/
    python scripts/make_synthetic.py --identities 5000 --size 64 --output_dir big/   # one process per core

writes ``OUT/<identity>_<image>.png`` with ground-truth sidecars (see :mod:`diffrig.data.synthetic`).
"""

from __future__ import annotations

import argparse
import sys

from diffrig.cliargs import check_device
from diffrig.errors import DiffrigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write synthetic portraits with their ground-truth codes: an FFHQ-like folder "
                    "(many identities) or a personal album (one identity).")
    parser.add_argument("--identities", type=int, required=True, help="how many identities")
    parser.add_argument("--per_identity", "--per-identity", dest="per_identity", type=int, default=1,
                        help="photos per identity (default 1)")
    parser.add_argument("--size", type=int, default=256, help="side of the photos, 64 to 256 (default 256)")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="the world: same seed, same people and photos")
    parser.add_argument("--first_identity", "--first-identity", dest="first_identity", type=int, default=0,
                        help="index of the first identity (write held-out people with a higher one)")
    parser.add_argument("--first_image", "--first-image", dest="first_image", type=int, default=0,
                        help="index of each identity's first photo (write further photos of a person)")
    parser.add_argument("--deca_dir", "--deca-dir", dest="deca_dir", default="builtin",
                        help="DECA data folder, or 'builtin' (default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64,
                        help="photos rendered at once (default 64)")
    parser.add_argument("--workers", type=int, default=None,
                        help="single-threaded processes rendering side by side on the CPU (default: one per core)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from diffrig.data.synthetic.world import SyntheticWorld
        from diffrig.errors import DataError

        if args.identities < 1 or args.per_identity < 1 or args.first_identity < 0 or args.first_image < 0:
            raise DataError("--identities and --per_identity must be at least 1, --first_identity and "
                            "--first_image at least 0")
        if args.batch_size < 1 or (args.workers is not None and args.workers < 1):
            raise DataError("--batch_size and --workers must be at least 1")
        world = SyntheticWorld(args.deca_dir, size=args.size, seed=args.seed,
                               device=check_device(args.device))
        identities = range(args.first_identity, args.first_identity + args.identities)
        written = world.write_folder(args.output_dir, identities, args.per_identity, first_image=args.first_image,
                                     batch_size=args.batch_size, progress=not args.quiet, workers=args.workers)
    except DiffrigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {len(written)} portraits to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
