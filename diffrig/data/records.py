"""One training sample as bytes: the value stored under each LMDB key. No pickle anywhere.

A record is a safetensors blob holding

- ``image.png``     uint8 (N,)   the photo, an 8-bit RGB PNG;
- ``buffers8.png``  uint8 (N,)   the buffer channels whose span is at most 1 (albedo, most of
  rendered), quantised to 8 bits and stacked vertically into one grey PNG;
- ``buffers16.png`` uint8 (N,)   the wider ones (normal x, y), at 1/1020 steps in a 16-bit PNG;
- ``buffers.quant`` float32 (9, 3) per channel: step, zero level, bits (value = (q - zero) * step);
- ``codes``         float32 (C,)  the flat rig codes the buffers were rendered from;
- ``tform``         float32 (3, 3) the crop transform (re-render the buffers in the image frame);

and the source file name in the safetensors metadata. Every channel stays within half a step of
float32 (at most 1/508 for 8-bit channels, 1/2040 for the wider ones), zero (the background)
decodes exactly, and PNG's compression of the empty background keeps a 256² record at a small
fraction of the official pickled format.
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
PNG_LEVEL = 3  # zlib level: 6 costs ~2.5x the time for ~5% fewer bytes


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
    """(H,W,3) uint8, (H,W) uint8 or (H,W) uint16 array -> PNG bytes as a uint8 tensor."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=PNG_LEVEL)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


def _unpng(data: torch.Tensor) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data.numpy().tobytes())))


def _quantisation(x: torch.Tensor) -> torch.Tensor:
    """(C,H,W) -> (C,3) rows (step, zero level, bits). A channel of span at most 1 takes 8 bits
    (error at most 1/508); a wider one (normals span 2, rendered may exceed 1) takes as many levels
    as keep its error at 1/2040, stored in a 16-bit PNG whose unused high bits compress away. Zero
    is always a level, so the empty background decodes as exactly 0."""
    low = x.amin(dim=(1, 2)).clamp(max=0)
    high = x.amax(dim=(1, 2)).clamp(min=0)
    span = high - low
    narrow = span <= 1.0
    levels = torch.where(narrow, torch.full_like(span, 254.0), (span * 1020).ceil().clamp(max=65534))
    step = (span / levels).clamp_min(1e-12)
    zero = (-low / step).round()
    bits = torch.where(narrow, 8.0, 16.0)
    return torch.stack([step, zero, bits], dim=1)


def _encode_buffers(buffers: torch.Tensor) -> dict:
    """(9,H,W) float -> the tensors holding it: ``buffers.quant`` and one grey PNG per bit depth
    with that depth's channels stacked vertically."""
    x = buffers.detach().float().cpu()
    quant = _quantisation(x)
    step, zero, bits = quant[:, 0, None, None], quant[:, 1, None, None], quant[:, 2]
    q = (x / step + zero).round().clamp(0, 65535).to(torch.int32)
    out = {"buffers.quant": quant}
    for depth, dtype in ((8, np.uint8), (16, np.uint16)):
        chosen = bits == depth
        if chosen.any():
            stack = q[chosen].numpy().astype(dtype)
            out[f"buffers{depth}.png"] = _png(stack.reshape(-1, stack.shape[-1]))
    return out


def _decode_buffers(tensors: dict) -> torch.Tensor:
    quant = tensors["buffers.quant"]
    bits = quant[:, 2]
    channels = [None] * quant.shape[0]
    for depth in (8, 16):
        index = (bits == depth).nonzero().flatten().tolist()
        if not index:
            continue
        grey = torch.from_numpy(_unpng(tensors[f"buffers{depth}.png"]).astype(np.float32))
        for i, plane in zip(index, grey.reshape(len(index), -1, grey.shape[-1])):
            channels[i] = (plane - quant[i, 1]) * quant[i, 0]
    return torch.stack(channels)


def encode_sample(sample: Sample) -> bytes:
    """Sample -> safetensors bytes."""
    if sample.image.dtype != torch.uint8 or sample.image.ndim != 3 or sample.image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3,H,W), got {tuple(sample.image.shape)} {sample.image.dtype}")
    if sample.buffers.shape != (BUFFER_CHANNELS, *sample.image.shape[1:]):
        raise ValueError(f"buffers must be (9,H,W) matching the image, got {tuple(sample.buffers.shape)}")
    tensors = {
        "image.png": _png(sample.image.permute(1, 2, 0).cpu().numpy()),
        **_encode_buffers(sample.buffers),
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
        buffers = _decode_buffers(tensors)
    except (SafetensorError, KeyError, RuntimeError, OSError, ValueError, struct.error) as error:
        raise DataError(f"{where} is corrupt ({error}); re-create the dataset with scripts/create_data.py") from None
    return Sample(name=name, image=image, buffers=buffers, codes=tensors["codes"], tform=tensors["tform"])


def _metadata(data: bytes) -> dict:
    """The safetensors header's ``__metadata__`` (8-byte little-endian length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
