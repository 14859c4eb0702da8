"""Hand-set rigs: head angles in degrees, SH light presets, expression and jaw opening.

Axes are FLAME's world axes, as DECA's orthographic camera sees them: x towards the picture's
right, y up, z towards the camera. Angles are right-handed rotations about them:

- ``yaw`` about y: positive turns the face towards the picture's right (the subject's left);
- ``pitch`` about x: positive tilts the face down;
- ``roll`` about z: positive tilts the top of the head towards the picture's left.

The global rotation is ``R = R_y(yaw) · R_x(pitch) · R_z(roll)``: yaw and pitch alone decide
where the nose points (``R · [0, 0, 1] = [sin(yaw) cos(pitch), -sin(pitch), cos(yaw) cos(pitch)]``)
and roll spins the head about that direction, so a yaw of 0 always faces the camera
horizontally. The jaw opens by a positive rotation about x.

Lights are DECA's ``light`` code: 9 second-order spherical-harmonics coefficients per RGB channel,
(9, 3), in DECA's basis order ``1, x, y, z, xy, xz, yz, x²-y², 3z²-1`` with its constants
(:data:`diffrig.deca.render.SH_CONSTANTS`); shading is ``Σ_k light[k, c] · basis_k(normal)``.
A preset is an ambient term plus one distant light whose clamped-cosine shading is projected
onto that basis (least squares over the sphere, which is the SH projection), so shading stays
positive on every normal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle

from diffrig.deca.codes import CODE_SIZES, NUM_SH, RigCodes
from diffrig.deca.render import sh_shading
from diffrig.errors import DiffrigError

Number = float | int


@dataclass(frozen=True)
class LightPreset:
    """An ambient level plus a distant white light from ``direction`` (x right, y up, z to camera)."""

    direction: tuple[float, float, float]
    intensity: float
    ambient: float


# Levels keep the brightest shading near 1.1, about what DECA's lights give a lit face.
LIGHT_PRESETS: dict[str, LightPreset] = {
    "front": LightPreset((0.0, 0.0, 1.0), intensity=0.6, ambient=0.45),
    "left": LightPreset((-1.0, 0.1, 0.6), intensity=0.8, ambient=0.3),
    "right": LightPreset((1.0, 0.1, 0.6), intensity=0.8, ambient=0.3),
    "top": LightPreset((0.0, 1.0, 0.5), intensity=0.8, ambient=0.3),
    "rim": LightPreset((0.0, 0.3, -1.0), intensity=1.0, ambient=0.25),
}


def _rotation(axis: int, degrees: torch.Tensor) -> torch.Tensor:
    """(B,) degrees -> (B, 3, 3) right-handed rotation about x (0), y (1) or z (2)."""
    angle_axis = torch.zeros(degrees.shape[0], 3, dtype=degrees.dtype, device=degrees.device)
    angle_axis[:, axis] = torch.deg2rad(degrees)
    return axis_angle_to_rotation_matrix(angle_axis)


def _as_batch(value, batch: int | None = None, dtype=torch.float32) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=dtype).reshape(-1)
    if batch is not None and tensor.numel() == 1:
        tensor = tensor.expand(batch)
    return tensor


def head_rotation(yaw, pitch=0.0, roll=0.0) -> torch.Tensor:
    """Angles in degrees (floats or (B,) tensors) -> FLAME global pose as axis-angle (B, 3), radians."""
    yaw, pitch, roll = (_as_batch(v) for v in (yaw, pitch, roll))
    batch = max(yaw.numel(), pitch.numel(), roll.numel())
    yaw, pitch, roll = (_as_batch(v, batch) for v in (yaw, pitch, roll))
    matrix = _rotation(1, yaw) @ _rotation(0, pitch) @ _rotation(2, roll)
    return rotation_matrix_to_axis_angle(matrix)


def head_angles(axis_angle: torch.Tensor) -> torch.Tensor:
    """FLAME global pose (B, 3) axis-angle -> (B, 3) degrees as (yaw, pitch, roll); inverts
    :func:`head_rotation` for pitch in (-90, 90)."""
    matrix = axis_angle_to_rotation_matrix(axis_angle.reshape(-1, 3))
    pitch = torch.asin((-matrix[:, 1, 2]).clamp(-1.0, 1.0))
    yaw = torch.atan2(matrix[:, 0, 2], matrix[:, 2, 2])
    roll = torch.atan2(matrix[:, 1, 0], matrix[:, 1, 1])
    return torch.rad2deg(torch.stack([yaw, pitch, roll], dim=1))


def jaw_pose(opening_degrees) -> torch.Tensor:
    """Jaw opening in degrees (float or (B,)) -> FLAME jaw axis-angle (B, 3) (0 = closed)."""
    opening = torch.deg2rad(_as_batch(opening_degrees))
    return torch.stack([opening, torch.zeros_like(opening), torch.zeros_like(opening)], dim=1)


@lru_cache(maxsize=1)
def _sphere_basis(count: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spread unit normals (N, 3) (a Fibonacci lattice) and DECA's SH basis there (N, 9)."""
    index = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * index / count
    azimuth = math.pi * (1.0 + math.sqrt(5.0)) * index
    radius = (1.0 - z * z).sqrt()
    normals = torch.stack([radius * azimuth.cos(), radius * azimuth.sin(), z], dim=1)
    # shading under each unit coefficient is that basis function, scaled by DECA's constant
    unit_lights = torch.eye(NUM_SH)[:, :, None].expand(NUM_SH, NUM_SH, 3)
    grid = normals.T.reshape(1, 3, count, 1).float().expand(NUM_SH, -1, -1, -1)
    basis = sh_shading(grid, unit_lights)[:, 0, :, 0].double()  # (9, N)
    return normals, basis.T


