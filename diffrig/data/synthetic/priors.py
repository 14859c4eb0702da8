"""Priors of the synthetic world: seeds, identity parameters and per-photo codes.

Every draw uses a ``torch.Generator`` seeded from a tuple of integers (world seed, stream, indices)
through numpy's ``SeedSequence``, so identity ``i`` and photo ``(i, k)`` are reproducible one by
one, in any order and in any batch.

Angles follow :mod:`diffrig.rigs` (degrees; yaw towards the picture's right, pitch down, roll);
lights are DECA's SH codes (9, 3) made of an ambient term plus one distant light, projected onto
DECA's basis analytically (:func:`sh_light`), so shading stays positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffrig.deca.codes import CODE_SIZES
from diffrig.deca.render import SH_CONSTANTS

# Streams of the seed tree: one per kind of draw.
IDENTITY_STREAM, PHOTO_STREAM, NUISANCE_STREAM = 0, 1, 2

# Irradiance factors of SH bands 0, 1, 2 (clamped cosine); DECA's basis carries them from band 1 on.
_BAND_FACTOR = torch.tensor([math.pi] + [2 * math.pi / 3] * 3 + [math.pi / 4] * 5)
_Y00 = 1.0 / math.sqrt(4 * math.pi)
_SH_OVER_BAND = SH_CONSTANTS.double().numpy() / _BAND_FACTOR.double().numpy()
_ONES3 = np.ones(3)

# Natural hair colours (linear-ish RGB in [0, 1]) and how often they occur.
HAIR_PALETTE = torch.tensor([
    [0.05, 0.04, 0.035],  # black
    [0.16, 0.10, 0.06],  # dark brown
    [0.30, 0.19, 0.11],  # brown
    [0.50, 0.36, 0.22],  # light brown
    [0.75, 0.60, 0.38],  # blond
    [0.50, 0.20, 0.08],  # auburn / red
    [0.62, 0.60, 0.58],  # grey
])
NAMED_TEX = 6  # leading tex components drawn at full spread
HAIR_WEIGHTS = torch.tensor([0.25, 0.25, 0.18, 0.1, 0.1, 0.06, 0.06])


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative integers."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def derived_seed(*key: int) -> int:
    """A 31-bit integer seed derived from a tuple of integers."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint32)[0] >> 1)


class Draws:
    """Random numbers drawn from a generator in one block each (uniform in [0, 1) and standard
    normal), then handed out in order: cheap, and each draw's meaning fixed by its position."""

    def __init__(self, g: torch.Generator, uniforms: int, normals: int = 0):
        self._uniform = torch.rand(uniforms, generator=g, dtype=torch.float64).tolist()
        self._normal = torch.randn(normals, generator=g)
        self._u = self._z = 0

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        self._u += 1
        return low + (high - low) * self._uniform[self._u - 1]

    def uniforms(self, low: float, high: float, count: int) -> torch.Tensor:
        return torch.tensor([self.uniform(low, high) for _ in range(count)], dtype=torch.float32)

    def normals(self, count: int) -> torch.Tensor:
        if self._z + count > self._normal.numel():
            raise IndexError(f"only {self._normal.numel()} normal draws were made")
        self._z += count
        return self._normal[self._z - count:self._z]

    def choice(self, weights: torch.Tensor | Sequence[float]) -> int:
        """An index drawn with probability proportional to ``weights``."""
        weights = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
        threshold, edge = self.uniform() * sum(weights), 0.0
        for index, weight in enumerate(weights):
            edge += weight
            if threshold < edge:
                return index
        return len(weights) - 1


def _decaying_std(size: int, first: float, last: float) -> torch.Tensor:
    """Per-component standard deviations falling geometrically from ``first`` to ``last``."""
    return first * (last / first) ** torch.linspace(0, 1, size)


SHAPE_STD = _decaying_std(CODE_SIZES["shape"], 1.0, 0.3)
# the leading albedo components carry skin tone and the like; the rest mottle the skin
TEX_STD = torch.cat([torch.ones(NAMED_TEX), _decaying_std(CODE_SIZES["tex"] - NAMED_TEX, 0.35, 0.15)])
EXP_STD = _decaying_std(CODE_SIZES["exp"], 0.6, 0.15)
ANGLE_STD, ANGLE_LIMIT = torch.tensor([15.0, 7.0, 3.0]), torch.tensor([40.0, 20.0, 8.0])  # yaw, pitch, roll


