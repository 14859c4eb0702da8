"""Open any image file as an upright 8-bit RGB picture, or say in a few words why not.

Every PIL mode becomes RGB:

- transparency (RGBA, LA, PA, palette with a transparent colour) is composited on **white**, the
  way a cut-out portrait is usually shown; dropping the alpha channel instead (what
  ``convert("RGB")`` does) reveals whatever colour the transparent pixels happen to store;
- 16-bit greys (``I;16*``) are scaled by 255/65535; 32-bit integer greys (``I``) likewise when
  they exceed 255 (otherwise they already hold 8-bit values); float greys (``F``) are read as
  [0, 1] when they stay within it, else as [0, 255];
- CMYK goes through its embedded ICC profile when there is one (plain PIL conversion otherwise);
  CIELAB through an sRGB profile; everything else through ``Image.convert``.

The EXIF orientation tag is applied, so a phone photo comes out the way it is displayed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from diffrig.errors import DataError

MIN_IMAGE_SIDE = 64
BACKGROUND = (255, 255, 255)


class ImageRejected(DataError):
    """One image cannot be used. ``reason`` is a short phrase for reports (no file name)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def load_rgb(path: str | Path, min_side: int = MIN_IMAGE_SIDE,
             background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Read ``path`` as an upright RGB image with 8 bits per channel.

    Raises ``ImageRejected`` when the file is not an image, cannot be decoded, is too large to
    open safely, or has a side shorter than ``min_side`` pixels.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        raise ImageRejected(path, "not an image") from None
    except Image.DecompressionBombError as error:
        raise ImageRejected(path, f"too large to open safely ({error})") from None
    except Exception as error:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageRejected(path, f"unreadable ({type(error).__name__}: {error})") from None
    return usable_rgb(image, path, min_side, background)


def usable_rgb(image: Image.Image, source: str | Path, min_side: int = MIN_IMAGE_SIDE,
               background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """An upright picture as 8-bit RGB; ImageRejected naming ``source`` (a file, or a name for a
    picture in memory) when its colour mode cannot be converted or a side is under ``min_side`` px."""
    try:
        rgb = to_rgb(image, background)
    except (ValueError, OSError, ImageCms.PyCMSError) as error:
        raise ImageRejected(source, f"unsupported colour mode {image.mode} ({error})") from None
    if min(rgb.size) < min_side:
        raise ImageRejected(source, f"too small: {rgb.width}x{rgb.height} px "
                                    f"(needs at least {min_side} px on each side)")
    return rgb


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        return _grey_to_rgb(values, full_scale=_grey_full_scale(mode, values))
    if mode == "CMYK" and image.info.get("icc_profile"):
        return _cmyk_with_profile(image)
    if mode == "LAB":
        lab = ImageCms.createProfile("LAB")
        srgb = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(image, lab, srgb, outputMode="RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _grey_full_scale(mode: str, values: np.ndarray) -> float:
    """The value that means white for a wide grey mode."""
    if mode.startswith("I;16"):
        return 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return 1.0
    if mode == "I" and high > 255.0:
        return 65535.0
    return 255.0


def _grey_to_rgb(values: np.ndarray, full_scale: float) -> Image.Image:
    """One channel (H, W) where ``full_scale`` is white -> 8-bit RGB."""
    grey = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _cmyk_with_profile(image: Image.Image) -> Image.Image:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image.convert("RGB")  # a broken profile: fall back to PIL's naive conversion
