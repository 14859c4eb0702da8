import math

import pytest
import torch

from diffrig.deca.rasterizer import Fragments, interpolate_face_attributes, rasterize


def to_screen(pixel_xy, width, height, z=1.0):
    """Pixel-index coordinates (pixel c has its centre at c) -> DECA screen frame, z appended."""
    pts = torch.as_tensor(pixel_xy, dtype=torch.float64)
    x = (2 * pts[..., 0] + 1) / width - 1
    y = (2 * pts[..., 1] + 1) / height - 1
    zs = torch.full_like(x, float(z)) if not torch.is_tensor(z) else z.to(x)
    return torch.stack([x, y, zs], -1)


def uv_sphere(rings=24, columns=48, radius=1.0):
    """Closed lat-long sphere: vertices (V, 3), faces (F, 3) wound counter-clockwise seen from outside."""
    verts = [[0.0, radius, 0.0]]
    for i in range(1, rings):
        theta = math.pi * i / rings
        for j in range(columns):
            phi = 2 * math.pi * j / columns
            verts.append([radius * math.sin(theta) * math.cos(phi), radius * math.cos(theta),
                          radius * math.sin(theta) * math.sin(phi)])
    verts.append([0.0, -radius, 0.0])
    faces = []
    ring = lambda i, j: 1 + (i - 1) * columns + j % columns  # noqa: E731
    for j in range(columns):
        faces.append([0, ring(1, j + 1), ring(1, j)])
        faces.append([len(verts) - 1, ring(rings - 1, j), ring(rings - 1, j + 1)])
    for i in range(1, rings - 1):
        for j in range(columns):
            faces.append([ring(i, j), ring(i, j + 1), ring(i + 1, j)])
            faces.append([ring(i, j + 1), ring(i + 1, j + 1), ring(i + 1, j)])
    return torch.tensor(verts, dtype=torch.float64), torch.tensor(faces)


def test_right_triangle_covers_the_analytic_pixel_count():
    # Legs of 10 pixels from (0.1, 0.1): centres (i, j) with i, j >= 1 and i + j <= 10 -> 45 pixels.
    size = 16
    tri = to_screen([[0.1, 0.1], [10.1, 0.1], [0.1, 10.1]], size, size, z=2.0)[None]
    frags = rasterize(tri.float(), torch.tensor([[0, 1, 2]]), size, size)
    covered = frags.pix_to_face[0] == 0
    expected = torch.zeros(size, size, dtype=torch.bool)
    for row in range(size):
        for col in range(size):
            expected[row, col] = col >= 1 and row >= 1 and col + row <= 10
    assert torch.equal(covered, expected)
    assert covered.sum() == 45
    assert torch.all(frags.pix_to_face[0][~covered] == -1)
    # The barycentrics reproduce each pixel centre; depth is the (planar) z.
    bary = frags.bary_coords[0][covered].double()
    assert torch.allclose(bary.sum(-1), torch.ones(45, dtype=torch.float64), atol=1e-5)
    centres = bary @ tri[0, :, :2]
    rows, cols = covered.nonzero(as_tuple=True)
    assert torch.allclose(centres[:, 0], (2 * cols + 1).double() / size - 1.0, atol=1e-5)
    assert torch.allclose(centres[:, 1], (2 * rows + 1).double() / size - 1.0, atol=1e-5)
    assert torch.allclose(frags.zbuf[0][covered], torch.full((45,), 2.0))
    assert torch.all(frags.zbuf[0][~covered] == -1) and torch.all(frags.bary_coords[0][~covered] == -1)