@dataclass
class HairStyle:
    """One identity's hair, in units of the head (eye distance ``d``, radians, radii ``r``).

    colour (3,); hairline heights above the brows at the front, the drop to the ears and to the
    nape (in ``d``); a fringe down to ``fringe_level`` above the brows (in ``d``) around azimuth
    ``fringe_centre`` over a half width ``fringe_width`` (radians around the head, 0 = front; a
    width of 0 means no fringe); wiggle (3,) amplitudes and phases (3,) of the hairline; strand
    frequencies (3,) and phases (3,); volume: half width of the hair outline and its height above
    the head centre (in head radii), superellipse exponent, length below the head centre (in
    head radii, negative = short), flare of long hair.
    """

    colour: torch.Tensor
    front: float
    side_drop: float
    back_drop: float
    fringe_level: float
    fringe_centre: float
    fringe_width: float
    wiggle: torch.Tensor
    wiggle_phase: torch.Tensor
    strand_freq: torch.Tensor
    strand_phase: torch.Tensor
    width: float
    height: float
    roundness: float
    length: float
    flare: float


@dataclass
class SkinStyle:
    """Freckles and moles: counts and strengths (positions are drawn on the face by the world)."""

    freckles: int
    freckle_strength: float
    freckle_radius: float
    moles: int
    mole_radius: float


@dataclass
class SpecularStyle:
    """Skin shine: ``strength * (n . h)^exponent`` under the SH light's dominant direction."""

    strength: float
    exponent: float


def sample_identity(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, HairStyle, SkinStyle, SpecularStyle]:
    """FLAME shape (100,) and albedo tex (50,) codes, hair, skin and shine of one identity."""
    draws = Draws(g, uniforms=40, normals=CODE_SIZES["shape"] + CODE_SIZES["tex"] + 4)
    shape = draws.normals(CODE_SIZES["shape"]) * SHAPE_STD
    tex = draws.normals(CODE_SIZES["tex"]) * TEX_STD
    return shape, tex, _hair(draws), _skin(draws), SpecularStyle(draws.uniform(0.08, 0.3), draws.uniform(8.0, 40.0))


def _hair(draws: Draws) -> HairStyle:
    shade, tint = draws.normals(1), draws.normals(3)  # overall lightness, a slight hue shift
    colour = (HAIR_PALETTE[draws.choice(HAIR_WEIGHTS)] * torch.exp(0.15 * shade + 0.04 * tint)).clamp(0.0, 1.0)
    fringe_kind = draws.choice((0.5, 0.25, 0.25))  # none, full, to one side
    side = 1.0 if draws.uniform() < 0.5 else -1.0
    fringe_level, fringe_width, fringe_centre = draws.uniform(0.12, 0.4), 0.0, 0.0
    if fringe_kind == 1:
        fringe_width = draws.uniform(0.7, 1.0)
    elif fringe_kind == 2:
        fringe_width, fringe_centre = draws.uniform(0.35, 0.55), side * draws.uniform(0.25, 0.45)
    long_hair = draws.uniform() < 0.45
    return HairStyle(
        colour=colour,
        front=draws.uniform(0.55, 1.1),
        side_drop=draws.uniform(0.1, 0.5),
        back_drop=draws.uniform(0.8, 1.6),
        fringe_level=fringe_level,
        fringe_centre=fringe_centre,
        fringe_width=fringe_width,
        wiggle=draws.uniforms(0.0, 0.08, 3),
        wiggle_phase=draws.uniforms(0.0, 2 * math.pi, 3),
        strand_freq=torch.tensor([23.0, 41.0, 67.0]) * draws.uniforms(0.8, 1.25, 3),
        strand_phase=draws.uniforms(0.0, 2 * math.pi, 3),
        width=draws.uniform(0.95, 1.2) if long_hair else draws.uniform(0.9, 1.08),
        height=draws.uniform(1.05, 1.3),
        roundness=draws.uniform(2.0, 3.0),
        length=draws.uniform(1.0, 2.2) if long_hair else draws.uniform(-0.6, 0.3),
        flare=draws.uniform(0.0, 0.12),
    )


