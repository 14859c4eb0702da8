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

Writing is split for ``create_data``'s pipeline: :func:`quantise_buffers` runs batched where the
buffers were rendered and hands over 8/16-bit planes; :func:`encode_record` (PNG compression,
mostly outside the GIL: :mod:`diffrig.data.png`) runs in threads. Records written by Pillow's PNG
encoder (before) and by ours decode to the same values.
"""

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.numpy import save as st_save
from safetensors.torch import load as st_load

from diffrig.data.png import SIGNATURE, encode_png
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


@dataclass
class RecordBuffers:
    """One sample's buffers as stored: ``quant`` float32 (9, 3) rows (step, zero level, bits);
    ``planes8`` uint8 (n8, H, W) and ``planes16`` big-endian uint16 (n16, H, W) the quantised
    channels of each bit depth, in channel order (n8 + n16 = 9)."""

    quant: np.ndarray
    planes8: np.ndarray
    planes16: np.ndarray


@dataclass
class QuantisedBuffers:
    """A batch of :class:`RecordBuffers` in three host arrays: ``quant`` (B, 9, 3), ``planes8``
    (N8, H, W) and ``planes16`` (N16, H, W), sample ``i`` owning planes ``starts8[i]:starts8[i+1]``
    (and likewise for 16 bits)."""

    quant: np.ndarray
    planes8: np.ndarray
    planes16: np.ndarray
    starts8: list[int]
    starts16: list[int]

    def __len__(self) -> int:
        return len(self.quant)

    def __getitem__(self, i: int) -> RecordBuffers:
        return RecordBuffers(self.quant[i], self.planes8[self.starts8[i] : self.starts8[i + 1]],
                             self.planes16[self.starts16[i] : self.starts16[i + 1]])


def _quantisation(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (B,C,3) rows (step, zero level, bits). A channel of span at most 1 takes 8 bits
    (error at most 1/508); a wider one (normals span 2, rendered may exceed 1) takes as many levels
    as keep its error at 1/2040, stored in a 16-bit PNG whose unused high bits compress away. Zero
    is always a level, so the empty background decodes as exactly 0."""
    low = x.amin(dim=(2, 3)).clamp(max=0)
    high = x.amax(dim=(2, 3)).clamp(min=0)
    span = high - low
    narrow = span <= 1.0
    levels = torch.where(narrow, torch.full_like(span, 254.0), (span * 1020).ceil().clamp(max=65534))
    step = (span / levels).clamp_min(1e-12)
    zero = (-low / step).round()
    bits = torch.where(narrow, 8.0, 16.0)
    return torch.stack([step, zero, bits], dim=-1)


@torch.inference_mode()
def quantise_buffers(buffers: torch.Tensor) -> QuantisedBuffers:
    """Buffers (B, 9, H, W) on any device -> their stored form on the host. The quantisation runs
    where the buffers are (batched on the GPU in ``create_data``); only the 8- and 16-bit planes
    cross to the host (1 or 2 bytes a value instead of 4)."""
    if buffers.ndim != 4 or buffers.shape[1] != BUFFER_CHANNELS:
        raise ValueError(f"buffers must be (B,9,H,W), got {tuple(buffers.shape)}")
    x = buffers.detach().float()
    quant = _quantisation(x)
    step, zero = quant[..., 0, None, None], quant[..., 1, None, None]
    levels = (x / step + zero).round().clamp(0, 65535).to(torch.int32)
    eight = quant[..., 2] == 8
    planes8 = levels[eight].to(torch.uint8)
    wide = levels[~eight]
    planes16 = torch.stack([wide >> 8, wide & 255], dim=-1).to(torch.uint8)  # big-endian bytes
    counts8 = eight.sum(1).cpu().tolist()
    height, width = buffers.shape[2:]
    return QuantisedBuffers(
        quant=quant.cpu().numpy(),
        planes8=planes8.cpu().numpy(),
        planes16=planes16.cpu().numpy().view(">u2").reshape(-1, height, width),
        starts8=np.cumsum([0, *counts8]).tolist(),
        starts16=np.cumsum([0, *(BUFFER_CHANNELS - n for n in counts8)]).tolist(),
    )


def _stacked_png(planes: np.ndarray) -> np.ndarray:
    """(n, H, W) planes stacked vertically into one grey PNG, as a uint8 array of its bytes."""
    return np.frombuffer(encode_png(planes.reshape(-1, planes.shape[-1])), dtype=np.uint8)


def _host_float32(tensor: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).reshape(shape).contiguous().numpy()


def encode_record(name: str, image: torch.Tensor | bytes, buffers: RecordBuffers, codes: torch.Tensor,
                  tform: torch.Tensor) -> bytes:
    """One record's safetensors bytes. ``image``: uint8 (3,H,W), or the bytes of an 8-bit RGB PNG
    of it (stored as they are: :func:`diffrig.data.png.plain_png` says when a file's own bytes
    qualify); ``buffers``: from :func:`quantise_buffers`; codes (C,); tform (3, 3)."""
    height, width = buffers.planes8.shape[1:] if len(buffers.planes8) else buffers.planes16.shape[1:]
    if isinstance(image, (bytes, bytearray)):
        if not image.startswith(SIGNATURE):
            raise ValueError("image bytes must be a PNG")
        photo = np.frombuffer(image, dtype=np.uint8)
    else:
        if image.dtype != torch.uint8 or image.shape != (3, height, width):
            raise ValueError(f"image must be uint8 (3,H,W) matching the (9,{height},{width}) buffers, got "
                             f"{tuple(image.shape)} {image.dtype}")
        photo = np.frombuffer(encode_png(image.cpu().permute(1, 2, 0).numpy()), dtype=np.uint8)
    arrays = {"image.png": photo, "buffers.quant": np.asarray(buffers.quant, dtype=np.float32)}
    for depth, planes in ((8, buffers.planes8), (16, buffers.planes16)):
        if len(planes):
            arrays[f"buffers{depth}.png"] = _stacked_png(planes)
    arrays["codes"] = _host_float32(codes, (-1,))
    arrays["tform"] = _host_float32(tform, (3, 3))
    return st_save(arrays, metadata={"name": name})


def encode_sample(sample: Sample) -> bytes:
    """Sample -> safetensors bytes."""
    if sample.image.dtype != torch.uint8 or sample.image.ndim != 3 or sample.image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3,H,W), got {tuple(sample.image.shape)} {sample.image.dtype}")
    if sample.buffers.shape != (BUFFER_CHANNELS, *sample.image.shape[1:]):
        raise ValueError(f"buffers must be (9,H,W) matching the image, got {tuple(sample.buffers.shape)}")
    buffers = quantise_buffers(sample.buffers[None])[0]
    return encode_record(sample.name, sample.image, buffers, sample.codes, sample.tform)


def _unpng(data: torch.Tensor) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data.numpy().tobytes())))


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
