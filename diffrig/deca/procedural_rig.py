"""Rigging the built-in head the way FLAME is rigged: joints, skinning, blendshapes, landmarks.

Everything is computed from the rest mesh of :func:`diffrig.deca.procedural_head.build_head`,
deterministically (fixed seeds, element-wise NumPy, no BLAS-sized products whose rounding could
depend on the thread count).

- Joints as FLAME's: 0 root (neck base), 1 neck, 2 jaw, 3 left eye (+x), 4 right eye (-x);
  ``kintree_table`` parents ``[-, 0, 1, 1, 1]``; ``J_regressor`` rows are convex combinations of
  vertices (rings of the neck, points in front of the ears, the eyeballs).
- Skinning: the chin, lower lip and the lower half of the mouth bag follow the jaw, eyeballs
  their eye joints, the lower neck the root, everything else the neck joint.
- ``shapedirs`` (V, 3, 400): columns 0..299 identity (a dozen named smooth components, then
  random smooth ones with decaying size), columns 300..399 expression (smile, mouth open, brow
  raise, frown, pucker, then small random smooth ones). Like FLAME's, each column is scaled to
  one standard deviation: a code of 1 moves vertices by millimetres to about a centimetre.
- ``posedirs`` (V, 3, 36): zero except a small corrective pulling the mouth corners in as the
  jaw opens.
- Landmarks (DECA's embedding): 51 static and 68 full landmarks in the iBUG-68 order, and the 17
  face-contour landmarks for each of 79 head yaws (0..39 degrees, then -1..-39), the contour
  being the face's outline seen from the camera at that yaw.
"""

from __future__ import annotations

import numpy as np

from diffrig.deca.procedural_head import (
    EYE_HALF_WIDTH,
    MOUTH_HALF_WIDTH,
    NUM_COLUMNS,
    ProceduralHead,
    _angles_of,
    _from_eye_coords,
    almond_distance,
)

NUM_JOINTS = 5
ROOT, NECK, JAW, LEFT_EYE, RIGHT_EYE = range(NUM_JOINTS)
PARENTS = (-1, ROOT, NECK, NECK, NECK)
ROOT_PARENT_IN_FILE = 4294967295  # FLAME's pickles store the root's parent as uint32(-1)
NUM_SHAPE, NUM_EXPRESSION = 300, 100
NAMED_SHAPES = (
    "head size", "head width", "face length", "nose size", "jaw width", "cranium height",
    "chin projection", "cheek fullness", "eye spacing", "lip fullness", "nose bridge", "forehead slope",
)
NAMED_EXPRESSIONS = ("smile", "mouth open", "brow raise", "frown", "pucker")
JAW_CORRECTIVE_FEATURE = 9 + 7  # pose feature of the jaw (joint 2): R - I entry [2, 1] = sin(angle) about x
MOUTH_OPEN_ANGLE = 0.12  # radians of jaw rotation that one unit of "mouth open" imitates
YAW_BINS = 39  # DECA's contour table: yaws 0..39 degrees, then -1..-39
NECK_TOP = -0.095  # the neck starts below this height (m)

# Frontal (x, y) of landmark targets, as on FLAME's template: the subject's left brow inner to outer,
LEFT_BROW = np.array([[0.0094, 0.0441], [0.0226, 0.0482], [0.0384, 0.0496], [0.0535, 0.0454], [0.0614, 0.0288]])
# the nose ridge top to tip, the nose base right to left.
NOSE_RIDGE = np.array([[0.0, 0.0292], [0.0, 0.0187], [0.0, 0.0091], [0.0, -0.0002]])
NOSE_BASE = np.array([[-0.0127, -0.0134], [-0.0066, -0.0152], [0.0, -0.017], [0.0066, -0.0152], [0.0127, -0.0134]])
UPPER_LIP_BORDER, LOWER_LIP_BORDER = 0.0062, -0.0085  # vermilion borders above/below the lip line (m)


# ----------------------------------------------------------------------------- mesh helpers


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3) of a counter-clockwise mesh."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    face_normals = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def _skin_faces(head: ProceduralHead) -> np.ndarray:
    """Indices of faces between skin vertices whose grid directions form a proper 2D triangle
    (not the pole fans, not across the seam at the back)."""
    faces = head.faces
    skin = np.zeros(len(head.vertices), bool)
    skin[head.parts["skin"]] = True
    top, bottom = head.poles
    ok = skin[faces].all(1) & ~np.isin(faces, [top, bottom]).any(1)
    phi = head.skin_phi[np.where(ok[:, None], faces, 0)]
    ok &= (phi.max(1) - phi.min(1)) < np.pi
    return np.nonzero(ok)[0]


