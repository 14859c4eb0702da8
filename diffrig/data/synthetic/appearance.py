"""What the synthetic photos show beyond DECA's buffers: hair, skin detail, shine, clothes, backdrop.

- On the head (moving with it, occluded with it): the identity's albedo with freckles and moles
  splatted into its UV map (:func:`add_skin_detail`), hair covering the scalp above an
  identity-specific hairline (:func:`scalp_hair`) and shine along the T-zone. Hairline and zones
  are defined on the neutral head through a :class:`HeadAtlas` (where every texel lies on the
  head), whatever the UV layout of the rig's mesh; they are evaluated per pixel.
- Around the projected head: the hair outline beyond the skull (:func:`hair_back_layer`,
  following the head's position, size and roll), shoulders (:func:`clothes_layer`) and a
  backdrop (:func:`background`).

Hair, clothes and backdrop are unlit: a change of the light code changes the skin only.
Per-photo tensors are batched: (B, ...) with one identity's style per photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffrig.data.synthetic.priors import Draws, HairStyle, SkinStyle, generator
from diffrig.deca.rasterizer import interpolate_face_attributes, rasterize

# 68-point (iBUG) landmark indices
BROWS = slice(17, 27)
RIGHT_EYE, LEFT_EYE = slice(36, 42), slice(42, 48)
NOSE_TIP, CHIN = 30, 8
MOUTH = slice(48, 60)

SEAM_FILL_STEPS = 6  # texels of UV-island border filled from their neighbours
EDGE_PIXELS = 1.5  # width of the soft edges of hair outlines and clothes
FRECKLE_TINT = (0.45, 0.62, 0.75)  # how much a full freckle darkens R, G, B
MOLE_TINT = (0.55, 0.68, 0.72)
SKIN_UV_SIDE = 256  # SkinStyle's radii are texels of a UV map this wide (scaled for other sides)
HEAD_CHANNELS = ("cos_azimuth", "sin_azimuth", "height", "side")  # per-texel head coordinates


@dataclass
class HeadAtlas:
    """The neutral head seen through its UV map, and its reference points (metres, FLAME axes).

    coordinates: (4, U, U) per texel, the point of the neutral head under it expressed as cos and
    sin of its azimuth around the skull's vertical axis (0 towards +z, positive towards +x), its
    height above the brows and its sideways offset, both in eye distances (UV islands are grown by
    a few texels so bilinear lookups near seams read sensible values); covered: (U, U) bool,
    texels inside a UV triangle; freckle_cdf, mole_cdf: (U * U,) float64 cumulative weights of
    the texels where freckles (cheeks, nose) and moles (face below the brows) may sit.

    eye_distance (m); centre (3,): skull centre; radius: skull half width (m);
    anchors (4,) vertex indices and helper_weights (4, 4): affine weights over the anchors of the
    helper points centre, centre + radius * (up, right, front), so posed helpers are
    ``helper_weights @ posed_vertices[anchors]``; chin (3,): the chin landmark at rest.
    """

    coordinates: torch.Tensor
    covered: torch.Tensor
    freckle_cdf: torch.Tensor
    mole_cdf: torch.Tensor
    eye_distance: float
    centre: torch.Tensor
    radius: float
    anchors: torch.Tensor
    helper_weights: torch.Tensor
    chin: torch.Tensor

    @property
    def size(self) -> int:
        return self.coordinates.shape[-1]


def build_atlas(flame, face_uvcoords: torch.Tensor, uv_size: int) -> HeadAtlas:
    """Atlas of a rig: ``flame`` (:class:`diffrig.deca.flame.FLAME`), the renderer's per-face UV
    corners (F, 3, 2) in grid_sample coordinates, and the UV map's side."""
    device = face_uvcoords.device
    with torch.no_grad():
        zeros = [torch.zeros(1, n, device=device) for n in (flame.n_shape, flame.n_exp, 6)]
        vertices, _, landmarks = flame(*zeros)
    vertices, landmarks = vertices[0].float().cpu(), landmarks[0].float().cpu()
    faces = flame.faces.cpu()
    corners = face_uvcoords.float().cpu()
    num_faces = corners.shape[0]
    # rasterize the UV triangles: their grid coordinates are the rasterizer's screen frame
    screen = torch.cat([corners.reshape(1, -1, 2), torch.ones(1, num_faces * 3, 1)], dim=-1)
    fragments = rasterize(screen, torch.arange(num_faces * 3).view(num_faces, 3), uv_size, uv_size)
    position = interpolate_face_attributes(fragments, vertices[faces][None])[0]
    covered = fragments.pix_to_face[0] >= 0
    position = _grow_islands(position, covered, SEAM_FILL_STEPS)

    eyes = torch.stack([landmarks[RIGHT_EYE].mean(0), landmarks[LEFT_EYE].mean(0)])
    eye_distance = float((eyes[1] - eyes[0]).norm())
    brow_y = float(landmarks[BROWS, 1].mean())
    cranium = vertices[vertices[:, 1] > landmarks[NOSE_TIP, 1]]
    low, high = cranium.amin(0), cranium.amax(0)
    centre = torch.tensor([0.5 * float(low[0] + high[0]), brow_y, 0.5 * float(low[2] + high[2])])
    radius = 0.5 * float(high[0] - low[0])

    relative = position - centre[:, None, None]
    azimuth = torch.atan2(relative[0], relative[2])
    height = (position[1] - brow_y) / eye_distance
    side = (position[0] - centre[0]) / eye_distance
    coordinates = torch.stack([azimuth.cos(), azimuth.sin(), height, side])

    eye_height = float(eyes[:, 1].mean() - brow_y) / eye_distance

    def blob(x0: float, y0: float, sx: float, sy: float) -> torch.Tensor:
        return torch.exp(-0.5 * (((side - x0) / sx) ** 2 + ((height - eye_height - y0) / sy) ** 2))

    from_eyes = _distance(position, eyes).amin(0) / eye_distance
    from_mouth = _distance(position, landmarks[MOUTH].mean(0, keepdim=True))[0] / eye_distance
    skin = covered & (from_eyes > 0.3) & (from_mouth > 0.45)  # not on the eyeballs or inside the mouth
    freckle_zone = (blob(-0.55, -0.55, 0.35, 0.3) + blob(0.55, -0.55, 0.35, 0.3)
                    + 0.7 * blob(0.0, -0.4, 0.15, 0.35)) * (skin & (azimuth.abs() < 1.2))
    mole_zone = (skin & (azimuth.abs() < 1.3) & (from_eyes > 0.45) & (from_mouth > 0.6) & (height < 0.1)).float()

    anchors = torch.stack([
        torch.where(vertices[:, 1] > brow_y, vertices[:, 0], torch.inf).argmin(),  # subject's right side
        torch.where(vertices[:, 1] > brow_y, -vertices[:, 0], torch.inf).argmin(),  # left side
        vertices[:, 1].argmax(),  # top
        torch.where(vertices[:, 1] > brow_y, vertices[:, 2], torch.inf).argmin(),  # back
    ])
    helpers = torch.cat([centre[None], centre[None] + radius * torch.eye(3)[[1, 0, 2]]])  # centre, up, right, front
    helper_weights = _affine_weights(vertices[anchors].double(), helpers.double()).float()
    return HeadAtlas(
        coordinates=coordinates, covered=covered, freckle_cdf=freckle_zone.double().reshape(-1).cumsum(0),
        mole_cdf=mole_zone.double().reshape(-1).cumsum(0),
        eye_distance=eye_distance, centre=centre, radius=radius, anchors=anchors,
        helper_weights=helper_weights, chin=landmarks[CHIN],
    )


