"""DECA's physical buffers (shaded render, normals, albedo) and its screen-space helpers.

``BufferRenderer.forward`` has the semantics of ``SRenderY.forward`` with spherical-harmonics
lights in DiffusionRig's copy of DECA, whose buffers the official DiffusionRig checkpoints were
trained on:

- the screen-space mesh is shifted by +10 in depth and rasterized (nearest face per pixel);
- ``albedo`` samples the UV albedo map (bilinear, ``align_corners=False``, zero padding) at the
  interpolated texture coordinates, then is masked by coverage;
- ``normal`` interpolates the *world-space* vertex normals (area-weighted, unit length per
  vertex, not renormalized per pixel), masked: values in [-1, 1];
- ``rendered`` is ``albedo * sh_shading(normal, lights)``, masked;
- ``alpha`` is the coverage mask (1 where a face is visible).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .rasterizer import _interpolate_channels_last, rasterize

# Depth offset DECA adds before rasterizing, so the whole mesh lies in front of the camera.
DEPTH_OFFSET = 10.0


def _sh_constants() -> torch.Tensor:
    pi = math.pi
    band1 = (2 * pi / 3) * math.sqrt(3 / (4 * pi))
    band2 = (pi / 4) * 3 * math.sqrt(5 / (12 * pi))
    return torch.tensor(
        [
            1 / math.sqrt(4 * pi),
            band1,
            band1,
            band1,
            band2,
            band2,
            band2,
            (pi / 4) * (3 / 2) * math.sqrt(5 / (12 * pi)),
            (pi / 4) * (1 / 2) * math.sqrt(5 / (4 * pi)),
        ],
        dtype=torch.float32,
    )


#: Factors of DECA's 9 SH basis functions (irradiance convolution included), in its order
#: ``1, x, y, z, xy, xz, yz, x^2 - y^2, 3 z^2 - 1``.
SH_CONSTANTS = _sh_constants()


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """DECA's 9 SH basis functions (unscaled) of normals (..., 3) -> (..., 9)."""
    x, y, z = normals.unbind(-1)
    return torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], dim=-1)