def test_pixel_centres_and_y_direction_on_a_non_square_image():
    height, width = 8, 16
    # A small triangle around the centre of pixel (row 1, col 12): top right of the image.
    tri = to_screen([[11.8, 0.8], [12.4, 0.8], [12.0, 1.3]], width, height)[None].float()
    frags = rasterize(tri, torch.tensor([[0, 1, 2]]), height, width)
    assert (frags.pix_to_face[0] == 0).nonzero().tolist() == [[1, 12]]
    x = (2 * 12 + 1) / width - 1
    y = (2 * 1 + 1) / height - 1
    assert y < 0  # DECA's frame: negative y is the top of the image
    point = frags.bary_coords[0, 1, 12].double() @ tri[0, :, :2].double()
    assert torch.allclose(point, torch.tensor([x, y], dtype=torch.float64), atol=1e-5)


def cube(half, centre_xy, depth):
    """Axis-aligned cube in screen space: (8, 3) vertices, (12, 3) faces, front faces = first two."""
    cx, cy = centre_xy
    corners = torch.tensor(
        [[cx + sx * half, cy + sy * half, depth + sz * half] for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)]
    )
    # corner index = 4 * (z > 0) + 2 * (y > 0) + (x > 0); front = z < 0 (nearer).
    faces = torch.tensor([
        [0, 1, 3], [0, 3, 2],  # front (z-)
        [4, 7, 5], [4, 6, 7],  # back (z+)
        [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],  # y- / y+
        [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3],  # x- / x+
    ])
    return corners, faces


def test_cube_front_face_wins_with_the_analytic_coverage():
    size = 16
    # Square from pixel x 2.3..9.6 and y 3.4..10.7: columns 3..9, rows 4..10 -> 49 pixels; its
    # diagonal y = x + 1.1 passes through no pixel centre.
    to_ndc = 2 / size
    half = 3.65 * to_ndc
    centre = ((2 * 5.95 + 1) / size - 1, (2 * 7.05 + 1) / size - 1)
    verts, faces = cube(half, centre, depth=3.0)
    for order in (torch.arange(12), torch.arange(11, -1, -1)):
        frags = rasterize(verts[None], faces[order], size, size)
        covered = frags.pix_to_face[0] >= 0
        expected = torch.zeros(size, size, dtype=torch.bool)
        expected[4:11, 3:10] = True
        assert torch.equal(covered, expected)
        winners = order[frags.pix_to_face[0][covered]]
        assert set(winners.tolist()) == {0, 1}  # only the front face is visible
        assert torch.allclose(frags.zbuf[0][covered], torch.full((49,), 3.0 - half), atol=1e-6)


def test_nearest_face_wins_and_exact_ties_go_to_the_lower_index():
    size = 8
    near = to_screen([[-1, -1], [9, -1], [-1, 9]], size, size, z=1.0)
    far = to_screen([[-1, -1], [9, -1], [-1, 9]], size, size, z=5.0)
    verts = torch.cat([far, near])[None].float()
    for faces, nearest in ((torch.tensor([[0, 1, 2], [3, 4, 5]]), 1), (torch.tensor([[3, 4, 5], [0, 1, 2]]), 0)):
        frags = rasterize(verts, faces, size, size)
        covered = frags.pix_to_face[0] >= 0
        assert covered.sum() > 20
        assert torch.all(frags.pix_to_face[0][covered] == nearest)
        assert torch.allclose(frags.zbuf[0][covered], torch.ones(int(covered.sum())))
    twins = torch.tensor([[3, 4, 5], [3, 4, 5], [3, 4, 5]])
    frags = rasterize(verts, twins, size, size)
    assert torch.all(frags.pix_to_face[0][frags.pix_to_face[0] >= 0] == 0)


def test_tilted_faces_are_ordered_per_pixel_by_interpolated_depth():
    # Two crossing planes: each is nearer on one side of x = 0.
    size = 32
    corners = [[-2, -2], [40, -2], [-2, 40]]
    a = to_screen(corners, size, size)
    a[:, 2] = 2.0 + a[:, 0]
    b = to_screen(corners, size, size)
    b[:, 2] = 2.0 - b[:, 0]
    frags = rasterize(torch.cat([a, b])[None].float(), torch.tensor([[0, 1, 2], [3, 4, 5]]), size, size)
    cols = torch.arange(size)
    x = (2 * cols + 1) / size - 1
    row = frags.pix_to_face[0, 0]
    assert torch.equal(row[x < 0], torch.zeros(int((x < 0).sum()), dtype=torch.long))
    assert torch.equal(row[x > 0], torch.ones(int((x > 0).sum()), dtype=torch.long))
    assert torch.allclose(frags.zbuf[0, 0], 2.0 - x.abs().float(), atol=1e-5)