class SkinLocator:
    """Finds the skin triangle and barycentric weights at grid directions (theta, phi)."""

    def __init__(self, head: ProceduralHead):
        self.face_ids = _skin_faces(head)
        corners = head.faces[self.face_ids]
        self.theta = head.skin_theta[corners]  # (F, 3)
        self.phi = head.skin_phi[corners]
        self.side = head.lip_side[corners].sum(1)  # > 0 on faces of the upper lip's copies

    def locate(self, theta: float, phi: float, lip: int = 0) -> tuple[int, np.ndarray]:
        """(face index, barycentric (3,)). ``lip`` +1/-1 picks the upper/lower lip's triangle for
        points on the lip line, where both contain the point."""
        t0, t1, t2 = self.theta.T
        p0, p1, p2 = self.phi.T
        det = (t1 - t0) * (p2 - p0) - (t2 - t0) * (p1 - p0)
        det = np.where(np.abs(det) < 1e-18, np.nan, det)
        b1 = ((theta - t0) * (p2 - p0) - (t2 - t0) * (phi - p0)) / det
        b2 = ((t1 - t0) * (phi - p0) - (theta - t0) * (p1 - p0)) / det
        b0 = 1.0 - b1 - b2
        worst = np.minimum(np.minimum(b0, b1), b2)
        worst = np.where(np.isnan(worst), -np.inf, worst)
        best = worst.max()
        candidates = np.nonzero(worst >= best - 1e-9)[0]
        if lip and len(candidates) > 1:
            preferred = candidates[np.sign(self.side[candidates]) == lip]
            candidates = preferred if len(preferred) else candidates
        k = candidates[0]
        bary = np.clip(np.array([b0[k], b1[k], b2[k]]), 0.0, None)
        return int(self.face_ids[k]), bary / bary.sum()


def _surface_at(head: ProceduralHead, face: int, bary: np.ndarray) -> np.ndarray:
    return (head.vertices[head.faces[face]] * bary[:, None]).sum(0)


# ----------------------------------------------------------------------------- landmarks


def _frontal_point(head, locator, x, y, iterations=6):
    """The skin point seen at (x, y) from the front: (face, bary)."""
    guess = np.array([x, y, 0.06])
    for _ in range(iterations):
        theta, phi, _ = _angles_of(guess)
        face, bary = locator.locate(theta, phi)
        point = _surface_at(head, face, bary)
        guess = guess + np.array([x - point[0], y - point[1], point[2] - guess[2]])
    return face, bary


def _mouth_point(head, locator, ax, ay, lip=0):
    frame = head.features.mouth
    theta = frame.theta0 - ay / frame.radius
    phi = frame.phi0 + ax / (frame.radius * np.sin(frame.theta0))
    return locator.locate(theta, phi, lip)


def _eye_point(head, locator, eye, ex, ey):
    """A point on the lid margin of ``eye`` ("left"/"right"); ``ex`` grows towards the outer corner."""
    frame = head.features.eyes[eye]
    theta, phi = _from_eye_coords(frame, ex, ey)
    return locator.locate(theta, phi)


def _lid_margin(ex, upper):
    """The rim's ``ey`` at ``ex`` (eye frame), 0.4 mm out onto the lid."""
    lo, hi = (0.0, 0.02) if upper else (-0.02, 0.0)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        inside = almond_distance(np.array(ex), np.array(mid)) < 0
        if upper:
            lo, hi = (mid, hi) if inside else (lo, mid)
        else:
            lo, hi = (lo, mid) if inside else (mid, hi)
    return 0.5 * (lo + hi) + (0.0004 if upper else -0.0004)