def _distance(position: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Distances (N, U, U) from texel positions (3, U, U) to points (N, 3)."""
    return torch.stack([(position - p[:, None, None]).pow(2).sum(0).sqrt() for p in points])


def _affine_weights(anchors: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Weights w (P, 4), rows summing to 1, with ``w @ anchors == points`` (anchors (4, 3))."""
    system = torch.cat([anchors.T, torch.ones(1, 4, dtype=anchors.dtype)])  # (4, 4)
    targets = torch.cat([points.T, torch.ones(1, points.shape[0], dtype=points.dtype)])  # (4, P)
    return torch.linalg.solve(system, targets).T


def _grow_islands(values: torch.Tensor, covered: torch.Tensor, steps: int) -> torch.Tensor:
    """Fill uncovered texels next to covered ones with their covered neighbours' mean, ``steps`` times."""
    values = (values * covered)[None]
    weight = covered.float()[None, None]
    for _ in range(steps):
        summed = F.avg_pool2d(values, 3, stride=1, padding=1)
        count = F.avg_pool2d(weight, 3, stride=1, padding=1)
        fill = (weight == 0) & (count > 0)
        values = torch.where(fill, summed / count.clamp(min=1e-6), values)
        weight = torch.where(fill, torch.ones_like(weight), weight)
    return values[0]


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (3 - 2 * x)


def _per_photo(styles: list, name: str, device) -> torch.Tensor:
    """A style field of every photo as (B, 1, 1) (scalars) or (B, K, 1, 1) (vectors)."""
    values = [getattr(style, name) for style in styles]
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values).to(device)[:, :, None, None]
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None, None]


