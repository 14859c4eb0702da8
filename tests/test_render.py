import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffrig.deca.render import (
    SH_CONSTANTS,
    BufferRenderer,
    orthographic_project,
    sh_shading,
    transform_points,
    vertex_normals,
)
from test_rasterizer import uv_sphere


def sphere_mesh(rings=32, columns=64, radius=0.8):
    verts, faces = uv_sphere(rings, columns, radius)
    # Per-vertex UVs (longitude, latitude) kept off the texture border, where grid_sample's zero
    # padding would darken a constant texture.
    u = (torch.atan2(verts[:, 2], verts[:, 0]) / (2 * math.pi)) % 1.0
    v = 0.5 + torch.asin((verts[:, 1] / radius).clamp(-1, 1)) / math.pi
    uv = 0.1 + 0.8 * torch.stack([u, v], -1)
    mesh = SimpleNamespace(faces=faces, uvcoords=uv.float(), uvfaces=faces.clone())
    return verts.float(), mesh


def test_sh_constants_are_deca_s():
    pi = math.pi
    expected = [
        1 / math.sqrt(4 * pi),
        2 * pi / 3 * math.sqrt(3 / (4 * pi)),
        2 * pi / 3 * math.sqrt(3 / (4 * pi)),
        2 * pi / 3 * math.sqrt(3 / (4 * pi)),
        pi / 4 * 3 * math.sqrt(5 / (12 * pi)),
        pi / 4 * 3 * math.sqrt(5 / (12 * pi)),
        pi / 4 * 3 * math.sqrt(5 / (12 * pi)),
        pi / 4 * 3 / 2 * math.sqrt(5 / (12 * pi)),
        pi / 4 / 2 * math.sqrt(5 / (4 * pi)),
    ]
    assert torch.allclose(SH_CONSTANTS.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7)


def test_sh_shading_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    normals = F.normalize(torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64), dim=1)
    sh = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    shading = sh_shading(normals, sh)
    c = SH_CONSTANTS.double()
    for b in range(2):
        for row, col in [(0, 0), (4, 6), (2, 3)]:
            x, y, z = normals[b, :, row, col].tolist()
            basis = [1, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1]
            for channel in range(3):
                closed = sum(c[k] * basis[k] * sh[b, k, channel] for k in range(9))
                assert shading[b, channel, row, col].item() == pytest.approx(closed.item(), abs=1e-12)
    # An order-1 light along +z is a clamped-cosine-free linear ramp in n_z.
    only_z = torch.zeros(2, 9, 3, dtype=torch.float64)
    only_z[:, 3] = 1.5
    ramp = sh_shading(normals, only_z)
    assert torch.allclose(ramp, 1.5 * c[3] * normals[:, 2:3].expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"SH lights must be \(B, 9, 3\), got \(2, 4, 3\)"):
        sh_shading(normals, sh[:, :4])


def test_vertex_normals_of_a_sphere_point_outwards():
    verts, faces = uv_sphere(24, 48, radius=2.0)
    normals = vertex_normals(verts[None], faces)[0]
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(verts), dtype=torch.float64), atol=1e-9)
    error = (normals - verts / 2.0).norm(dim=-1)
    assert error.max() < 0.03 and error.mean() < 0.01
    # A regular octahedron: by symmetry every vertex normal is exactly the vertex direction.
    octa = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float64)
    octa_faces = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    assert torch.allclose(vertex_normals(3 * octa[None], octa_faces)[0], octa, atol=1e-12)
    batched = vertex_normals(torch.stack([verts, -verts]), faces)
    # Point reflection leaves every cross product unchanged: the same normals, now pointing inwards.
    assert torch.allclose(batched[0], normals) and torch.allclose(batched[1], normals, atol=1e-12)


