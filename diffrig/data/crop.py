"""DECA's face crop: a square around the 68 landmarks, warped to the encoder's 224² input.

The rule is that of DECA's ``TestData`` for landmark boxes (its ``'kpt68'`` kind):

- the landmark box (min/max of x and y) gives a centre (the box centre) and a side, the mean of
  its width and height enlarged by 10 %;
- the crop square is that side times ``scale`` (1.25), truncated to whole pixels, around the centre;
- ``tform`` is the similarity taking the square's corners (left, top), (left, bottom), (right, top)
  to (0, 0), (0, 223), (223, 0): a uniform scale ``223 / side`` and a shift, no rotation (the
  least-squares similarity through those three points is this one exactly);
- the crop samples the image at ``tform⁻¹`` of every crop pixel, bilinearly, black outside.

Coordinates are pixel centres (pixel ``i`` is at ``i``), as in scikit-image's ``warp``, which
DECA uses. ``tform`` (3×3, column vectors, image pixel -> crop pixel) is what DECA's decoder
inverts to render into the image frame (:meth:`diffrig.deca.rig.DECA.decode`).
"""

from __future__ import annotations

import torch
from kornia.geometry.transform import warp_affine

CROP_SIZE = 224
CROP_SCALE = 1.25
LANDMARK_BOX_GROWTH = 1.1  # DECA enlarges a landmark box by a tenth before scaling it


def landmark_box(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) points (x, y) -> (B, 4) boxes (left, top, right, bottom)."""
    low = landmarks[..., :2].amin(dim=1)
    high = landmarks[..., :2].amax(dim=1)
    return torch.cat([low, high], dim=1)


def crop_square(box: torch.Tensor, scale: float = CROP_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """DECA's crop square of landmark boxes (B, 4) -> centres (B, 2) and sides (B,) in pixels.

    The side is truncated to a whole number of pixels, as DECA does."""
    left, top, right, bottom = box.unbind(dim=1)
    centre = torch.stack([(left + right) / 2, (top + bottom) / 2], dim=1)
    side = ((right - left) + (bottom - top)) / 2 * LANDMARK_BOX_GROWTH
    return centre, torch.floor(side * scale)


def square_transform(centre: torch.Tensor, side: torch.Tensor, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """The similarity (B, 3, 3) mapping the square of ``side`` (B,) around ``centre`` (B, 2) onto
    the ``crop_size``² crop: its corners go to pixels 0 and ``crop_size - 1``."""
    ratio = (crop_size - 1) / side
    corner = centre - side[:, None] / 2
    tform = torch.zeros(centre.shape[0], 3, 3, dtype=centre.dtype, device=centre.device)
    tform[:, 0, 0] = ratio
    tform[:, 1, 1] = ratio
    tform[:, :2, 2] = -corner * ratio[:, None]
    tform[:, 2, 2] = 1
    return tform


def crop_transform(landmarks: torch.Tensor, scale: float = CROP_SCALE, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """DECA's crop transform (B, 3, 3), image pixel -> crop pixel, from landmarks (B, N, 2).

    Compute it in float64 (as DECA does) when the landmarks are large pixel values."""
    centre, side = crop_square(landmark_box(landmarks), scale)
    return square_transform(centre, side, crop_size)


def crop_images(images: torch.Tensor, tform: torch.Tensor, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """Warp images (B, C, H, W) (float) into their crops (B, C, crop_size, crop_size) with
    ``tform`` (B, 3, 3): bilinear, zeros outside the image."""
    matrix = tform[:, :2, :].to(images.dtype)
    return warp_affine(images, matrix, (crop_size, crop_size), mode="bilinear", padding_mode="zeros",
                       align_corners=True)


def resize_transform(tform: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """The crop transform (B, 3, 3) of an image resized from ``from_size`` to ``to_size`` (W, H),
    given ``tform`` in the original's pixels (pixel-centre coordinates)."""
    return tform @ resize_matrix(to_size, from_size).to(tform)


def resize_matrix(from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """(3, 3) float64 taking pixel-centre coordinates of a (W, H) image to those of the same image
    resized to ``to_size`` (W, H)."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return torch.tensor([[sx, 0.0, (sx - 1) / 2], [0.0, sy, (sy - 1) / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
