"""DECA's per-image codes as one small batched record, and its flat 236-value form.

The flat layout is DECA's encoder output: shape 100, tex 50, exp 50, pose 6 (global axis-angle 3,
jaw axis-angle 3), cam 3 (scale, tx, ty), light 27 (9 SH coefficients x RGB, coefficient-major).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

CODE_SIZES = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
CODE_DIM = sum(CODE_SIZES.values())  # 236
NUM_SH = 9


@dataclass
class RigCodes:
    """Codes of a batch of B faces.

    shape (B, 100), tex (B, 50), exp (B, 50), pose (B, 6), cam (B, 3), light (B, 9, 3).
    ``light`` may be given as (B, 27); it is stored as (B, 9, 3).
    """

    shape: torch.Tensor
    tex: torch.Tensor
    exp: torch.Tensor
    pose: torch.Tensor
    cam: torch.Tensor
    light: torch.Tensor

    def __post_init__(self):
        for name in CODE_SIZES:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() < 2:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"RigCodes.{name} must be a batch (B, {CODE_SIZES[name]}), got {got}; "
                                 "for one face add the batch axis: value[None]")
        batch = self.shape.shape[0]
        for name in CODE_SIZES:
            if getattr(self, name).shape[0] != batch:
                raise ValueError(f"RigCodes fields must hold the same faces: shape has {batch}, "
                                 f"{name} {getattr(self, name).shape[0]}")
        if self.light.dim() == 2:
            self.light = self.light.reshape(batch, NUM_SH, 3)
        for name, size in CODE_SIZES.items():
            value = getattr(self, name)
            flat_shape = (value.shape[0], value.shape[1:].numel())
            if flat_shape != (batch, size):
                raise ValueError(f"RigCodes.{name} must hold (B={batch}, {size}) values, got {tuple(value.shape)}")
        if self.light.shape[1:] != (NUM_SH, 3):
            raise ValueError(f"RigCodes.light must be (B, 9, 3), got {tuple(self.light.shape)}")

    @classmethod
    def from_flat(cls, flat: torch.Tensor) -> RigCodes:
        """Split DECA's (B, 236) parameter vector."""
        if flat.dim() != 2 or flat.shape[1] != CODE_DIM:
            raise ValueError(f"flat codes must be (B, {CODE_DIM}), got {tuple(flat.shape)}")
        return cls(**dict(zip(CODE_SIZES, flat.split(list(CODE_SIZES.values()), dim=1))))

    def flat(self) -> torch.Tensor:
        """(B, 236) in DECA's order; ``RigCodes.from_flat(codes.flat())`` round-trips exactly."""
        return torch.cat([getattr(self, name).reshape(self.batch_size, -1) for name in CODE_SIZES], dim=1)

    @classmethod
    def cat(cls, items: list[RigCodes]) -> RigCodes:
        """Concatenate along the batch."""
        return cls(**{name: torch.cat([getattr(c, name) for c in items]) for name in CODE_SIZES})

    @property
    def batch_size(self) -> int:
        return self.shape.shape[0]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in CODE_SIZES}

    def replace(self, **fields: torch.Tensor) -> RigCodes:
        """A copy with some fields swapped, e.g. ``codes.replace(light=other.light)``."""
        return dataclasses.replace(self, **fields)

    def map(self, fn) -> RigCodes:
        """Apply ``fn`` to every tensor (``codes.map(lambda t: t.to(device))``)."""
        return RigCodes(**{name: fn(value) for name, value in self.as_dict().items()})

    def to(self, *args, **kwargs) -> RigCodes:
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> RigCodes:
        return self.map(torch.Tensor.detach)

    def clone(self) -> RigCodes:
        return self.map(torch.Tensor.clone)

    def __getitem__(self, index) -> RigCodes:
        """Batch slice; an integer index keeps the batch axis (``codes[0]`` has B = 1)."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"face {index} is out of range for {self.batch_size} faces")
            index = slice(index, index + 1 if index != -1 else None)
        return self.map(lambda t: t[index])

    def __len__(self) -> int:
        return self.batch_size