def _skin(draws: Draws) -> SkinStyle:
    freckled = draws.uniform() < 0.35
    freckles = int(draws.uniform(30, 160))
    return SkinStyle(
        freckles=freckles if freckled else 0,
        freckle_strength=draws.uniform(0.15, 0.35),
        freckle_radius=draws.uniform(1.2, 2.0),
        moles=int(draws.uniform(1, 4)),
        mole_radius=draws.uniform(1.6, 2.6),
    )


@dataclass
class PhotoDraw:
    """The random part of one photo: head angles (3,) degrees (yaw, pitch, roll), jaw opening
    (degrees), expression (50,), light (9, 3), framing jitter (log-scale, dx, dy in half-images)
    and the nuisance seed (background, clothes)."""

    angles: torch.Tensor
    jaw: float
    exp: torch.Tensor
    light: torch.Tensor
    zoom: float
    shift: torch.Tensor
    nuisance_seed: int


def sample_photo(g: torch.Generator, nuisance_seed: int) -> PhotoDraw:
    draws = Draws(g, uniforms=8, normals=12 + CODE_SIZES["exp"])
    angles = torch.maximum(torch.minimum(draws.normals(3) * ANGLE_STD, ANGLE_LIMIT), -ANGLE_LIMIT)
    jaw = min(abs(4.0 * float(draws.normals(1))), 15.0)
    exp = draws.normals(CODE_SIZES["exp"]) * EXP_STD
    zoom, shift = 0.04 * float(draws.normals(1)), 0.02 * draws.normals(2)
    return PhotoDraw(angles=angles, jaw=jaw, exp=exp, light=sample_light(draws), zoom=zoom, shift=shift,
                     nuisance_seed=nuisance_seed)


def sample_light(draws: Draws) -> torch.Tensor:
    """An SH light (9, 3): tinted ambient plus one distant light from the front half."""
    azimuth = math.radians(draws.uniform(-75.0, 75.0))
    elevation = math.radians(draws.uniform(-15.0, 55.0))
    direction = [math.sin(azimuth) * math.cos(elevation), math.sin(elevation), math.cos(azimuth) * math.cos(elevation)]
    warmth = draws.uniform(-0.12, 0.12)
    ambient = draws.uniform(0.35, 0.6) * (1.0 + 0.03 * draws.normals(3).numpy().astype(np.float64))
    strength = draws.uniform(0.3, 0.75)
    return sh_light(direction, [strength * (1.0 + warmth), strength, strength * (1.0 - warmth)], ambient)


def sh_light(direction: torch.Tensor | Sequence[float], intensity: torch.Tensor | Sequence[float] | float,
             ambient: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
    """SH light (9, 3) whose shading is ``ambient + intensity * max(0, n . direction)``, per RGB
    channel, to second order: the clamped cosine's SH projection in DECA's basis (whose band 0
    lacks the irradiance factor pi that bands 1 and 2 carry).

    direction: (3,) (normalized here); intensity, ambient: (3,) or scalars (tensors, arrays or
    floats). Computed in float64 (plain numpy: cheap for one light), returned as float32.
    """
    x, y, z = _float64(direction).tolist()
    length = math.sqrt(x * x + y * y + z * z)
    x, y, z = x / length, y / length, z / length
    # Y_k(direction) for k >= 1
    kernel = _SH_OVER_BAND * np.array([1.0, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1])
    kernel[0] = math.pi * _Y00
    light = kernel[:, None] * (_ONES3 * _float64(intensity))[None, :]
    light[0] += _ONES3 * _float64(ambient) / _Y00
    return torch.from_numpy(light.astype(np.float32))


def _float64(value) -> np.ndarray:
    """A float, sequence, array or tensor (any device) as a float64 array."""
    return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)


def dominant_light(light: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direction (B, 3) and RGB intensity (B, 3) of the distant light behind SH codes (B, 9, 3).

    The first-order band of a distant light of intensity ``I`` from ``w`` is ``I * Y_1(w)``; the
    direction is that of the luminance-weighted band, the intensity its projection per channel.
    Works for any SH code (a lobe-free light has zero intensity).
    """
    band = light[:, 1:4, :] / math.sqrt(3.0 / (4.0 * math.pi))  # (B, 3 axes, 3 channels)
    luminance = band @ band.new_tensor([0.3, 0.59, 0.11])
    direction = torch.nn.functional.normalize(luminance, dim=1, eps=1e-8)
    intensity = (band * direction[:, :, None]).sum(1).clamp(min=0.0)
    return direction, intensity