# ----------------------------------------------------------------------------- on the head


def hairline(styles: list[HairStyle], azimuth: torch.Tensor) -> torch.Tensor:
    """Height of each photo's hairline (eye distances above the brows) at azimuths (B, H, W)."""
    device = azimuth.device
    front, side_drop, back_drop = (_per_photo(styles, n, device) for n in ("front", "side_drop", "back_drop"))
    turn = azimuth.abs() / math.pi  # 0 front, 0.5 ears, 1 back
    line = front + (-side_drop - front) * _smoothstep((turn - 0.22) / 0.2)
    line = line + (side_drop - back_drop) * _smoothstep((turn - 0.55) / 0.3)
    orders = torch.tensor([2.0, 3.0, 4.0], device=device)[None, :, None, None]
    wiggle, phase = _per_photo(styles, "wiggle", device), _per_photo(styles, "wiggle_phase", device)
    line = line + (wiggle * torch.sin(orders * azimuth[:, None] + phase)).sum(1)
    level, centre, width = (_per_photo(styles, n, device) for n in ("fringe_level", "fringe_centre", "fringe_width"))
    offset = (azimuth - centre).abs() / width.clamp(min=1e-3)
    bump = (1 - _smoothstep((offset - 0.6) / 0.4)) * (width > 0)
    ragged = 0.06 * torch.sin(37 * azimuth + _per_photo(styles, "strand_phase", device)[:, 0])
    return line - bump * (line - level - ragged).clamp(min=0)


