"""The synthetic world: identities, photos of them, the true photo under any codes, and folders.

A photo is ``render(identity, codes, tform, nuisance_seed)``:

- the identity owns the appearance: its albedo (from its ``tex`` code, with freckles and moles),
  hair, skin shine; ``codes.tex`` is not read (an edit keeps the person);
- the codes' shape, expression and pose pose FLAME; ``cam`` (DECA's orthographic camera in the
  224² crop frame) and the crop transform ``tform`` place it in the photo, exactly as
  :meth:`diffrig.deca.rig.DECA.decode` with ``tform`` does; ``light`` (SH) shades the skin and
  its dominant direction lights a specular term;
- the nuisance seed draws the backdrop and the clothes.

The mesh is rasterized with the rig's rasterizer and DECA's conventions, so ``DECA.decode(codes,
size=S, tform=tform)`` gives buffers whose alpha is the photo's face and whose normals shade it.
Only faces turned towards the camera that may cover a pixel centre are rasterized, which leaves
the picture of a closed mesh such as the built-in head unchanged. UV maps (albedo with freckles
and moles, head coordinates) are built at twice the photo's side, at most the rig's UV size: as
fine as the photo samples them.

Each photo is framed like an FFHQ-aligned portrait: the camera puts the FFHQ crop square of its
own landmarks (the rule of ``scripts/align.py``: centre a tenth of the way from the eyes to the
mouth, side ``max(4 |eye to eye|, 3.6 |eye to mouth|)``) onto the whole picture, with a little
jitter; the crop transform is then DECA's rule on those landmarks (:mod:`diffrig.data.crop`) and
the camera is re-expressed in that crop's frame, as DECA's encoder would report it.

Randomness is seeded per identity and per photo (:mod:`diffrig.data.synthetic.priors`), so photo
``k`` of identity ``i`` is drawn the same in any batch or folder; rendered floats may differ in
their last bits between batch compositions (BLAS), and the same call gives the same bytes.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import partial
from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffrig.data.crop import CROP_SIZE, crop_transform
from diffrig.data.png import encode_png
from diffrig.data.synthetic import appearance
from diffrig.data.synthetic.appearance import HeadAtlas
from diffrig.data.synthetic.priors import (
    IDENTITY_STREAM,
    NUISANCE_STREAM,
    PHOTO_STREAM,
    HairStyle,
    SkinStyle,
    SpecularStyle,
    derived_seed,
    dominant_light,
    generator,
    sample_identity,
    sample_photo,
)
from diffrig.data.synthetic.sidecar import PortraitTruth, sidecar_path, write_sidecar
from diffrig.deca.codes import RigCodes
from diffrig.deca.rasterizer import rasterize
from diffrig.deca.render import DEPTH_OFFSET, orthographic_project, sh_shading, transform_points, vertex_normals
from diffrig.errors import DataError
from diffrig.rigs import head_rotation, jaw_pose

WORLD_FORMAT = "diffrig.synthetic.world/1"
WORLD_FOLDER = "world"  # DIR/world/world.json, DIR/world/identities.json
MIN_SIZE, MAX_SIZE = 64, 256
PIXEL_SLACK = 0.01  # pixels of tolerance when discarding faces that cover no pixel centre
COVER_MARGIN = 1e-3  # squared pixels: a pixel centre this close to a face's edge may be inside it
IDENTITY_CACHE = 32  # identities whose UV maps stay in memory (0.8 MB each at 256² UV)
UV_TEXELS_PER_PIXEL = 2  # UV map side per photo side (at most the rig's UV size)
MAX_DEFAULT_WORKERS = 8  # write_folder's default worker processes, at most (each holds a batch's tensors)

# 68-point landmark indices of the FFHQ alignment rule
RIGHT_EYE, LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT = slice(36, 42), slice(42, 48), 48, 54


@dataclass
class Identity:
    """One person of the world: FLAME shape (100,) and albedo tex (50,) codes, hair, skin detail
    (freckles and moles placed from ``skin_seed``) and skin shine."""

    index: int
    shape: torch.Tensor
    tex: torch.Tensor
    hair: HairStyle
    skin: SkinStyle
    specular: SpecularStyle
    skin_seed: int

    def to_dict(self) -> dict:
        """JSON-ready description (the world re-creates it from its index; this is for reading)."""
        def plain(value):
            return value.tolist() if isinstance(value, torch.Tensor) else value

        out = {"index": self.index, "shape": self.shape.tolist(), "tex": self.tex.tolist(), "skin_seed": self.skin_seed}
        for group in ("hair", "skin", "specular"):
            out[group] = {name: plain(value) for name, value in vars(getattr(self, group)).items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Identity:
        def group(kind, values):
            return kind(**{f.name: torch.tensor(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                           for f in fields(kind)})

        return cls(index=int(data["index"]), shape=torch.tensor(data["shape"]), tex=torch.tensor(data["tex"]),
                   hair=group(HairStyle, data["hair"]), skin=group(SkinStyle, data["skin"]),
                   specular=group(SpecularStyle, data["specular"]), skin_seed=int(data["skin_seed"]))


@dataclass
class Portraits:
    """Photos to render: codes (B), crop transforms (B, 3, 3) (PNG pixel -> crop pixel), and per
    photo its identity index, image index and nuisance seed (backdrop and clothes)."""

    codes: RigCodes
    tform: torch.Tensor
    identity: list[int]
    image: list[int]
    nuisance_seed: list[int]

    def __len__(self) -> int:
        return self.codes.batch_size

    def truth(self, index: int, size: int, world_seed: int, deca_dir: str) -> PortraitTruth:
        return PortraitTruth(codes=self.codes[index].to("cpu"), tform=self.tform[index].cpu(), size=size,
                             identity=self.identity[index], image=self.image[index],
                             nuisance_seed=self.nuisance_seed[index], world_seed=world_seed, deca_dir=deca_dir)

    @classmethod
    def cat(cls, items: Sequence[Portraits]) -> Portraits:
        return cls(codes=RigCodes.cat([p.codes for p in items]), tform=torch.cat([p.tform for p in items]),
                   identity=sum((p.identity for p in items), []), image=sum((p.image for p in items), []),
                   nuisance_seed=sum((p.nuisance_seed for p in items), []))


class SyntheticWorld:
    """Portraits of procedural people rendered with a DECA rig (the built-in one by default).

    deca_dir: a DECA data folder or ``"builtin"``; rig: anything with the ``flame``,
    ``albedo_space`` and ``renderer`` of a rig, such as a loaded :class:`~diffrig.deca.rig.DECA`
    (overrides ``deca_dir``); size: side of the photos (64 to 256); seed: the world (identities
    and photos); device: where rendering runs.

    ``identity(i)`` -> :class:`Identity`; ``sample(identity, images)`` -> :class:`Portraits`
    (codes, crop transforms, nuisance seeds); ``render(identity, codes, tform, seeds)`` -> photos
    (B, 3, S, S) in [0, 1], the truth under any (edited) codes; ``render_layers`` adds the masks;
    ``write_folder(dir, identities, per_identity)`` writes PNGs with ground-truth sidecars.
    """

    def __init__(self, deca_dir: str | PathLike = "builtin", size: int = 64, seed: int = 0,
                 device: str | torch.device = "cpu", rig=None):
        if not MIN_SIZE <= int(size) <= MAX_SIZE:
            raise DataError(f"synthetic portraits are {MIN_SIZE} to {MAX_SIZE} pixels wide, got {size}")
        self.size, self.seed, self.deca_dir = int(size), int(seed), str(deca_dir)
        self.device = torch.device(device)
        if rig is None:
            rig = _load_rig(deca_dir)
        self.flame = rig.flame.to(self.device)
        self.renderer = rig.renderer.to(self.device)
        # UV maps only as fine as the photos sample them: about two texels per pixel across the face
        uv_size = min(rig.albedo_space.uv_size, UV_TEXELS_PER_PIXEL * self.size)
        self.albedo = UVAlbedo(rig.albedo_space, uv_size)
        atlas = appearance.build_atlas(self.flame, self.renderer.face_uvcoords, uv_size)
        self.atlas: HeadAtlas = atlas
        self._head_coordinates = atlas.coordinates[None].to(self.device)
        self._anchors = atlas.anchors.to(self.device)
        self._helper_weights = atlas.helper_weights.to(self.device)
        self._chin = atlas.chin.to(self.device).view(1, 1, 3)
        self._maps: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._posed: tuple[RigCodes, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._corner_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    # ------------------------------------------------------------------------- people and photos

    def identity(self, index: int) -> Identity:
        """Identity ``index`` of this world (deterministic)."""
        shape, tex, hair, skin, shine = sample_identity(generator(self.seed, IDENTITY_STREAM, index))
        return Identity(index=int(index), shape=shape, tex=tex, hair=hair, skin=skin, specular=shine,
                        skin_seed=derived_seed(self.seed, IDENTITY_STREAM, index, 1))

    @torch.no_grad()
    def sample(self, identities: Identity | Sequence[Identity], images: int | Iterable[int]) -> Portraits:
        """Photos ``images`` (indices, or a count from 0) of one identity, or of one identity per
        image: pose, expression, light and framing drawn from the priors, each photo seeded by
        (world seed, identity, image) alone."""
        images = list(range(images)) if isinstance(images, int) else [int(k) for k in images]
        people = [identities] * len(images) if isinstance(identities, Identity) else list(identities)
        if len(people) != len(images):
            raise ValueError(f"{len(people)} identities for {len(images)} images")
        draws = [sample_photo(generator(self.seed, PHOTO_STREAM, p.index, k),
                              derived_seed(self.seed, NUISANCE_STREAM, p.index, k)) for p, k in zip(people, images)]
        angles = torch.stack([d.angles for d in draws])
        pose = torch.cat([head_rotation(angles[:, 0], angles[:, 1], angles[:, 2]),
                          jaw_pose(torch.tensor([d.jaw for d in draws]))], dim=1)
        codes = RigCodes(
            shape=torch.stack([p.shape for p in people]), tex=torch.stack([p.tex for p in people]),
            exp=torch.stack([d.exp for d in draws]), pose=pose.float(), cam=torch.zeros(len(draws), 3),
            light=torch.stack([d.light for d in draws]),
        ).to(self.device)
        zoom = torch.tensor([d.zoom for d in draws], device=self.device)
        shift = torch.stack([d.shift for d in draws]).to(self.device)
        posed = self.flame(codes.shape, codes.exp, codes.pose)[:2]
        cam, tform = self._frame(posed[1], zoom, shift)
        portraits = Portraits(codes=codes.replace(cam=cam), tform=tform, identity=[p.index for p in people],
                              image=images, nuisance_seed=[d.nuisance_seed for d in draws])
        self._posed = (portraits.codes, posed)
        return portraits

    def _frame(self, landmarks: torch.Tensor, zoom: torch.Tensor,
               shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FFHQ-like framing of posed heads, from FLAME's landmarks2d (B, 68, 3): (camera in the
        crop frame (B, 3), tform (B, 3, 3))."""
        xy = landmarks[..., :2].double()
        eye_right, eye_left = xy[:, RIGHT_EYE].mean(1), xy[:, LEFT_EYE].mean(1)
        eye_mid = 0.5 * (eye_right + eye_left)
        eye_to_mouth = 0.5 * (xy[:, MOUTH_LEFT] + xy[:, MOUTH_RIGHT]) - eye_mid
        centre = eye_mid + 0.1 * eye_to_mouth
        side = torch.maximum(4 * (eye_left - eye_right).norm(dim=1), 3.6 * eye_to_mouth.norm(dim=1))
        scale = 2 / side * torch.exp(zoom.double())
        shift = shift.double()
        image_cam = torch.stack([scale, -centre[:, 0] + shift[:, 0] / scale, -centre[:, 1] - shift[:, 1] / scale], 1)

        normalized = orthographic_project(landmarks.double(), image_cam)[..., :2]
        pixels = (normalized + 1) * self.size / 2 - 0.5  # pixel centres, as a landmark detector reports
        tform = crop_transform(pixels)
        return _camera_in_crop(image_cam, tform, self.size).float(), tform.float()

    # ------------------------------------------------------------------------- rendering

    def render(self, identities: Identity | Sequence[Identity], codes: RigCodes, tform: torch.Tensor,
               nuisance_seeds: int | Sequence[int], ffhq_center: torch.Tensor | None = None) -> torch.Tensor:
        """The true photos (B, 3, S, S) in [0, 1] of ``identities`` (one, or one per photo) under
        ``codes`` (B), seen through crop transforms ``tform`` (B, 3, 3) (or (3, 3)), with the
        backdrop and clothes of ``nuisance_seeds``. ``ffhq_center`` (B, 3) moves each mesh so
        that its FFHQ centre lands there, as :meth:`DECA.decode` does for edits.
        """
        return self.render_layers(identities, codes, tform, nuisance_seeds, ffhq_center)["photo"]

    @torch.no_grad()
    def render_layers(self, identities: Identity | Sequence[Identity], codes: RigCodes, tform: torch.Tensor,
                      nuisance_seeds: int | Sequence[int],
                      ffhq_center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`render` and its layers: ``photo`` (B, 3, S, S); coverages (B, 1, S, S) of the
        ``face`` (the rig's mesh, DECA's alpha), ``scalp_hair`` (hair on the mesh),
        ``hair_back`` (hair around the head) and ``clothes``; ``normal`` (B, 3, S, S)."""
        codes = codes.to(self.device)
        batch = codes.batch_size
        people = [identities] * batch if isinstance(identities, Identity) else list(identities)
        seeds = [int(nuisance_seeds)] * batch if isinstance(nuisance_seeds, int) else [int(s) for s in nuisance_seeds]
        if len(people) != batch or len(seeds) != batch:
            raise ValueError(f"render needs one identity and nuisance seed per photo: {batch} photos, "
                             f"{len(people)} identities, {len(seeds)} seeds")
        tform = tform.to(self.device).float()
        tform = tform.expand(batch, 3, 3) if tform.dim() == 2 else tform

        vertices, landmarks = self._pose(codes)
        shift = torch.zeros(batch, 1, 3, device=self.device)
        if ffhq_center is not None:
            shift = (ffhq_center.to(vertices).view(-1, 3) - _ffhq_center(landmarks)).view(-1, 1, 3)
            vertices = vertices + shift
        crop_to_image = torch.linalg.inv(tform).transpose(1, 2)

        def to_image(points: torch.Tensor) -> torch.Tensor:
            projected = orthographic_project(points, codes.cam)
            return transform_points(projected, crop_to_image, [CROP_SIZE, CROP_SIZE], [self.size, self.size])

        surface = self._rasterize(vertices, to_image(vertices))
        helpers = to_image(torch.cat([self._helper_weights @ vertices[:, self._anchors], self._chin + shift], 1))
        head = _sample(self._head_coordinates, surface.uv)
        groups = self._albedo_groups(people)
        if len(groups) == 1:
            albedo = _sample(self._maps[next(iter(groups))][None], surface.uv)
        else:
            which = torch.empty(batch, dtype=torch.long)
            for slot, photos in enumerate(groups.values()):
                which[photos] = slot
            maps = torch.stack([self._maps[key] for key in groups]).index_select(0, which.to(self.device))
            albedo = F.grid_sample(maps, surface.uv, mode="bilinear", padding_mode="zeros", align_corners=False)

        hairs = [p.hair for p in people]
        hair_colour, scalp_cover = appearance.scalp_hair(hairs, head)
        direction, intensity = dominant_light(codes.light.float())
        strength = torch.tensor([p.specular.strength for p in people], device=self.device)[:, None, None, None]
        exponent = torch.tensor([p.specular.exponent for p in people], device=self.device)
        shine = appearance.shine_zone(head) * (1 - scalp_cover) * strength
        skin = albedo * sh_shading(surface.normal, codes.light) + appearance.specular(
            surface.normal, direction, intensity, shine, exponent)
        face = skin + (hair_colour - skin) * scalp_cover

        frame = appearance.head_frame(helpers[:, :4, :2])
        eye_distance = frame.radius * (self.atlas.eye_distance / self.atlas.radius)
        nuisances = [appearance.sample_nuisance(seed) for seed in seeds]
        hair_back, hair_back_cover = appearance.hair_back_layer(hairs, frame, self.size)
        clothes, clothes_cover = appearance.clothes_layer(nuisances, helpers[:, 4, :2], eye_distance, self.size)
        photo = appearance.background(nuisances, self.size, self.device)
        photo = photo + (hair_back - photo) * hair_back_cover
        photo = photo + (face - photo) * surface.alpha
        photo = photo + (clothes - photo) * clothes_cover
        return {"photo": photo.clamp(0.0, 1.0), "face": surface.alpha, "scalp_hair": scalp_cover * surface.alpha,
                "hair_back": hair_back_cover, "clothes": clothes_cover, "normal": surface.normal}

    def _pose(self, codes: RigCodes) -> tuple[torch.Tensor, torch.Tensor]:
        """FLAME's vertices and landmarks2d of ``codes``, reusing those of the last :meth:`sample`
        when these are its codes (writing a folder poses every head once)."""
        if self._posed is not None:
            last, posed = self._posed
            if all(torch.equal(getattr(last, name), getattr(codes, name)) for name in ("shape", "exp", "pose")):
                return posed
        return self.flame(codes.shape, codes.exp, codes.pose)[:2]

    def _corner_ids(self, batch: int, num_vertices: int) -> torch.Tensor:
        """Vertex ids (3 corners, B*F) of the faces of ``batch`` meshes in their flattened (B*V,)
        vertices (cached: the same for every batch of a size)."""
        if self._corner_cache is None or self._corner_cache[0] != (batch, num_vertices):
            offset = torch.arange(batch, device=self.device)[None, :, None] * num_vertices
            self._corner_cache = (batch, num_vertices), (self.renderer.faces.t()[:, None, :] + offset).reshape(3, -1)
        return self._corner_cache[1]

    def _rasterize(self, vertices: torch.Tensor, screen: torch.Tensor) -> _Surface:
        """Rasterize the posed meshes (B, V, 3) at their image-frame positions ``screen``.

        As the rig's renderer (same rasterizer, DECA's depth offset, interpolated world normals and
        UVs), but only faces turned towards the camera that may cover a pixel centre are
        rasterized: on a closed mesh the visible surface is the same, at a fraction of the cost.
        A face is dropped when its bounding box holds no pixel centre or, for boxes of up to 2 x 2
        centres (most at small sizes), when every centre lies clearly outside it (by
        :data:`COVER_MARGIN`, far above rounding). (Gathers use ``index_select``, much faster on
        CPU than advanced indexing.)
        """
        faces = self.renderer.faces
        batch, num_faces = vertices.shape[0], faces.shape[0]
        pixels = (screen[:, :, :2] + 1) * (self.size / 2) - 0.5  # pixel-centre units
        # coordinates as contiguous (B*V,) rows and corner ids as (3, B*F) rows: dense elementwise work
        by_coord = pixels.reshape(-1, 2).t().contiguous()
        corner_ids = self._corner_ids(batch, vertices.shape[1])
        corners = [[coord.index_select(0, ids) for ids in corner_ids] for coord in by_coord]
        (ax, bx, cx), (ay, by, cy) = corners
        # the screen's y points down: a face turned towards the camera runs clockwise there
        keep = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax) < 0
        # faces whose bounding box holds no pixel centre cover nothing: many of them at small sizes
        first_centre, centres = [], []
        for a, b, c in corners:
            low, high = torch.minimum(torch.minimum(a, b), c), torch.maximum(torch.maximum(a, b), c)
            first, last = torch.ceil(low - PIXEL_SLACK), torch.floor(high + PIXEL_SLACK)
            keep &= (first <= last) & (high > -1) & (low < self.size)
            first_centre.append(first)
            centres.append(last - first)  # pixel centres in the box along this axis, less one
        candidate = keep.nonzero().squeeze(1)  # flat (mesh, face)
        # of the faces whose box holds at most 2 x 2 pixel centres (most, at small sizes), those
        # that clearly leave all of them outside cover nothing either
        ax, bx, cx, ay, by, cy, px, py, extra_x, extra_y = (
            t.index_select(0, candidate) for t in (ax, bx, cx, ay, by, cy, *first_centre, *centres))
        small = (extra_x <= 1) & (extra_y <= 1)
        inside = [small.clone() for _ in range(4)]  # centres (px, py), (px + 1, py), (px, py + 1), (px + 1, py + 1)
        for ux, uy, vx, vy in ((ax, ay, bx, by), (bx, by, cx, cy), (cx, cy, ax, ay)):
            # edge function of (u -> v) at the first centre and its steps: <= 0 on the face's side
            edge, step_x, step_y = (vx - ux) * (py - uy) - (vy - uy) * (px - ux), uy - vy, vx - ux
            inside[0] &= edge <= COVER_MARGIN
            inside[1] &= edge + step_x <= COVER_MARGIN
            inside[2] &= edge + step_y <= COVER_MARGIN
            inside[3] &= edge + step_x + step_y <= COVER_MARGIN
        covers = inside[0] | (inside[1] & (extra_x > 0)) | (inside[2] & (extra_y > 0)) | (
            inside[3] & (extra_x > 0) & (extra_y > 0))
        candidate = candidate[covers | ~small]
        # the kept faces of each mesh first, in mesh order (the rest of a row is padding)
        mesh, face_of = candidate // num_faces, candidate % num_faces
        count = torch.bincount(mesh, minlength=batch)
        row_length = max(int(count.max()), 1)
        start = torch.cumsum(count, 0) - count
        slot = mesh * row_length + torch.arange(candidate.numel(), device=self.device) - start.index_select(0, mesh)
        order = torch.zeros(batch * row_length, dtype=torch.long, device=self.device)
        order = order.index_copy(0, slot, face_of).view(batch, row_length)
        kept = faces.index_select(0, order.reshape(-1)).view(batch, -1, 3)
        kept = kept * (torch.arange(order.shape[1], device=self.device) < count[:, None])[..., None]
        fragments = rasterize(screen + screen.new_tensor([0.0, 0.0, DEPTH_OFFSET]), kept, self.size, self.size)

        covered = fragments.pix_to_face >= 0
        pixel = covered.view(-1).nonzero().squeeze(1)  # interpolate where a face is, only
        face = order.reshape(-1).index_select(
            0, fragments.pix_to_face.view(-1).index_select(0, pixel) + pixel // self.size**2 * order.shape[1])
        bary = fragments.bary_coords.view(-1, 3).index_select(0, pixel)  # (N, 3)
        normals = vertex_normals(vertices, faces).view(-1, 3)
        corner_vertices = faces.index_select(0, face) + (pixel // self.size**2 * vertices.shape[1])[:, None]

        def interpolate(corners: torch.Tensor) -> torch.Tensor:  # (N, 3 corners, D) -> (N, D)
            values = bary[:, 0:1] * corners[:, 0]
            values = torch.addcmul(values, bary[:, 1:2], corners[:, 1])
            return torch.addcmul(values, bary[:, 2:3], corners[:, 2])

        normal = torch.zeros(covered.numel(), 3, device=self.device).index_copy_(
            0, pixel, interpolate(normals.index_select(0, corner_vertices.view(-1)).view(-1, 3, 3)))
        uv = torch.zeros(covered.numel(), 2, device=self.device).index_copy_(
            0, pixel, interpolate(self.renderer.face_uvcoords.index_select(0, face)))
        shape = (batch, self.size, self.size)
        return _Surface(alpha=covered[:, None].float(), normal=normal.view(*shape, 3).permute(0, 3, 1, 2),
                        uv=uv.view(*shape, 2))

    def _albedo_groups(self, people: Sequence[Identity]) -> dict[tuple, list[int]]:
        """Photo indices per identity (keyed as the map cache is), making sure every identity's
        albedo map is cached."""
        groups: dict[tuple, list[int]] = {}
        todo: dict[tuple, Identity] = {}
        for photo, person in enumerate(people):
            key = _map_key(person)
            groups.setdefault(key, []).append(photo)
            if key not in self._maps:
                todo[key] = person
        if todo:
            people = list(todo.values())
            albedo = self.albedo(torch.stack([p.tex for p in people]).to(self.device))
            appearance.add_skin_detail(albedo, self.atlas, [p.skin for p in people], [p.skin_seed for p in people])
            self._maps.update(zip(todo, albedo))
        for key in groups:
            self._maps.move_to_end(key)
        while len(self._maps) > max(IDENTITY_CACHE, len(groups)):
            self._maps.popitem(last=False)
        return groups

    def albedo_map(self, identity: Identity) -> torch.Tensor:
        """The identity's UV albedo (3, U, U): its tex code's albedo with its freckles and moles."""
        self._albedo_groups([identity])
        return self._maps[_map_key(identity)]

    def render_portraits(self, portraits: Portraits) -> torch.Tensor:
        """The photos (B, 3, S, S) of sampled portraits."""
        people = {index: self.identity(index) for index in set(portraits.identity)}
        return self.render([people[i] for i in portraits.identity], portraits.codes, portraits.tform,
                           portraits.nuisance_seed)

    # ------------------------------------------------------------------------- folders

    def write_folder(self, output_dir: str | PathLike, identities: int | Iterable[int], per_identity: int,
                     first_image: int = 0, batch_size: int = 64, progress: bool = False,
                     workers: int | None = None) -> list[Path]:
        """Write photos ``first_image .. first_image + per_identity - 1`` of each identity (a count
        from 0, or indices) into a flat folder with sidecars (see :mod:`diffrig.data.synthetic`).
        Returns the PNG paths, in order.

        workers: processes rendering batches side by side on the CPU, each single-threaded
        (default: one per core this process may use, at most :data:`MAX_DEFAULT_WORKERS`; 1
        renders here, with this process's threads). One process per core is the fastest way to
        use a CPU: a batch is many small tensor operations, which threads barely speed up. On Linux the workers are forked from
        this process (they start at once and share its world); elsewhere they are spawned and
        each loads the rig from ``deca_dir`` (a few seconds), so a script calling this must guard
        its main code with ``if __name__ == "__main__":``. Folders of one batch, and worlds on a
        GPU, are rendered here. The batches, hence the bytes written, are the same for any
        number of workers.
        """
        identities = list(range(identities)) if isinstance(identities, int) else [int(i) for i in identities]
        workers = _default_workers() if workers is None else workers
        if not identities or per_identity < 1 or first_image < 0 or batch_size < 1 or workers < 1:
            raise DataError("nothing to write: give at least one identity and one image per identity, a first "
                            "image index of 0 or more, and a batch size and worker count of at least 1")
        output = Path(output_dir)
        (output / WORLD_FOLDER).mkdir(parents=True, exist_ok=True)
        description = {"format": WORLD_FORMAT, "seed": self.seed, "size": self.size, "deca_dir": self.deca_dir}
        world_file = output / WORLD_FOLDER / "world.json"
        if world_file.is_file() and json.loads(world_file.read_text()) != description:
            raise DataError(f"{output} holds portraits of another synthetic world ({world_file.read_text().strip()}); "
                            "write this one to another folder")
        world_file.write_text(json.dumps(description, indent=2) + "\n")
        described = output / WORLD_FOLDER / "identities.json"
        # identity key -> its JSON text (encoded where it is rendered: in the workers)
        catalogue = {key: json.dumps(value, sort_keys=True)
                     for key, value in (json.loads(described.read_text()) if described.is_file() else {}).items()}
        jobs = [(i, k) for i in identities for k in range(first_image, first_image + per_identity)]
        batches = [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]
        with tqdm(total=len(jobs), desc="portraits", unit="img", disable=not progress) as bar:
            if workers > 1 and len(batches) > 1 and self.device.type == "cpu":
                forking = sys.platform.startswith("linux")  # fork is unsafe with macOS system libraries
                context = multiprocessing.get_context("fork" if forking else "spawn")
                with context.Pool(min(workers, len(batches)), initializer=_start_worker,
                                  initargs=(self,) if forking else (self.deca_dir, self.size, self.seed)) as pool:
                    for count, described_here in pool.imap_unordered(partial(_worker_writes, output), batches):
                        catalogue.update(described_here)
                        bar.update(count)
            else:
                catalogue.update(self._write_batches(output, batches, bar))
        # what json.dumps(catalogue, sort_keys=True) writes, from the encoded entries
        entries = (f"{json.dumps(key)}: {catalogue[key]}" for key in sorted(catalogue))
        described.write_text("{" + ", ".join(entries) + "}\n")
        return [output / f"{i:05d}_{k:04d}.png" for i, k in jobs]

    def _write_batches(self, output: Path, batches: list[list[tuple[int, int]]], bar=None) -> dict[str, str]:
        """Render and write batches of (identity, image) jobs; returns the identities' descriptions
        (JSON text by identity key).
        PNG and sidecar writing (zlib and file I/O) overlaps the next batch's rendering."""
        catalogue: dict[str, str] = {}
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=1) as writer:
            for batch in batches:
                people = {i: self.identity(i) for i, _ in batch}
                catalogue.update({f"{i:05d}": json.dumps(person.to_dict(), sort_keys=True)
                                  for i, person in people.items()})
                portraits = self.sample([people[i] for i, _ in batch], [k for _, k in batch])
                photos = self.render([people[i] for i, _ in batch], portraits.codes, portraits.tform,
                                     portraits.nuisance_seed)
                pixels = (photos * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                truths = [portraits.truth(index, self.size, self.seed, self.deca_dir) for index in range(len(batch))]
                paths = [output / f"{i:05d}_{k:04d}.png" for i, k in batch]
                pending.append(writer.submit(_write_portraits, paths, pixels, truths))
                while len(pending) > 1:
                    pending.popleft().result()
                if bar is not None:
                    bar.update(len(batch))
            while pending:
                pending.popleft().result()
        return catalogue


def _map_key(identity: Identity) -> tuple:
    """What an identity's albedo map depends on."""
    return identity.index, identity.skin_seed, identity.tex.numpy().tobytes(), repr(identity.skin)


_WORKER_WORLD: SyntheticWorld | None = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _default_workers() -> int:
    """One worker per CPU core this process may use (its affinity and, in a container, its cgroup
    CPU quota), at most :data:`MAX_DEFAULT_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def _start_worker(world: SyntheticWorld | str, size: int | None = None, seed: int | None = None) -> None:
    """Set up a worker process: the forked parent's world, or a new one from ``deca_dir``."""
    global _WORKER_WORLD
    torch.set_num_threads(1)
    _retain_freed_memory()
    _WORKER_WORLD = world if isinstance(world, SyntheticWorld) else SyntheticWorld(world, size=size, seed=seed)


def _retain_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks instead of returning them to the system: rendering
    allocates and frees megabytes per step, and fresh pages cost page faults (~20% of a
    worker's time). Only in the worker processes this module starts; other C libraries: no-op."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def _worker_writes(output: Path, batch: list[tuple[int, int]]) -> tuple[int, dict[str, str]]:
    return len(batch), _WORKER_WORLD._write_batches(output, [batch])


def _write_portraits(paths: list[Path], pixels: np.ndarray, truths: list[PortraitTruth]) -> None:
    """PNGs (B, S, S, 3) uint8 and their sidecars."""
    for path, image, truth in zip(paths, pixels, truths):
        path.write_bytes(encode_png(image))
        write_sidecar(sidecar_path(path), truth)


@dataclass
class _Surface:
    """Rasterized meshes: alpha (B, 1, S, S), world normal (B, 3, S, S) (0 off the mesh), uv
    (B, S, S, 2) in grid_sample coordinates."""

    alpha: torch.Tensor
    normal: torch.Tensor
    uv: torch.Tensor


def _sample(maps: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookups (as the rig's renderer does) of one map (1, C, U, U) at the pixels' UVs
    (B, S, S, 2) of several photos -> (B, C, S, S), in one call (the photos stacked as rows)."""
    batch, height, width, _ = uv.shape
    looked_up = F.grid_sample(maps, uv.reshape(1, batch * height, width, 2), mode="bilinear",
                              padding_mode="zeros", align_corners=False)
    return looked_up.view(maps.shape[1], batch, height, width).transpose(0, 1)


class UVAlbedo:
    """``AlbedoSpace(tex)`` (B, 3, U, U) nearest-neighbour resized to ``size`` (default: the
    space's UV size), computed at only the texels the resize keeps (a quarter of DECA's 512² map
    for a 256² UV map): same values, a fraction of the work."""

    def __init__(self, space, size: int | None = None):
        side, size = space.texture_side, space.uv_size if size is None else int(size)
        index = torch.floor(torch.arange(size, dtype=torch.float64) * (side / size)).long().clamp(max=side - 1)
        bgr_to_rgb = torch.tensor([2, 1, 0])  # the spaces store B, G, R pixel by pixel
        keep = ((index[:, None] * side + index[None, :])[None] * 3 + bgr_to_rgb[:, None, None]).reshape(-1)
        self.size = size
        self.mean = space.mean[:, keep].clone()
        self.basis = space.basis[:, keep].clone()

    def __call__(self, tex: torch.Tensor) -> torch.Tensor:
        self.mean, self.basis = self.mean.to(tex.device), self.basis.to(tex.device)
        flat = torch.mm(tex.to(self.basis.dtype), self.basis).add_(self.mean)  # addmm would copy the mean first
        return flat.view(-1, 3, self.size, self.size)


def _camera_in_crop(image_cam: torch.Tensor, tform: torch.Tensor, size: int) -> torch.Tensor:
    """Re-express an orthographic camera of the S² image frame in the crop frame of ``tform``.

    ``DECA.decode(tform=...)`` maps crop coordinates ``c`` to image coordinates
    ``n = ((c + 1) * 112 - t) / k * 2 / S - 1`` (``k``, ``t``: scale and shift of tform), so
    ``n = a c + b`` per axis, and a camera ``(s, tx, ty)`` of the image is ``(s / a, tx - b_x / s,
    ty + b_y / s)`` of the crop (y is negated by the projection).
    """
    tform = tform.double()
    k = tform[:, 0, 0]
    if not torch.allclose(tform[:, 0, 1], torch.zeros_like(k)) or not torch.allclose(tform[:, 1, 1], k):
        raise ValueError("the crop transform must be a uniform scale plus a shift")
    half = CROP_SIZE / 2
    a = 2 * half / (k * size)
    b = (half - tform[:, :2, 2]) * 2 / (k[:, None] * size) - 1
    scale = image_cam[:, 0]
    return torch.stack([scale / a, image_cam[:, 1] - b[:, 0] / scale, image_cam[:, 2] + b[:, 1] / scale], dim=1)


def _ffhq_center(landmarks: torch.Tensor) -> torch.Tensor:
    from diffrig.deca.rig import _ffhq_center as rig_ffhq_center

    return rig_ffhq_center(landmarks)


def _load_rig(deca_dir: str | PathLike):
    """FLAME, albedo space and buffer renderer of a DECA folder (the encoder is not needed)."""
    from types import SimpleNamespace

    from diffrig.deca.assets import asset_path, resolve_deca_dir
    from diffrig.deca.codes import CODE_SIZES
    from diffrig.deca.files import TEXTURE_FILES
    from diffrig.deca.flame import FLAME
    from diffrig.deca.formats import read_obj
    from diffrig.deca.render import BufferRenderer
    from diffrig.deca.texture import AlbedoSpace

    folder = resolve_deca_dir(deca_dir)
    texture = next((folder / name for name in TEXTURE_FILES if (folder / name).is_file()), None)
    if texture is None:
        texture = asset_path(folder, TEXTURE_FILES[0])  # raises, naming the file and where to get it
    flame = FLAME.from_files(asset_path(folder, "generic_model.pkl"), asset_path(folder, "landmark_embedding.npy"),
                             n_shape=CODE_SIZES["shape"], n_exp=CODE_SIZES["exp"])
    albedo_space = AlbedoSpace.from_file(texture, n_tex=CODE_SIZES["tex"])
    renderer = BufferRenderer(read_obj(asset_path(folder, "head_template.obj")), image_size=CROP_SIZE)
    return SimpleNamespace(flame=flame, albedo_space=albedo_space, renderer=renderer)