def sh_shading(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """Per-pixel RGB shading ``sum_k sh[b, k, c] * SH_CONSTANTS[k] * basis_k(normal)``.

    normals: (B, 3, H, W); sh: (B, 9, 3) coefficients (DECA's ``light`` code). Returns (B, 3, H, W).
    """
    if sh.dim() != 3 or sh.shape[1:] != (9, 3):
        raise ValueError(f"SH lights must be (B, 9, 3), got {tuple(sh.shape)}")
    return _sh_shading_channels_last(normals.permute(0, 2, 3, 1), sh).permute(0, 3, 1, 2)


def _sh_shading_channels_last(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """normals (B, H, W, 3), sh (B, 9, 3) -> shading (B, H, W, 3)."""
    batch, height, width, _ = normals.shape
    scaled = sh.to(normals.dtype) * SH_CONSTANTS.to(normals)[None, :, None]
    basis = sh_basis(normals).view(batch, height * width, 9)
    return torch.bmm(basis, scaled).view(batch, height, width, 3)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals: sum of the area-weighted normals of the faces around each vertex.

    vertices: (B, V, 3); faces: (F, 3) or (B, F, 3). Returns (B, V, 3); a vertex in no face (or
    only in degenerate ones) gets a zero normal.
    """
    batch, num_vertices = vertices.shape[:2]
    if faces.dim() == 2:
        faces = faces[None]
    faces = faces.to(device=vertices.device, dtype=torch.long).expand(batch, -1, -1)
    flat_faces = faces + num_vertices * torch.arange(batch, device=vertices.device)[:, None, None]
    flat_faces = flat_faces.reshape(-1, 3)
    corners = vertices.reshape(-1, 3).index_select(0, flat_faces.reshape(-1)).view(-1, 3, 3)  # (B*F, 3, 3)
    face_normal = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)
    summed = vertices.new_zeros(batch * num_vertices, 3)
    for corner in range(3):
        summed = summed.index_add(0, flat_faces[:, corner], face_normal)
    return F.normalize(summed, eps=1e-6, dim=1).view(batch, num_vertices, 3)


def orthographic_project(points: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """DECA's camera: ``scale * (x + tx, y + ty, z)``, then y and z negated (image y points down).

    points: (B, N, 3) world; cam: (B, 3) as (scale, tx, ty). Returns (B, N, 3) in the screen frame
    that :func:`diffrig.deca.rasterizer.rasterize` and :class:`BufferRenderer` take.
    """
    scale = cam[:, None, 0:1]
    shift = torch.cat([cam[:, None, 1:3], torch.zeros_like(cam[:, None, :1])], dim=-1)
    projected = scale * (points + shift)
    return projected * projected.new_tensor([1.0, -1.0, -1.0])


def transform_points(
    points: torch.Tensor,
    tform: torch.Tensor,
    points_scale: Sequence[int] | None = None,
    out_scale: Sequence[int] | None = None,
) -> torch.Tensor:
    """Move screen-frame points of a crop into another image's frame (DECA's ``render_orig``).

    points: (B, N, 3), x and y in [-1, 1] of the crop when ``points_scale`` (crop size, square) is
    given, else in crop pixels. tform: (B, 3, 3) acting on row vectors, ``[x, y, 1] @ tform``: for a
    crop made with a similarity ``T`` (original pixels -> crop pixels, column vectors) pass
    ``inverse(T).transpose(1, 2)``, as DECA does. out_scale: (height, width) of the target image;
    when given, x and y come back in [-1, 1] of it, else in its pixels. z is passed through.
    """
    xy = points[..., :2]
    if points_scale is not None:
        if points_scale[0] != points_scale[1]:
            raise ValueError(f"points_scale must be square, got {tuple(points_scale)}")
        xy = (xy * 0.5 + 0.5) * points_scale[0]
    homogeneous = torch.cat([xy, torch.ones_like(xy[..., :1])], dim=-1)
    moved = torch.bmm(homogeneous, tform.to(homogeneous))[..., :2]
    if out_scale is not None:
        height, width = out_scale
        moved = moved / moved.new_tensor([width, height]) * 2 - 1
    return torch.cat([moved, points[..., 2:]], dim=-1)


def _as_tensor(array, dtype) -> torch.Tensor:
    return torch.as_tensor(array).to(dtype)


class BufferRenderer(nn.Module):
    """Renders DECA's physical buffers of FLAME-topology meshes.

    mesh: anything with ``faces`` (F, 3), ``uvcoords`` (T, 2) and ``uvfaces`` (F, 3), 0-based, such
    as the ``ObjMesh`` of ``head_template.obj``; image_size: default output height and width.
    """

    def __init__(self, mesh, image_size: int = 224):
        super().__init__()
        self.image_size = int(image_size)
        faces = _as_tensor(mesh.faces, torch.long)
        uvfaces = _as_tensor(mesh.uvfaces, torch.long)
        uvcoords = _as_tensor(mesh.uvcoords, torch.float32)
        if faces.shape != uvfaces.shape or faces.dim() != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces {tuple(faces.shape)} and uvfaces {tuple(uvfaces.shape)} must both be (F, 3)")
        # grid_sample coordinates: u -> x in [-1, 1]; v is measured upwards, image rows downwards.
        grid_uv = uvcoords * 2 - 1
        grid_uv = grid_uv * grid_uv.new_tensor([1.0, -1.0])
        self.register_buffer("faces", faces, persistent=False)
        self.register_buffer("face_uvcoords", grid_uv[uvfaces], persistent=False)  # (F, 3, 2)

    def forward(
        self,
        vertices: torch.Tensor,
        transformed_vertices: torch.Tensor,
        albedo_uv: torch.Tensor,
        lights: torch.Tensor | None,
        h: int | None = None,
        w: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Buffers of a batch.

        vertices: (B, V, 3) world (for normals); transformed_vertices: (B, V, 3) screen frame
        (:func:`orthographic_project`, optionally :func:`transform_points`), not modified;
        albedo_uv: (B, 3, Hu, Wu) UV albedo in [0, 1]; lights: (B, 9, 3) SH coefficients, or None
        for unshaded albedo. Returns dict of ``rendered``, ``normal``, ``albedo`` (B, 3, H, W) and
        ``alpha`` (B, 1, H, W), H = h or image_size, W = w or image_size.
        """
        height = self.image_size if h is None else int(h)
        width = self.image_size if w is None else int(w)
        batch = vertices.shape[0]
        screen = transformed_vertices + transformed_vertices.new_tensor([0.0, 0.0, DEPTH_OFFSET])
        fragments = rasterize(screen, self.faces, height, width)

        normals = vertex_normals(vertices, self.faces)  # (B, V, 3)
        face_normals = normals.index_select(1, self.faces.reshape(-1)).view(batch, -1, 3, 3)  # (B, F, 3, 3)
        face_uv = self.face_uvcoords.to(face_normals.dtype).expand(batch, -1, -1, -1)
        pixels = _interpolate_channels_last(fragments, torch.cat([face_uv, face_normals], dim=-1))  # (B, H, W, 5)

        alpha = (fragments.pix_to_face >= 0).to(vertices.dtype)[:, None]
        albedo = F.grid_sample(
            albedo_uv.to(pixels.dtype), pixels[..., :2], mode="bilinear", padding_mode="zeros", align_corners=False
        )
        albedo = albedo * alpha  # empty pixels sample the texture at uv (0.5, 0.5)
        normal = pixels[..., 2:]  # already 0 where empty
        rendered = albedo if lights is None else albedo * _sh_shading_channels_last(normal, lights).permute(0, 3, 1, 2)
        return {
            "rendered": rendered,
            "normal": normal.permute(0, 3, 1, 2),
            "albedo": albedo,
            "alpha": alpha,
        }
