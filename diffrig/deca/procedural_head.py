"""The geometry of diffrig's built-in head: a closed skin surface with a mouth bag, two eyeballs, UVs.

The skin is a star-shaped surface around ``CENTRE``: a grid of rays (rows of polar angle
``theta`` from +y, columns of azimuth ``phi`` from +z towards +x) is cast against a smooth
signed-distance head (cranium, face, jaw, chin, cheeks, brow ridges, nose, ears, neck), then
radial offsets add the lips, the groove between them and the almond-shaped eye openings.
Rows and columns are denser over the face so that it gets most of the ~5000 vertices.

The mouth is a slit along one grid row: its vertices are doubled (upper and lower lip) and the
hole between the copies is closed by a bag reaching back into the head, so the skin plus bag is
one closed, consistently oriented surface (genus 0) whose lips part when the lower ones move.
The eyeballs are separate closed spheres sitting in the eye openings, facing +z.

Conventions as FLAME's: metres, y up, z towards the camera, the face centred near the origin,
triangles counter-clockwise seen from outside (normals ``(b - a) x (c - a)`` point out).

UV layout (v = 1 is the top row of a UV image): the skin fills ``v >= SKIN_V_MIN`` as its
(column, row) grid with the face in the middle (``u = 0.5`` is the front); the strip below holds
the two eyeballs as disks (iris in the centre) and the mouth bag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------- layout constants

CENTRE = np.array([0.0, 0.005, -0.015])  # origin of the skin's rays
NUM_ROWS = 58  # skin rings between the two poles
NUM_COLUMNS = 80  # skin vertices per ring (even: columns j and NUM_COLUMNS - j mirror in x)
EYE_RADIUS = 0.0125
EYE_RINGS, EYE_SEGMENTS = 12, 20
BAG_RINGS = 4

SKIN_V_MIN = 0.1  # skin UVs span v in [SKIN_V_MIN, 1]
EYE_UV_CENTRES = {"right": (0.08, 0.05), "left": (0.2, 0.05)}  # subject's right eye is at -x
EYE_UV_RADIUS = 0.045
BAG_UV_BOX = (0.35, 0.9, 0.008, 0.092)  # u0, u1, v0, v1

# Feature targets (metres), close to FLAME's template shifted to the origin.
EYE_CENTRE = np.array([0.0315, 0.025, 0.037])  # left eyeball centre (mirror for the right)
EYE_HALF_WIDTH, EYE_HALF_HEIGHT = 0.0118, 0.0052  # almond-shaped lid opening
LID_RADII = np.array([0.022, 0.017, EYE_RADIUS + 0.0012])  # the lids wrap the eyeball like this ellipsoid
MOUTH_TARGET = np.array([0.0, -0.038, 0.072])  # lip line in the middle of the mouth
MOUTH_HALF_WIDTH = 0.024


# ----------------------------------------------------------------------------- signed distances


def _ellipsoid(p, centre, radii):
    q = (p - centre) / radii
    return (np.sqrt((q * q).sum(-1)) - 1.0) * radii.min()


def _capsule(p, a, b, ra, rb):
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.sqrt(((p - closest) ** 2).sum(-1)) - (ra + (rb - ra) * t)


def _smooth_union(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smooth_subtract(a, b, k):
    """``a`` with ``b`` carved out."""
    return -_smooth_union(-a, b, k)


def head_sdf(p: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of the head without lips and eye openings.

    p: (..., 3) points in metres. Returns (...). Symmetric in x.
    """
    p = np.asarray(p, dtype=np.float64)
    m = p.copy()
    m[..., 0] = np.abs(m[..., 0])  # mirror: features below are given for x >= 0
    a = np.array
    d = _ellipsoid(p, a([0.0, 0.03, -0.03]), a([0.076, 0.097, 0.1]))  # cranium
    d = _smooth_union(d, _ellipsoid(p, a([0.0, 0.022, 0.0]), a([0.068, 0.062, 0.061])), 0.02)  # forehead
    d = _smooth_union(d, _ellipsoid(p, a([0.0, -0.012, 0.002]), a([0.062, 0.058, 0.065])), 0.02)  # midface
    tapered = p * np.stack([1.0 + 5.0 * np.clip(-0.035 - p[..., 1], 0.0, None), np.ones_like(p[..., 1]),
                            np.ones_like(p[..., 1])], -1)  # narrowing towards the chin
    d = _smooth_union(d, _ellipsoid(tapered, a([0.0, -0.046, 0.004]), a([0.055, 0.04, 0.06])), 0.02)  # jaw
    d = _smooth_union(d, _ellipsoid(p, a([0.0, -0.071, 0.045]), a([0.02, 0.016, 0.017])), 0.01)  # chin
    d = _smooth_union(d, _ellipsoid(m, a([0.045, 0.004, 0.03]), a([0.021, 0.015, 0.019])), 0.01)  # cheekbones
    d = _smooth_union(d, _ellipsoid(m, a([0.029, 0.046, 0.041]), a([0.026, 0.01, 0.012])), 0.012)  # brow ridges
    d = _smooth_subtract(d, _ellipsoid(m, a([0.032, 0.027, 0.061]), a([0.018, 0.013, 0.011])), 0.008)  # orbits
    nose = _capsule(p, a([0.0, 0.03, 0.056]), a([0.0, 0.006, 0.08]), 0.006, 0.0075)
    nose = _smooth_union(nose, _ellipsoid(p, a([0.0, 0.0, 0.08]), a([0.009, 0.0095, 0.0105])), 0.006)
    nose = _smooth_union(nose, _ellipsoid(m, a([0.0125, -0.006, 0.068]), a([0.0075, 0.0065, 0.0075])), 0.005)
    d = _smooth_union(d, nose, 0.008)
    d = _smooth_union(d, _ellipsoid(m, a([0.073, 0.01, -0.022]), a([0.01, 0.028, 0.017])), 0.012)  # ears
    neck_z = p[..., 2] + 0.028 - 0.08 * (p[..., 1] + 0.08)  # leaning forward like FLAME's
    neck_radial = (np.sqrt((p[..., 0] / 0.05) ** 2 + (neck_z / 0.052) ** 2) - 1.0) * 0.05
    neck = np.maximum(np.maximum(neck_radial, -0.187 - p[..., 1]), p[..., 1] + 0.03)
    return _smooth_union(d, neck, 0.025)