def directional_light(direction: Sequence[float], intensity: float = 0.8, ambient: float = 0.3,
                      color: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """SH light (9, 3) shading ``color · (ambient + intensity · max(0, n · direction))`` (projected)."""
    direction = torch.as_tensor(direction, dtype=torch.float64)
    if direction.shape != (3,) or direction.norm() < 1e-8:
        raise DiffrigError(f"a light direction is three numbers, not all zero; got {direction.tolist()}")
    normals, basis = _sphere_basis()
    target = ambient + intensity * (normals @ (direction / direction.norm())).clamp(min=0.0)
    coefficients = torch.linalg.lstsq(basis, target[:, None]).solution  # (9, 1)
    return (coefficients * torch.as_tensor(color, dtype=torch.float64)[None, :]).float()


def light_preset(name: str) -> torch.Tensor:
    """A named SH light (9, 3): one of :data:`LIGHT_PRESETS`."""
    preset = LIGHT_PRESETS.get(name.lower())
    if preset is None:
        raise DiffrigError(f"unknown light preset {name!r}: use one of {', '.join(LIGHT_PRESETS)} "
                           "or 9 (grey) or 27 (RGB, coefficient-major) SH coefficients")
    return directional_light(preset.direction, preset.intensity, preset.ambient)


def parse_light(value: str | Sequence[Number] | torch.Tensor) -> torch.Tensor:
    """A preset name, or 9 grey / 27 RGB SH coefficients (DECA's coefficient-major order, a string
    of numbers separated by commas or spaces is accepted) -> light (9, 3)."""
    if isinstance(value, str):
        text = value.replace(",", " ").split()
        if len(text) == 1 and not _is_number(text[0]):
            return light_preset(text[0])
        if not all(_is_number(part) for part in text):
            raise DiffrigError(f"cannot read the light {value!r}: give a preset ({', '.join(LIGHT_PRESETS)}) "
                               "or 9 / 27 numbers")
        value = [float(part) for part in text]
    coefficients = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if coefficients.numel() == NUM_SH:
        return coefficients[:, None].repeat(1, 3)
    if coefficients.numel() == 3 * NUM_SH:
        return coefficients.reshape(NUM_SH, 3)
    raise DiffrigError(f"an SH light has 9 (grey) or 27 (RGB) coefficients, got {coefficients.numel()}")


def parse_numbers(value: str | Sequence[Number] | torch.Tensor, what: str) -> torch.Tensor:
    """Numbers given as a sequence, tensor, or a string separated by commas or spaces -> (N,) float32."""
    if isinstance(value, str):
        parts = value.replace(",", " ").split()
        if not all(_is_number(part) for part in parts):
            raise DiffrigError(f"cannot read {what} {value!r}: give numbers separated by commas or spaces")
        value = [float(part) for part in parts]
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HandRig:
    """A rig set by hand; fields left as None keep the source's value.

    yaw, pitch, roll: head angles in degrees (see the module docstring); angles not given keep the
        source's own (its rotation decomposed as yaw, pitch, roll).
    light: a preset name or SH coefficients (see :func:`parse_light`).
    expression: up to 50 FLAME expression coefficients; the rest are set to 0.
    jaw: jaw opening in degrees (sets the whole jaw rotation).
    """

    yaw: float | None = None
    pitch: float | None = None
    roll: float | None = None
    light: str | Sequence[Number] | torch.Tensor | None = None
    expression: str | Sequence[Number] | torch.Tensor | None = None
    jaw: float | None = None

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in ("yaw", "pitch", "roll", "light", "expression", "jaw"))

    @property
    def changes(self) -> tuple[str, ...]:
        """Which codes this rig sets: a subset of ("pose", "light", "exp")."""
        changed = []
        if any(v is not None for v in (self.yaw, self.pitch, self.roll, self.jaw)):
            changed.append("pose")
        if self.light is not None:
            changed.append("light")
        if self.expression is not None:
            changed.append("exp")
        return tuple(changed)

    def apply(self, codes: RigCodes) -> RigCodes:
        """The codes (B faces) with this rig's settings; the inputs are not modified."""
        batch, device, dtype = codes.batch_size, codes.pose.device, codes.pose.dtype
        fields = {}
        pose = codes.pose.clone()
        if any(v is not None for v in (self.yaw, self.pitch, self.roll)):
            angles = head_angles(codes.pose[:, :3].detach().float().cpu())
            for column, value in enumerate((self.yaw, self.pitch, self.roll)):
                if value is not None:
                    angles[:, column] = float(value)
            pose[:, :3] = head_rotation(angles[:, 0], angles[:, 1], angles[:, 2]).to(device, dtype)
        if self.jaw is not None:
            pose[:, 3:] = jaw_pose(self.jaw).to(device, dtype).expand(batch, 3)
        if "pose" in self.changes:
            fields["pose"] = pose
        if self.light is not None:
            fields["light"] = parse_light(self.light).to(device, codes.light.dtype).expand(batch, NUM_SH, 3).clone()
        if self.expression is not None:
            values = parse_numbers(self.expression, "expression coefficients")
            size = CODE_SIZES["exp"]
            if values.numel() > size:
                raise DiffrigError(f"FLAME has {size} expression coefficients, got {values.numel()}")
            exp = torch.zeros(batch, size, device=device, dtype=codes.exp.dtype)
            exp[:, :values.numel()] = values.to(device, codes.exp.dtype)
            fields["exp"] = exp
        return codes.replace(**fields)
