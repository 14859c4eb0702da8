"""Linear albedo spaces in FLAME's UV layout, as DECA decodes its ``tex`` code.

Two files carry one: ``FLAME_texture.npz`` (``mean``, ``tex_dir``; values in 0..255) and
``FLAME_albedo_from_BFM.npz`` (``MU``, ``PC``; values in 0..1). Both store square UV images
pixel-major with channels in B, G, R order; DECA flips them to RGB and samples the 512² map
down to its UV size (256) with nearest-neighbour interpolation. Values are not clipped: a code
far from the mean gives albedo outside [0, 1], exactly as in DECA.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffrig.errors import AssetError

KINDS = ("FLAME", "BFM")
# The FLAME space stores 8-bit intensities; the BFM conversion stores reflectance in [0, 1].
VALUE_SCALE = {"FLAME": 1.0 / 255.0, "BFM": 1.0}


class AlbedoSpace(nn.Module):
    """``albedo = mean + basis @ tex`` reshaped to a UV image.

    Args:
        kind: ``"FLAME"`` or ``"BFM"`` (selects the value scale).
        mean: array with ``S*S*3`` values (pixel-major, BGR), as stored in the file.
        basis: array whose last axis indexes components and whose other axes hold ``S*S*3``
            values in the same order as ``mean``.
        n_tex: number of leading components used (DECA: 50).
        uv_size: side of the output UV map (DECA: 256).
    """

    def __init__(self, kind: str, mean, basis, n_tex: int = 50, uv_size: int = 256, name: str = "albedo space"):
        super().__init__()
        if kind not in KINDS:
            raise AssetError(f"{name}: unknown albedo space kind {kind!r}; expected one of {KINDS}")
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        basis = np.asarray(basis)
        if basis.ndim < 2:
            raise AssetError(f"{name}: basis must have a components axis, got shape {basis.shape}")
        basis = basis.reshape(-1, basis.shape[-1])
        side = math.isqrt(mean.size // 3)
        if mean.size != 3 * side * side or basis.shape[0] != mean.size:
            raise AssetError(
                f"{name}: mean ({mean.size} values) and basis ({basis.shape[0]} rows) must both hold "
                "one square RGB UV image; the file is damaged or not a DECA texture space"
            )
        if n_tex > basis.shape[1]:
            raise AssetError(f"{name}: {n_tex} texture components requested but the file has {basis.shape[1]}")
        scale = VALUE_SCALE[kind]
        self.kind = kind
        self.n_tex = n_tex
        self.uv_size = uv_size
        self.texture_side = side
        self.register_buffer("mean", torch.from_numpy(mean * scale).float()[None])  # (1, N)
        self.register_buffer("basis", torch.from_numpy(basis[:, :n_tex] * scale).float().T.contiguous())  # (n_tex, N)

    @classmethod
    def from_file(cls, path: str | Path, n_tex: int = 50, uv_size: int = 256) -> "AlbedoSpace":
        """Load ``FLAME_texture.npz`` or ``FLAME_albedo_from_BFM.npz`` (kind told by its keys)."""
        from diffrig.deca.formats import read_texture_space

        space = read_texture_space(path)
        return cls(space.kind, space.mean, space.basis, n_tex=n_tex, uv_size=uv_size, name=str(path))

    def forward(self, tex: torch.Tensor) -> torch.Tensor:
        """tex (B, n_tex) -> albedo UV map (B, 3, uv_size, uv_size), RGB."""
        if tex.shape[-1] != self.n_tex:
            raise ValueError(f"tex code has {tex.shape[-1]} values, this albedo space uses {self.n_tex}")
        flat = torch.addmm(self.mean, tex.to(self.basis.dtype), self.basis)  # (B, N)
        side = self.texture_side
        bgr = flat.reshape(-1, side, side, 3).permute(0, 3, 1, 2)
        bgr = F.interpolate(bgr, size=(self.uv_size, self.uv_size), mode="nearest")
        return bgr.flip(1)