def _directions(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit ray directions (..., 3) for polar angle ``theta`` (from +y) and azimuth ``phi`` (from +z to +x)."""
    theta, phi = np.broadcast_arrays(theta, phi)
    s = np.sin(theta)
    return np.stack([s * np.sin(phi), np.cos(theta), s * np.cos(phi)], axis=-1)


def _angles_of(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(theta, phi, distance) of points seen from ``CENTRE``."""
    q = np.asarray(points, dtype=np.float64) - CENTRE
    r = np.sqrt((q * q).sum(-1))
    return np.arccos(np.clip(q[..., 1] / r, -1.0, 1.0)), np.arctan2(q[..., 0], q[..., 2]), r


def cast_rays(directions: np.ndarray, sdf=head_sdf, start: float = 0.35, iterations: int = 96) -> np.ndarray:
    """Distance from ``CENTRE`` to the outermost surface of ``sdf`` along each direction (...,).

    Sphere tracing inwards from ``start``: the first zero crossing met is the outermost one.
    """
    flat = directions.reshape(-1, 3)
    r = np.full(len(flat), start)
    for _ in range(iterations):
        d = sdf(CENTRE + r[:, None] * flat)
        r = r - np.maximum(0.8 * d, 0.0) - 1e-7 * (d > 1e-7)
    return r.reshape(directions.shape[:-1])


# ----------------------------------------------------------------------------- the grid


def _inverse_cdf(density, lo, hi, targets, samples=40001):
    x = np.linspace(lo, hi, samples)
    w = density(x)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(x))])
    return np.interp(targets * cdf[-1], cdf, x)


def _gauss(x, centre, width):
    return np.exp(-(((x - centre) / width) ** 2))


def _band(x, lo, hi, soft):
    return 1.0 / (1.0 + np.exp(-(x - lo) / soft)) / (1.0 + np.exp((x - hi) / soft))


