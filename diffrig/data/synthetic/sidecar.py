"""Ground-truth sidecars of synthetic portraits: write, read, and use them in place of DECA's encoder.

The format is described in :mod:`diffrig.data.synthetic`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffrig.deca.codes import CODE_SIZES, NUM_SH, RigCodes
from diffrig.errors import DataError

SIDECAR_FORMAT = "diffrig.synthetic.codes/1"
SIDECAR_SUFFIX = ".codes.safetensors"
_INT_FIELDS = ("identity", "image", "nuisance_seed", "world_seed", "size")


def sidecar_path(image_path: str | PathLike) -> Path:
    """``DIR/name.png`` -> ``DIR/name.codes.safetensors``."""
    path = Path(image_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


@dataclass
class PortraitTruth:
    """What the world knows about one written portrait.

    codes: RigCodes of one face (B = 1); tform: (3, 3) PNG pixel -> 224² crop pixel;
    size: the PNG's side; identity, image: its indices; nuisance_seed: seeds its background and
    clothes; world_seed, deca_dir: the world that rendered it.
    """

    codes: RigCodes
    tform: torch.Tensor
    size: int
    identity: int
    image: int
    nuisance_seed: int
    world_seed: int
    deca_dir: str


def write_sidecar(path: str | PathLike, truth: PortraitTruth) -> None:
    """Write ``truth`` to ``path`` (a ``.codes.safetensors`` file)."""
    if truth.codes.batch_size != 1:
        raise ValueError(f"a sidecar holds the codes of one portrait, got a batch of {truth.codes.batch_size}")
    tensors = {name: value.detach()[0] for name, value in truth.codes.as_dict().items()}
    tensors["tform"] = truth.tform.detach().reshape(3, 3)
    metadata = {name: str(int(getattr(truth, name))) for name in _INT_FIELDS}
    metadata.update(format=SIDECAR_FORMAT, deca_dir=str(truth.deca_dir))
    Path(path).write_bytes(_safetensors_bytes(tensors, metadata))


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file of float32 tensors, its header in sorted order, so that equal content
    gives equal bytes (the safetensors library orders metadata keys arbitrarily)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    names = sorted(tensors)
    data = torch.cat([tensors[name].reshape(-1).float().cpu() for name in names]).numpy().astype("<f4", copy=False)
    offset = 0
    for name in names:
        size = 4 * tensors[name].numel()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data.tobytes()


def read_sidecar(path: str | PathLike) -> PortraitTruth:
    """Read a sidecar; DataError (saying what to do) when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: only portraits written by scripts/make_synthetic.py have ground-truth "
            "codes; estimate codes of other photos with DECA (--codes deca)"
        )
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as stream:
            metadata = _metadata(stream)
        if metadata.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        expected = {name: (size,) for name, size in CODE_SIZES.items()}
        expected.update(light=(NUM_SH, 3), tform=(3, 3))
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                found = tuple(tensors[name].shape) if name in tensors else "nothing"
                raise ValueError(f"{name} should be {shape}, found {found}")
        ints = {name: int(metadata[name]) for name in _INT_FIELDS}
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise DataError(
            f"{path} is not a synthetic-portrait sidecar ({error}); re-create the folder with "
            "scripts/make_synthetic.py"
        ) from None
    codes = RigCodes(**{name: tensors[name].float()[None] for name in CODE_SIZES})
    return PortraitTruth(codes=codes, tform=tensors["tform"].float(), deca_dir=metadata.get("deca_dir", ""), **ints)


def _metadata(stream) -> dict[str, str]:
    (length,) = struct.unpack("<Q", stream.read(8))
    return json.loads(stream.read(length)).get("__metadata__") or {}


class GroundTruthCodes:
    """The true codes of synthetic portraits, read from their sidecars: the stand-in for DECA's
    crop + encoder when building datasets from the synthetic world (``--codes ground_truth``).

    ``estimator(paths, image_size)`` -> (RigCodes (B), tform (B, 3, 3)). ``image_size`` (int or
    (W, H)) is the size the caller works at; when it differs from the PNG's, ``tform`` is
    rescaled to pixels of the resized image.
    """

    def __call__(self, image_paths: Sequence[str | PathLike],
                 image_size: int | tuple[int, int] | None = None) -> tuple[RigCodes, torch.Tensor]:
        if len(image_paths) == 0:
            raise DataError("no images given to read ground-truth codes for")
        truths = [self.read(path) for path in image_paths]
        tforms = []
        for truth in truths:
            tform = truth.tform[None].double()
            if image_size is not None:
                target = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
                if target != (truth.size, truth.size):
                    from diffrig.data.crop import resize_transform

                    tform = resize_transform(tform, (truth.size, truth.size), target)
            tforms.append(tform.float())
        return RigCodes.cat([t.codes for t in truths]), torch.cat(tforms)

    @staticmethod
    def read(image_path: str | PathLike) -> PortraitTruth:
        """The truth of one portrait, from the sidecar beside ``image_path``."""
        return read_sidecar(sidecar_path(image_path))
