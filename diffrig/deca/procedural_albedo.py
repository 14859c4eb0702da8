"""The built-in head's UV images: albedo spaces, face masks, mean texture, fixed displacement.

Every texel is traced back to the surface through the UV layout of
:mod:`diffrig.deca.procedural_head` (skin grid, eyeball disks, mouth bag strip), and coloured
from what lies there: skin, lips (redder), brows (dark), lash lines, sclera, iris and pupil,
the mouth's inside. Images are row-major with row 0 at ``v = 1``, as DECA samples them.

Albedo spaces hold ``NUM_TEXTURE_COMPONENTS`` components (DECA's code uses 50): skin tone
(light/dark), warmth, lip colour, brow darkness, cheek flush, iris colour, then smooth random
variations of shrinking size. A code of 1 changes colours by a few hundredths to a tenth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffrig.deca.procedural_head import (
    BAG_UV_BOX,
    EYE_UV_CENTRES,
    EYE_UV_RADIUS,
    MOUTH_HALF_WIDTH,
    SKIN_V_MIN,
    ProceduralHead,
    _eye_coords,
    almond_distance,
)
from diffrig.deca.procedural_rig import LEFT_BROW, LOWER_LIP_BORDER, UPPER_LIP_BORDER

TEXTURE_SIZE = 256  # DECA samples albedo at 256²; FLAME ships 512² (AlbedoSpace reads either)
MASK_SIZE = 256
NUM_TEXTURE_COMPONENTS = 50

SKIN = np.array([0.72, 0.53, 0.43])
LIPS = np.array([0.62, 0.33, 0.32])
BROWS = np.array([0.23, 0.16, 0.12])
LASHES = np.array([0.12, 0.08, 0.07])
SCLERA = np.array([0.88, 0.86, 0.82])
IRIS = np.array([0.36, 0.23, 0.13])
PUPIL = np.array([0.03, 0.03, 0.03])
MOUTH_INSIDE = np.array([0.36, 0.12, 0.12])
IRIS_ANGLE, PUPIL_ANGLE = 0.48, 0.2  # radians from the eyeball's front pole


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass
class UVSurface:
    """What lies under each texel of a ``size`` x ``size`` UV image.

    ``skin`` (S, S) bool with ``theta``, ``phi`` (grid directions) and ``position`` (S, S, 3) there;
    ``eye_angle`` (S, S) the angle from the eyeball's front pole (NaN off the eyes);
    ``bag_depth`` (S, S) 0 at the lips to 1 at the back of the mouth (NaN off the bag).
    """

    skin: np.ndarray
    theta: np.ndarray
    phi: np.ndarray
    position: np.ndarray
    eye_angle: np.ndarray
    bag_depth: np.ndarray


def uv_surface(head: ProceduralHead, size: int) -> UVSurface:
    """Trace every texel centre of a ``size``-square UV image back to the head."""
    centres = (np.arange(size) + 0.5) / size
    u = np.broadcast_to(centres[None, :], (size, size))
    v = np.broadcast_to(1.0 - centres[:, None], (size, size))
    grid = head.grid_index
    rows, cols = grid.shape
    skin = v >= SKIN_V_MIN
    # Continuous grid coordinates; rows -1 and `rows` are the poles (clamped to the end rings).
    r = np.clip((1.0 - v) / (1.0 - SKIN_V_MIN) * (rows + 1) - 1.0, 0.0, rows - 1 - 1e-9)
    c = np.clip(u * cols, 0.0, cols - 1e-9)
    i = np.minimum(r.astype(int), rows - 2)
    j = c.astype(int)
    fr, fc = r - i, c - j
    # Barycentric weights of the cell's corners a (i, j), b (i, j+1), c (i+1, j), d (i+1, j+1)
    # in its two triangles, split as build_head splits it.
    other = head.cell_split[i, j]
    lower = fr >= fc  # triangles (a, c, d) and (a, d, b)
    first = fr + fc <= 1.0  # or (a, c, b) and (b, c, d)
    w_a = np.where(other, np.where(first, 1.0 - fr - fc, 0.0), np.where(lower, 1.0 - fr, 1.0 - fc))
    w_b = np.where(other, np.where(first, fc, 1.0 - fr), np.where(lower, 0.0, fc - fr))
    w_c = np.where(other, np.where(first, fr, 1.0 - fc), np.where(lower, fr - fc, 0.0))
    w_d = np.where(other, np.where(first, 0.0, fr + fc - 1.0), np.where(lower, fc, fr))
    jn = (j + 1) % cols
    theta_grid, phi_grid = head.skin_theta[grid], head.skin_phi[grid]
    phi_next = np.where(jn == 0, phi_grid[i, jn] + 2 * np.pi, phi_grid[i, jn])  # across the seam
    phi_next_down = np.where(jn == 0, phi_grid[i + 1, jn] + 2 * np.pi, phi_grid[i + 1, jn])

    def blend(a, b, cc, d):
        if a.ndim == w_a.ndim + 1:
            return w_a[..., None] * a + w_b[..., None] * b + w_c[..., None] * cc + w_d[..., None] * d
        return w_a * a + w_b * b + w_c * cc + w_d * d

    theta = blend(theta_grid[i, j], theta_grid[i, jn], theta_grid[i + 1, j], theta_grid[i + 1, jn])
    phi = blend(phi_grid[i, j], phi_next, phi_grid[i + 1, j], phi_next_down)
    points = head.vertices[grid]
    position = blend(points[i, j], points[i, jn], points[i + 1, j], points[i + 1, jn])
    theta, phi = np.where(skin, theta, np.nan), np.where(skin, phi, np.nan)
    eye_angle = np.full((size, size), np.nan)
    for cu, cv in EYE_UV_CENTRES.values():
        rho = np.hypot(u - cu, v - cv) / EYE_UV_RADIUS
        eye_angle = np.where(rho <= 1.0, rho * np.pi, eye_angle)
    u0, u1, v0, v1 = BAG_UV_BOX
    in_bag = (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)
    bag_depth = np.where(in_bag, (v1 - v) / (v1 - v0), np.nan)
    return UVSurface(skin, theta, phi, position, eye_angle, bag_depth)


# ----------------------------------------------------------------------------- semantic regions


def lip_weight(head: ProceduralHead, surface: UVSurface) -> np.ndarray:
    """(S, S) 1 on the red of the lips."""
    ax, ay = head.features.mouth.coords(surface.theta, surface.phi)
    across = np.sqrt(np.clip(1.0 - (ax / MOUTH_HALF_WIDTH) ** 2, 0.0, None))
    inside = np.minimum(UPPER_LIP_BORDER * across - ay, ay - LOWER_LIP_BORDER * across)
    return np.nan_to_num(_smoothstep(0.5 + inside / 0.0015) * _smoothstep(across / 0.25))


def brow_weight(surface: UVSurface) -> np.ndarray:
    """(S, S) 1 on the eyebrows (arcs through the brow landmarks, thicker towards the nose)."""
    x, y, z = np.abs(surface.position[..., 0]), surface.position[..., 1], surface.position[..., 2]
    best = np.full(x.shape, np.inf)
    half = np.zeros(x.shape)
    for k in range(len(LEFT_BROW) - 1):
        a, b = LEFT_BROW[k], LEFT_BROW[k + 1]
        ab = b - a
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1]) / (ab @ ab), 0.0, 1.0)
        dist = np.hypot(x - a[0] - t * ab[0], y - a[1] - t * ab[1])
        thickness = 0.0042 - 0.0022 * (k + t) / (len(LEFT_BROW) - 1)
        closer = dist < best
        best, half = np.where(closer, dist, best), np.where(closer, thickness, half)
    weight = _smoothstep((half - best) / 0.0012 + 0.5) * (z > 0.015)
    return np.where(surface.skin, weight, 0.0)


def eye_opening_weights(head: ProceduralHead, surface: UVSurface) -> tuple[np.ndarray, np.ndarray]:
    """(inside the lid openings, along the upper lash lines), each (S, S)."""
    inside = np.zeros(surface.skin.shape)
    lashes = np.zeros(surface.skin.shape)
    for frame in head.features.eyes.values():
        ex, ey = _eye_coords(frame, surface.theta, surface.phi)
        d = np.nan_to_num(almond_distance(ex, ey), nan=1.0)
        inside = np.maximum(inside, _smoothstep(0.5 - d / 0.0008))
        upper = np.nan_to_num(ey) > -0.001
        lashes = np.maximum(lashes, _smoothstep(1.0 - np.abs(d - 0.0004) / 0.0009) * upper)
    return inside, lashes


def face_weight(head: ProceduralHead, surface: UVSurface) -> np.ndarray:
    """(S, S) the face: forehead to chin, in front of the ears."""
    y = surface.position[..., 1]
    phi = np.nan_to_num(surface.phi, nan=np.pi)
    across = _smoothstep((np.deg2rad(68.0) - np.abs(phi)) / np.deg2rad(10.0))
    height = _smoothstep((0.072 - y) / 0.012) * _smoothstep((y + 0.087) / 0.008)
    theta = np.nan_to_num(surface.theta, nan=np.pi)
    above_neck = _smoothstep((np.deg2rad(138.0) - theta) / np.deg2rad(6.0))
    return np.where(surface.skin, across * height * above_neck, 0.0)


def _cheek_weight(surface: UVSurface) -> np.ndarray:
    q = surface.position - np.array([0.0, -0.012, 0.045])
    q[..., 0] = np.abs(surface.position[..., 0]) - 0.042
    return np.where(surface.skin, np.exp(-(q * q).sum(-1) / 0.018**2), 0.0)


# ----------------------------------------------------------------------------- images


def mean_albedo(head: ProceduralHead, surface: UVSurface) -> np.ndarray:
    """(S, S, 3) RGB albedo in [0, 1]."""
    size = surface.skin.shape[0]
    image = np.broadcast_to(SKIN, (size, size, 3)).copy()
    lips = lip_weight(head, surface)[..., None]
    brows = brow_weight(surface)[..., None]
    inside, lashes = eye_opening_weights(head, surface)
    image = image + 0.05 * _cheek_weight(surface)[..., None] * np.array([1.0, -0.2, -0.2])
    image = image * (1 - lips) + LIPS * lips
    image = image * (1 - brows) + BROWS * brows
    image = image * (1 - inside[..., None]) + np.array([0.42, 0.24, 0.22]) * inside[..., None]
    image = image * (1 - lashes[..., None]) + LASHES * lashes[..., None]
    angle = surface.eye_angle[..., None]
    eyes = ~np.isnan(angle)
    iris = _smoothstep((IRIS_ANGLE - angle) / 0.04 + 0.5)
    pupil = _smoothstep((PUPIL_ANGLE - angle) / 0.03 + 0.5)
    limbus = np.exp(-(((angle - IRIS_ANGLE) / 0.05) ** 2))
    eye_colour = SCLERA * (1 - iris) + IRIS * iris
    eye_colour = eye_colour * (1 - 0.5 * limbus)
    eye_colour = eye_colour * (1 - pupil) + PUPIL * pupil
    image = np.where(eyes, np.nan_to_num(eye_colour), image)
    depth = surface.bag_depth[..., None]
    image = np.where(~np.isnan(depth), MOUTH_INSIDE * (1.0 - 0.6 * np.nan_to_num(depth)), image)
    return np.clip(image, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size, 3) smooth random field of unit RMS: Gaussian bumps on a ``cells``-square grid
    with random RGB weights."""
    coarse = rng.normal(size=(3, cells, cells))
    x = (np.arange(size) + 0.5) / size
    centres = (np.arange(cells) + 0.5) / cells
    basis = np.exp(-(((x[:, None] - centres[None, :]) * cells) ** 2))  # (size, cells)
    fine = _single_thread_matmul(_single_thread_matmul(basis[None], coarse), basis.T[None])  # (3, size, size)
    fine = fine.transpose(1, 2, 0)
    return fine / np.sqrt((fine * fine).mean())


