"""The face rig as DiffusionRig uses DECA: photo crop -> codes -> mesh, landmarks and physical buffers.

``DECA.from_dir(path)`` reads a DECA data folder (or ``"builtin"``, the procedural stand-in);
``encode`` regresses :class:`RigCodes` from 224² crops; ``decode`` poses FLAME, projects it with
the orthographic camera and renders the buffers DiffusionRig's UNet consumes
(``cat([rendered, normal, albedo], 1)``).

Conventions follow DiffusionRig's copy of DECA (``decalib/deca.py``):

- screen space: ``(x + tx, y + ty, z) * scale``, then y and z negated; x, y in [-1, 1] span the crop;
- ``tform`` is the crop transform of DECA's ``TestData`` (3x3, original-image pixel -> crop pixel,
  column vectors); rendering "into the original frame" maps crop-normalised points through its
  inverse, exactly as DiffusionRig's scripts do before calling DECA's ``decode(render_orig=True)``;
- the FFHQ centre is a world-space point between the eyes and the mouth (a tenth of the way from
  the eye midpoint to the mouth midpoint); aligning to a stored centre translates the mesh so a
  re-posed face stays where the original one was. Unlike DECA, the landmarks move with the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffrig.deca.codes import CODE_DIM, CODE_SIZES, RigCodes
from diffrig.deca.encoder import load_deca_encoder
from diffrig.deca.files import DECA_FILES, TEXTURE_FILES
from diffrig.deca.flame import FLAME
from diffrig.deca.render import BufferRenderer, orthographic_project, transform_points
from diffrig.deca.texture import AlbedoSpace
from diffrig.errors import AssetError, DataError

CROP_SIZE = 224  # DECA's encoder input and the pixel scale of its crop frame
TEXTURE_KINDS = {"FLAME": "FLAME_texture.npz", "BFM": "FLAME_albedo_from_BFM.npz"}
RIG_FILES = ("deca_model.tar", "generic_model.pkl", "landmark_embedding.npy", "head_template.obj")

# landmark indices (68-point iBUG layout) used for the FFHQ centre
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)
MOUTH_LEFT, MOUTH_RIGHT = 48, 54


@dataclass
class RigOutput:
    """What :meth:`DECA.decode` returns.

    vertices (B, V, 3): posed FLAME mesh in world space (after FFHQ alignment, if asked).
    transformed_vertices (B, V, 3): the mesh in the output frame (crop, or original image with
        ``tform``), x and y in [-1, 1] across the image, y down, z negated.
    landmarks2d (B, 68, 2), landmarks3d (B, 68, 3): landmarks in the same frame.
    landmarks3d_world (B, 68, 3): DECA's 68 fixed landmarks in world space.
    albedo_uv (B, 3, 256, 256): the albedo map in UV space.
    rendered, normal, albedo (B, 3, H, W), alpha (B, 1, H, W): physical buffers (None without
        rendering): rendered = albedo x SH shading; all masked by alpha.
    """

    vertices: torch.Tensor
    transformed_vertices: torch.Tensor
    landmarks2d: torch.Tensor
    landmarks3d: torch.Tensor
    landmarks3d_world: torch.Tensor
    albedo_uv: torch.Tensor
    rendered: torch.Tensor | None = None
    normal: torch.Tensor | None = None
    albedo: torch.Tensor | None = None
    alpha: torch.Tensor | None = None

    @property
    def buffers(self) -> torch.Tensor:
        """(B, 9, H, W): ``cat([rendered, normal, albedo], 1)``, DiffusionRig's conditioning."""
        if self.rendered is None:
            raise ValueError("decode(..., render=False) produced no buffers")
        return torch.cat([self.rendered, self.normal, self.albedo], dim=1)