def static_landmarks(head: ProceduralHead, locator: SkinLocator) -> list[tuple[int, np.ndarray]]:
    """Landmarks 17..67 of the iBUG-68 scheme as (face, bary)."""
    points = []
    right_brow = LEFT_BROW[::-1] * [-1.0, 1.0]  # 17..21: outer to inner, subject's right (x < 0)
    for x, y in np.concatenate([right_brow, LEFT_BROW]):  # 22..26: inner to outer
        points.append(_frontal_point(head, locator, x, y))
    for x, y in np.concatenate([NOSE_RIDGE, NOSE_BASE]):  # 27..30 ridge, 31..35 base
        points.append(_frontal_point(head, locator, x, y))
    w, third = EYE_HALF_WIDTH - 0.0004, EYE_HALF_WIDTH / 3
    skew = 0.0015 * w / EYE_HALF_WIDTH
    right_eye = [(w, skew), (third, 1), (-third, 1), (-w, -skew), (-third, -1), (third, -1)]  # 36..41
    left_eye = [(-w, -skew), (-third, 1), (third, 1), (w, skew), (third, -1), (-third, -1)]  # 42..47
    for eye, spec in (("right", right_eye), ("left", left_eye)):
        for k, (ex, ey) in enumerate(spec):
            if k in (0, 3):
                points.append(_eye_point(head, locator, eye, ex, ey))
            else:
                points.append(_eye_point(head, locator, eye, ex, _lid_margin(ex, ey > 0)))
    hw = MOUTH_HALF_WIDTH
    border = lambda level, ax: level * np.sqrt(max(1.0 - (ax / hw) ** 2, 0.0))  # noqa: E731
    outer = [-hw, -0.66 * hw, -0.27 * hw, 0.0, 0.27 * hw, 0.66 * hw, hw]
    for ax in outer:  # 48..54: right corner, upper lip, left corner
        points.append(_mouth_point(head, locator, ax, border(UPPER_LIP_BORDER, ax)))
    for ax in outer[-2:0:-1]:  # 55..59: lower lip, left to right
        points.append(_mouth_point(head, locator, ax, border(LOWER_LIP_BORDER, ax)))
    inner = 0.27 * hw
    points.append(_mouth_point(head, locator, -hw + 0.0005, 0.0))  # 60
    for ax in (-inner, 0.0, inner):  # 61..63 upper lip's inner edge
        points.append(_mouth_point(head, locator, ax, 0.0, lip=1))
    points.append(_mouth_point(head, locator, hw - 0.0005, 0.0))  # 64
    for ax in (inner, 0.0, -inner):  # 65..67 lower lip's inner edge
        points.append(_mouth_point(head, locator, ax, 0.0, lip=-1))
    return points