def column_angles() -> np.ndarray:
    """Azimuths (NUM_COLUMNS,) from -pi (back, the UV seam) through 0 (front), mirror-symmetric."""
    half = NUM_COLUMNS // 2
    density = lambda phi: 1.0 + 4.5 * _gauss(phi, 0.0, 0.85)  # noqa: E731 - denser on the face
    front = _inverse_cdf(density, 0.0, np.pi, np.arange(half + 1) / half)  # 0 .. pi
    phi = np.empty(NUM_COLUMNS)
    phi[half:] = front[:half]
    phi[1:half] = -front[half - 1:0:-1]
    phi[0] = -np.pi
    return phi


def _row_density(theta):
    eye, mouth = np.deg2rad(72.0), np.deg2rad(115.0)
    face = _band(theta, np.deg2rad(52.0), np.deg2rad(150.0), np.deg2rad(4.0))
    return 1.0 + 2.0 * face + 2.0 * _gauss(theta, eye, np.deg2rad(7.0)) + 1.2 * _gauss(theta, mouth, np.deg2rad(8.0))


def row_angles() -> np.ndarray:
    """Polar angles (NUM_ROWS,) of the skin's rings, top to bottom (poles excluded)."""
    return _inverse_cdf(_row_density, 0.0, np.pi, np.arange(1, NUM_ROWS + 1) / (NUM_ROWS + 1))


@dataclass
class FeatureFrame:
    """A local 2D frame on the skin around a feature: ``theta0, phi0`` its direction, ``radius`` its
    distance from ``CENTRE``; ``ax`` (to +x) and ``ay`` (up) are arc lengths in metres."""

    theta0: float
    phi0: float
    radius: float

    def coords(self, theta, phi):
        ax = self.radius * np.sin(self.theta0) * (phi - self.phi0)
        ay = -self.radius * (theta - self.theta0)
        return ax, ay


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _lip_window(ax, half_width, fade):
    """1 across the mouth, fading to 0 over ``fade`` beyond ``half_width`` (the corners)."""
    return _smoothstep((half_width + fade - np.abs(ax)) / fade)


def almond_distance(ax, ay):
    """Signed distance-like value of the eye opening: negative inside the almond (metres)."""
    x = np.clip(np.abs(ax) / EYE_HALF_WIDTH, 0.0, 1.0)
    half_height = EYE_HALF_HEIGHT * (1.0 - x * x) ** 0.75
    skew = 0.0015 * ax / EYE_HALF_WIDTH  # ax grows outwards: the outer corner sits higher
    return np.maximum(np.abs(ay - skew) - half_height, np.abs(ax) - EYE_HALF_WIDTH)


def _eye_coords(frame: FeatureFrame, theta, phi):
    """Eye-frame coordinates with ``ex`` growing towards the outer corner on both sides."""
    ex, ey = frame.coords(theta, phi)
    return (-ex if frame.phi0 < 0 else ex), ey


def _from_eye_coords(frame: FeatureFrame, ex, ey):
    ex = -ex if frame.phi0 < 0 else ex
    return frame.theta0 - ey / frame.radius, frame.phi0 + ex / (frame.radius * np.sin(frame.theta0))


def snap_to_eyelids(theta, phi, frames, reach=0.0015):
    """Move grid directions lying within ``reach`` (metres) of an eye opening's rim onto the rim,
    so that the lid margins follow the almond instead of the grid's staircase.
    Returns (theta, phi, snapped mask)."""
    theta, phi = theta.copy(), phi.copy()
    snapped = np.zeros(theta.shape, bool)
    for frame in frames:
        ex, ey = _eye_coords(frame, theta, phi)
        near = (np.abs(ex) < EYE_HALF_WIDTH + 0.003) & (np.abs(ey) < EYE_HALF_HEIGHT + 0.004)
        lo, hi = np.zeros(near.sum()), np.full(near.sum(), 4.0)
        px, py = ex[near], ey[near]
        for _ in range(40):  # the rim crossing on the ray from the almond's centre
            mid = 0.5 * (lo + hi)
            inside = almond_distance(mid * px, mid * py) < 0
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        scale = 0.5 * (lo + hi)
        gap = np.abs(1.0 - scale) * np.hypot(px, py)
        snap = gap < reach
        px, py = np.where(snap, scale * px, px), np.where(snap, scale * py, py)
        t, p = _from_eye_coords(frame, px, py)
        theta[near], phi[near] = t, p
        snapped[near] = snap
    return theta, phi, snapped