def test_tiny_triangles_cover_a_pixel_only_when_they_contain_its_centre():
    size = 8
    inside = to_screen([[2.9, 4.9], [3.2, 4.9], [3.0, 5.2]], size, size)  # around centre (3, 5)
    between = to_screen([[5.2, 1.2], [5.6, 1.2], [5.4, 1.6]], size, size)  # no centre inside
    degenerate = to_screen([[0.0, 0.0], [7.0, 7.0], [3.5, 3.5]], size, size)  # zero area
    verts = torch.cat([inside, between, degenerate])[None].float()
    frags = rasterize(verts, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]), size, size)
    assert (frags.pix_to_face[0] >= 0).nonzero().tolist() == [[5, 3]]
    assert frags.pix_to_face[0, 5, 3] == 0


def test_huge_triangles_cover_everything_and_chunking_changes_nothing():
    size = 24
    huge = torch.tensor([[[-50.0, -50.0, 1.0], [200.0, -50.0, 1.0], [-50.0, 200.0, 1.5]]])
    frags = rasterize(huge, torch.tensor([[0, 1, 2]]), size, size)
    assert torch.all(frags.pix_to_face == 0)
    verts, faces = uv_sphere(12, 24, radius=0.8)
    verts = verts.float()
    verts[:, 2] += 2.0
    verts = torch.cat([verts[None], (verts * torch.tensor([1.2, 0.7, 1.0]))[None]])
    whole = rasterize(verts, faces, size, size)
    for max_pairs in (1, 7, 1000):
        chunked = rasterize(verts, faces, size, size, max_pairs=max_pairs)
        assert torch.equal(chunked.pix_to_face, whole.pix_to_face)
        assert torch.equal(chunked.bary_coords, whole.bary_coords)


def test_faces_behind_the_camera_are_skipped():
    size = 8
    tri = to_screen([[-1, -1], [9, -1], [-1, 9]], size, size, z=1.0)
    tri[0, 2] = -0.5  # one vertex behind: pytorch3d drops the whole face
    frags = rasterize(tri[None].float(), torch.tensor([[0, 1, 2]]), size, size)
    assert torch.all(frags.pix_to_face == -1)


def test_batched_faces_and_per_mesh_face_indices():
    size = 8
    tri = to_screen([[-1, -1], [9, -1], [-1, 9], [9, 9]], size, size)
    verts = torch.stack([tri, tri]).float()
    faces = torch.tensor([[[0, 1, 2]], [[1, 3, 2]]])
    frags = rasterize(verts, faces, size, size)
    assert frags.pix_to_face.shape == (2, size, size)
    assert frags.pix_to_face[0, 0, 0] == 0 and frags.pix_to_face[0, 7, 7] == -1
    assert frags.pix_to_face[1, 7, 7] == 0 and frags.pix_to_face[1, 0, 0] == -1
    # Per-mesh attributes are read from each mesh's own faces.
    attrs = torch.tensor([2.0, -3.0]).view(2, 1, 1, 1).expand(2, 1, 3, 1)
    image = interpolate_face_attributes(frags, attrs)[:, 0]
    assert torch.allclose(image[0][frags.pix_to_face[0] >= 0], torch.tensor(2.0))
    assert torch.allclose(image[1][frags.pix_to_face[1] >= 0], torch.tensor(-3.0))