def _rotate_y(points, degrees):
    """Points turned about +y as FLAME's global pose turns the head (yaw > 0 hides the +x side)."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.stack([c * x + s * z, y, -s * x + c * z], -1)


def contour_landmarks(head: ProceduralHead, locator: SkinLocator, samples_per_edge: int = 8):
    """Face-contour landmarks 0..16 for yaws 0..39 and -1..-39 degrees: (faces (79, 17), bary (79, 17, 3)).

    The face is the skin above the jaw's lower border and in front of the ears. Landmark 8 is the
    chin's lowest front point; landmark k sits at a height between the chin and the ears (as in
    FLAME) on the outline of the face seen from the camera after turning the head by the yaw.
    """
    vertices, faces = head.vertices, head.faces
    normals = vertex_normals(vertices, faces)
    grid = head.grid_index
    rows, cols = grid.shape
    # The jaw's lower border: under the lips, the ring whose normal faces down the most before
    # the neck begins.
    chin_column = NUM_COLUMNS // 2
    border = np.zeros(cols, np.int64)
    below = np.arange(head.features.mouth_row + 2, rows)
    for j in range(cols):
        above_neck = below[vertices[grid[below, j], 1] > NECK_TOP]
        border[j] = above_neck[np.argmin(normals[grid[above_neck, j], 1])]
    in_face = np.zeros(len(vertices), bool)
    for j in range(cols):
        if abs(head.phi[j]) <= np.deg2rad(82.0):
            in_face[grid[: border[j] + 1, j]] = True
    in_face[list(head.lower_lip_index.values())] = True
    face_ids = locator.face_ids[in_face[faces[locator.face_ids]].all(1)]
    # Sample the face triangles densely.
    n = samples_per_edge
    ij = np.array([(i, j) for i in range(n + 1) for j in range(n + 1 - i)], dtype=float) / n
    bary = np.stack([1.0 - ij.sum(1), ij[:, 0], ij[:, 1]], -1)  # (S, 3)
    corner_points = vertices[faces[face_ids]]  # (F, 3, 3)
    points = np.einsum("sk,fkd->fsd", bary, corner_points).reshape(-1, 3)
    sample_face = np.repeat(face_ids, len(bary))
    sample_bary = np.tile(bary, (len(face_ids), 1))

    chin_vertex = grid[border[chin_column], chin_column]
    chin_face, chin_bary = _vertex_as_landmark(faces, chin_vertex)
    chin = vertices[chin_vertex]
    top = 0.1035  # FLAME: the contour's ends sit ~10 cm above the chin point, at the ears
    heights = [chin[1] + top * (abs(k - 8) / 8.0) ** 1.6 for k in range(17)]
    yaws = list(range(YAW_BINS + 1)) + [-d for d in range(1, YAW_BINS + 1)]
    out_faces = np.zeros((len(yaws), 17), np.int64)
    out_bary = np.zeros((len(yaws), 17, 3))
    tolerance = 0.0006
    for k, height in enumerate(heights):
        if k == 8:
            out_faces[:, k], out_bary[:, k] = chin_face, chin_bary
            continue
        band = np.nonzero((np.abs(points[:, 1] - height) < tolerance) & (np.sign(points[:, 0]) == np.sign(k - 8)))[0]
        for row, yaw in enumerate(yaws):
            x_seen = _rotate_y(points[band], yaw)[:, 0]
            pick = band[np.argmax(x_seen) if k > 8 else np.argmin(x_seen)]
            out_faces[row, k], out_bary[row, k] = sample_face[pick], sample_bary[pick]
    return out_faces, out_bary


def _vertex_as_landmark(faces, vertex):
    face = int(np.nonzero((faces == vertex).any(1))[0][0])
    bary = (faces[face] == vertex).astype(float)
    return face, bary


def landmark_embedding(head: ProceduralHead) -> dict[str, np.ndarray]:
    """DECA's ``landmark_embedding.npy`` content for the head (keys and dtypes as DECA's)."""
    locator = SkinLocator(head)
    static = static_landmarks(head, locator)
    dynamic_faces, dynamic_bary = contour_landmarks(head, locator)
    static_faces = np.array([f for f, _ in static], np.int64)
    static_bary = np.array([b for _, b in static])
    full_faces = np.concatenate([dynamic_faces[0], static_faces])[None]
    full_bary = np.concatenate([dynamic_bary[0], static_bary])[None]
    return {
        "static_lmk_faces_idx": static_faces,
        "static_lmk_bary_coords": static_bary.astype(np.float64),
        "dynamic_lmk_faces_idx": dynamic_faces,
        "dynamic_lmk_bary_coords": dynamic_bary.astype(np.float32),
        "full_lmk_faces_idx": full_faces.astype(np.int64),
        "full_lmk_bary_coords": full_bary.astype(np.float32),
    }


# ----------------------------------------------------------------------------- skinning and joints


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def jaw_weights(head: ProceduralHead) -> np.ndarray:
    """(V,) how much each vertex follows the jaw.

    On the skin: 1 below the lip line and the jaw line that rises from the mouth corners to the
    joints in front of the ears, 0 above, with a sharp step across the lips (the two copies of the
    lip line get 0 and 1) widening over the cheeks; fading out behind the ears and down the neck.
    In the mouth bag: the lower lip's half follows the jaw, the corners and back half-way.
    """
    weights = np.zeros(len(head.vertices))
    skin = head.parts["skin"]
    theta, phi = head.skin_theta[skin], head.skin_phi[skin]
    frame = head.features.mouth
    ax, ay = frame.coords(theta, phi)
    side = head.lip_side[skin]
    ay = np.where(side != 0, 0.0015 * side, ay)  # the lip line's copies: just above / just below
    beyond = np.maximum(np.abs(ax) - MOUTH_HALF_WIDTH, 0.0)
    line = 0.32 * beyond  # the jaw line rises towards the ears
    width = 0.0024 + 0.25 * beyond
    below = _smoothstep(0.5 + (line - ay) / width)
    front = _smoothstep((np.deg2rad(100.0) - np.abs(phi)) / np.deg2rad(25.0))
    neck = 1.0 - _smoothstep((theta - np.deg2rad(140.0)) / np.deg2rad(14.0))
    weights[skin] = below * front * neck
    bag = head.parts["mouth_bag"]
    weights[bag] = np.where(head.lip_side[bag] < 0, 1.0, np.where(head.lip_side[bag] > 0, 0.0, 0.5))
    return weights


def skinning_weights(head: ProceduralHead) -> np.ndarray:
    """(V, 5) skinning weights, rows summing to 1."""
    vertices = head.vertices
    weights = np.zeros((len(vertices), NUM_JOINTS))
    jaw = jaw_weights(head)
    root = _smoothstep((-0.125 - vertices[:, 1]) / 0.04)  # the lower neck
    weights[:, ROOT] = root
    weights[:, JAW] = jaw * (1.0 - root)
    weights[:, NECK] = 1.0 - weights[:, ROOT] - weights[:, JAW]
    for joint, eye in ((LEFT_EYE, "left_eye"), (RIGHT_EYE, "right_eye")):
        weights[head.parts[eye]] = 0.0
        weights[head.parts[eye], joint] = 1.0
    return weights


def joint_regressor(head: ProceduralHead) -> np.ndarray:
    """(5, V) ``J_regressor``: each joint a convex combination of rest vertices."""
    vertices = head.vertices
    regressor = np.zeros((NUM_JOINTS, len(vertices)))
    grid = head.grid_index
    ring_height = vertices[grid, 1].mean(1)
    neck_rings = np.nonzero(head.theta > np.deg2rad(150.0))[0]
    for joint, height in ((ROOT, -0.165), (NECK, -0.115)):
        ring = neck_rings[np.argmin(np.abs(ring_height[neck_rings] - height))]
        regressor[joint, grid[ring]] = 1.0 / grid.shape[1]
    # The jaw hinges in front of the ears: average symmetric skin points there.
    skin = head.parts["skin"]
    for sign in (1.0, -1.0):
        target = np.array([0.07 * sign, -0.004, -0.01])
        distance = np.linalg.norm(vertices[skin] - target, axis=1)
        nearest = skin[np.argsort(distance, kind="stable")[:4]]
        regressor[JAW, nearest] += 1.0 / 8.0
    for joint, eye in ((LEFT_EYE, "left_eye"), (RIGHT_EYE, "right_eye")):
        regressor[joint, head.parts[eye]] = 1.0 / len(head.parts[eye])
    return regressor


def kintree_table() -> np.ndarray:
    """(2, 5) int64 as FLAME stores it: parents (the root's as uint32 -1), then joint ids."""
    parents = [ROOT_PARENT_IN_FILE] + list(PARENTS[1:])
    return np.array([parents, list(range(NUM_JOINTS))], dtype=np.int64)


# ----------------------------------------------------------------------------- blendshapes


def _gauss(points, centre, sigma):
    """exp(-|p - centre|^2 / sigma^2) per point; ``sigma`` scalar or per-axis (3,)."""
    q = (points - centre) / sigma
    return np.exp(-(q * q).sum(-1))


def _mirrored(points, field):
    """``field`` evaluated with x mirrored for points at x < 0 (and the x component flipped back),
    so a field designed for the left half acts symmetrically."""
    flip = np.where(points[:, :1] < 0, -1.0, 1.0)
    mirror = np.concatenate([flip, np.ones((len(points), 2))], axis=1)
    return field(points * mirror) * mirror


def _rigid_eyes(head, displacement):
    """Move each eyeball rigidly with the displacement at its centre, so eyes stay in their sockets."""
    out = displacement.copy()
    for eye in ("left_eye", "right_eye"):
        index = head.parts[eye]
        out[index] = displacement[index].mean(0)  # the eyeball's vertices average to its centre
    return out


def _front(points, start=-0.04, ramp=0.05):
    return _smoothstep((points[:, 2] - start) / ramp)


def _peak(displacement, millimetres):
    """Scale so that the largest vertex displacement is ``millimetres``."""
    top = np.linalg.norm(displacement, axis=1).max()
    return displacement * (millimetres * 1e-3 / top)


def _named_shapes(head: ProceduralHead) -> list[np.ndarray]:
    p = head.vertices
    x, y = p[:, 0], p[:, 1]
    zero = np.zeros_like(x)
    mouth_y = head.vertices[head.grid_index[head.features.mouth_row, NUM_COLUMNS // 2], 1]
    eyes = head.features.eye_centres
    fields = [
        (p - np.array([0.0, 0.0, -0.01])) * 0.035,  # head size
        np.stack([0.05 * x, zero, zero], -1),  # head width
        np.stack([zero, (y - 0.01) * _smoothstep((0.01 - y) / 0.04) * _front(p), zero], -1),  # face length
        (p - np.array([0.0, 0.012, 0.058]))[:, :] * _gauss(p, np.array([0.0, 0.0, 0.088]), 0.02)[:, None],  # nose
        np.stack([x * _smoothstep((-0.02 - y) / 0.03) * _front(p), zero, zero], -1),  # jaw width
        np.stack([zero, (y - 0.03) * _smoothstep((y - 0.03) / 0.03), zero], -1),  # cranium height
        np.stack([zero, zero, _gauss(p, np.array([0.0, -0.075, 0.05]), 0.02)], -1),  # chin projection
        _mirrored(p, lambda q: _gauss(q, np.array([0.045, -0.02, 0.04]), 0.025)[:, None] * [1.0, 0.0, 0.5]),  # cheeks
        _mirrored(p, lambda q: _gauss(q, eyes["left"], 0.018)[:, None] * [1.0, 0.0, 0.0]),  # eye spacing
        _lip_fullness(p, mouth_y),
        np.stack([zero, zero, _gauss(p, np.array([0.0, 0.025, 0.07]), 0.015)], -1),  # nose bridge
        np.stack([zero, zero, _smoothstep((y - 0.04) / 0.05) * _front(p, 0.0, 0.04)], -1),  # forehead slope
    ]
    sizes_mm = (4.5, 4.0, 7.0, 3.0, 4.5, 5.0, 4.0, 3.5, 2.5, 2.0, 2.5, 4.0)
    return [_rigid_eyes(head, _peak(f, mm)) for f, mm in zip(fields, sizes_mm)]


def _distance_to_polyline(points, polyline):
    """Distance (N,) from 2D points (N, 2) to a polyline (K, 2)."""
    best = np.full(len(points), np.inf)
    for a, b in zip(polyline[:-1], polyline[1:]):
        ab = b - a
        t = np.clip(((points - a) * ab).sum(1) / (ab * ab).sum(), 0.0, 1.0)
        best = np.minimum(best, np.linalg.norm(points - a - t[:, None] * ab, axis=1))
    return best


def _lip_fullness(p, mouth_y):
    g = _gauss(p, np.array([0.0, mouth_y, 0.07]), np.array([0.026, 0.012, 0.02]))
    return np.stack([np.zeros_like(g), 0.35 * (p[:, 1] - mouth_y) / 0.012 * g, g], -1)


def _random_smooth(head: ProceduralHead, rng: np.random.Generator, region: np.ndarray, symmetric: bool):
    """A smooth displacement field: a few Gaussian bumps with random 3D directions, made mirror
    symmetric or antisymmetric, weighted by ``region`` (V,), with unit RMS over the vertices."""
    p = head.vertices
    skin = head.parts["skin"]
    candidates = skin[region[skin] > 0.5]
    centres = p[rng.choice(candidates, size=5)]
    sigmas = rng.uniform(0.02, 0.05, size=5)
    vectors = rng.normal(size=(5, 3))

    def field(q):
        out = np.zeros_like(q)
        for c, s, v in zip(centres, sigmas, vectors):
            out += _gauss(q, c, s)[:, None] * v
        return out

    mirror = np.array([-1.0, 1.0, 1.0])
    mirrored = field(p * mirror) * mirror
    total = (field(p) + mirrored if symmetric else field(p) - mirrored) * region[:, None]
    rms = np.sqrt((total * total).sum(1).mean())
    return _rigid_eyes(head, total / max(rms, 1e-12))


def face_region(head: ProceduralHead) -> np.ndarray:
    """(V,) smooth weight of the face (front, above the neck) for expression fields."""
    p = head.vertices
    return _front(p, 0.0, 0.04) * _smoothstep((p[:, 1] + 0.1) / 0.02) * _smoothstep((0.075 - p[:, 1]) / 0.03)


def shape_directions(head: ProceduralHead, seed: int = 0) -> np.ndarray:
    """(V, 3, 300) identity blendshapes: the named ones, then random smooth ones shrinking with index."""
    named = _named_shapes(head)
    rng = np.random.default_rng(seed)
    whole = np.ones(len(head.vertices))
    columns = list(named)
    for k in range(NUM_SHAPE - len(named)):
        rms_mm = 1.6 * (1.0 + k) ** -0.9
        columns.append(_random_smooth(head, rng, whole, symmetric=k % 3 != 2) * rms_mm * 1e-3)
    return np.stack(columns, axis=-1)


def _named_expressions(head: ProceduralHead, jaw_joint: np.ndarray) -> list[np.ndarray]:
    p = head.vertices
    grid = head.grid_index
    corner = p[grid[head.features.mouth_row, head.features.mouth_columns[1]]]  # the +x corner
    front = _front(p, 0.0, 0.04)
    smile = _mirrored(p, lambda q: _gauss(q, corner, 0.013)[:, None] * [0.35, 1.0, -0.4]
                      + _gauss(q, np.array([0.042, -0.01, 0.045]), 0.02)[:, None] * [0.0, 0.35, 0.15])
    jaw = jaw_weights(head)
    lever = p - jaw_joint
    mouth_open = jaw[:, None] * np.stack([np.zeros(len(p)), -lever[:, 2], lever[:, 1]], -1) * MOUTH_OPEN_ANGLE
    eye = head.features.eye_centres["left"]

    def brow(q):  # the brows and the forehead above them; the lids stay put
        lid = np.hypot((q[:, 0] - eye[0]) / 0.012, (q[:, 1] - eye[1]) / 0.006)
        near_brow = np.exp(-((_distance_to_polyline(q[:, :2], LEFT_BROW) / 0.012) ** 2))
        forehead = 0.5 * _smoothstep((q[:, 1] - 0.045) / 0.02) * np.exp(-((q[:, 1] - 0.06) / 0.03) ** 2)
        return np.maximum(near_brow, forehead) * _smoothstep((lid - 1.1) / 0.8)

    brow_raise = _mirrored(p, lambda q: brow(q)[:, None] * [0.0, 1.0, 0.0]) * front[:, None]
    frown = _mirrored(p, lambda q: _gauss(q, np.array([0.018, 0.044, 0.065]), np.array([0.016, 0.012, 0.04]))[:, None]
                      * [-0.8, -1.0, 0.3]) * front[:, None]
    mouth_y = corner[1]
    lips = _gauss(p, np.array([0.0, mouth_y, 0.07]), np.array([0.026, 0.013, 0.025]))
    pucker = np.stack([-8.0 * p[:, 0] * lips, np.zeros(len(p)), 0.12 * lips], -1) * front[:, None]
    fields = [smile, mouth_open, brow_raise, frown, pucker]
    sizes_mm = (5.0, None, 5.0, 3.5, 5.0)
    return [_rigid_eyes(head, f if mm is None else _peak(f, mm)) for f, mm in zip(fields, sizes_mm)]


def expression_directions(head: ProceduralHead, jaw_joint: np.ndarray, seed: int = 1) -> np.ndarray:
    """(V, 3, 100) expression blendshapes: smile, mouth open, brow raise, frown, pucker, then small
    random smooth ones on the face."""
    named = _named_expressions(head, jaw_joint)
    rng = np.random.default_rng(seed)
    region = face_region(head)
    columns = list(named)
    for k in range(NUM_EXPRESSION - len(named)):
        rms_mm = 0.8 * (1.0 + k) ** -0.8
        columns.append(_random_smooth(head, rng, region, symmetric=k % 2 == 0) * rms_mm * 1e-3)
    return np.stack(columns, axis=-1)


def pose_directions(head: ProceduralHead) -> np.ndarray:
    """(V, 3, 36) pose correctives: as the jaw opens, the mouth corners are drawn in a little."""
    p = head.vertices
    corner = p[head.grid_index[head.features.mouth_row, head.features.mouth_columns[1]]]
    corrective = _mirrored(p, lambda q: _gauss(q, corner, 0.012)[:, None] * [-0.5, -0.25, -0.2]) * 0.012
    posedirs = np.zeros((len(p), 3, 36))
    posedirs[:, :, JAW_CORRECTIVE_FEATURE] = _rigid_eyes(head, corrective)
    return posedirs


def flame_arrays(head: ProceduralHead) -> dict[str, np.ndarray]:
    """The arrays of ``generic_model.pkl`` (``read_flame_model``'s keys) for the head."""
    regressor = joint_regressor(head)
    joints = (regressor[:, :, None] * head.vertices[None]).sum(1)  # no BLAS: same bits on any thread count
    shapedirs = np.concatenate([shape_directions(head), expression_directions(head, joints[JAW])], axis=-1)
    return {
        "v_template": head.vertices,
        "f": head.faces,
        "shapedirs": shapedirs,
        "posedirs": pose_directions(head),
        "J_regressor": regressor,
        "kintree_table": kintree_table(),
        "weights": skinning_weights(head),
    }
