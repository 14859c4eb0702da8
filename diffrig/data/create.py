"""Make a DiffusionRig training set: aligned photos -> DECA crop -> codes -> buffers -> LMDB.

For every image of a folder (sorted by name; hidden files and landmark/codes sidecars skipped):

1. load it (any mode, EXIF-upright RGB) and resize it to ``image_size``²; it must be square (an
   aligned face: ``scripts/align.py`` makes them);
2. find its crop transform: DECA's rule (:mod:`diffrig.data.crop`) on 68 landmarks from a
   DECA-style sidecar (``x.mat`` with ``pt3d_68``, else ``x.txt`` with one ``x y [z]`` row per point,
   in the pixels of the file ``x.png``) or else from dlib on the full-resolution picture, scaled to
   the resized frame; with ``codes="ground_truth"`` (synthetic portraits) the transform and the
   codes come from the sidecar ``x.codes.safetensors`` instead (:mod:`diffrig.data.synthetic`);
3. on the device, in batches: crop to 224², encode with DECA, replace the shape with the album's
   mean shape when asked, render the buffers into the ``image_size``² image frame and quantise
   them for storage (only 8/16-bit planes come back to the host);
4. store image, buffers, codes and crop transform (:mod:`diffrig.data.records`), a batch per LMDB
   transaction; records are compressed in threads and written by another while the device works
   on the next batches. A photo that already is an 8-bit RGB PNG of ``image_size``² is stored as
   its own file's bytes (ancillary chunks dropped), not compressed again.

With ``use_meanshape`` a first pass encodes every usable image and saves the mean shape code as
``OUT/mean_shape.safetensors`` (tensor ``shape``, (1, 100)); every sample's codes and buffers use it.

Re-running with the same arguments continues an interrupted run (samples already written are
skipped; the mean shape file is reused); other settings or DECA files are refused. The dataset is
marked complete only when every image has been written or rejected. Images that cannot be used
(unreadable, not square, no face, face too small, bad sidecar) are skipped and listed with their
reason in ``OUT/rejected.txt`` (``name<TAB>reason``, as ``scripts/align.py`` writes it).

Differences from DiffusionRig's ``create_data.py``: images with no face are rejected rather than
encoded whole; dlib replaces the FAN landmark detector and runs on the full-resolution picture;
sidecar landmarks are read in the pixels of the file they describe (the same thing when the file
is already ``image_size``²); pictures are resized with a Lanczos filter (DECA's loader smooths and
resamples bilinearly) and stored with their exact 8-bit pixels; the codes and the crop transform
are stored too, so the buffers can be rendered again (:func:`render_buffers`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from diffrig.atomic import write_atomically
from diffrig.cliargs import check_device, str2bool
from diffrig.data.align import MIN_FACE, read_rejected, write_rejected
from diffrig.data.crop import CROP_SIZE, crop_images, crop_transform, resize_matrix, resize_transform
from diffrig.data.images import ImageRejected, load_rgb
from diffrig.data.lmdb_store import DatasetMeta, RecordWriter
from diffrig.data.png import plain_png
from diffrig.data.records import QuantisedBuffers, encode_record, quantise_buffers
from diffrig.deca.codes import CODE_SIZES, RigCodes
from diffrig.deca.files import DECA_FILES
from diffrig.errors import DataError, DiffrigError

logger = logging.getLogger(__name__)

CODES_SOURCES = ("deca", "ground_truth")
MEAN_SHAPE_FILE = "mean_shape.safetensors"
LANDMARK_SIDECARS = (".mat", ".txt")  # DECA's order of preference
FINGERPRINT_CHUNK = 1 << 20
BATCHES_IN_FLIGHT = 3  # rendered batches waiting for compression or LMDB (memory: ~70 MB each at 256², B=64)


# ----------------------------------------------------------------------------- inputs and sidecars

def list_images(data_dir: Path) -> list[Path]:
    """Candidate images of ``data_dir`` (not its subfolders), sorted; hidden files and sidecars
    (``.txt``, ``.mat``, ``.safetensors``) are left out."""
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist: give the folder of aligned photos with --data_dir")
    files = [path for path in data_dir.iterdir()
             if path.is_file() and not path.name.startswith(".")
             and path.suffix.lower() not in (*LANDMARK_SIDECARS, ".safetensors")]
    return sorted(files)


def sidecar_landmarks(image_path: Path) -> np.ndarray | None:
    """Landmarks (N, 2) from ``x.mat`` (``pt3d_68``, 3×68) or ``x.txt`` (N rows ``x y [z]``) beside
    ``x.png``, in that file's pixels; None when there is no sidecar."""
    for suffix in LANDMARK_SIDECARS:
        sidecar = image_path.with_suffix(suffix)
        if not sidecar.is_file():
            continue
        try:
            if suffix == ".mat":
                from scipy.io import loadmat

                points = np.asarray(loadmat(sidecar)["pt3d_68"], dtype=np.float64).T
            else:
                points = np.loadtxt(sidecar, dtype=np.float64, ndmin=2)
        except ImportError:
            raise ImageRejected(image_path, f"{sidecar.name} needs scipy to be read: pip install scipy") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ImageRejected(image_path, f"landmark file {sidecar.name} unreadable ({error})") from None
        if points.ndim != 2 or points.shape[0] < 2 or points.shape[1] < 2 or not np.isfinite(points[:, :2]).all():
            raise ImageRejected(image_path, f"landmark file {sidecar.name} must hold rows of finite 'x y' "
                                            f"values, got an array of shape {points.shape}")
        return points[:, :2]
    return None