def _single_thread_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on one thread, so the result's bits never depend on the machine's thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        product = torch.matmul(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b)))
        return product.numpy()
    finally:
        torch.set_num_threads(threads)


def albedo_components(head: ProceduralHead, surface: UVSurface, seed: int):
    """Yield the ``NUM_TEXTURE_COMPONENTS`` RGB albedo directions (one standard deviation each),
    each (S, S, 3) float32: the named ones, then smooth random ones."""
    skin = surface.skin[..., None].astype(np.float32)
    lips = lip_weight(head, surface)[..., None]
    brows = brow_weight(surface)[..., None]
    eyes = ~np.isnan(surface.eye_angle)
    iris = np.where(eyes, _smoothstep((IRIS_ANGLE - np.nan_to_num(surface.eye_angle)) / 0.04 + 0.5), 0.0)[..., None]
    named = (
        (skin, (-0.12, -0.11, -0.09)),  # skin tone: lighter / darker
        (skin, (0.035, -0.005, -0.035)),  # warmth
        (lips, (0.07, -0.04, -0.02)),  # lip colour
        (brows, (-0.1, -0.08, -0.06)),  # brow darkness
        (_cheek_weight(surface)[..., None], (0.06, -0.01, -0.01)),  # cheek flush
        (iris, (-0.12, 0.0, 0.14)),  # iris: brown / blue
    )
    for weight, colour in named:
        yield (weight * np.array(colour)).astype(np.float32)
    rng = np.random.default_rng(seed)
    size = surface.skin.shape[0]
    for k in range(NUM_TEXTURE_COMPONENTS - len(named)):
        cells = 4 + (k % 7) * 2
        amplitude = 0.03 * (1.0 + k) ** -0.6
        yield (_smooth_noise(rng, size, cells) * amplitude).astype(np.float32) * skin


def displacement_map(head: ProceduralHead, seed: int = 3) -> np.ndarray:
    """(256, 256) float64 fixed UV displacement (metres): a faint smooth relief on the face."""
    surface = uv_surface(head, MASK_SIZE)
    noise = _smooth_noise(np.random.default_rng(seed), MASK_SIZE, 24)[..., 0]
    return 0.0004 * noise * face_weight(head, surface)


def face_masks(head: ProceduralHead) -> tuple[np.ndarray, np.ndarray]:
    """(uv_face_mask, uv_face_eye_mask), each (256, 256) in [0, 1]: the face without / with the
    eye openings and eyeballs."""
    surface = uv_surface(head, MASK_SIZE)
    face = face_weight(head, surface)
    inside, _ = eye_opening_weights(head, surface)
    eyes = (~np.isnan(surface.eye_angle)).astype(float)
    return face * (1.0 - inside), np.maximum(face, eyes)