class DECA(nn.Module):
    """DECA's coarse model: encoder ``E_flame``, FLAME, an albedo space and the buffer renderer.

    The rig is frozen: no parameter requires grad and it stays in eval mode (``train()`` leaves
    the encoder's batch norm alone), while gradients still flow to the codes.
    """

    def __init__(self, encoder: nn.Module, flame: FLAME, albedo_space: AlbedoSpace, renderer: BufferRenderer,
                 crop_size: int = CROP_SIZE):
        super().__init__()
        self.encoder = encoder
        self.flame = flame
        self.albedo_space = albedo_space
        self.renderer = renderer
        self.crop_size = crop_size
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_dir(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                 texture: str | None = None) -> DECA:
        """Load a DECA data folder (DECA's file names) or the built-in asset set (``"builtin"``).

        ``path`` None means the default folder (``DIFFRIG_DECA_DIR`` or ``./data``).

        ``texture``: ``"FLAME"`` (``FLAME_texture.npz``, what DiffusionRig uses) or ``"BFM"``
        (``FLAME_albedo_from_BFM.npz``); by default the first of the two that the folder holds.
        Raises :class:`AssetError` naming every missing file and where to get it.
        """
        from diffrig.deca.assets import resolve_deca_dir
        from diffrig.deca.formats import read_deca_checkpoint, read_obj

        folder = resolve_deca_dir(path)
        texture_names = _texture_files(texture)
        missing = [name for name in RIG_FILES if not (folder / name).is_file()]
        if not any((folder / name).is_file() for name in texture_names):
            missing += texture_names
        if missing:
            lines = "; ".join(f"{name} ({DECA_FILES[name][0]}; get it from {DECA_FILES[name][1]})" for name in missing)
            either = " (one texture file is enough)" if len(texture_names) > 1 and texture_names[-1] in missing else ""
            raise AssetError(f"DECA data folder {folder} lacks {lines}{either}")
        texture_name = next(name for name in texture_names if (folder / name).is_file())

        checkpoint = read_deca_checkpoint(folder / "deca_model.tar")
        if "E_flame" not in checkpoint:
            raise AssetError(f"{folder / 'deca_model.tar'} has no 'E_flame' entry; it is not DECA's deca_model.tar")
        encoder = load_deca_encoder(checkpoint["E_flame"], outsize=CODE_DIM, name=f"{folder / 'deca_model.tar'}:E_flame")
        flame = FLAME.from_files(folder / "generic_model.pkl", folder / "landmark_embedding.npy",
                                 n_shape=CODE_SIZES["shape"], n_exp=CODE_SIZES["exp"])
        albedo_space = AlbedoSpace.from_file(folder / texture_name, n_tex=CODE_SIZES["tex"])
        renderer = BufferRenderer(read_obj(folder / "head_template.obj"), image_size=CROP_SIZE)
        return cls(encoder, flame, albedo_space, renderer).to(device)

    def train(self, mode: bool = True) -> DECA:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.flame.v_template.device

    def encode(self, images: torch.Tensor) -> RigCodes:
        """Face crops (B, 3, 224, 224) in [0, 1] -> codes (DECA's crop: see diffrig.data)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"DECA encodes a tensor of face crops (B, 3, {self.crop_size}, {self.crop_size}) in "
                            f"[0, 1], got {type(images).__name__}")
        weights = next(self.encoder.parameters())
        if images.dtype != weights.dtype:
            raise TypeError(f"DECA's encoder runs in {weights.dtype}; got crops of {images.dtype}: "
                            + ("use images.float() / 255" if not images.is_floating_point() else "use images.float()"))
        if images.dim() != 4 or images.shape[1:] != (3, self.crop_size, self.crop_size):
            raise DataError(
                f"DECA encodes (B, 3, {self.crop_size}, {self.crop_size}) face crops in [0, 1]; "
                f"got {tuple(images.shape)}: crop the aligned photo first"
            )
        return RigCodes.from_flat(self.encoder(images))

    def ffhq_center(self, codes: RigCodes) -> torch.Tensor:
        """World-space FFHQ face centre (B, 3) of the posed mesh, before any alignment."""
        _, landmarks2d, _ = self._pose(codes)
        return _ffhq_center(landmarks2d)

    def decode(self, codes: RigCodes, size: int | tuple[int, int] | None = None, tform: torch.Tensor | None = None,
               ffhq_center: torch.Tensor | None = None, render: bool = True) -> RigOutput:
        """Pose, project and (optionally) render.

        size: output (H, W) (or one int). Without ``tform`` the crop frame is rendered at this size
            (default 224, DECA's); with ``tform`` it must be the original image's size.
        tform: (B, 3, 3) crop transform of each image (original pixel -> crop pixel); renders the
            buffers into the original image frame, as DiffusionRig stores them.
        ffhq_center: (B, 3) or (3,) centre from :meth:`ffhq_center` of the unedited codes; mesh
            and landmarks are translated so their own centre lands there (keeps the face put when
            the pose changes, as DiffusionRig's ``align_ffhq``).
        render: False skips rasterization (geometry only).
        """
        vertices, landmarks2d, landmarks3d = self._pose(codes)
        if ffhq_center is not None:
            shift = (ffhq_center.to(vertices) - _ffhq_center(landmarks2d)).unsqueeze(1)
            vertices, landmarks2d, landmarks3d = vertices + shift, landmarks2d + shift, landmarks3d + shift
        albedo_uv = self.albedo_space(codes.tex)

        projected = [orthographic_project(p, codes.cam) for p in (vertices, landmarks2d, landmarks3d)]
        if tform is None:
            height, width = _pair(self.crop_size if size is None else size)
        else:
            if size is None:
                raise ValueError("decode(tform=...) needs size=(H, W) of the original image")
            height, width = _pair(size)
            if tform.dim() != 3 or tform.shape[1:] != (3, 3) or tform.shape[0] not in (1, len(codes)):
                raise ValueError(f"tform must be ({len(codes)}, 3, 3) crop transforms, one per face (or one for "
                                 f"all), got {tuple(tform.shape)}")
            crop_to_original = torch.linalg.inv(tform.to(vertices)).transpose(1, 2).expand(len(codes), -1, -1)
            projected = [transform_points(p, crop_to_original, [self.crop_size, self.crop_size], [height, width])
                         for p in projected]
        if height < 1 or width < 1:
            raise ValueError(f"size must be positive, got {size}")
        transformed_vertices, screen_landmarks2d, screen_landmarks3d = projected
        out = RigOutput(
            vertices=vertices,
            transformed_vertices=transformed_vertices,
            landmarks2d=screen_landmarks2d[..., :2],
            landmarks3d=screen_landmarks3d,
            landmarks3d_world=landmarks3d,
            albedo_uv=albedo_uv,
        )
        if render:
            buffers = self.renderer(vertices, transformed_vertices, albedo_uv, codes.light, h=height, w=width)
            out.rendered, out.normal = buffers["rendered"], buffers["normal"]
            out.albedo, out.alpha = buffers["albedo"], buffers["alpha"]
        return out

    def _pose(self, codes: RigCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.flame(codes.shape, codes.exp, codes.pose)


def _texture_files(texture: str | None) -> list[str]:
    """Texture files acceptable for ``texture`` (None: either, FLAME's first)."""
    if texture is None:
        return list(TEXTURE_FILES)
    if texture not in TEXTURE_KINDS:
        raise AssetError(f"unknown texture space {texture!r}; choose one of {sorted(TEXTURE_KINDS)}")
    return [TEXTURE_KINDS[texture]]


def _ffhq_center(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, 68, 3) landmarks -> (B, 3): a tenth of the way from the eye midpoint to the mouth midpoint."""
    eyes = 0.5 * (landmarks[:, LEFT_EYE].mean(1) + landmarks[:, RIGHT_EYE].mean(1))
    mouth = 0.5 * (landmarks[:, MOUTH_LEFT] + landmarks[:, MOUTH_RIGHT])
    return eyes + 0.1 * (mouth - eyes)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
