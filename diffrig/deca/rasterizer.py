"""Pure-PyTorch triangle rasterizer with the conventions of DECA's default (pytorch3d) rasterizer.

Vertices are in DECA's screen frame: ``x`` and ``y`` in [-1, 1] after DECA's y flip (``x = -1`` is
the left image border, ``y = -1`` the top one), ``z`` the depth (smaller is nearer). Pixel
``(row, col)`` samples the point ``((2 col + 1) / W - 1, (2 row + 1) / H - 1)``, its centre.

What matches pytorch3d's ``rasterize_meshes`` (blur 0, one face per pixel, no perspective
correction, no culling), which DiffusionRig's DECA uses by default:

- barycentrics ``w_i = edge_i / (area + 1e-8)`` in pytorch3d's NDC units; a pixel is covered when
  all three are strictly positive, so a pixel centre on a shared edge belongs to no face;
- faces with ``|area| <= 1e-8`` (NDC units) or a vertex with ``z < 1e-8`` are skipped, as are
  pixels whose interpolated depth is negative;
- depth is the barycentric (linear) interpolation of ``z``; the nearest face wins and, on an
  exact depth tie, the lower face index does;
- non-square images sample the same pixel centres (pytorch3d stretches the longer side).

The barycentrics and the depth are differentiable with respect to the vertices (the winning face
of each pixel is recomputed with autograd); which face wins is not.

Algorithm: faces whose pixel bounding box holds no pixel centre (or that are skipped) are dropped
first; each remaining face's box is cut into row runs; runs of faces with similar box
widths are evaluated together as a dense (runs, width) grid of candidate (face, pixel) pairs, in
chunks of at most ``max_pairs`` pairs, so any triangle size and resolution runs in bounded memory.
Barycentrics and depth are affine along a run, so a pair costs a few multiply-adds. Each covered
pair packs ``(depth bits, face index)`` into one int64 and ``scatter_reduce(amin)`` keeps the
nearest face of every pixel, deterministically.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# pytorch3d's kEpsilon: the area offset of its barycentrics and its zero-area / behind-camera tests.
EPSILON = 1e-8
# Slack (in pixels) when rounding bounding boxes to pixel centres; the inside test decides.
_BOX_SLACK = 1e-3
_EMPTY_KEY = torch.iinfo(torch.int64).max
_FACE_BITS = 32


class Fragments(NamedTuple):
    """Per-pixel rasterization result.

    pix_to_face: (B, H, W) long, index of the visible face within its mesh (0..F-1), -1 where empty.
    bary_coords: (B, H, W, 3) barycentrics of the pixel centre in that face, -1 where empty.
    zbuf: (B, H, W) interpolated depth of the visible face, -1 where empty.
    """

    pix_to_face: torch.Tensor
    bary_coords: torch.Tensor
    zbuf: torch.Tensor


def rasterize(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    max_pairs: int | None = None,
) -> Fragments:
    """Rasterize a batch of triangle meshes, nearest face per pixel.

    vertices: (B, V, 3) float in DECA's screen frame (see the module docstring).
    faces: (F, 3) or (B, F, 3) long vertex indices.
    max_pairs: most candidate (face, pixel) pairs evaluated at once (never fewer than one image row);
    bounds memory, about 40 bytes a pair (default: 2**24 on CUDA, 2**21 on CPU).
    """
    vertices, faces = _check_inputs(vertices, faces, height, width)
    batch, num_faces = faces.shape[0], faces.shape[1]
    if max_pairs is None:
        max_pairs = 2**24 if vertices.is_cuda else 2**21
    scale_x, scale_y = _ndc_stretch(height, width)

    if num_faces == 0:
        shape = (batch, height, width)
        return Fragments(
            pix_to_face=torch.full(shape, -1, dtype=torch.long, device=vertices.device),
            bary_coords=vertices.new_full(shape + (3,), -1.0),
            zbuf=vertices.new_full(shape, -1.0),
        )
    # Vertex ids into the flattened (B*V, 3) vertices, corner-major: (3 corners, B*F).
    offset = torch.arange(batch, device=faces.device)[None, :, None] * vertices.shape[1]
    corner_ids = faces.new_empty(3, batch, num_faces)  # written in place: no strided copy
    torch.add(faces.permute(2, 0, 1), offset, out=corner_ids)
    corner_ids = corner_ids.view(3, batch * num_faces)
    keys = _nearest_face_keys(_to_pytorch3d_ndc(vertices.detach().float(), scale_x, scale_y), corner_ids,
                              batch, num_faces, height, width, max_pairs)

    # Recompute the winners' barycentrics and depth with autograd, in the caller's dtype.
    pixel = (keys != _EMPTY_KEY).nonzero().squeeze(1)  # covered pixels, flat (b, row, col)
    face = keys.index_select(0, pixel) & ((1 << _FACE_BITS) - 1)
    mesh = torch.div(pixel, height * width, rounding_mode="floor")
    within = pixel - mesh * (height * width)
    row = torch.div(within, width, rounding_mode="floor")
    winner_ids = corner_ids.index_select(1, mesh * num_faces + face).t().reshape(-1)
    table = _to_pytorch3d_ndc(vertices, scale_x, scale_y).reshape(-1, 3)
    winner = table.index_select(0, winner_ids).view(-1, 3, 3)  # (P, 3 corners, 3), autograd-connected
    px, py = _pixel_centres(height, width, scale_x, scale_y, winner.device, winner.dtype)
    bary = _barycentrics(px.index_select(0, within - row * width), py.index_select(0, row), winner)
    depth = (bary * winner[..., 2]).sum(-1)

    size = batch * height * width
    pix_to_face = torch.full((size,), -1, dtype=torch.long, device=keys.device).index_copy(0, pixel, face)
    bary_coords = bary.new_full((size, 3), -1.0).index_copy(0, pixel, bary)
    zbuf = depth.new_full((size,), -1.0).index_copy(0, pixel, depth)
    return Fragments(
        pix_to_face=pix_to_face.view(batch, height, width),
        bary_coords=bary_coords.view(batch, height, width, 3),
        zbuf=zbuf.view(batch, height, width),
    )


def interpolate_face_attributes(fragments: Fragments, face_attributes: torch.Tensor) -> torch.Tensor:
    """Barycentric interpolation of per-corner attributes at every pixel; 0 where empty.

    face_attributes: (B, F, 3, D) (or (1, F, 3, D), broadcast over the batch). Returns (B, D, H, W).
    """
    return _interpolate_channels_last(fragments, face_attributes).permute(0, 3, 1, 2)


def _interpolate_channels_last(fragments: Fragments, face_attributes: torch.Tensor) -> torch.Tensor:
    """As :func:`interpolate_face_attributes`, returning (B, H, W, D)."""
    pix_to_face = fragments.pix_to_face
    batch, height, width = pix_to_face.shape
    if face_attributes.dim() != 4 or face_attributes.shape[2] != 3:
        raise ValueError(f"face_attributes must be (B, F, 3, D), got {tuple(face_attributes.shape)}")
    if face_attributes.shape[0] not in (1, batch):
        raise ValueError(f"face_attributes batch {face_attributes.shape[0]} does not match fragments batch {batch}")
    num_faces, dims = face_attributes.shape[1], face_attributes.shape[3]
    flat_face = pix_to_face.reshape(-1)
    pixel = (flat_face >= 0).nonzero().squeeze(1)
    face = flat_face.index_select(0, pixel)
    if face_attributes.shape[0] > 1:
        face = face + torch.div(pixel, height * width, rounding_mode="floor") * num_faces
    corners = face_attributes.reshape(-1, 3, dims).index_select(0, face)  # (P, 3, D)
    bary = fragments.bary_coords.reshape(-1, 3).index_select(0, pixel).to(corners.dtype)
    values = bary[:, 0:1] * corners[:, 0]
    values = torch.addcmul(values, bary[:, 1:2], corners[:, 1])
    values = torch.addcmul(values, bary[:, 2:3], corners[:, 2])  # (P, D)
    out = values.new_zeros(batch * height * width, dims).index_copy(0, pixel, values)
    return out.view(batch, height, width, dims)


def _check_inputs(vertices: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, V, 3), got {tuple(vertices.shape)}")
    if not vertices.is_floating_point():
        raise ValueError(f"vertices must be floating point, got {vertices.dtype}")
    if faces.dim() == 2:
        faces = faces[None]
    if faces.dim() != 3 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3) or (B, F, 3), got {tuple(faces.shape)}")
    if faces.shape[0] not in (1, vertices.shape[0]):
        raise ValueError(f"faces batch {faces.shape[0]} does not match vertices batch {vertices.shape[0]}")
    if faces.shape[1] >= 2**31:
        raise ValueError("at most 2**31 - 1 faces per mesh")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    faces = faces.to(device=vertices.device, dtype=torch.long).expand(vertices.shape[0], -1, -1)
    return vertices, faces


def _ndc_stretch(height: int, width: int) -> tuple[float, float]:
    """pytorch3d's NDC spans [-1, 1] on the shorter side and proportionally more on the longer."""
    return max(width / height, 1.0), max(height / width, 1.0)


