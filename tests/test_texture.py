"""AlbedoSpace: DECA's FLAMETex semantics for both texture files."""

import numpy as np
import pytest
import torch

from diffrig.deca.texture import AlbedoSpace
from diffrig.errors import AssetError

SIDE, N_PC = 16, 7


def expected_albedo(mean, basis, tex, scale, uv_size):
    """Independent numpy statement of DECA's decoding: affine map, BGR->RGB, nearest resample."""
    image = (mean.reshape(SIDE, SIDE, 3) + basis.reshape(SIDE, SIDE, 3, -1)[..., : tex.size] @ tex) * scale
    step = SIDE // uv_size
    return image[::step, ::step, ::-1].transpose(2, 0, 1)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(3)
    return {
        "FLAME": (rng.uniform(0, 255, (SIDE, SIDE, 3)), rng.normal(0, 9, (SIDE, SIDE, 3, N_PC))),
        # the BFM file stores MU as one row and PC as (pixels*3, components)
        "BFM": (rng.uniform(0, 1, (1, SIDE * SIDE * 3)), rng.normal(0, 0.05, (SIDE * SIDE * 3, N_PC))),
    }


@pytest.mark.parametrize("kind,scale", [("FLAME", 1 / 255), ("BFM", 1.0)])
def test_decoding_matches_deca(arrays, kind, scale):
    mean, basis = arrays[kind]
    space = AlbedoSpace(kind, mean, basis, n_tex=5, uv_size=SIDE // 2)
    tex = np.random.default_rng(0).normal(size=(2, 5))
    out = space(torch.from_numpy(tex).float())
    assert out.shape == (2, 3, SIDE // 2, SIDE // 2)
    for b in range(2):
        want = expected_albedo(mean, basis, tex[b], scale, SIDE // 2)
        np.testing.assert_allclose(out[b].numpy(), want, atol=1e-5)


def test_zero_code_gives_mean_in_rgb(arrays):
    mean, basis = arrays["FLAME"]
    space = AlbedoSpace("FLAME", mean, basis, n_tex=N_PC, uv_size=SIDE)
    out = space(torch.zeros(1, N_PC))[0]
    # channel 0 of the output is the file's last channel (files are BGR)
    np.testing.assert_allclose(out[0].numpy(), mean[..., 2] / 255, atol=1e-6)
    np.testing.assert_allclose(out[2].numpy(), mean[..., 0] / 255, atol=1e-6)
    assert 0 <= out.min() and out.max() <= 1


def test_only_leading_components_are_kept(arrays):
    mean, basis = arrays["BFM"]
    space = AlbedoSpace("BFM", mean, basis, n_tex=3)
    assert space.basis.shape == (3, SIDE * SIDE * 3)
    with pytest.raises(ValueError, match="uses 3"):
        space(torch.zeros(1, 4))


def test_default_output_is_deca_uv_size(arrays):
    mean, basis = arrays["BFM"]
    out = AlbedoSpace("BFM", mean, basis, n_tex=2)(torch.zeros(1, 2))
    assert out.shape == (1, 3, 256, 256)


def test_bad_inputs_raise_asset_errors(arrays):
    mean, basis = arrays["FLAME"]
    with pytest.raises(AssetError, match="kind"):
        AlbedoSpace("albedoMM", mean, basis)
    with pytest.raises(AssetError, match="7"):
        AlbedoSpace("FLAME", mean, basis, n_tex=50)
    with pytest.raises(AssetError, match="square"):
        AlbedoSpace("FLAME", mean[:-1], basis[:-1])


@pytest.mark.parametrize("name,keys,kind", [
    ("FLAME_texture.npz", ("mean", "tex_dir"), "FLAME"),
    ("FLAME_albedo_from_BFM.npz", ("MU", "PC"), "BFM"),
])
def test_from_file_reads_both_kinds(tmp_path, arrays, name, keys, kind):
    mean, basis = arrays[kind]
    path = tmp_path / name
    np.savez(path, **{keys[0]: mean.astype(np.float32), keys[1]: basis.astype(np.float32)})
    space = AlbedoSpace.from_file(path, n_tex=4, uv_size=SIDE)
    assert space.kind == kind and space.n_tex == 4
    tex = np.linspace(-1, 1, 4)
    out = space(torch.from_numpy(tex)[None].float())[0].numpy()
    np.testing.assert_allclose(out, expected_albedo(mean, basis, tex, 1 / 255 if kind == "FLAME" else 1.0, SIDE), atol=1e-5)
