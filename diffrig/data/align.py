"""FFHQ-style face alignment: photos in a folder -> square aligned crops (PNG), one face each.

The crop is FFHQ's: an oriented square built from the eye and mouth landmarks (its centre a tenth
of the way from the eyes to the mouth, its side the larger of 4x the eye distance and 3.6x the
eye-to-mouth distance), taken from a copy of the photo shrunk by an integer factor when the face
is much larger than the output, padded where the square leaves the photo (mirrored pixels
faded into a blur and then into the median colour), resampled bilinearly into a
``transform_size``² square and reduced to ``output_size``² with a Lanczos filter.

Command line (also ``scripts/align.py``)::

    python -m diffrig.data.align -i photos/ -o aligned/ -s 256

reads every file of the input folder (``--recursive`` descends into subfolders, mirroring them
under the output; hidden files are ignored) or a single file, writes ``OUT/<stem>.png`` per
image, keeps outputs of an earlier run that already have the right size (``--overwrite``
redoes them), and lists the files it could not use, with the reason, in ``OUT/rejected.txt``
(``name<TAB>reason`` per line). It fails (exit code 1) only when there is nothing to read or
nothing could be aligned.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import kornia
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from diffrig.atomic import write_atomically
from diffrig.data.images import MIN_IMAGE_SIDE, ImageRejected, load_rgb
from diffrig.data.landmarks import Face, usable_faces
from diffrig.errors import DataError, DiffrigError

logger = logging.getLogger(__name__)

OUTPUT_SIZE = 256
TRANSFORM_SIZE = 4096
MIN_FACE = 32
REJECTED_FILE = "rejected.txt"


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop square from 68 landmarks (68, 2) -> corners (4, 2) in source pixels, in the
    order top-left, bottom-left, bottom-right, top-right of the aligned picture."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (68, 2):
        raise DataError(f"FFHQ alignment needs 68 (x, y) landmarks, got an array of shape {points.shape}")
    eye_left, eye_right = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_mid = (points[48] + points[54]) / 2
    eye_to_mouth = mouth_mid - eye_mid

    # Horizontal half-axis: the eye line averaged with the eye-to-mouth line turned a quarter turn,
    # so that neither a tilted eye line nor a tilted mouth alone decides the roll.
    half_x = eye_to_eye - _quarter_turn(eye_to_mouth)
    if not np.isfinite(half_x).all() or np.hypot(*half_x) < 1e-6:
        raise DataError("the eye and mouth landmarks coincide: cannot orient the FFHQ crop")
    half_x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / np.hypot(*half_x)
    half_y = _quarter_turn(half_x)
    centre = eye_mid + eye_to_mouth * 0.1
    return np.stack([centre - half_x - half_y, centre - half_x + half_y,
                     centre + half_x + half_y, centre + half_x - half_y])


def _quarter_turn(vector: np.ndarray) -> np.ndarray:
    """Rotate (x, y) by +90 degrees in image coordinates (y down): right -> down."""
    return np.array([-vector[1], vector[0]])


def aligned_coordinates(points: np.ndarray, landmarks: np.ndarray, output_size: int = OUTPUT_SIZE) -> np.ndarray:
    """Where source points (N, 2) land in the aligned picture (pixel-centre coordinates), given the
    landmarks (68, 2) the alignment used. Shrinking, cropping and padding do not move them."""
    quad = ffhq_quad(landmarks)
    axis_x, axis_y = quad[3] - quad[0], quad[1] - quad[0]
    offset = np.asarray(points, dtype=np.float64) - quad[0]
    unit = np.stack([offset @ axis_x / (axis_x @ axis_x), offset @ axis_y / (axis_y @ axis_y)], axis=-1)
    return unit * output_size - 0.5


def align_face(image: Image.Image, landmarks: np.ndarray, output_size: int = OUTPUT_SIZE,
               transform_size: int = TRANSFORM_SIZE, padding: bool = True) -> Image.Image:
    """FFHQ-align one face of an RGB picture -> RGB ``output_size``² (see the module docstring)."""
    quad = ffhq_quad(landmarks)
    side = np.hypot(*(quad[3] - quad[0]))
    image = image if image.mode == "RGB" else image.convert("RGB")
    transform_size = max(transform_size, output_size)

    shrink = int(np.floor(side / output_size * 0.5))
    if shrink > 1:
        size = (int(np.rint(image.width / shrink)), int(np.rint(image.height / shrink)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        quad, side = quad / shrink, side / shrink

    border = max(int(np.rint(side * 0.1)), 3)
    low, high = np.floor(quad.min(axis=0)).astype(int), np.ceil(quad.max(axis=0)).astype(int)
    crop = (max(low[0] - border, 0), max(low[1] - border, 0),
            min(high[0] + border, image.width), min(high[1] + border, image.height))
    if crop[2] - crop[0] < image.width or crop[3] - crop[1] < image.height:
        image = image.crop(crop)
        quad = quad - crop[:2]

    low, high = np.floor(quad.min(axis=0)).astype(int), np.ceil(quad.max(axis=0)).astype(int)
    pad = np.array([max(border - low[0], 0), max(border - low[1], 0),
                    max(high[0] - image.width + border, 0), max(high[1] - image.height + border, 0)])
    if padding and pad.max() > border - 4:
        pad = np.maximum(pad, int(np.rint(side * 0.3)))
        image = _pad_softly(image, pad, blur_sigma=side * 0.02)
        quad = quad + pad[:2]

    aligned = image.transform((transform_size, transform_size), Image.Transform.QUAD,
                              (quad + 0.5).flatten().tolist(), Image.Resampling.BILINEAR)
    if output_size < transform_size:
        aligned = aligned.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return aligned


def _pad_softly(image: Image.Image, pad: np.ndarray, blur_sigma: float) -> Image.Image:
    """Mirror-pad an RGB picture by (left, top, right, bottom) pixels; the padding fades into a
    Gaussian blur of itself and then into the picture's median colour towards its outer edge."""
    left, top, right, bottom = (max(int(p), 1) for p in pad)
    pixels = np.pad(np.asarray(image, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    height, width = pixels.shape[:2]
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    # 1 on the outer edge, 0 where the photo starts, negative inside it.
    outside = np.maximum(1.0 - np.minimum(xs / left, (width - 1 - xs) / right),
                         1.0 - np.minimum(ys / top, (height - 1 - ys) / bottom))[..., None]
    blurred = _gaussian_blur(pixels, blur_sigma)
    pixels += (blurred - pixels) * np.clip(outside * 3.0 + 1.0, 0.0, 1.0)
    pixels += (np.median(pixels, axis=(0, 1)) - pixels) * np.clip(outside, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) float32 -> the same, blurred with a Gaussian truncated at 4 sigma."""
    radius = int(4.0 * sigma + 0.5)
    if radius < 1:
        return pixels.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        blurred = kornia.filters.gaussian_blur2d(tensor, (2 * radius + 1,) * 2, (sigma, sigma), border_type="reflect")
    return blurred[0].numpy().transpose(1, 2, 0)


@dataclass
class AlignedPhoto:
    """One aligned photo: the picture, the face used (source coordinates) and how many were found."""

    image: Image.Image
    face: Face
    faces_found: int


def align_photo(path: str | Path, output_size: int = OUTPUT_SIZE, transform_size: int = TRANSFORM_SIZE,
                min_face: float = MIN_FACE, min_side: int = MIN_IMAGE_SIDE) -> AlignedPhoto:
    """Load a photo file, find its largest face and FFHQ-align it.

    Raises ``ImageRejected`` (a ``DataError`` with a short ``reason``) when the file is not a usable
    image, has no face, or its largest face is under ``min_face`` pixels wide.
    """
    return align_image(load_rgb(path, min_side=min_side), output_size, transform_size, min_face, source=path)


def align_image(image: Image.Image, output_size: int = OUTPUT_SIZE, transform_size: int = TRANSFORM_SIZE,
                min_face: float = MIN_FACE, source: str | Path = "image") -> AlignedPhoto:
    """FFHQ-align the largest face of an upright RGB picture; ``source`` names it in rejections and logs."""
    faces = usable_faces(image, min_face, source)
    face = faces[0]
    if len(faces) > 1:
        logger.info("%s: %d faces found, using the largest (%.0f px wide, at x=%.0f y=%.0f)",
                    source, len(faces), face.width, face.box[0], face.box[1])
    return AlignedPhoto(align_face(image, face.landmarks, output_size, transform_size), face, len(faces))


@dataclass
class AlignSummary:
    """What ``align_folder`` did. ``rejected`` holds (input name relative to the input, reason)."""

    aligned: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rejected_file: Path | None = None

    def __str__(self) -> str:
        parts = [f"aligned {len(self.aligned)}"]
        if self.kept:
            parts.append(f"kept {len(self.kept)} existing")
        parts.append(f"rejected {len(self.rejected)}")
        text = ", ".join(parts)
        return text + (f" (see {self.rejected_file})" if self.rejected_file else "")


def list_inputs(source: Path, output: Path, recursive: bool = False) -> list[Path]:
    """Files to align under ``source`` (or ``source`` itself), sorted, skipping hidden names and
    anything inside ``output``."""
    if not source.exists():
        raise DataError(f"input {source} does not exist: give a photo or a folder of photos with -i")
    if source.is_file():
        return [source]
    output = output.resolve()
    candidates = source.rglob("*") if recursive else source.iterdir()
    files = []
    for path in candidates:
        parts = path.relative_to(source).parts
        if any(part.startswith(".") for part in parts) or not path.is_file():
            continue
        if output in path.resolve().parents:
            continue
        files.append(path)
    if not recursive:
        folders = [p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if folders:
            logger.info("%s: %d subfolder(s) not searched (use --recursive)", source, len(folders))
    return sorted(files)


def align_folder(source: str | Path, output: str | Path, output_size: int = OUTPUT_SIZE,
                 transform_size: int = TRANSFORM_SIZE, min_face: float = MIN_FACE,
                 recursive: bool = False, overwrite: bool = False, progress: bool = True) -> AlignSummary:
    """Align every photo of ``source`` (a folder, or one file) into ``output/<stem>.png``.

    Unusable files are skipped and listed, with their reason, in ``output/rejected.txt`` (removed
    when a run rejects nothing). Raises ``DataError`` when ``source`` is missing or holds no file,
    or when ``output`` is the input folder itself.
    """
    source, output = Path(source), Path(output)
    if source.is_dir() and source.resolve() == output.resolve():
        raise DataError(f"the output folder must differ from the input folder {source} (-o)")
    files = list_inputs(source, output, recursive)
    if not files:
        raise DataError(f"no files in {source}: put the photos to align there")
    output.mkdir(parents=True, exist_ok=True)
    root = source if source.is_dir() else source.parent
    summary = AlignSummary()
    claimed: dict[Path, str] = {}
    bar = tqdm(files, desc="aligning", unit="photo", disable=not progress)
    for path in bar:
        name = path.relative_to(root).as_posix()
        target = output / path.relative_to(root).with_suffix(".png")
        if target in claimed:
            summary.rejected.append((name, f"same output name {target.name} as {claimed[target]}; rename one"))
            continue
        claimed[target] = name
        if not overwrite and _has_size(target, output_size):
            summary.kept.append(target)
            continue
        try:
            result = align_photo(path, output_size, transform_size, min_face)
        except ImageRejected as rejection:
            summary.rejected.append((name, rejection.reason))
            logger.info("%s: skipped, %s", name, rejection.reason)
        else:
            _save_png(result.image, target)
            summary.aligned.append(target)
        bar.set_postfix(aligned=len(summary.aligned) + len(summary.kept), rejected=len(summary.rejected))
    summary.rejected_file = write_rejected(output, summary.rejected)
    return summary


def _has_size(path: Path, size: int) -> bool:
    try:
        with Image.open(path) as existing:
            return existing.size == (size, size)
    except (OSError, ValueError):
        return False


def _save_png(image: Image.Image, target: Path) -> None:
    """Write atomically, so an interrupted run never leaves a truncated PNG that looks done."""
    write_atomically(target, lambda stream: image.save(stream, format="PNG"))


def read_rejected(output: Path) -> set[str]:
    """The file names listed in ``output/rejected.txt`` (none when there is no such file)."""
    listing = output / REJECTED_FILE
    if not listing.is_file():
        return set()
    return {line.split("\t", 1)[0] for line in listing.read_text(encoding="utf-8").splitlines() if line}


def write_rejected(output: Path, rejected: list[tuple[str, str]]) -> Path | None:
    """``output/rejected.txt``: one ``name<TAB>reason`` line per file; removed when none was."""
    listing = output / REJECTED_FILE
    if not rejected:
        listing.unlink(missing_ok=True)
        return None
    lines = ["\t".join(" ".join(text.split()) for text in row) for row in rejected]
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return listing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align.py",
        description="FFHQ-align the largest face of every photo in a folder (dlib 68 landmarks).")
    parser.add_argument("-i", "--input", "--input_imgs_path", dest="input", default="imgs",
                        help="photo or folder of photos (default: imgs)")
    parser.add_argument("-o", "--output", "--output_imgs_path", dest="output", default="imgs_align",
                        help="folder for the aligned PNGs and rejected.txt (default: imgs_align)")
    parser.add_argument("-s", "--size", "--output_size", dest="size", type=int, default=OUTPUT_SIZE,
                        help=f"side of the aligned pictures in pixels (default: {OUTPUT_SIZE})")
    parser.add_argument("--transform_size", type=int, default=TRANSFORM_SIZE,
                        help=f"side of the intermediate resampled square (default: {TRANSFORM_SIZE}, FFHQ's; "
                             "4x the output size halves the time of a run and looks the same)")
    parser.add_argument("--min_face", type=float, default=MIN_FACE,
                        help=f"reject faces narrower than this many pixels (default: {MIN_FACE})")
    parser.add_argument("-r", "--recursive", action="store_true", help="also read subfolders, mirrored in the output")
    parser.add_argument("--overwrite", action="store_true", help="redo photos whose output already exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no per-file messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size < 1 or args.transform_size < 1:
        print("error: --size and --transform_size must be positive", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            summary = align_folder(args.input, args.output, args.size, args.transform_size, args.min_face,
                                   recursive=args.recursive, overwrite=args.overwrite, progress=not args.quiet)
    except DiffrigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    if not summary.aligned and not summary.kept:
        print(f"error: no face could be aligned in {args.input}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
