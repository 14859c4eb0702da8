"""The fast PNG writer, the reuse of a photo file's own PNG, and batched record encoding."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diffrig.data import records
from diffrig.data.png import SIGNATURE, encode_png, plain_png
from diffrig.data.records import Sample, decode_sample, encode_record, encode_sample, quantise_buffers
from test_lmdb_records import sphere_sample


def chunks(data: bytes) -> list[bytes]:
    tags, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        tags.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return tags


def pillow_png(pixels: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", **save)
    return out.getvalue()


def photo(size=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size)[None, :, None] + np.linspace(0, 40, size)[:, None, None]
    return np.clip(ramp + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("pixels", [
    photo(37),
    photo(16)[..., 1],
    np.random.default_rng(1).integers(0, 65536, (9, 31)).astype(np.uint16),
    np.random.default_rng(2).integers(0, 65536, (5, 3)).astype(">u2"),  # big-endian input too
    np.full((1, 1), 255, np.uint8),
])
def test_encode_png_is_read_back_exactly_by_pillow(pixels):
    data = encode_png(pixels)
    assert data.startswith(SIGNATURE) and chunks(data) == [b"IHDR", b"IDAT", b"IEND"]
    decoded = Image.open(io.BytesIO(data))
    decoded.load()  # checks every chunk's CRC and the zlib stream
    assert np.array_equal(np.asarray(decoded), pixels)


def test_encode_png_refuses_what_it_cannot_write():
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4, 4), np.uint8),
                np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError, match="PNG pixels"):
            encode_png(bad)


def test_plain_png_keeps_the_pixels_and_drops_harmless_chunks():
    pixels = photo(48)
    data = pillow_png(pixels, dpi=(72, 72), icc_profile=b"not really a profile")
    assert {b"pHYs", b"iCCP"} <= set(chunks(data))
    plain = plain_png(data, 48)
    assert chunks(plain) == [b"IHDR", b"IDAT", b"IEND"] and len(plain) < len(data)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(plain))), pixels)
    assert plain_png(plain, 48) == plain


def test_plain_png_refuses_files_whose_pixels_would_differ_or_that_are_not_compact():
    pixels = photo(48)
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", "may hold an orientation")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: load_rgb turns the picture
    good = pillow_png(pixels)
    refused = {
        "other size": plain_png(good, 47),
        "grey": plain_png(pillow_png(pixels[..., 0]), 48),
        "rgba": plain_png(pillow_png(np.dstack([pixels, pixels[..., :1]])), 48),
        "16-bit grey": plain_png(pillow_png(pixels[..., 0].astype(np.uint16) * 257), 48),
        "text": plain_png(pillow_png(pixels, pnginfo=text), 48),
        "exif": plain_png(pillow_png(pixels, exif=exif), 48),
        "transparent colour": plain_png(pillow_png(pixels, transparency=(1, 2, 3)), 48),
        "stored uncompressed": plain_png(pillow_png(pixels, compress_level=0), 48),
        "truncated": plain_png(good[:-20], 48),
        "bad crc": plain_png(good[:40] + bytes([good[40] ^ 1]) + good[41:], 48),
        "jpeg": plain_png(b"\xff\xd8\xff\xe0" + good[4:], 48),
    }
    assert plain_png(good, 48) == good
    assert all(value is None for value in refused.values()), {k: v is not None for k, v in refused.items()}
    header = struct.pack(">IIBBBBB", 48, 48, 8, 2, 0, 0, 1)  # Adam7-interlaced, CRC right
    interlaced = good[:8] + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(
        ">I", zlib.crc32(header, zlib.crc32(b"IHDR"))) + good[33:]
    assert plain_png(interlaced, 48) is None


def pillow_record(sample: Sample) -> bytes:
    """A record as the first version of the writer made it: Pillow's PNGs (adaptive filters)."""
    x = sample.buffers[None].float()
    quant = records._quantisation(x)[0]
    step, zero, bits = quant[:, 0, None, None], quant[:, 1, None, None], quant[:, 2]
    q = (x[0] / step + zero).round().clamp(0, 65535).to(torch.int32)
    png = lambda a: torch.frombuffer(bytearray(pillow_png(a, compress_level=3)), dtype=torch.uint8)  # noqa: E731
    tensors = {"image.png": png(sample.image.permute(1, 2, 0).numpy()), "buffers.quant": quant,
               "codes": sample.codes, "tform": sample.tform}
    for depth, dtype in ((8, np.uint8), (16, np.uint16)):
        stack = q[bits == depth].numpy().astype(dtype)
        if len(stack):
            tensors[f"buffers{depth}.png"] = png(stack.reshape(-1, stack.shape[-1]))
    return st_save(tensors, metadata={"name": sample.name})


def test_records_written_by_pillow_and_by_the_fast_writer_decode_the_same():
    for seed, sample in enumerate([sphere_sample(64, seed=0), sphere_sample(32, seed=1)]):
        if seed == 1:  # every channel narrow: no 16-bit PNG at all
            sample.buffers = sample.buffers.clamp(0, 0.9)
        old, new = decode_sample(pillow_record(sample)), decode_sample(encode_sample(sample))
        assert old.name == new.name == sample.name
        for field in ("image", "buffers", "codes", "tform"):
            assert torch.equal(getattr(old, field), getattr(new, field)), field
        assert ("buffers16.png" in st_load(encode_sample(sample))) == (seed == 0)


def test_batched_quantisation_gives_the_bytes_of_one_sample_at_a_time():
    batch = [sphere_sample(64, seed=i, name=f"s{i}.png") for i in range(3)]
    batch[1].buffers = batch[1].buffers * 0.5  # other spans: other 8/16-bit splits per sample
    quantised = quantise_buffers(torch.stack([s.buffers for s in batch]))
    assert len(quantised) == 3
    for i, sample in enumerate(batch):
        assert quantised[i].planes8.dtype == np.uint8 and quantised[i].planes16.dtype == np.dtype(">u2")
        assert len(quantised[i].planes8) + len(quantised[i].planes16) == 9
        stored = encode_record(sample.name, sample.image, quantised[i], sample.codes, sample.tform)
        assert stored == encode_sample(sample)


def test_a_files_png_is_stored_as_it_is():
    sample = sphere_sample(64)
    file_png = pillow_png(sample.image.permute(1, 2, 0).numpy())
    data = encode_record(sample.name, file_png, quantise_buffers(sample.buffers[None])[0], sample.codes, sample.tform)
    assert st_load(data)["image.png"].numpy().tobytes() == file_png
    assert torch.equal(decode_sample(data).image, sample.image)
    with pytest.raises(ValueError, match="must be a PNG"):
        encode_record(sample.name, b"GIF89a", quantise_buffers(sample.buffers[None])[0], sample.codes, sample.tform)
    with pytest.raises(ValueError, match="matching"):
        encode_record(sample.name, sample.image[:, :32], quantise_buffers(sample.buffers[None])[0], sample.codes,
                      sample.tform)


def test_fast_writer_costs_little_in_record_size():
    sample = sphere_sample(256)
    fast = len(encode_sample(sample))
    pillow = len(pillow_record(sample))
    assert fast <= 1.15 * pillow, (fast, pillow)