def test_orthographic_projection_flips_y_and_z():
    points = torch.tensor([[[0.1, 0.2, 0.3], [-0.5, 0.0, 1.0]]])
    cam = torch.tensor([[2.0, 0.5, -0.25]])
    out = orthographic_project(points, cam)
    expected = torch.tensor([[[1.2, 0.1, -0.6], [0.0, 0.5, -2.0]]])
    assert torch.allclose(out, expected)


def test_transform_points_follows_deca_s_render_orig():
    points = torch.tensor([[[-1.0, -1.0, 0.3], [1.0, 0.5, -0.2]]])
    crop = 224
    # Crop made from the original by T: crop_px = 0.5 * orig_px - (10, 20); DECA passes inv(T)^T.
    T = torch.tensor([[[0.5, 0.0, -10.0], [0.0, 0.5, -20.0], [0.0, 0.0, 1.0]]])
    tform = torch.inverse(T).transpose(1, 2)
    height, width = 600, 500
    out = transform_points(points, tform, [crop, crop], [height, width])
    crop_px = (points[..., :2] * 0.5 + 0.5) * crop
    orig_px = (crop_px + torch.tensor([10.0, 20.0])) / 0.5
    expected_xy = orig_px / torch.tensor([width, height]) * 2 - 1
    assert torch.allclose(out[..., :2], expected_xy, atol=1e-5)
    assert torch.equal(out[..., 2], points[..., 2])
    identity = transform_points(points, torch.eye(3)[None], [crop, crop], [crop, crop])
    assert torch.allclose(identity, points, atol=1e-6)
    with pytest.raises(ValueError, match=r"points_scale must be square, got \(224, 225\)"):
        transform_points(points, tform, [crop, crop + 1])


def render_sphere(size=64, lights=None, albedo_uv=None, radius=0.8):
    verts, mesh = sphere_mesh(radius=radius)
    renderer = BufferRenderer(mesh, size)
    cam = torch.tensor([[1.0, 0.0, 0.0]])
    screen = orthographic_project(verts[None], cam)
    if albedo_uv is None:
        albedo_uv = torch.full((1, 3, 32, 32), 0.5)
    return renderer(verts[None], screen, albedo_uv, lights), screen


def test_sphere_normal_buffer_matches_the_analytic_normals():
    size = 64
    buffers, _ = render_sphere(size)
    normal, alpha = buffers["normal"][0], buffers["alpha"][0, 0]
    centres = (2 * torch.arange(size) + 1) / size - 1
    sy, sx = torch.meshgrid(centres, centres, indexing="ij")
    radius = 0.8
    inside = (sx**2 + sy**2) < (0.9 * radius) ** 2
    assert torch.all(alpha[inside] == 1)
    assert torch.all(alpha[(sx**2 + sy**2) > radius**2] == 0)
    # Visible hemisphere faces the camera: world normal (x, y, z) with world y = -screen y.
    expected = torch.stack([sx / radius, -sy / radius, (1 - (sx**2 + sy**2) / radius**2).clamp(min=0).sqrt()])
    assert (normal[:, inside] - expected[:, inside]).abs().max() < 0.03
    assert torch.all(normal[:, alpha == 0] == 0)
    assert normal.abs().max() <= 1.0


def test_rendered_is_albedo_times_sh_shading_masked():
    lights = torch.zeros(1, 9, 3)
    lights[0, 0] = torch.tensor([2.0, 3.0, 4.0])
    lights[0, 3] = torch.tensor([1.0, 0.0, -1.0])
    buffers, _ = render_sphere(48, lights=lights)
    alpha = buffers["alpha"]
    assert set(alpha.unique().tolist()) == {0.0, 1.0}
    c0, c3 = SH_CONSTANTS[0].item(), SH_CONSTANTS[3].item()
    nz = buffers["normal"][:, 2:3]
    expected = 0.5 * (lights[0, 0].view(1, 3, 1, 1) * c0 + lights[0, 3].view(1, 3, 1, 1) * c3 * nz) * alpha
    assert torch.allclose(buffers["rendered"], expected, atol=1e-5)
    assert torch.allclose(buffers["albedo"], 0.5 * alpha.expand(-1, 3, -1, -1))
    unlit, _ = render_sphere(48, lights=None)
    assert torch.allclose(unlit["rendered"], unlit["albedo"])