def test_interpolate_face_attributes_is_barycentric_and_zero_outside():
    size = 16
    tri = to_screen([[0.1, 0.1], [10.1, 0.1], [0.1, 10.1]], size, size)[None].float()
    frags = rasterize(tri, torch.tensor([[0, 1, 2]]), size, size)
    attrs = tri[:, None]  # interpolate the screen positions themselves: (1, 1, 3, 3)
    image = interpolate_face_attributes(frags, attrs)
    assert image.shape == (1, 3, size, size)
    covered = frags.pix_to_face[0] >= 0
    rows, cols = covered.nonzero(as_tuple=True)
    assert torch.allclose(image[0, 0][covered], (2 * cols + 1).float() / size - 1, atol=1e-5)
    assert torch.allclose(image[0, 1][covered], (2 * rows + 1).float() / size - 1, atol=1e-5)
    assert torch.all(image[0][:, ~covered] == 0)
    with pytest.raises(ValueError, match=r"face_attributes must be \(B, F, 3, D\), got \(1, 1, 3\)"):
        interpolate_face_attributes(frags, attrs[..., 0])
    with pytest.raises(ValueError, match="face_attributes batch 2 does not match fragments batch 1"):
        interpolate_face_attributes(frags, attrs.expand(2, -1, -1, -1))


def test_gradients_flow_to_vertices_through_barycentrics():
    size = 12
    tri = to_screen([[0.3, 0.6], [10.7, 1.1], [1.2, 9.9]], size, size, z=2.0)[None]
    faces = torch.tensor([[0, 1, 2]])

    def interpolated(v):
        frags = rasterize(v, faces, size, size)
        values = torch.tensor([[[[1.0], [-2.0], [0.5]]]], dtype=v.dtype)
        return interpolate_face_attributes(frags, values).sum() + frags.zbuf.clamp(min=0).sum()

    vertices = tri.clone().requires_grad_(True)
    interpolated(vertices).backward()
    assert vertices.grad is not None and vertices.grad[..., :2].abs().sum() > 0
    assert torch.all(vertices.grad[..., 2] > 0)  # depth of covered pixels grows with every z
    assert torch.autograd.gradcheck(interpolated, (tri.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)


def test_sphere_at_1024_is_memory_safe_and_has_the_disc_area():
    verts, faces = uv_sphere(40, 80, radius=0.75)
    verts = verts.float()
    verts[:, 2] += 2.0
    frags = rasterize(verts[None], faces, 1024, 1024, max_pairs=2**20)
    covered = (frags.pix_to_face >= 0).sum().item()
    pixel_area = (2 / 1024) ** 2
    polygon_area = 0.5 * 80 * math.sin(2 * math.pi / 80) * 0.75**2  # the silhouette is an 80-gon
    assert abs(covered * pixel_area - polygon_area) / polygon_area < 2e-3
    assert isinstance(frags, Fragments)


def test_empty_mesh_and_bad_inputs():
    frags = rasterize(torch.zeros(2, 3, 3), torch.zeros(0, 3, dtype=torch.long), 4, 5)
    assert frags.pix_to_face.shape == (2, 4, 5) and torch.all(frags.pix_to_face == -1)
    with pytest.raises(ValueError, match=r"vertices must be \(B, V, 3\), got \(3, 3\)"):
        rasterize(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), 4, 4)
    with pytest.raises(ValueError, match="vertices must be floating point"):
        rasterize(torch.zeros(1, 3, 3, dtype=torch.long), torch.tensor([[0, 1, 2]]), 4, 4)
    with pytest.raises(ValueError, match=r"faces must be \(F, 3\) or \(B, F, 3\), got \(3,\)"):
        rasterize(torch.zeros(1, 3, 3), torch.tensor([0, 1, 2]), 4, 4)
    with pytest.raises(ValueError, match="faces batch 3 does not match vertices batch 2"):
        rasterize(torch.zeros(2, 3, 3), torch.tensor([[[0, 1, 2]]] * 3), 4, 4)
    with pytest.raises(ValueError, match="image size must be positive, got 0x4"):
        rasterize(torch.zeros(1, 3, 3), torch.tensor([[0, 1, 2]]), 0, 4)
