import numpy as np
import pytest
import torch

from diffrig.data.crop import (
    CROP_SIZE,
    crop_images,
    crop_square,
    crop_transform,
    landmark_box,
    resize_matrix,
    resize_transform,
    square_transform,
)


def apply(tform: torch.Tensor, points) -> np.ndarray:
    """(3, 3) transform of (N, 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ tform[:2, :2].double().numpy().T + tform[:2, 2].double().numpy()


def box_landmarks(left, top, right, bottom, n=68, seed=0) -> torch.Tensor:
    """(1, n, 2) points inside the box, touching all four sides."""
    rng = np.random.default_rng(seed)
    points = np.stack([rng.uniform(left, right, n), rng.uniform(top, bottom, n)], axis=1)
    points[0] = (left, top + 1)
    points[1] = (right, bottom - 1)
    points[2] = (left + 1, top)
    points[3] = (right - 1, bottom)
    return torch.from_numpy(points)[None]


def test_known_box_maps_centre_to_crop_centre_and_size_by_deca_rule():
    landmarks = box_landmarks(40.0, 60.0, 140.0, 180.0)
    assert landmark_box(landmarks).tolist() == [[40.0, 60.0, 140.0, 180.0]]
    centre, side = crop_square(landmark_box(landmarks))
    assert centre.tolist() == [[90.0, 120.0]]
    assert side.item() == np.floor((100 + 120) / 2 * 1.1 * 1.25) == 151  # DECA truncates the side

    tform = crop_transform(landmarks)[0]
    # the box centre lands on the crop's centre (pixel-centre coordinates: 0 .. 223)
    np.testing.assert_allclose(apply(tform, [[90.0, 120.0]]), [[111.5, 111.5]], atol=1e-9)
    # the enlarged landmark square (1.1 x the mean box side) spans about 224 / 1.25 crop pixels
    square = (100 + 120) / 2 * 1.1
    ends = apply(tform, [[90 - square / 2, 120.0], [90 + square / 2, 120.0]])
    assert ends[1, 0] - ends[0, 0] == pytest.approx(square * (CROP_SIZE - 1) / 151)
    assert abs((ends[1, 0] - ends[0, 0]) - CROP_SIZE / 1.25) < 1.0
    # the crop square's corners go to the crop's corner pixels, with no rotation
    np.testing.assert_allclose(apply(tform, [[90 - 75.5, 120 - 75.5], [90 + 75.5, 120 + 75.5]]),
                               [[0, 0], [223, 223]], atol=1e-9)
    assert tform[0, 1] == tform[1, 0] == 0 and tform[2].tolist() == [0, 0, 1]


def test_batched_transforms_equal_single_ones():
    landmarks = torch.cat([box_landmarks(10, 20, 90, 95, seed=1), box_landmarks(100, 5, 300, 260, seed=2),
                           box_landmarks(-30, -10, 50, 40, seed=3)])
    batched = crop_transform(landmarks)
    for i in range(3):
        torch.testing.assert_close(batched[i], crop_transform(landmarks[i : i + 1])[0])
    assert batched.dtype == torch.float64


def reference_crop(image: np.ndarray, tform: np.ndarray, size: int) -> np.ndarray:
    """DECA's warp, written plainly: every crop pixel samples the image at tform^-1 of itself,
    bilinearly from the four pixel centres around it, out-of-image neighbours counting as 0."""
    c, h, w = image.shape
    inverse = np.linalg.inv(tform)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    out = np.zeros((c, size, size))
    for dx, dy, weight in [(0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)]:
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        values = image[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
        out += values * (weight * inside)
    return out


def test_crop_images_samples_like_deca_warp_including_borders():
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 96, 96))
    # one face well inside, one whose crop leaves the picture (black border)
    landmarks = torch.cat([box_landmarks(30, 35, 70, 80, seed=4), box_landmarks(-10, 40, 60, 110, seed=5)])
    tform = crop_transform(landmarks)
    crops = crop_images(torch.from_numpy(images), tform, crop_size=CROP_SIZE)
    assert crops.shape == (2, 3, CROP_SIZE, CROP_SIZE) and crops.dtype == torch.float64
    for i in range(2):
        expected = reference_crop(images[i], tform[i].numpy(), CROP_SIZE)
        np.testing.assert_allclose(crops[i].numpy(), expected, atol=1e-9)
    assert (crops[1, :, :, :10] == 0).all()  # left of the picture


def test_crop_of_identity_like_transform_keeps_pixels():
    image = torch.rand(1, 3, CROP_SIZE, CROP_SIZE)
    tform = square_transform(torch.tensor([[111.5, 111.5]]), torch.tensor([223.0]))
    torch.testing.assert_close(tform[0], torch.eye(3))
    torch.testing.assert_close(crop_images(image, tform), image, atol=1e-4, rtol=0)  # float32 grid maths


def test_resize_transform_follows_pixel_centres():
    to_small = resize_matrix((512, 400), (256, 100))
    # pixel edges stay edges: -0.5 and width - 0.5 (pixel-centre coordinates)
    np.testing.assert_allclose(apply(to_small, [[-0.5, -0.5], [511.5, 399.5]]), [[-0.5, -0.5], [255.5, 99.5]])
    tform = crop_transform(box_landmarks(100, 120, 300, 350).double())[0]
    small = resize_transform(tform[None], (512, 400), (256, 100))[0]
    point_small = np.array([[37.25, 81.0]])
    point_big = apply(resize_matrix((256, 100), (512, 400)), point_small)
    np.testing.assert_allclose(apply(small, point_small), apply(tform, point_big), atol=1e-9)
