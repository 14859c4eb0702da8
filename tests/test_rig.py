"""DECA rig on the built-in asset set: encode, decode, buffers, render_orig, FFHQ alignment, errors."""

import os

import pytest
import torch

from diffrig.deca.assets import resolve_deca_dir
from diffrig.deca.codes import RigCodes
from diffrig.deca.render import sh_shading
from diffrig.deca.rig import DECA
from diffrig.errors import AssetError, DataError

SIZE = 96  # render size of most tests: small keeps CPU rasterization fast


@pytest.fixture(scope="module")
def deca(builtin_cache):
    torch.manual_seed(0)
    return DECA.from_dir("builtin")


def plausible_codes(batch=2, yaw=0.0):
    """Mean face and texture, frontal, centred, lit from the front-left."""
    flat = torch.zeros(batch, 236)
    codes = RigCodes.from_flat(flat)
    codes.cam[:, 0] = 8.0
    codes.pose[:, 1] = yaw
    codes.light[:, 0] = 2.6  # ambient
    codes.light[:, 1] = 0.3  # x
    codes.light[:, 3] = 0.5  # z (towards the camera)
    return codes


def test_encode_gives_decas_code_sizes(deca):
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        codes = deca.encode(images)
    sizes = {name: tuple(value.shape) for name, value in codes.as_dict().items()}
    assert sizes == {"shape": (2, 100), "tex": (2, 50), "exp": (2, 50), "pose": (2, 6), "cam": (2, 3),
                     "light": (2, 9, 3)}
    assert codes.flat().shape == (2, 236) and torch.isfinite(codes.flat()).all()
    with torch.no_grad():
        torch.testing.assert_close(deca.encode(images[1:]).flat(), codes[1].flat(), atol=1e-4, rtol=1e-4)