@dataclass
class HeadFeatures:
    """Where the lips and eyes are, in skin-grid terms."""

    mouth_row: int  # grid row of the lip line
    mouth_columns: tuple[int, int]  # the two corner columns (shared by both lips)
    mouth: FeatureFrame
    eyes: dict[str, FeatureFrame]  # "left" (+x) and "right" (-x)
    eye_centres: dict[str, np.ndarray]


def _features(theta: np.ndarray, phi: np.ndarray) -> HeadFeatures:
    t_m, p_m, _ = _angles_of(MOUTH_TARGET)
    mouth_row = int(np.argmin(np.abs(theta - t_m)))
    t_row = theta[mouth_row]
    r_m = float(cast_rays(_directions(np.array([t_row]), np.array([0.0])))[0])
    mouth = FeatureFrame(t_row, 0.0, r_m)
    corner_phi = MOUTH_HALF_WIDTH / (r_m * np.sin(t_row))
    half = NUM_COLUMNS // 2
    right = half + int(np.argmin(np.abs(phi[half:] - corner_phi)))
    eyes, centres = {}, {}
    for name, sign in (("left", 1.0), ("right", -1.0)):
        centre = EYE_CENTRE * np.array([sign, 1.0, 1.0])
        front = centre + np.array([0.0, 0.0, EYE_RADIUS])
        t_e, p_e, _ = _angles_of(front)
        r_e = float(cast_rays(_directions(np.array([t_e]), np.array([p_e])))[0])
        eyes[name] = FeatureFrame(float(t_e), float(p_e), r_e)
        centres[name] = centre
    return HeadFeatures(mouth_row, (NUM_COLUMNS - right, right), mouth, eyes, centres)


def _exit_distance(directions, centre, radii):
    """Distance from ``CENTRE`` along each ray to where it leaves the ellipsoid (centre, radii)
    through its front (the rays start inside the head, behind the eyes); where a ray misses,
    the distance of its closest approach."""
    origin = (CENTRE - centre) / radii
    step = directions / radii
    a = (step * step).sum(-1)
    b = (origin * step).sum(-1)
    c = (origin * origin).sum() - 1.0
    return (-b + np.sqrt(np.maximum(b * b - a * c, 0.0))) / a


def skin_radius(theta, phi, features: HeadFeatures):
    """Distance from ``CENTRE`` to the skin at grid directions: the head's surface plus the lips,
    the groove between them, lids wrapping the eyeballs and almond-shaped openings in them."""
    directions = _directions(theta, phi)
    radius = cast_rays(directions)
    ax, ay = features.mouth.coords(theta, phi)
    taper = lambda half: np.clip(1.0 - (ax / half) ** 2, 0.0, 1.0) ** 0.6  # noqa: E731
    upper = 0.0028 * taper(MOUTH_HALF_WIDTH + 0.003) * _gauss(ay, 0.0042, 0.0040 + 0.0008 * taper(MOUTH_HALF_WIDTH))
    lower = 0.0034 * taper(MOUTH_HALF_WIDTH + 0.001) * _gauss(ay, -0.0058, 0.0048)
    groove = -0.0018 * _lip_window(ax, MOUTH_HALF_WIDTH, 0.004) * _gauss(ay, 0.0, 0.0014)
    radius = radius + upper + lower + groove
    for name, frame in features.eyes.items():
        ex, ey = _eye_coords(frame, theta, phi)
        d = almond_distance(ex, ey)
        centre = features.eye_centres[name]
        lids = _exit_distance(directions, centre, LID_RADII)
        around = np.sqrt((ex / (EYE_HALF_WIDTH + 0.004)) ** 2 + (ey / (EYE_HALF_HEIGHT + 0.004)) ** 2)
        radius = radius + _smoothstep((1.6 - around) / 0.6) * np.maximum(lids - radius, 0.0)  # lids bulge
        radius = radius + _smoothstep((1.3 - around) / 0.35) * np.minimum(lids - radius, 0.0)  # lid fold
        behind_eyeball = _exit_distance(directions, centre, np.full(3, EYE_RADIUS)) - 0.0008
        radius = radius - _smoothstep(1.0 - d / 0.0015) * np.maximum(radius - behind_eyeball, 0.0)  # rim on the eyeball
    return radius


