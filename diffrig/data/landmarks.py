"""Faces and their 68 landmarks, found with dlib (the detector and predictor FFHQ was aligned with).

Landmarks follow the iBUG 300-W layout: jaw 0-16, brows 17-26, nose 27-35, eyes 36-41 (the
subject's right eye, on the left of the picture) and 42-47, mouth 48-67.

dlib's HOG detector is run on a copy of the picture whose longest side is at most ``max_side``
pixels (fast on large photos), and once more at twice that size if it finds nothing (small faces); the
landmark predictor then runs on the full-resolution picture inside the box scaled back.
dlib and the predictor file come with the ``faces`` extra: ``pip install "diffrig[faces]"``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffrig.data.images import ImageRejected
from diffrig.errors import DataError

logger = logging.getLogger(__name__)

MAX_DETECT_SIDE = 1024
_INSTALL_HINT = 'install the face-landmark extra: pip install "diffrig[faces]"'


@dataclass(frozen=True)
class Face:
    """One detected face. ``box`` is (left, top, right, bottom) and ``landmarks`` (68, 2) holds
    (x, y) pixel-centre coordinates, both in the frame of the picture given to ``detect_faces``."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def area(self) -> float:
        return self.width * (self.box[3] - self.box[1])


@functools.lru_cache(maxsize=None)
def load_dlib_models(predictor_path: str | None = None):
    """(HOG face detector, 68-point shape predictor), loaded once per process.

    ``predictor_path`` defaults to the file shipped by ``face_recognition_models`` (found by path:
    importing that package needs the removed ``pkg_resources``).
    """
    try:
        import dlib
    except ImportError:
        raise DataError(f"face detection needs dlib: {_INSTALL_HINT}") from None
    if predictor_path is None:
        from diffrig.info import dlib_models

        found = dlib_models().get("landmarks68")
        if found is None:
            raise DataError(f"dlib's 68-landmark model was not found: {_INSTALL_HINT}")
        predictor_path = str(found)
    try:
        predictor = dlib.shape_predictor(predictor_path)
    except RuntimeError as error:
        raise DataError(f"cannot load the landmark model {predictor_path} ({error}): {_INSTALL_HINT}") from None
    return dlib.get_frontal_face_detector(), predictor


def detect_faces(image: Image.Image | np.ndarray, max_side: int = MAX_DETECT_SIDE,
                 predictor_path: str | None = None) -> list[Face]:
    """All faces in an RGB picture (PIL image or uint8 array (H, W, 3)), the largest first."""
    detector, predictor = load_dlib_models(predictor_path)
    import dlib

    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                                             dtype=np.uint8))
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DataError(f"detect_faces needs an RGB picture (H, W, 3), got an array of shape {pixels.shape}")
    height, width = pixels.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = pixels
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
        scale_x, scale_y = size[0] / width, size[1] / height
    else:
        scale_x = scale_y = 1.0
    boxes = detector(small, 0)
    if len(boxes) == 0:
        logger.debug("no face at the detection size; trying again upsampled")
        boxes = detector(small, 1)
    faces = []
    for box in boxes:
        left, top = box.left() / scale_x, box.top() / scale_y
        right, bottom = box.right() / scale_x, box.bottom() / scale_y
        full_box = dlib.rectangle(round(left), round(top), round(right), round(bottom))
        shape = predictor(pixels, full_box)
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        faces.append(Face(box=(left, top, right, bottom), landmarks=landmarks))
    return sorted(faces, key=lambda face: face.area, reverse=True)


def usable_faces(image: Image.Image, min_face: float, source: str | Path) -> list[Face]:
    """:func:`detect_faces`, largest first, when the largest is at least ``min_face`` pixels wide.

    Raises ``ImageRejected`` naming ``source`` (a file, or a name for a picture in memory) when
    there is no face or the largest is too small.
    """
    faces = detect_faces(image)
    if not faces:
        raise ImageRejected(source, "no face found")
    if faces[0].width < min_face:
        raise ImageRejected(source, f"face too small: {faces[0].width:.0f} px wide (needs at least {min_face:g} px)")
    return faces