def strands(styles: list[HairStyle], across: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
    """Brightness factor (B, H, W) of hair strands, about 1 +- 0.2, at a coordinate across the
    strands (radians) and one along them."""
    device = across.device
    frequency, phase = _per_photo(styles, "strand_freq", device), _per_photo(styles, "strand_phase", device)
    steps = torch.tensor([1.7, 3.4, 5.1], device=device)[None, :, None, None]
    waves = torch.sin(frequency * across[:, None] + phase + steps * along[:, None])
    return 1.0 + 0.2 * waves.mean(1)


def scalp_hair(styles: list[HairStyle], head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hair on the head: colour (B, 3, H, W), coverage (B, 1, H, W), from per-pixel head
    coordinates (B, 4, H, W) (:data:`HEAD_CHANNELS`)."""
    azimuth = torch.atan2(head[:, 1], head[:, 0])
    height = head[:, 2]
    above = height - hairline(styles, azimuth)
    coverage = _smoothstep(above / 0.12 + 0.5)
    shade = strands(styles, azimuth, height) * (0.8 + 0.2 * _smoothstep(above / 0.6))
    colour = _per_photo(styles, "colour", head.device) * shade[:, None]
    return colour.clamp(0.0, 1.0), coverage[:, None]


def shine_zone(head: torch.Tensor) -> torch.Tensor:
    """Where skin shines (B, 1, H, W), from head coordinates: more along the T-zone."""
    return (0.6 + 0.8 * torch.exp(-((head[:, 3] / 0.45) ** 2)))[:, None]


def add_skin_detail(albedo: torch.Tensor, atlas: HeadAtlas, skins: list[SkinStyle], seeds: list[int]) -> torch.Tensor:
    """Darken UV albedo maps (K, 3, U, U) in place at each identity's freckles (cheeks and nose)
    and moles (face below the brows), placed from its seed; returns them.

    Each identity draws its spots from its own generator; the spots of all maps are then splatted
    at once as Gaussians (radii in texels of a :data:`SKIN_UV_SIDE`-wide map, scaled to U).
    """
    side = atlas.size
    counts, draws, params = [], [], []
    totals = (float(atlas.freckle_cdf[-1]), float(atlas.mole_cdf[-1]))
    for skin, seed in zip(skins, seeds):
        freckles = skin.freckles if totals[0] > 0 else 0
        moles = skin.moles if totals[1] > 0 else 0
        counts += [freckles, moles]
        # per spot: place in the zone, jitter within the texel (2), size, strength
        draws.append(torch.rand(5, freckles + moles, generator=generator(seed), dtype=torch.float64))
        params += [[skin.freckle_radius * 0.7, skin.freckle_radius * 0.6, skin.freckle_strength * 0.6,
                    skin.freckle_strength * 0.8],
                   [skin.mole_radius * 0.8, skin.mole_radius * 0.4, 0.8, 0.2]]
    counts = torch.tensor(counts)
    total = int(counts.sum())
    if total == 0:
        return albedo
    u = torch.cat(draws, dim=1)
    group = torch.repeat_interleave(torch.arange(len(counts)), counts, output_size=total)  # 2 * map + kind
    radius_low, radius_span, strength_low, strength_span = torch.tensor(params, dtype=torch.float64)[group].T
    position = torch.empty(total, dtype=torch.long)
    for kind, cdf in enumerate((atlas.freckle_cdf, atlas.mole_cdf)):
        mine = (group % 2 == kind).nonzero().squeeze(1)
        if mine.numel():
            picked = torch.searchsorted(cdf, u[0, mine] * cdf[-1], right=True).clamp(max=cdf.numel() - 1)
            position[mine] = picked
    centre_row = ((position // side).double() + u[1] - 0.5).float()
    centre_col = ((position % side).double() + u[2] - 0.5).float()
    radius = ((radius_low + radius_span * u[3]) * (side / SKIN_UV_SIDE)).float()
    strength = (strength_low + strength_span * u[4]).float()

    # each spot covers the texels within ceil(2.5 radius) rows and columns of its own: the same
    # footprint whatever other spots share the batch
    reach = torch.ceil(2.5 * radius)
    offsets = torch.arange(-int(reach.max()), int(reach.max()) + 1, dtype=torch.float32)
    rows = centre_row.floor()[:, None, None] + offsets[None, :, None]  # (N, P, 1)
    cols = centre_col.floor()[:, None, None] + offsets[None, None, :]  # (N, 1, P)
    distance = (rows - centre_row[:, None, None]) ** 2 + (cols - centre_col[:, None, None]) ** 2
    value = strength[:, None, None] * torch.exp(-distance / (2 * radius[:, None, None] ** 2))
    near = offsets.abs()[None, :] <= reach[:, None]  # (N, P)
    inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side) & near[:, :, None] & near[:, None, :]
    texel = rows.clamp(0, side - 1).long() * side + cols.clamp(0, side - 1).long()  # off-map: adds 0 to a texel
    slot = (group[:, None, None] * side * side + texel).view(-1)
    sums = torch.zeros(len(counts) * side * side).index_add_(0, slot, (value * inside).view(-1))
    sums = sums.view(-1, 2, side * side).clamp_(max=1.0)  # (K, freckles / moles, U * U)

    touched = (sums[:, 0] + sums[:, 1]).view(-1).nonzero().squeeze(1)  # map * U * U + texel
    freckle, mole = (sums[:, kind].reshape(-1).index_select(0, touched) for kind in (0, 1))
    factor = (1 - torch.tensor(FRECKLE_TINT)[:, None] * freckle) * (1 - torch.tensor(MOLE_TINT)[:, None] * mole)
    map_index, texel = touched // (side * side), touched % (side * side)
    flat_index = (map_index * 3 + torch.arange(3)[:, None]) * (side * side) + texel  # (3, T)
    flat = albedo.view(-1)
    flat_index = flat_index.view(-1).to(albedo.device)
    flat.index_copy_(0, flat_index, flat.index_select(0, flat_index) * factor.view(-1).to(albedo))
    return albedo


def specular(normal: torch.Tensor, direction: torch.Tensor, intensity: torch.Tensor, strength: torch.Tensor,
             exponent: torch.Tensor) -> torch.Tensor:
    """Blinn-Phong shine (B, 3, H, W) for an orthographic camera looking down -z.

    normal: (B, 3, H, W) world normals (any length); direction, intensity: (B, 3) the light's
    dominant direction and RGB intensity; strength: (B, 1, H, W) shine map times the identity's
    strength; exponent: (B,) sharpness.
    """
    unit = F.normalize(normal, dim=1, eps=1e-6)
    half = F.normalize(direction + direction.new_tensor([0.0, 0.0, 1.0]), dim=-1, eps=1e-6)
    facing = (unit * direction[:, :, None, None]).sum(1, keepdim=True) > 0
    cosine = (unit * half[:, :, None, None]).sum(1, keepdim=True).clamp(min=0)
    lobe = cosine ** exponent[:, None, None, None] * facing
    return strength * lobe * intensity[:, :, None, None]


# ----------------------------------------------------------------------------- around the head


def pixel_axes(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in the normalized image frame (x right, y down, [-1, 1]) as x (1, 1, S) and
    y (1, S, 1): they broadcast to (1, S, S) (per-photo terms are computed per row or column)."""
    centres = (2 * torch.arange(size, device=device, dtype=torch.float32) + 1) / size - 1
    return centres.view(1, 1, size), centres.view(1, size, 1)


@dataclass
class HeadFrame:
    """The projected skull, per photo: centre (B, 2), unit up and right directions (B, 2) in the
    normalized image frame, radius (B,) in normalized units."""

    centre: torch.Tensor
    up: torch.Tensor
    right: torch.Tensor
    radius: torch.Tensor


def head_frame(helpers: torch.Tensor) -> HeadFrame:
    """From projected helper points (B, 4, 2) (centre, up, right, front, see :class:`HeadAtlas`).
    Orthographic projection keeps ``sum |P axis|^2 = 2`` over three orthogonal axes, so the image
    radius needs no knowledge of the head's rotation."""
    centre = helpers[:, 0]
    deltas = helpers[:, 1:] - centre[:, None]
    radius = (deltas.pow(2).sum(dim=(1, 2)) / 2).sqrt()
    up = F.normalize(deltas[:, 0], dim=-1, eps=1e-8)
    right = torch.stack([-up[:, 1], up[:, 0]], dim=-1)
    return HeadFrame(centre=centre, up=up, right=right, radius=radius)


def hair_back_layer(styles: list[HairStyle], frame: HeadFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hair outline around and below the skull: colour (B, 3, S, S), coverage (B, 1, S, S).

    In the head's frame (u right, v up, in skull radii): a superellipse of half width ``width``
    and height ``height`` above the centre; below it, long hair hangs ``length`` radii down,
    widening by ``flare``; short hair (negative length) ends ``-length`` above the centre.
    """
    device = frame.centre.device
    x, y = pixel_axes(size, device)
    x, y = x - frame.centre[:, 0, None, None], y - frame.centre[:, 1, None, None]  # (B, 1, S), (B, S, 1)
    radius = frame.radius[:, None, None]
    u = (x * (frame.right[:, 0, None, None] / radius) + y * (frame.right[:, 1, None, None] / radius))
    v = (x * (frame.up[:, 0, None, None] / radius) + y * (frame.up[:, 1, None, None] / radius))
    width, height, power, length, flare = (_per_photo(styles, n, device)
                                           for n in ("width", "height", "roundness", "length", "flare"))
    angle = torch.atan2(v, u)
    orders = torch.tensor([5.0, 7.0, 11.0], device=device)[None, :, None, None]
    wiggle, phase = _per_photo(styles, "wiggle", device), _per_photo(styles, "wiggle_phase", device)
    width = width * (1 + 0.5 * (wiggle * torch.sin(orders * angle[:, None] + phase)).sum(1))

    half_width = width * (1 + flare * (-v).clamp(min=0))
    extent = torch.where(v >= 0, height, length.clamp(min=1e-3))
    exponent = torch.where(v >= 0, power, torch.full_like(v, 6.0))
    shape = (u.abs() / half_width) ** power + (v.abs() / extent) ** exponent
    pixels_per_radius = radius * size / 2
    coverage = _smoothstep(0.5 + (1 - shape) * pixels_per_radius * width / power / EDGE_PIXELS)
    coverage = coverage * ((v >= 0) | (length > 0))
    coverage = coverage * torch.where(length < 0, _smoothstep((v + length) / 0.15 + 0.5), torch.ones_like(v))

    shade = 0.85 * strands(styles, 3 * angle, v)
    colour = _per_photo(styles, "colour", device) * shade[:, None]
    return colour.clamp(0.0, 1.0), coverage[:, None]


@dataclass
class Nuisance:
    """Per-photo draws that no code controls, as plain numbers: backdrop (top and bottom RGB,
    tilt, soft blobs: centres (x, y), radii, RGB, strengths) and clothes (RGB, collar depth and
    width in eye distances)."""

    top: list[float]
    bottom: list[float]
    tilt: float
    blob_centres: list[list[float]]
    blob_radii: list[float]
    blob_colours: list[list[float]]
    blob_strengths: list[float]
    clothes: list[float]
    collar_depth: float
    collar_width: float


def _muted_colour(draws: Draws, low: float, high: float) -> list[float]:
    grey = draws.uniform(low, high)
    hue = [draws.uniform() for _ in range(3)]
    saturation = draws.uniform(0.0, 0.5)
    return [min(max(grey * (1 - saturation + 2 * saturation * h), 0.0), 1.0) for h in hue]


def sample_nuisance(seed: int, blobs: int = 3) -> Nuisance:
    draws = Draws(generator(seed), uniforms=20 + 10 * blobs)
    return Nuisance(
        top=_muted_colour(draws, 0.25, 0.9),
        bottom=_muted_colour(draws, 0.15, 0.8),
        tilt=draws.uniform(-0.5, 0.5),
        blob_centres=[[draws.uniform(-1.2, 1.2), draws.uniform(-1.2, 1.2)] for _ in range(blobs)],
        blob_radii=[draws.uniform(0.2, 0.7) for _ in range(blobs)],
        blob_colours=[_muted_colour(draws, 0.1, 0.95) for _ in range(blobs)],
        blob_strengths=[draws.uniform(0.2, 0.7) for _ in range(blobs)],
        clothes=_muted_colour(draws, 0.05, 0.7),
        collar_depth=draws.uniform(0.4, 0.8),
        collar_width=draws.uniform(0.4, 0.7),
    )


def _gathered(nuisances: list[Nuisance], name: str, device) -> torch.Tensor:
    return torch.tensor([getattr(n, name) for n in nuisances], dtype=torch.float32, device=device)


def background(nuisances: list[Nuisance], size: int, device=None) -> torch.Tensor:
    """Backdrops (B, 3, S, S): a tilted vertical gradient with soft blobs of colour."""
    x, y = pixel_axes(size, device)
    top, bottom, tilt = (_gathered(nuisances, name, device) for name in ("top", "bottom", "tilt"))
    t = ((y + tilt[:, None, None] * x) * 0.5 + 0.5).clamp(0.0, 1.0)
    image = top[:, :, None, None] + (bottom - top)[:, :, None, None] * t[:, None]
    centres, radii, colours, strengths = (_gathered(nuisances, name, device) for name in
                                          ("blob_centres", "blob_radii", "blob_colours", "blob_strengths"))
    for k in range(centres.shape[1]):
        spread = 2 * radii[:, k, None, None] ** 2
        # a round Gaussian is a column profile times a row profile
        across = torch.exp(-(x - centres[:, k, 0, None, None]) ** 2 / spread)  # (B, 1, S)
        down = strengths[:, k, None, None] * torch.exp(-(y - centres[:, k, 1, None, None]) ** 2 / spread)  # (B, S, 1)
        image = image + (colours[:, k, :, None, None] - image) * (down * across)[:, None]
    return image


def clothes_layer(nuisances: list[Nuisance], chin: torch.Tensor, unit: torch.Tensor,
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shoulders and collar, drawn over the neck: colour (B, 3, S, S), coverage (B, 1, S, S).

    chin: (B, 2) where the chin of the head at rest projects (the body does not turn with the
    head); unit: (B,) the eye distance in normalized image units. The shoulder line runs just
    below the chin and dips at the collar.
    """
    device = chin.device
    x, y = pixel_axes(size, device)
    unit = unit[:, None, None]
    x = (x - chin[:, 0, None, None]) / unit  # (B, 1, S)
    y = (y - chin[:, 1, None, None]) / unit  # (B, S, 1)
    depth, width = _per_photo(nuisances, "collar_depth", device), _per_photo(nuisances, "collar_width", device)
    top = 0.15 + 0.05 * x.abs() + depth * torch.exp(-0.5 * (x / width) ** 2)
    coverage = _smoothstep(0.5 + (y - top) * unit * size / 2 / EDGE_PIXELS)
    colour = _gathered(nuisances, "clothes", device)[:, :, None, None]
    fold = 1 + 0.1 * torch.sin(2.0 * x + 1.1 * y) - 0.12 * (y - top).clamp(0, 1.5)
    return (colour * fold[:, None]).clamp(0.0, 1.0), coverage[:, None]
