"""One training sample as bytes: the value stored under each LMDB key. No pickle anywhere.

A record is a safetensors blob holding

- ``image.png``   uint8 (N,)  the photo, an 8-bit RGB PNG;
- ``buffers.png`` uint8 (N,)  the 9 buffer channels stacked into one 16-bit grey PNG of 9H×W;
- ``buffers.range`` float32 (9, 2)  per channel (low, high) of the 16-bit quantisation;
- ``codes``       float32 (C,)  the flat rig codes the buffers were rendered from;
- ``tform``       float32 (3, 3) the crop transform (re-render the buffers in the image frame);

and the source file name in the safetensors metadata. 16 bits over each channel's own range keep
the buffers within 1/65535 of their span (far inside 1/255 of float32), while PNG's compression
of the empty background keeps a 256² record near a fifth of the official pickled format.
"""

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diffrig.errors import DataError

BUFFER_CHANNELS = 9


@dataclass
class Sample:
    """image: uint8 (3,H,W); buffers: float32 (9,H,W) rendered|normal|albedo; codes: float32 (C,);
    tform: float32 (3,3); name: the source file, relative to the album or data folder."""

    name: str
    image: torch.Tensor
    buffers: torch.Tensor
    codes: torch.Tensor
    tform: torch.Tensor


def _png(array: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 or (H,W) uint16 array -> PNG bytes as a uint8 tensor."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=6)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


def _unpng(data: torch.Tensor) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data.numpy().tobytes())))


def _encode_buffers(buffers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(9,H,W) float -> (16-bit PNG of the (9H,W) stacked channels, (9,2) ranges)."""
    x = buffers.detach().float().cpu()
    c, h, w = x.shape
    low = x.amin(dim=(1, 2))
    high = x.amax(dim=(1, 2))
    span = (high - low).clamp_min(1e-12)
    q = ((x - low[:, None, None]) / span[:, None, None] * 65535.0).round().clamp(0, 65535)
    grey = q.to(torch.int32).numpy().astype(np.uint16).reshape(c * h, w)
    return _png(grey), torch.stack([low, high], dim=1)


def _decode_buffers(png: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    grey = _unpng(png).astype(np.float32)
    c = ranges.shape[0]
    x = torch.from_numpy(grey).reshape(c, grey.shape[0] // c, grey.shape[1])
    low, high = ranges[:, 0, None, None], ranges[:, 1, None, None]
    return low + x / 65535.0 * (high - low)


def encode_sample(sample: Sample) -> bytes:
    """Sample -> safetensors bytes."""
    if sample.image.dtype != torch.uint8 or sample.image.ndim != 3 or sample.image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3,H,W), got {tuple(sample.image.shape)} {sample.image.dtype}")
    if sample.buffers.shape != (BUFFER_CHANNELS, *sample.image.shape[1:]):
        raise ValueError(f"buffers must be (9,H,W) matching the image, got {tuple(sample.buffers.shape)}")
    buffers_png, ranges = _encode_buffers(sample.buffers)
    tensors = {
        "image.png": _png(sample.image.permute(1, 2, 0).cpu().numpy()),
        "buffers.png": buffers_png,
        "buffers.range": ranges.contiguous(),
        "codes": sample.codes.detach().float().cpu().contiguous(),
        "tform": sample.tform.detach().float().cpu().reshape(3, 3).contiguous(),
    }
    return st_save(tensors, metadata={"name": sample.name})


def decode_sample(data: bytes, where: str = "record") -> Sample:
    """safetensors bytes -> Sample. ``where`` names the record in errors."""
    try:
        tensors = st_load(data)
        name = _metadata(data).get("name", "")
        image = torch.from_numpy(_unpng(tensors["image.png"]).copy()).permute(2, 0, 1).contiguous()
        buffers = _decode_buffers(tensors["buffers.png"], tensors["buffers.range"])
    except (SafetensorError, KeyError, RuntimeError, OSError, ValueError, struct.error) as error:
        raise DataError(f"{where} is corrupt ({error}); re-create the dataset with scripts/create_data.py") from None
    return Sample(name=name, image=image, buffers=buffers, codes=tensors["codes"], tform=tensors["tform"])


def _metadata(data: bytes) -> dict:
    """The safetensors header's ``__metadata__`` (8-byte little-endian length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