def _to_pytorch3d_ndc(corners: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    if scale_x == 1.0 and scale_y == 1.0:
        return corners
    factors = corners.new_tensor([scale_x, scale_y, 1.0])
    return corners * factors


def _pixel_centres(height: int, width: int, scale_x: float, scale_y: float, device, dtype):
    """Pixel-centre coordinates (W,), (H,) in the stretched DECA frame, computed as pytorch3d does.

    pytorch3d samples its own (x, y negated, axes reversed) frame at ``PixToNonSquareNdc``; negating
    that for the reversed index gives DECA's left-to-right / top-to-bottom order.
    """

    def centres(size: int, stretch: float) -> torch.Tensor:
        span = torch.tensor(2.0 * stretch, dtype=torch.float32)
        offset = span / 2
        reversed_index = torch.arange(size - 1, -1, -1, dtype=torch.float32)
        return -(-offset + (span * reversed_index + offset) / size)

    return (
        centres(width, scale_x).to(device=device, dtype=dtype),
        centres(height, scale_y).to(device=device, dtype=dtype),
    )


def _edge(px, py, ax, ay, bx, by):
    """pytorch3d's edge function: cross(p - a, b - a)."""
    return (px - ax) * (by - ay) - (py - ay) * (bx - ax)


def _barycentrics(px: torch.Tensor, py: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Barycentrics of points (px, py) in triangles corners (..., 3, >=2) -> (..., 3)."""
    x0, y0 = corners[..., 0, 0], corners[..., 0, 1]
    x1, y1 = corners[..., 1, 0], corners[..., 1, 1]
    x2, y2 = corners[..., 2, 0], corners[..., 2, 1]
    area = _edge(x2, y2, x0, y0, x1, y1) + EPSILON
    return torch.stack(
        [
            _edge(px, py, x1, y1, x2, y2) / area,
            _edge(px, py, x2, y2, x0, y0) / area,
            _edge(px, py, x0, y0, x1, y1) / area,
        ],
        dim=-1,
    )


def _coordinate_rows(vertices: torch.Tensor, corner_ids: torch.Tensor):
    """Corner coordinates as rows: (3 coords, 3 corners, N) contiguous, and (N,) bool, all finite.

    vertices: (B, V, 3); corner_ids: (3, N) ids into the flattened (B*V,) vertices. Per-corner rows
    are contiguous, so the elementwise work below runs on dense vectors.
    """
    by_coord = vertices.reshape(-1, 3).t().contiguous()  # (3, B*V)
    finite_vertex = torch.isfinite(by_coord).all(0)
    finite = finite_vertex.index_select(0, corner_ids[0])
    finite &= finite_vertex.index_select(0, corner_ids[1])
    finite &= finite_vertex.index_select(0, corner_ids[2])
    rows = torch.stack([coord.index_select(0, ids) for coord in by_coord for ids in corner_ids])
    return rows.view(3, 3, -1), finite


def _face_boxes(rows: torch.Tensor, finite: torch.Tensor, height: int, width: int, scale_x: float, scale_y: float):
    """Pixel-index bounding boxes of the faces that can cover a pixel.

    rows: (3 coords, 3 corners, N) float32 (see :func:`_coordinate_rows`); finite: (N,) bool.
    Returns col0, row0, box_w, box_h: (N,) long (box_h 0 for skipped faces).
    """
    x, y, z = rows[0] / scale_x, rows[1] / scale_y, rows[2]
    # Continuous pixel-index coordinates: pixel c has its centre at c.
    cx = (x + 1) * (width / 2) - 0.5
    cy = (y + 1) * (height / 2) - 0.5
    cx_min = cx.amin(0).clamp(-1, width) - _BOX_SLACK
    cx_max = cx.amax(0).clamp(-1, width) + _BOX_SLACK
    cy_min = cy.amin(0).clamp(-1, height) - _BOX_SLACK
    cy_max = cy.amax(0).clamp(-1, height) + _BOX_SLACK
    col0 = torch.ceil(cx_min).clamp(min=0)
    col1 = torch.floor(cx_max).clamp(max=width - 1)
    row0 = torch.ceil(cy_min).clamp(min=0)
    row1 = torch.floor(cy_max).clamp(max=height - 1)
    (x0, x1, x2), (y0, y1, y2) = rows[0], rows[1]
    area = _edge(x0, y0, x1, y1, x2, y2)
    usable = finite & (area.abs() > EPSILON) & (z.amin(0) >= EPSILON) & (col1 >= col0) & (row1 >= row0)
    col0 = torch.where(usable, col0, torch.zeros_like(col0)).long()
    row0 = torch.where(usable, row0, torch.zeros_like(row0)).long()
    box_w = torch.where(usable, col1 - col0 + 1, torch.ones_like(col1)).long()
    box_h = torch.where(usable, row1 - row0 + 1, torch.zeros_like(row1)).long()
    return col0, row0, box_w, box_h


def _nearest_face_keys(ndc: torch.Tensor, corner_ids: torch.Tensor, batch: int, num_faces: int, height: int,
                       width: int, max_pairs: int) -> torch.Tensor:
    """Packed (depth bits << 32 | face) of the nearest covering face per pixel; (B*H*W,) int64.

    ndc: (B, V, 3) float32 vertices in pytorch3d's (stretched) NDC units, DECA's axis directions;
    corner_ids: (3 corners, B*F) ids into the flattened (B*V,) vertices.

    Faces whose box holds no pixel centre (or that are skipped) are dropped first. Each remaining
    face's box is cut into row runs; runs are grouped by box width rounded up to a power of two,
    so that a group evaluates a dense (runs, width) grid by broadcasting, with per-run (not
    per-pixel) gathers. Groups are processed in chunks of at most ``max_pairs`` grid cells.
    """
    device = ndc.device
    scale_x, scale_y = _ndc_stretch(height, width)
    rows, finite = _coordinate_rows(ndc, corner_ids)
    col0, row0, box_w, box_h = _face_boxes(rows, finite, height, width, scale_x, scale_y)
    keys = torch.full((batch * height * width,), _EMPTY_KEY, dtype=torch.int64, device=device)
    face_of = (box_h > 0).nonzero().squeeze(1)  # flat (mesh, face) index of the faces kept
    if face_of.numel() == 0:
        return keys
    rows = torch.stack([row.index_select(0, face_of) for row in rows.view(9, -1)]).view(3, 3, -1)
    col0, row0, box_w, box_h = (t.index_select(0, face_of) for t in (col0, row0, box_w, box_h))
    first_pixel = (face_of // num_faces * height + row0) * width + col0
    face_in_mesh = face_of % num_faces
    plane = _pixel_step_planes(rows, col0, row0, height, width, scale_x, scale_y)  # (12, N)
    width_class = torch.ceil(torch.log2(box_w.double())).long()  # box_w >= 1
    classes = torch.bincount(width_class).nonzero().squeeze(1)
    for cls in classes.tolist():
        padded = 1 << cls
        members = (width_class == cls).nonzero().squeeze(1)
        runs_per_face = box_h.index_select(0, members)
        ends = torch.cumsum(runs_per_face, 0)
        total_runs = int(ends[-1])
        runs_per_chunk = max(1, max_pairs // padded)
        for run_start in range(0, total_runs, runs_per_chunk):
            run_end = min(run_start + runs_per_chunk, total_runs)
            member, run_row = _enumerate_runs(ends, runs_per_face, run_start, run_end, total_runs)
            owner = members.index_select(0, member)
            coeff = plane.index_select(1, owner).view(3, 4, -1)
            row_start = torch.addcmul(coeff[0], run_row.to(coeff.dtype), coeff[2])  # (4, R)
            columns = torch.arange(padded, device=device)
            # (4, R, padded): value at every pixel of the run, padded columns past the box included.
            values = torch.addcmul(row_start[:, :, None], columns.to(coeff.dtype), coeff[1, :, :, None])
            # All barycentrics > 0 and every z >= EPSILON (checked per face) imply depth > 0.
            hit = torch.minimum(torch.minimum(values[0], values[1]), values[2]) > 0
            if padded > 1:
                hit &= columns[None, :] < box_w.index_select(0, owner)[:, None]
            hit_cell = hit.view(-1).nonzero().squeeze(1)
            if hit_cell.numel() == 0:
                continue
            hit_run = hit_cell >> cls
            run_pixel = first_pixel.index_select(0, owner) + run_row * width
            pixel = run_pixel.index_select(0, hit_run) + (hit_cell & (padded - 1))
            # Non-negative float32 bit patterns order like the floats (-0.0 is folded onto +0.0).
            depth = values[3].reshape(-1).index_select(0, hit_cell) + 0.0
            face = face_in_mesh.index_select(0, owner).index_select(0, hit_run)
            key = (depth.view(torch.int32).to(torch.int64) << _FACE_BITS) | face
            keys.scatter_reduce_(0, pixel, key, reduce="amin", include_self=True)
    return keys


def _enumerate_runs(ends: torch.Tensor, count: torch.Tensor, run_start: int, run_end: int, total: int):
    """Member and row within its box of the row runs ``run_start..run_end - 1``.

    ends: (M,) inclusive cumulative run counts of the members; count: (M,). Returns member (R,)
    and row (R,), both long. A member's runs may be split across chunks.
    """
    device = ends.device
    if run_start == 0 and run_end == total:
        member = torch.repeat_interleave(torch.arange(count.numel(), device=device), count, output_size=run_end)
        row = torch.arange(run_end, device=device) - (ends - count).index_select(0, member)
        return member, row
    bounds = torch.searchsorted(ends, torch.tensor([run_start, run_end - 1], device=device), right=True)
    first, last = bounds.tolist()
    counts = count[first : last + 1].clone()
    counts[0] = ends[first] - run_start
    counts[-1] -= ends[last] - run_end
    size = run_end - run_start
    member = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts, output_size=size)
    local = torch.arange(size, device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, member)
    member = member + first
    # Runs of the first member that earlier chunks already did.
    done_before = run_start - (ends[first] - count[first])
    row = local + torch.where(member == first, done_before, torch.zeros_like(done_before))
    return member, row


def _pixel_step_planes(rows, col0, row0, height, width, scale_x, scale_y) -> torch.Tensor:
    """Barycentrics and depth of each face as affine functions of the pixel offset in its box.

    rows: (3 coords, 3 corners, N) float32 NDC corners (see :func:`_coordinate_rows`); col0, row0:
    (N,) box origins. Returns (12, N): (w0, w1, w2, z) at the origin pixel centre, then their
    changes per column, then per row. The origin values use pytorch3d's
    formula exactly; steps are exact up to rounding.
    """
    px_table, py_table = _pixel_centres(height, width, scale_x, scale_y, rows.device, torch.float32)
    px, py = px_table.index_select(0, col0), py_table.index_select(0, row0)
    (x0, x1, x2), (y0, y1, y2), (z0, z1, z2) = rows
    area = _edge(x2, y2, x0, y0, x1, y1) + EPSILON
    origin = (_edge(px, py, x1, y1, x2, y2) / area, _edge(px, py, x2, y2, x0, y0) / area,
              _edge(px, py, x0, y0, x1, y1) / area)
    # Edge i runs between corners (i + 1, i + 2): d edge / d px = dy, d edge / d py = -dx.
    col_scale, row_scale = 2.0 * scale_x / width, 2.0 * scale_y / height
    step_col = tuple(dy * col_scale / area for dy in (y2 - y1, y0 - y2, y1 - y0))
    step_row = tuple(-dx * row_scale / area for dx in (x2 - x1, x0 - x2, x1 - x0))
    columns = []
    for w0, w1, w2 in (origin, step_col, step_row):
        columns += [w0, w1, w2, w0 * z0 + w1 * z1 + w2 * z2]
    return torch.stack(columns)