def test_encode_rejects_uncropped_images(deca):
    with pytest.raises(DataError, match="224"):
        deca.encode(torch.rand(1, 3, 256, 256))
    with pytest.raises(TypeError, match="uint8.*255"):
        deca.encode(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(TypeError, match="ndarray"):
        deca.encode(torch.rand(1, 3, 224, 224).numpy())


def test_decode_refuses_transforms_and_sizes_that_do_not_fit(deca):
    codes = plausible_codes()
    with pytest.raises(ValueError, match=r"tform must be \(2, 3, 3\)"):
        deca.decode(codes, size=SIZE, tform=torch.eye(3))
    with pytest.raises(ValueError, match=r"tform must be \(2, 3, 3\)"):
        deca.decode(codes, size=SIZE, tform=torch.eye(3).repeat(3, 1, 1))
    with pytest.raises(ValueError, match="size must be positive"):
        deca.decode(codes, size=0, render=False)


def test_decode_geometry_and_buffers(deca):
    codes = plausible_codes()
    with torch.no_grad():
        out = deca.decode(codes, size=SIZE)
    batch, num_vertices = 2, deca.flame.v_template.shape[0]
    assert out.vertices.shape == out.transformed_vertices.shape == (batch, num_vertices, 3)
    assert out.landmarks2d.shape == (batch, 68, 2) and out.landmarks3d.shape == (batch, 68, 3)
    for name in ("rendered", "normal", "albedo"):
        assert getattr(out, name).shape == (batch, 3, SIZE, SIZE)
    assert out.alpha.shape == (batch, 1, SIZE, SIZE)
    assert out.buffers.shape == (batch, 9, SIZE, SIZE)
    torch.testing.assert_close(out.buffers, torch.cat([out.rendered, out.normal, out.albedo], 1))

    # DECA's camera: x' = s (x + tx), y' = -s (y + ty)
    torch.testing.assert_close(out.transformed_vertices[..., 0], 8.0 * out.vertices[..., 0])
    torch.testing.assert_close(out.transformed_vertices[..., 1], -8.0 * out.vertices[..., 1])

    alpha = out.alpha
    assert set(alpha.unique().tolist()) <= {0.0, 1.0}
    assert 0.1 < alpha.mean() < 0.9  # a face, not an empty or full frame
    assert out.albedo.min() >= 0 and out.albedo.max() <= 1  # mean texture
    assert out.normal.min() >= -1 - 1e-5 and out.normal.max() <= 1 + 1e-5
    for buffer in (out.rendered, out.normal, out.albedo):
        assert (buffer * (1 - alpha)).abs().max() == 0  # masked
    # rendered = albedo x SH shading of the (interpolated world) normals
    torch.testing.assert_close(out.rendered, out.albedo * sh_shading(out.normal, codes.light) * alpha)
    # frontal light: the face looks towards +z, so most covered normals do too
    assert (out.normal[:, 2][alpha[:, 0] > 0] > 0).float().mean() > 0.9


def test_decode_without_rendering_skips_buffers(deca):
    with torch.no_grad():
        out = deca.decode(plausible_codes(1), render=False)
    assert out.rendered is None and out.vertices.shape[0] == 1
    with pytest.raises(ValueError, match="render=False"):
        out.buffers


def test_render_orig_maps_the_crop_into_the_original_frame(deca):
    codes = plausible_codes(1)
    codes.cam[:, 0] = 4.0  # the whole head inside the crop
    with torch.no_grad():
        crop = deca.decode(codes, size=SIZE)
        assert crop.alpha[..., [0, -1], :].sum() == 0 and crop.alpha[..., [0, -1]].sum() == 0
        # the 224² crop is the square [40, 120)² of a 160² original: crop pixel = (original - 40) * 2.8
        ratio, corner, original_size = 224 / 80, 40.0, 160
        tform = torch.tensor([[[ratio, 0, -corner * ratio], [0, ratio, -corner * ratio], [0, 0, 1]]])
        orig = deca.decode(codes, size=original_size, tform=tform)
    assert orig.rendered.shape == (1, 3, original_size, original_size)

    def to_original_pixels(points):  # crop-normalised -> crop pixels -> original pixels
        return ((points[..., :2] * 0.5 + 0.5) * 224) / ratio + corner

    want = to_original_pixels(crop.landmarks2d) / original_size * 2 - 1
    torch.testing.assert_close(orig.landmarks2d, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(orig.vertices, crop.vertices)
    alpha = orig.alpha[0, 0]
    inside = torch.zeros_like(alpha, dtype=torch.bool)
    inside[40:120, 40:120] = True
    assert alpha[~inside].sum() == 0 and alpha[inside].sum() > 0
    # same face, drawn at 80 px instead of SIZE px
    area_ratio = alpha.sum() / crop.alpha.sum()
    assert abs(area_ratio.item() - (80 / SIZE) ** 2) < 0.05


def test_render_orig_needs_the_original_size(deca):
    with pytest.raises(ValueError, match=r"decode\(tform=...\) needs size=\(H, W\) of the original image"):
        deca.decode(plausible_codes(1), tform=torch.eye(3)[None])


def ffhq_point(landmarks):
    eyes = 0.5 * (landmarks[:, 36:42].mean(1) + landmarks[:, 42:48].mean(1))
    mouth = 0.5 * (landmarks[:, 48] + landmarks[:, 54])
    return eyes + 0.1 * (mouth - eyes)


def test_ffhq_alignment_keeps_the_face_centre_when_pose_changes(deca):
    codes = plausible_codes(2)
    turned = codes.replace(pose=codes.pose + torch.tensor([0.15, 0.5, 0.05, 0.1, 0.0, 0.0]))
    with torch.no_grad():
        centre = deca.ffhq_center(codes)
        before = deca.decode(codes, render=False)
        drifted = deca.decode(turned, render=False)
        aligned = deca.decode(turned, ffhq_center=centre, render=False)
    assert centre.shape == (2, 3)
    start = ffhq_point(before.landmarks2d)
    assert (ffhq_point(drifted.landmarks2d) - start).abs().max() > 0.02  # turning the head moves it
    torch.testing.assert_close(ffhq_point(aligned.landmarks2d), start, atol=1e-5, rtol=0)
    torch.testing.assert_close(deca.ffhq_center(codes), centre)  # a pure function of the codes


def test_gradients_reach_the_codes(deca):
    codes = plausible_codes(1)
    light = codes.light.clone().requires_grad_(True)
    tex = codes.tex.clone().requires_grad_(True)
    out = deca.decode(codes.replace(light=light, tex=tex), size=48)
    out.rendered.mean().backward()
    assert light.grad.abs().sum() > 0 and tex.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in deca.parameters())
    deca.train()  # e.g. from a parent module: the encoder's batch norm must keep its statistics
    assert not deca.encoder.training


def test_from_dir_of_an_empty_folder_names_the_missing_files(tmp_path):
    with pytest.raises(AssetError) as info:
        DECA.from_dir(tmp_path)
    message = str(info.value)
    for name in ("deca_model.tar", "generic_model.pkl", "landmark_embedding.npy", "head_template.obj",
                 "FLAME_texture.npz", "FLAME_albedo_from_BFM.npz"):
        assert name in message
    assert "flame.is.tue.mpg.de" in message  # where to get them


def test_texture_space_choice(deca, builtin_cache, tmp_path):
    source = resolve_deca_dir("builtin")
    for path in source.iterdir():
        if path.name != "FLAME_texture.npz":
            os.symlink(path, tmp_path / path.name)
    with pytest.raises(AssetError, match="FLAME_texture.npz"):
        DECA.from_dir(tmp_path, texture="FLAME")
    with pytest.raises(AssetError, match="unknown texture space"):
        DECA.from_dir(tmp_path, texture="albedoMM")
    assert deca.albedo_space.kind == "FLAME"  # preferred when both are there
    bfm = DECA.from_dir(tmp_path)  # only the BFM space left
    assert bfm.albedo_space.kind == "BFM"


def test_package_exports():
    import diffrig.deca as deca_package

    for name in ("FLAME", "DECA", "AlbedoSpace", "DecaEncoder", "BufferRenderer", "rasterize", "ensure_builtin",
                 "RigCodes", "RigOutput"):
        assert name in deca_package.__all__
        assert getattr(deca_package, name).__name__ == name
    assert deca_package.DECA is DECA
    with pytest.raises(AttributeError, match="no attribute 'Decoder'"):
        deca_package.Decoder