def ground_truth(image_path: Path, image: Image.Image, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat codes (236,) and crop transform (3, 3) in the ``image_size``² frame of a synthetic
    portrait, from its ``x.codes.safetensors`` sidecar (:mod:`diffrig.data.synthetic`)."""
    from diffrig.data.synthetic import read_sidecar, sidecar_path

    sidecar = sidecar_path(image_path)
    if not sidecar.is_file():
        raise ImageRejected(image_path, f"no ground-truth codes ({sidecar.name} is missing)")
    try:
        truth = read_sidecar(sidecar)
    except DataError as error:
        raise ImageRejected(image_path, str(error).replace(str(sidecar), sidecar.name)) from None
    if image.size != (truth.size, truth.size):
        raise ImageRejected(image_path, f"the picture is {image.width}x{image.height} px but {sidecar.name} "
                                        f"describes a {truth.size}x{truth.size} one")
    tform = truth.tform.double()
    if truth.size != image_size:
        tform = resize_transform(tform[None], image.size, (image_size, image_size))[0]
    return truth.codes.flat()[0], tform


def asset_fingerprint(folder: Path) -> str:
    """A hash of the DECA files in ``folder``: names, sizes and contents (the first and last MiB
    of large files), so a resumed dataset is never continued with other assets."""
    digest = hashlib.sha256()
    for name in sorted(DECA_FILES):
        path = folder / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if size <= 2 * FINGERPRINT_CHUNK:
                digest.update(handle.read())
            else:
                digest.update(handle.read(FINGERPRINT_CHUNK))
                handle.seek(-FINGERPRINT_CHUNK, os.SEEK_END)
                digest.update(handle.read())
    return "sha256:" + digest.hexdigest()


# ----------------------------------------------------------------------------- CPU stage

class CropInputs(Dataset):
    """Loads, resizes and finds the crop transform of each image (DataLoader workers' work).

    Items: ``{"name", "image" uint8 (3, S, S), "tform" float32 (3, 3), "codes" float32 (236,) or
    None, "png" bytes or None}`` or, for an unusable file, ``{"name", "reason"}``. ``png`` is the
    file's own PNG (ancillary chunks dropped) when it holds exactly ``image``: the record stores
    it instead of compressing the pixels again. ``tforms`` (name -> (3, 3)) skips
    the landmark step for images whose transform is already known."""

    def __init__(self, files: list[Path], names: list[str], image_size: int, codes: str = "deca",
                 min_face: float = MIN_FACE, tforms: dict[str, torch.Tensor] | None = None):
        self.files, self.names = files, names
        self.image_size, self.codes, self.min_face = image_size, codes, min_face
        self.tforms = tforms or {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, name = self.files[index], self.names[index]
        try:
            return {"name": name, **self._load(path, name)}
        except ImageRejected as rejection:
            return {"name": name, "reason": rejection.reason}

    def _load(self, path: Path, name: str) -> dict:
        size = self.image_size
        image = load_rgb(path)
        if image.width != image.height:
            raise ImageRejected(path, f"not square ({image.width}x{image.height} px): align the photos "
                                      "first with scripts/align.py")
        pixels = square_pixels(image, size)
        same_pixels = image.size == (size, size) and path.suffix.lower() == ".png"
        png = plain_png(path.read_bytes(), size) if same_pixels else None  # a second read, of PNGs only
        codes = None
        if self.codes == "ground_truth":
            codes, tform = ground_truth(path, image, size)
        if name in self.tforms:
            tform = self.tforms[name]
        elif codes is None:
            tform = resized_crop_transform(self._landmarks(path, image), image.size, size, path)
        return {"image": pixels, "tform": tform.float(), "codes": codes, "png": png}

    def _landmarks(self, path: Path, image: Image.Image) -> np.ndarray:
        """(N, 2) landmarks in the pixels of the loaded picture: sidecar, else dlib's largest face."""
        points = sidecar_landmarks(path)
        if points is not None:
            return points
        from diffrig.data.landmarks import usable_faces

        return usable_faces(image, self.min_face, path)[0].landmarks


def square_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """A square RGB picture as uint8 (3, size, size), resized with a Lanczos filter when needed."""
    resized = image if image.size == (size, size) else image.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resized_crop_transform(landmarks: np.ndarray, source_size: tuple[int, int], size: int,
                           source: str | Path) -> torch.Tensor:
    """DECA's crop transform (3, 3) of a picture resized from ``source_size`` (W, H) to ``size``², from
    its landmarks (N, 2) in the source's pixels. Raises ``ImageRejected`` naming ``source`` when the
    landmarks span no area."""
    to_resized = resize_matrix(source_size, (size, size)).numpy()
    landmarks = landmarks @ to_resized[:2, :2].T + to_resized[:2, 2]
    tform = crop_transform(torch.from_numpy(landmarks)[None])[0]
    if not torch.isfinite(tform).all():
        raise ImageRejected(source, "the landmarks span no area: cannot crop the face")
    return tform


@dataclass
class Batch:
    """Collated usable items (images uint8 (B, 3, S, S), tforms float32 (B, 3, 3), codes float32
    (B, 236) or None, the files' own PNGs or None) and the rejected ones as (name, reason)."""

    names: list[str]
    images: torch.Tensor | None
    tforms: torch.Tensor | None
    codes: torch.Tensor | None
    rejected: list[tuple[str, str]]
    pngs: list[bytes | None] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """Called by a DataLoader with ``pin_memory=True``."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(self.names, pin(self.images), pin(self.tforms), pin(self.codes), self.rejected, self.pngs)

    def stored_image(self, i: int) -> torch.Tensor | bytes:
        """What the record of item ``i`` stores as its photo: the file's PNG, else the pixels."""
        return self.pngs[i] if self.pngs[i] is not None else self.images[i]


def collate(items: list[dict]) -> Batch:
    good = [item for item in items if "reason" not in item]
    rejected = [(item["name"], item["reason"]) for item in items if "reason" in item]
    if not good:
        return Batch([], None, None, None, rejected)
    codes = torch.stack([item["codes"] for item in good]) if good[0]["codes"] is not None else None
    return Batch(names=[item["name"] for item in good], images=torch.stack([item["image"] for item in good]),
                 tforms=torch.stack([item["tform"] for item in good]), codes=codes, rejected=rejected,
                 pngs=[item["png"] for item in good])


# ----------------------------------------------------------------------------- device stage

@torch.inference_mode()
def batch_codes(deca, batch: Batch) -> torch.Tensor:
    """Codes (B, 236) of a batch on ``deca``'s device: the sidecar codes, or DECA's encoding of the crops."""
    if batch.codes is not None:
        return batch.codes.to(deca.device)
    images = batch.images.to(deca.device, non_blocking=True).float() / 255.0
    crops = crop_images(images, batch.tforms.to(deca.device))
    return deca.encode(crops).flat()


@torch.inference_mode()
def render_buffers(deca, codes: torch.Tensor, tforms: torch.Tensor, image_size: int) -> torch.Tensor:
    """Buffers (B, 9, S, S) of flat codes (B, 236) rendered into the image frame through crop
    transforms (B, 3, 3): how every stored sample's buffers are made (and can be re-made)."""
    out = deca.decode(RigCodes.from_flat(codes.to(deca.device)), size=image_size, tform=tforms.to(deca.device))
    return out.buffers


def _with_mean_shape(codes: torch.Tensor, mean_shape: torch.Tensor | None) -> torch.Tensor:
    if mean_shape is None:
        return codes
    codes = codes.clone()
    codes[:, : CODE_SIZES["shape"]] = mean_shape.to(codes)
    return codes


@dataclass
class RenderedBatch:
    """The device stage's output on the host: codes float32 (B, 236) and the quantised buffers."""

    codes: torch.Tensor
    buffers: QuantisedBuffers


def render_batch(deca, batch: Batch, mean_shape: torch.Tensor | None, image_size: int) -> RenderedBatch:
    """Crop, encode (or take the sidecar codes), apply the mean shape, render and quantise a batch,
    all on ``deca``'s device; only the codes and the 8/16-bit buffer planes come back."""
    codes = _with_mean_shape(batch_codes(deca, batch), mean_shape)
    buffers = quantise_buffers(render_buffers(deca, codes, batch.tforms, image_size))
    return RenderedBatch(codes.float().cpu(), buffers)


def encode_item(batch: Batch, rendered: RenderedBatch, i: int) -> bytes:
    """Record bytes of item ``i`` (thread-safe; the PNG compression runs outside the GIL)."""
    return encode_record(batch.names[i], batch.stored_image(i), rendered.buffers[i], rendered.codes[i],
                         batch.tforms[i])


# ----------------------------------------------------------------------------- the whole run

@dataclass
class CreateSummary:
    """What :func:`create_dataset` did. ``rejected`` holds (file name, reason)."""

    output: Path
    written: int = 0
    existing: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rejected_file: Path | None = None
    mean_shape_file: Path | None = None
    already_complete: bool = False

    @property
    def count(self) -> int:
        return self.written + self.existing

    def __str__(self) -> str:
        if self.already_complete:
            return f"{self.output} is already complete ({self.existing} samples); nothing to do"
        text = f"wrote {self.written} samples"
        if self.existing:
            text += f" (+{self.existing} from an earlier run)"
        text += f" to {self.output}, rejected {len(self.rejected)}"
        text += f" (see {self.rejected_file})" if self.rejected_file else ""
        return text + (f"; mean shape in {self.mean_shape_file}" if self.mean_shape_file else "")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_dataset(data_dir: str | Path, output_dir: str | Path, image_size: int = 256, use_meanshape: bool = False,
                   deca_dir: str | Path | None = None, codes: str = "deca", batch_size: int = 64,
                   device: str | torch.device | None = None, num_workers: int | None = None,
                   encode_workers: int | None = None, progress: bool = True) -> CreateSummary:
    """Fill (or continue) the LMDB dataset ``output_dir`` from the images of ``data_dir``.

    deca_dir: a DECA data folder, ``"builtin"`` or None (``DIFFRIG_DECA_DIR`` or ``./data``).
    codes: ``"deca"`` (DECA's encoder on the crops) or ``"ground_truth"`` (the synthetic world's
        ``x.codes.safetensors`` sidecars: codes and crop transform, no landmarks, no encoder).
    num_workers: DataLoader processes for loading and landmarks (default: up to 8 on CUDA, 0 on CPU).
    encode_workers: threads compressing records to PNG while the device renders (numpy and zlib
        release the GIL), plus one thread writing them to LMDB; 0 does both inline. Default: the
        CPU count (at most 8) on CUDA, 0 on CPU.

    Raises DataError when there is nothing to read, when ``output_dir`` holds a dataset made with
    other settings or files, or when no image could be used; AssetError for missing DECA files.
    """
    from diffrig.deca.assets import resolve_deca_dir
    from diffrig.deca.rig import DECA

    data_dir, output = Path(data_dir), Path(output_dir)
    if codes not in CODES_SOURCES:
        raise DataError(f"unknown codes source {codes!r}; choose one of {', '.join(CODES_SOURCES)}")
    if image_size < 1 or batch_size < 1:
        raise DataError(f"image_size and batch_size must be positive, got {image_size} and {batch_size}")
    if output.resolve() == data_dir.resolve():
        raise DataError(f"the output dataset must not be the data folder {data_dir}; give another --output_dir")
    files = list_images(data_dir)
    if not files:
        raise DataError(f"no images in {data_dir}: put the aligned photos there")
    names = [path.name for path in files]

    device = torch.device(device) if device is not None else default_device()
    folder = resolve_deca_dir(deca_dir)
    meta = DatasetMeta(
        image_size=image_size,
        asset_fingerprint=asset_fingerprint(folder),
        codes_layout=dict(CODE_SIZES),
        settings={"use_meanshape": bool(use_meanshape), "codes": codes,
                  "deca_dir": "builtin" if str(deca_dir) == "builtin" else "folder",
                  "crop": {"rule": "deca-kpt68", "scale": 1.25, "size": CROP_SIZE}},
    )
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader_options = dict(batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                          pin_memory=device.type == "cuda")

    summary = CreateSummary(output=output)
    with RecordWriter(output, meta) as writer:
        summary.existing = writer.count
        if writer.meta.complete:
            _check_nothing_new(writer, output, data_dir, names)
            summary.already_complete = True
            return summary
        deca = DECA.from_dir(folder, device=device)
        pending = [(path, name) for path, name in zip(files, names) if not writer.has(name)]
        inputs = CropInputs([p for p, _ in pending], [n for _, n in pending], image_size, codes)
        mean_shape = None
        if use_meanshape:
            mean_shape, inputs, rejected = _mean_shape(deca, inputs, output, writer.count, loader_options, progress)
            summary.rejected += rejected
            summary.mean_shape_file = output / MEAN_SHAPE_FILE
        _write_records(deca, writer, DataLoader(inputs, **loader_options), len(inputs), mean_shape, image_size,
                       _encode_workers(encode_workers, deca.device), summary, progress)
        summary.rejected_file = write_rejected(output, summary.rejected)
        if writer.count == 0:
            raise DataError(f"no usable image in {data_dir}" +
                            (f" (see {summary.rejected_file})" if summary.rejected_file else ""))
        writer.finish()
    return summary


def _check_nothing_new(writer: RecordWriter, output: Path, data_dir: Path, names: list[str]) -> None:
    """A finished dataset is never extended: refuse photos it neither holds nor rejected."""
    rejected = read_rejected(output)
    new = [name for name in names if name not in rejected and not writer.has(name)]
    if new:
        raise DataError(f"{output} is a finished dataset of {writer.count} samples and does not hold {len(new)} "
                        f"photo(s) of {data_dir} ({', '.join(new[:3])}{', ...' if len(new) > 3 else ''}); "
                        "write them to another --output_dir, or delete it to start over")


def _encode_workers(requested: int | None, device: torch.device) -> int:
    if requested is not None:
        return requested
    # A 256² record costs ~7 ms of one core, nearly all of it zlib outside the GIL: 8 threads keep
    # up with well over 300 records/s and leave cores to the loader processes and the device thread.
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


class _InlineExecutor(Executor):
    """Runs each call at submit: the encoding and writing "pools" for ``encode_workers=0``."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _write_records(deca, writer: RecordWriter, loader: DataLoader, total: int, mean_shape: torch.Tensor | None,
                   image_size: int, workers: int, summary: CreateSummary, progress: bool) -> None:
    """Render and append every batch of ``loader``, counting into ``summary``. With ``workers``
    threads this is a pipeline: while the device renders a batch, the threads compress the
    records of the batches before it and one more thread writes finished batches to LMDB, in
    order, a transaction each (nothing is written after a batch that failed)."""
    bar = tqdm(total=total, desc="creating", unit="img", disable=not progress)
    # A process pool (forkserver) stalled on a GPU host: threads, with the PNG work outside the GIL.
    encoders = ThreadPoolExecutor(workers) if workers > 0 else _InlineExecutor()
    committer = ThreadPoolExecutor(1) if workers > 0 else _InlineExecutor()
    commits: deque[Future] = deque()
    failed = threading.Event()

    def commit(names: list[str], records: list[Future]) -> None:
        if failed.is_set():
            return
        try:
            writer.append_encoded([(name, record.result()) for name, record in zip(names, records)])
        except BaseException:
            failed.set()
            raise
        summary.written += len(names)

    try:
        for batch in loader:
            summary.rejected += batch.rejected
            for name, reason in batch.rejected:
                logger.info("%s: skipped, %s", name, reason)
            if batch.names:
                rendered = render_batch(deca, batch, mean_shape, image_size)
                records = [encoders.submit(encode_item, batch, rendered, i) for i in range(len(batch.names))]
                commits.append(committer.submit(commit, batch.names, records))
                while commits and (len(commits) > BATCHES_IN_FLIGHT or commits[0].done()):
                    commits.popleft().result()  # raises a failed batch's error
            bar.update(len(batch.names) + len(batch.rejected))
            bar.set_postfix(written=summary.existing + summary.written, rejected=len(summary.rejected))
        while commits:
            commits.popleft().result()
    except BaseException:
        failed.set()
        raise
    finally:
        committer.shutdown(wait=True, cancel_futures=True)
        encoders.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _mean_shape(deca, inputs: CropInputs, output: Path, written: int, loader_options: dict, progress: bool
                ) -> tuple[torch.Tensor, CropInputs, list[tuple[str, str]]]:
    """The album's mean shape code (1, 100): read from ``OUT/mean_shape.safetensors`` when an earlier
    run saved it, else computed over every usable image and saved. Returns it, the inputs still to
    write (with their crop transforms, so landmarks are not found twice) and the rejected files."""
    path = output / MEAN_SHAPE_FILE
    if path.is_file():
        return read_mean_shape(path), inputs, []
    if written:
        raise DataError(f"{output} holds {written} samples made with a mean shape, but {path.name} is gone; "
                        "delete the dataset folder to start over")
    total, count, tforms, rejected = torch.zeros(CODE_SIZES["shape"], dtype=torch.float64), 0, {}, []
    bar = tqdm(total=len(inputs), desc="mean shape", unit="img", disable=not progress)
    for batch in DataLoader(inputs, **loader_options):
        bar.update(len(batch.names) + len(batch.rejected))
        rejected += batch.rejected
        for name, reason in batch.rejected:
            logger.info("%s: skipped, %s", name, reason)
        if batch.names:
            shapes = batch_codes(deca, batch)[:, : CODE_SIZES["shape"]]
            total += shapes.double().sum(0).cpu()
            count += len(batch.names)
            tforms.update(zip(batch.names, batch.tforms))
    bar.close()
    if count == 0:
        return torch.zeros(1, CODE_SIZES["shape"]), CropInputs([], [], inputs.image_size), rejected
    mean = (total / count).float()[None]
    write_atomically(path, lambda stream: stream.write(save({"shape": mean.contiguous()})))
    keep = [i for i, name in enumerate(inputs.names) if name in tforms]
    remaining = CropInputs([inputs.files[i] for i in keep], [inputs.names[i] for i in keep], inputs.image_size,
                           inputs.codes, inputs.min_face, tforms)
    return mean, remaining, rejected


def read_mean_shape(path: str | Path) -> torch.Tensor:
    """The mean shape code (1, 100) saved by a mean-shape run."""
    try:
        shape = load_file(path).get("shape")
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path} is unreadable ({error}); delete the dataset folder to start over") from None
    if shape is None or shape.numel() != CODE_SIZES["shape"]:
        raise DataError(f"{path} must hold a tensor 'shape' of {CODE_SIZES['shape']} values; delete the "
                        "dataset folder to start over")
    return shape.reshape(1, -1).float()


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="create_data.py",
        description="Crop, DECA-encode and render the buffers of a folder of aligned faces into an LMDB dataset.")
    parser.add_argument("--data_dir", "--data-dir", required=True, help="folder of aligned square face photos")
    parser.add_argument("--output_dir", "--output-dir", required=True,
                        help="LMDB dataset folder to create or continue (e.g. ffhq256.lmdb)")
    parser.add_argument("--image_size", "--image-size", type=int, default=256,
                        help="side of the stored images and buffers (default: 256)")
    parser.add_argument("--use_meanshape", "--use-meanshape", type=str2bool, nargs="?", const=True, default=False,
                        help="give every image the album's mean shape code (True for a personal album)")
    parser.add_argument("--deca_dir", "--deca-dir", default=None,
                        help="DECA data folder, or 'builtin' for the procedural stand-in "
                             "(default: $DIFFRIG_DECA_DIR or ./data)")
    parser.add_argument("--codes", choices=CODES_SOURCES, default="deca",
                        help="deca: DECA's encoder on each crop (default); ground_truth: the true codes "
                             "and crop of synthetic portraits, from x.codes.safetensors beside x.png")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=None,
                        help="loader processes (default: up to 8 on CUDA, none on CPU)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no per-file messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            summary = create_dataset(args.data_dir, args.output_dir, image_size=args.image_size,
                                     use_meanshape=args.use_meanshape, deca_dir=args.deca_dir, codes=args.codes,
                                     batch_size=args.batch_size, device=check_device(args.device),
                                     num_workers=args.num_workers, progress=not args.quiet)
    except DiffrigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