# ----------------------------------------------------------------------------- the mesh


@dataclass
class ProceduralHead:
    """The built-in head's rest mesh and the bookkeeping needed to rig and texture it.

    vertices (V, 3) float64; faces (F, 3) int64 counter-clockwise from outside; uvcoords (T, 2);
    uvfaces (F, 3). ``parts`` maps "skin", "mouth_bag", "left_eye", "right_eye" to vertex
    indices. ``grid_index`` (NUM_ROWS, NUM_COLUMNS) are the skin grid's vertices (the upper lip's
    copy on the lip line) and ``lower_lip_index`` maps lip-line columns to the lower copies.
    ``skin_theta``/``skin_phi`` (V,) give every skin vertex's grid direction (NaN elsewhere).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvcoords: np.ndarray
    uvfaces: np.ndarray
    parts: dict[str, np.ndarray]
    theta: np.ndarray
    phi: np.ndarray
    grid_index: np.ndarray
    lower_lip_index: dict[int, int]
    poles: tuple[int, int]
    features: HeadFeatures
    skin_theta: np.ndarray
    skin_phi: np.ndarray
    lip_side: np.ndarray  # (V,) +1 / -1: the upper / lower lip's copy of the lip line and the bag below it
    bag_depth: np.ndarray  # (V,) ring of the mouth bag (0 on the skin), BAG_RINGS + 1 at its back
    cell_split: np.ndarray  # (NUM_ROWS - 1, NUM_COLUMNS) see cell_splits


def cell_splits(snapped: np.ndarray) -> np.ndarray:
    """(NUM_ROWS - 1, NUM_COLUMNS) bool: True where the grid cell below-right of a vertex is split
    along its b-c diagonal (top-right to bottom-left) instead of a-d.

    Cells at x < 0 mirror those at x > 0, so the mesh is mirror-symmetric; where an eyelid rim
    crosses a cell diagonally (both ends of one diagonal snapped onto it), that diagonal is used,
    so the rim is a chain of edges.
    """
    a, b = snapped[:-1], np.roll(snapped[:-1], -1, axis=1)
    c, d = snapped[1:], np.roll(snapped[1:], -1, axis=1)
    split = np.broadcast_to(np.arange(NUM_COLUMNS) < NUM_COLUMNS // 2, a.shape).copy()
    split[a & d & ~(b & c)] = False
    split[b & c & ~(a & d)] = True
    return split


def build_head() -> ProceduralHead:
    """Generate the head (deterministic; about a second on one core)."""
    theta, phi = row_angles(), column_angles()
    features = _features(theta, phi)
    grid_theta, grid_phi = np.broadcast_arrays(theta[:, None], phi[None, :])
    grid_theta, grid_phi, snapped = snap_to_eyelids(grid_theta, grid_phi, features.eyes.values())
    splits = cell_splits(snapped)
    radius = skin_radius(grid_theta, grid_phi, features)
    rows, cols = NUM_ROWS, NUM_COLUMNS
    dirs = _directions(grid_theta, grid_phi)
    grid_points = CENTRE + radius[..., None] * dirs

    vertices = [grid_points.reshape(-1, 3)]
    grid_index = np.arange(rows * cols).reshape(rows, cols)
    top_r = cast_rays(np.array([[0.0, 1.0, 0.0]]))[0]
    bottom_r = cast_rays(np.array([[0.0, -1.0, 0.0]]))[0]
    top, bottom = rows * cols, rows * cols + 1
    vertices.append(np.array([CENTRE + [0, top_r, 0], CENTRE - [0, bottom_r, 0]]))
    count = rows * cols + 2

    m_row = features.mouth_row
    j0, j1 = features.mouth_columns
    lip_columns = list(range(j0 + 1, j1))
    lower_lip_index = {j: count + k for k, j in enumerate(lip_columns)}
    vertices.append(grid_points[m_row, lip_columns])
    count += len(lip_columns)

    # Skin faces: quads between rings, fans at the poles.
    faces, uvfaces = [], []

    def uv_id(i, j):  # skin grid uv: rows x (cols + 1) (seam column duplicated)
        return i * (cols + 1) + j

    n_grid_uv = rows * (cols + 1)
    for i in range(rows - 1):
        for j in range(cols):
            jn = (j + 1) % cols
            a, b = grid_index[i, j], grid_index[i, jn]
            c, d = grid_index[i + 1, j], grid_index[i + 1, jn]
            if i == m_row:
                a = lower_lip_index.get(j, a)
                b = lower_lip_index.get(jn, b)
            ta, tb, tc, td = uv_id(i, j), uv_id(i, j + 1), uv_id(i + 1, j), uv_id(i + 1, j + 1)
            if splits[i, j]:
                faces += [(a, c, b), (b, c, d)]
                uvfaces += [(ta, tc, tb), (tb, tc, td)]
            else:
                faces += [(a, c, d), (a, d, b)]
                uvfaces += [(ta, tc, td), (ta, td, tb)]
    top_uv0 = n_grid_uv
    bottom_uv0 = n_grid_uv + cols
    for j in range(cols):
        jn = (j + 1) % cols
        faces.append((top, grid_index[0, j], grid_index[0, jn]))
        uvfaces.append((top_uv0 + j, uv_id(0, j), uv_id(0, j + 1)))
        faces.append((bottom, grid_index[rows - 1, jn], grid_index[rows - 1, j]))
        uvfaces.append((bottom_uv0 + j, uv_id(rows - 1, j + 1), uv_id(rows - 1, j)))

    u_grid = np.arange(cols + 1) / cols
    v_rows = 1.0 - (1.0 - SKIN_V_MIN) * np.arange(1, rows + 1) / (rows + 1)
    uvs = [np.stack(np.broadcast_arrays(u_grid[None, :], v_rows[:, None]), -1).reshape(-1, 2)]
    pole_u = (np.arange(cols) + 0.5) / cols
    uvs.append(np.stack([pole_u, np.ones(cols)], -1))
    uvs.append(np.stack([pole_u, np.full(cols, SKIN_V_MIN)], -1))
    n_uv = n_grid_uv + 2 * cols

    skin_count = count
    # Mouth bag: rings hanging from the lip loop, closed by a last vertex.
    loop = [grid_index[m_row, j0]] + [grid_index[m_row, j] for j in lip_columns]
    loop += [grid_index[m_row, j1]] + [lower_lip_index[j] for j in reversed(lip_columns)]
    loop_side = [0] + [1] * len(lip_columns) + [0] + [-1] * len(lip_columns)
    loop = np.array(loop)
    loop_side = np.array(loop_side, dtype=float)
    n_loop = len(loop)
    all_vertices = np.concatenate(vertices)
    rim = all_vertices[loop]
    half_width = np.abs(rim[:, 0]).max()
    s = rim[:, 0] / half_width
    bag_rings = [loop]
    bag_points = []
    for k in range(1, BAG_RINGS + 1):
        f = k / BAG_RINGS
        ring = rim.copy()
        ring[:, 0] *= 1.0 - 0.3 * f
        ring[:, 1] += loop_side * 0.0085 * np.sin(np.pi * k / (BAG_RINGS + 1)) * np.sqrt(np.clip(1 - s * s, 0, 1))
        ring[:, 1] -= 0.003 * np.sin(np.pi * f / 2)
        ring[:, 2] -= 0.0065 * k
        bag_points.append(ring)
        bag_rings.append(np.arange(count, count + n_loop))
        count += n_loop
    back = bag_points[-1].mean(0) - np.array([0.0, 0.0, 0.004])
    bag_points.append(back[None])
    back_index = count
    count += 1
    bag_faces = []
    for k in range(BAG_RINGS):
        outer, inner = bag_rings[k], bag_rings[k + 1]
        for n in range(n_loop):
            nn = (n + 1) % n_loop
            bag_faces += [(outer[n], outer[nn], inner[nn]), (outer[n], inner[nn], inner[n])]
    for n in range(n_loop):
        bag_faces.append((bag_rings[-1][n], bag_rings[-1][(n + 1) % n_loop], back_index))
    bag_faces = np.array(bag_faces)
    # Orient the bag against the skin: the lip loop's edges must run opposite ways in the two.
    # The bag's first face holds the edge loop[0] -> loop[1].
    skin_edges = {(a, b) for f in faces for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    flip_bag = (loop[0], loop[1]) in skin_edges
    # Bag UVs: rows of rings in BAG_UV_BOX.
    u0, u1, v0, v1 = BAG_UV_BOX
    bag_uv0 = n_uv
    bag_uv = []
    for k in range(BAG_RINGS + 1):
        for n in range(n_loop + 1):
            bag_uv.append((u0 + (u1 - u0) * n / n_loop, v1 - (v1 - v0) * k / (BAG_RINGS + 1)))
    back_uvs = [(u0 + (u1 - u0) * (n + 0.5) / n_loop, v0) for n in range(n_loop)]
    uvs.append(np.array(bag_uv))
    uvs.append(np.array(back_uvs))
    bag_uv_back0 = n_uv + (BAG_RINGS + 1) * (n_loop + 1)
    n_uv = bag_uv_back0 + n_loop
    bag_uvfaces = []
    for k in range(BAG_RINGS):
        for n in range(n_loop):
            a, b = bag_uv0 + k * (n_loop + 1) + n, bag_uv0 + k * (n_loop + 1) + n + 1
            c, d = bag_uv0 + (k + 1) * (n_loop + 1) + n + 1, bag_uv0 + (k + 1) * (n_loop + 1) + n
            bag_uvfaces += [(a, b, c), (a, c, d)]
    for n in range(n_loop):
        k = BAG_RINGS
        bag_uvfaces.append((bag_uv0 + k * (n_loop + 1) + n, bag_uv0 + k * (n_loop + 1) + n + 1, bag_uv_back0 + n))
    bag_uvfaces = np.array(bag_uvfaces)
    if flip_bag:
        bag_faces, bag_uvfaces = bag_faces[:, ::-1], bag_uvfaces[:, ::-1]

    vertices = [all_vertices] + bag_points
    faces = np.concatenate([np.array(faces), bag_faces])
    uvfaces = np.concatenate([np.array(uvfaces), bag_uvfaces])
    bag_vertices = np.arange(skin_count, count)

    # Eyeballs: spheres around +z, pole 0 in front.
    eye_parts = {}
    eye_faces, eye_uvfaces = [], []
    alpha = np.pi * np.arange(1, EYE_RINGS + 1) / (EYE_RINGS + 1)
    beta = 2 * np.pi * np.arange(EYE_SEGMENTS) / EYE_SEGMENTS
    for name in ("left", "right"):
        centre = features.eye_centres[name]
        ring = np.stack([np.sin(alpha)[:, None] * np.cos(beta), np.sin(alpha)[:, None] * np.sin(beta),
                         np.cos(alpha)[:, None] * np.ones_like(beta)], -1).reshape(-1, 3)
        points = centre + EYE_RADIUS * np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]])
        first = count
        vertices.append(points)
        count += len(points)
        eye_parts[name] = np.arange(first, count)
        ring_index = first + 1 + np.arange(EYE_RINGS * EYE_SEGMENTS).reshape(EYE_RINGS, EYE_SEGMENTS)
        front, rear = first, count - 1
        cu, cv = EYE_UV_CENTRES[name]
        disk = alpha / np.pi * EYE_UV_RADIUS
        ring_uv = np.stack([cu + disk[:, None] * np.cos(beta), cv + disk[:, None] * np.sin(beta)], -1)
        rear_beta = 2 * np.pi * (np.arange(EYE_SEGMENTS) + 0.5) / EYE_SEGMENTS
        rear_uv = np.stack([cu + EYE_UV_RADIUS * np.cos(rear_beta), cv + EYE_UV_RADIUS * np.sin(rear_beta)], -1)
        uv_front = n_uv
        uv_ring = n_uv + 1 + np.arange(EYE_RINGS * EYE_SEGMENTS).reshape(EYE_RINGS, EYE_SEGMENTS)
        uv_rear = n_uv + 1 + EYE_RINGS * EYE_SEGMENTS
        uvs += [np.array([[cu, cv]]), ring_uv.reshape(-1, 2), rear_uv]
        n_uv += 1 + EYE_RINGS * EYE_SEGMENTS + EYE_SEGMENTS
        for b in range(EYE_SEGMENTS):
            bn = (b + 1) % EYE_SEGMENTS
            eye_faces.append((front, ring_index[0, b], ring_index[0, bn]))
            eye_uvfaces.append((uv_front, uv_ring[0, b], uv_ring[0, bn]))
            for a in range(EYE_RINGS - 1):
                p, q = ring_index[a, b], ring_index[a, bn]
                r, s_ = ring_index[a + 1, b], ring_index[a + 1, bn]
                eye_faces += [(p, r, s_), (p, s_, q)]
                tp, tq, tr, ts = uv_ring[a, b], uv_ring[a, bn], uv_ring[a + 1, b], uv_ring[a + 1, bn]
                eye_uvfaces += [(tp, tr, ts), (tp, ts, tq)]
            eye_faces.append((rear, ring_index[-1, bn], ring_index[-1, b]))
            eye_uvfaces.append((uv_rear + b, uv_ring[-1, bn], uv_ring[-1, b]))
    vertices = np.concatenate(vertices)
    eye_faces = np.array(eye_faces)
    eye_uvfaces = np.array(eye_uvfaces)
    # Outward for a sphere: (b - a) x (c - a) along (a - centre).
    a, b, c = vertices[eye_faces[:, 0]], vertices[eye_faces[:, 1]], vertices[eye_faces[:, 2]]
    centre_of = np.where((a[:, 0] > 0)[:, None], features.eye_centres["left"], features.eye_centres["right"])
    if (np.cross(b - a, c - a) * (a + b + c - 3 * centre_of)).sum(-1).mean() < 0:
        eye_faces, eye_uvfaces = eye_faces[:, ::-1], eye_uvfaces[:, ::-1]
    faces = np.concatenate([faces, eye_faces]).astype(np.int64)
    uvfaces = np.concatenate([uvfaces, eye_uvfaces]).astype(np.int64)

    # Skin orientation decides everything else (bag faces were matched to it above).
    skin_faces = faces[: len(faces) - len(eye_faces)]
    volume = _signed_volume(vertices, skin_faces)
    if volume < 0:
        n_head = len(skin_faces)
        faces[:n_head] = faces[:n_head, ::-1]
        uvfaces[:n_head] = uvfaces[:n_head, ::-1]

    skin_theta = np.full(count, np.nan)
    skin_phi = np.full(count, np.nan)
    skin_theta[grid_index] = grid_theta
    skin_phi[grid_index] = grid_phi
    skin_theta[[top, bottom]] = [0.0, np.pi]
    skin_phi[[top, bottom]] = 0.0
    for j, v in lower_lip_index.items():
        skin_theta[v], skin_phi[v] = theta[m_row], phi[j]
    lip_side = np.zeros(count)
    lip_side[[grid_index[m_row, j] for j in lip_columns]] = 1.0
    lip_side[list(lower_lip_index.values())] = -1.0
    bag_depth = np.zeros(count)
    for k, ring in enumerate(bag_rings):
        bag_depth[ring] = k
    bag_depth[back_index] = BAG_RINGS + 1
    for k in range(1, BAG_RINGS + 1):
        lip_side[bag_rings[k]] = loop_side

    return ProceduralHead(
        vertices=vertices,
        faces=faces,
        uvcoords=np.concatenate(uvs).astype(np.float64),
        uvfaces=uvfaces,
        parts={
            "skin": np.arange(skin_count),
            "mouth_bag": bag_vertices,
            "left_eye": eye_parts["left"],
            "right_eye": eye_parts["right"],
        },
        theta=theta,
        phi=phi,
        grid_index=grid_index,
        lower_lip_index=lower_lip_index,
        poles=(top, bottom),
        features=features,
        skin_theta=skin_theta,
        skin_phi=skin_phi,
        lip_side=lip_side,
        bag_depth=bag_depth,
        cell_split=splits,
    )


def _signed_volume(vertices, faces):
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    return float((a * np.cross(b, c)).sum() / 6.0)