def test_albedo_is_sampled_at_interpolated_uvs_with_deca_s_v_flip():
    # A square in the image plane whose UVs span the unit square; the texture stores (u, 1 - v).
    size, tex = 32, 64
    verts = torch.tensor([[[-0.9, 0.9, 0.0], [0.9, 0.9, 0.0], [0.9, -0.9, 0.0], [-0.9, -0.9, 0.0]]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    renderer = BufferRenderer(SimpleNamespace(faces=faces, uvcoords=uv, uvfaces=faces), size)
    ramp = (torch.arange(tex) + 0.5) / tex
    texture = torch.stack([ramp[None, :].expand(tex, tex), ramp[:, None].expand(tex, tex), torch.zeros(tex, tex)])
    cam = torch.tensor([[1.0, 0.0, 0.0]])
    buffers = renderer(verts, orthographic_project(verts, cam), texture[None], None)
    alpha = buffers["alpha"][0, 0] > 0
    centres = (2 * torch.arange(size) + 1) / size - 1
    sy, sx = torch.meshgrid(centres, centres, indexing="ij")
    # screen (sx, sy) = world (x, -y): u runs with x; v runs with world y, i.e. against screen y.
    u = (sx + 0.9) / 1.8
    v = (0.9 - (-sy)) / 1.8
    inner = alpha & (u > 0.02) & (u < 0.98) & (v > 0.02) & (v < 0.98)
    assert inner.sum() > 500
    assert torch.allclose(buffers["albedo"][0, 0][inner], u[inner], atol=1e-4)
    assert torch.allclose(buffers["albedo"][0, 1][inner], 1 - v[inner], atol=1e-4)


def test_buffers_are_differentiable_and_inputs_untouched():
    verts, mesh = sphere_mesh(12, 24)
    renderer = BufferRenderer(mesh, 24)
    verts = verts[None].clone().requires_grad_(True)
    cam = torch.tensor([[1.0, 0.05, -0.05]])
    screen = orthographic_project(verts, cam)
    screen_before = screen.detach().clone()
    albedo = torch.rand(1, 3, 16, 16, requires_grad=True)
    lights = torch.randn(1, 9, 3, requires_grad=True)
    out = renderer(verts, screen, albedo, lights, h=20, w=28)
    assert out["rendered"].shape == (1, 3, 20, 28) and out["alpha"].shape == (1, 1, 20, 28)
    torch.cat([out["rendered"], out["normal"], out["albedo"]], 1).square().sum().backward()
    assert torch.equal(screen.detach(), screen_before)
    for tensor in (verts, albedo, lights):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_head_template_buffers(deca_public):
    from diffrig.deca.formats import read_obj

    mesh = read_obj(deca_public / "head_template.obj")
    verts = torch.as_tensor(mesh.vertices, dtype=torch.float32)[None]
    verts = verts - (verts.amax(1, keepdim=True) + verts.amin(1, keepdim=True)) / 2
    renderer = BufferRenderer(mesh, 224)
    cam = torch.tensor([[0.9 / verts.abs().max().item(), 0.0, 0.0]])
    lights = torch.zeros(1, 9, 3)
    lights[:, 0] = 3.0
    out = renderer(verts, orthographic_project(verts, cam), torch.full((1, 3, 256, 256), 0.6), lights)
    coverage = out["alpha"].mean().item()
    assert 0.2 < coverage < 0.9
    covered = out["alpha"][0, 0] > 0
    # The face looks at the camera: mostly positive world z normals where visible.
    assert (out["normal"][0, 2][covered] > 0).float().mean() > 0.8
    assert torch.allclose(out["rendered"][0][:, covered], torch.full((3,), 0.6 * 3.0 * SH_CONSTANTS[0].item())[:, None])
