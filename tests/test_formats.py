import pickle
import pickletools
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from diffrig.deca import assets
from diffrig.deca.formats import (
    LANDMARK_KEYS,
    ObjMesh,
    TextureSpace,
    read_array,
    read_deca_checkpoint,
    read_flame_model,
    read_landmark_embedding,
    read_mask,
    read_obj,
    read_rgb,
    read_texture_space,
    write_deca_checkpoint,
    write_flame_model,
    write_image,
    write_landmark_embedding,
    write_obj,
    write_texture_space,
)
from diffrig.errors import AssetError, UnsafePickleError


def _flame_arrays(seed=0, vertices=30, faces=40, components=12):
    rng = np.random.default_rng(seed)
    regressor = np.where(rng.random((5, vertices)) < 0.3, rng.random((5, vertices)), 0.0)
    return {
        "v_template": rng.normal(size=(vertices, 3)),
        "f": rng.integers(0, vertices, size=(faces, 3)),
        "shapedirs": rng.normal(size=(vertices, 3, components)),
        "posedirs": rng.normal(size=(vertices, 3, 36)),
        "J_regressor": regressor,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "weights": rng.dirichlet(np.ones(5), size=vertices),
    }


def _globals(data: bytes) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


# ------------------------------------------------------------------ FLAME model


def test_flame_model_round_trip(tmp_path):
    arrays = _flame_arrays()
    path = tmp_path / "generic_model.pkl"
    write_flame_model(path, arrays)
    model = read_flame_model(path)
    assert set(model) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(model[key], value, err_msg=key)
    assert model["f"].dtype == np.int64 and model["kintree_table"].dtype == np.int64
    assert model["J_regressor"].shape == (5, 30) and model["shapedirs"].dtype == np.float64


def test_written_flame_model_has_flame_2020_structure(tmp_path, monkeypatch):
    """Plain pickle (what DECA runs), with chumpy stubbed and real scipy, sees FLAME's types."""
    sparse = pytest.importorskip("scipy.sparse")
    arrays = _flame_arrays(1)
    path = tmp_path / "generic_model.pkl"
    write_flame_model(path, arrays)
    data = path.read_bytes()
    assert data[:2] == b"\x80\x02"
    assert _globals(data) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype",
                              "chumpy.ch Ch", "scipy.sparse.csc csc_matrix", "__builtin__ set"}

    class Ch:
        def __setstate__(self, state):
            self.__dict__.update(state)

    chumpy_ch = types.ModuleType("chumpy.ch")
    chumpy_ch.Ch = Ch
    monkeypatch.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
    monkeypatch.setitem(sys.modules, "chumpy.ch", chumpy_ch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy.sparse.csc is a deprecated alias
        model = pickle.loads(data, encoding="latin1")
    assert sorted(model) == sorted(["f", "J_regressor", "kintree_table", "J", "weights", "posedirs",
                                    "v_template", "shapedirs", "bs_style", "bs_type"])
    assert isinstance(model["shapedirs"], Ch) and sparse.issparse(model["J_regressor"])
    assert model["J_regressor"].format == "csc"
    np.testing.assert_array_equal(model["J_regressor"].toarray(), arrays["J_regressor"])
    np.testing.assert_array_equal(model["shapedirs"].x, arrays["shapedirs"])
    np.testing.assert_allclose(model["J"], arrays["J_regressor"] @ arrays["v_template"])
    assert model["f"].dtype == np.uint32 and (model["bs_style"], model["bs_type"]) == ("lbs", "lrotmin")
    assert set(model["shapedirs"].__dict__) == {"x", "_dirty_vars", "_itr", "_make_dense", "_make_sparse",
                                               "_depends_on_deps", "_status"}


def test_flame_model_with_scipy_pickled_regressor(tmp_path):
    """A model re-saved by Python 3 (scipy.sparse._csc, numpy._core, _codecs) reads the same."""
    sparse = pytest.importorskip("scipy.sparse")
    arrays = _flame_arrays(2)
    saved = dict(arrays, J_regressor=sparse.csc_matrix(arrays["J_regressor"]))
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(saved, protocol=2))
    np.testing.assert_array_equal(read_flame_model(path)["J_regressor"], arrays["J_regressor"])


def test_flame_model_missing_and_malformed(tmp_path):
    with pytest.raises(AssetError, match=r"generic_model\.pkl.*flame\.is\.tue\.mpg\.de"):
        read_flame_model(tmp_path / "generic_model.pkl")
    path = tmp_path / "generic_model.pkl"
    write_flame_model(path, _flame_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(AssetError, match=r"generic_model\.pkl is not a valid FLAME"):
        read_flame_model(path)
    path.write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}, protocol=2))
    with pytest.raises(AssetError, match="no f, shapedirs"):
        read_flame_model(path)


def test_flame_model_naming_os_system_is_unsafe(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "generic_model.pkl"
    command = f"touch {marker}".encode()
    path.write_bytes(b"\x80\x02cos\nsystem\nU" + bytes([len(command)]) + command + b"\x85R.")
    with pytest.raises(UnsafePickleError, match="os.system"):
        read_flame_model(path)
    assert not marker.exists()


# ------------------------------------------------------------------ landmark embedding


def test_real_landmark_embedding(deca_public):
    embedding = read_landmark_embedding(deca_public / "landmark_embedding.npy")
    expected = {
        "static_lmk_faces_idx": ((51,), np.int64), "static_lmk_bary_coords": ((51, 3), np.float64),
        "dynamic_lmk_faces_idx": ((79, 17), np.int64), "dynamic_lmk_bary_coords": ((79, 17, 3), np.float32),
        "full_lmk_faces_idx": ((1, 68), np.int64), "full_lmk_bary_coords": ((1, 68, 3), np.float32),
    }
    assert list(embedding) == list(expected)
    for key, (shape, dtype) in expected.items():
        assert isinstance(embedding[key], np.ndarray) and embedding[key].shape == shape and embedding[key].dtype == dtype
    np.testing.assert_allclose(embedding["static_lmk_bary_coords"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedding["dynamic_lmk_bary_coords"].sum(-1), 1.0, atol=1e-5)
    assert embedding["static_lmk_faces_idx"][:3].tolist() == [6365, 3772, 2857]
    assert embedding["dynamic_lmk_faces_idx"][0, :3].tolist() == [1504, 7727, 3410]
    assert 0 <= embedding["full_lmk_faces_idx"].min() and embedding["full_lmk_faces_idx"].max() < 9976


def test_landmark_embedding_rewrite_matches_real_file(deca_public, tmp_path):
    real_path = deca_public / "landmark_embedding.npy"
    real = read_landmark_embedding(real_path)
    path = tmp_path / "landmark_embedding.npy"
    write_landmark_embedding(path, real)
    ours = read_landmark_embedding(path)
    for key in LANDMARK_KEYS:
        np.testing.assert_array_equal(ours[key], real[key])
        assert ours[key].dtype == real[key].dtype
    # The same pickle globals, and what DECA's np.load(allow_pickle=True) sees: the same types.
    real_bytes, our_bytes = real_path.read_bytes(), path.read_bytes()
    assert our_bytes[:128] == real_bytes[:128]  # npy header
    assert _globals(our_bytes[128:]) == _globals(real_bytes[128:])
    trusted = np.load(path, allow_pickle=True, encoding="latin1")[()]
    reference = np.load(real_path, allow_pickle=True, encoding="latin1")[()]
    for key in LANDMARK_KEYS:
        assert type(trusted[key]) is type(reference[key]), key
        assert np.asarray(trusted[key]).dtype == np.asarray(reference[key]).dtype
        np.testing.assert_array_equal(np.asarray(trusted[key]), np.asarray(reference[key]))
    assert reference["static_lmk_bary_coords"].flags.f_contiguous == trusted["static_lmk_bary_coords"].flags.f_contiguous


def test_landmark_embedding_errors(tmp_path):
    path = tmp_path / "landmark_embedding.npy"
    with pytest.raises(AssetError, match=r"landmark_embedding\.npy.*DECA"):
        read_landmark_embedding(path)
    np.save(path, np.zeros(3))
    with pytest.raises(AssetError, match="not a pickled dict"):
        read_landmark_embedding(path)
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AssetError, match=r"landmark_embedding\.npy is not a valid"):
        read_landmark_embedding(path)


# ------------------------------------------------------------------ OBJ


def test_real_head_template(deca_public):
    mesh = read_obj(deca_public / "head_template.obj")
    assert mesh.vertices.shape == (5023, 3) and mesh.vertices.dtype == np.float32
    assert mesh.faces.shape == (9976, 3) and mesh.faces.dtype == np.int64
    assert mesh.uvcoords.shape == (5118, 2) and mesh.uvfaces.shape == (9976, 3)
    assert mesh.faces.min() == 0 and mesh.faces.max() == 5022
    assert mesh.uvfaces.min() == 0 and mesh.uvfaces.max() == 5117
    assert mesh.faces[0].tolist() == [3, 1, 0] and mesh.uvfaces[0].tolist() == [0, 1, 2]  # "f 4/1 2/2 1/3"
    assert 0.0 <= mesh.uvcoords.min() and mesh.uvcoords.max() <= 1.0


def test_obj_face_forms_and_round_trip(tmp_path):
    path = tmp_path / "m.obj"
    path.write_text(
        "# comment\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nvn 0 0 1\n"
        "f 1/1/1 2/2/1 3/3/1\nf 1/1 3/3 4/4\nf -4/-4 -3/-3 -1/-1\nf 1/1 2/2 3/3 4/4\n"
    )
    mesh = read_obj(path)
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 2, 3]]
    assert mesh.uvfaces.tolist() == mesh.faces.tolist()
    plain = tmp_path / "plain.obj"
    plain.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1//1 2//1 3//1\n")
    assert read_obj(plain).uvfaces.shape == (0, 3)
    out = tmp_path / "out.obj"
    write_obj(out, mesh)
    again = read_obj(out)
    for field in ("vertices", "faces", "uvcoords", "uvfaces"):
        np.testing.assert_array_equal(getattr(again, field), getattr(mesh, field))


def test_obj_errors(tmp_path):
    with pytest.raises(AssetError, match=r"head_template\.obj.*DECA"):
        read_obj(tmp_path / "head_template.obj")
    bad = tmp_path / "head_template.obj"
    bad.write_text("v 0 0 0\nf 1 2 3\n")
    with pytest.raises(AssetError, match="vertex that does not exist"):
        read_obj(bad)
    bad.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3\n")
    with pytest.raises(AssetError, match="texture indices"):
        read_obj(bad)
    round_trip = ObjMesh(np.zeros((3, 3)), np.array([[0, 1, 2]]), np.zeros((0, 2)), np.zeros((0, 3), int))
    write_obj(tmp_path / "tri.obj", round_trip)
    assert read_obj(tmp_path / "tri.obj").faces.tolist() == [[0, 1, 2]]


# ------------------------------------------------------------------ texture spaces


@pytest.mark.parametrize("kind,name,keys", [("FLAME", "FLAME_texture.npz", ("mean", "tex_dir")),
                                            ("BFM", "FLAME_albedo_from_BFM.npz", ("MU", "PC"))])
def test_texture_space_round_trip(tmp_path, kind, name, keys):
    rng = np.random.default_rng(3)
    side, components = 8, 5
    mean = rng.random(side * side * 3)
    basis = rng.normal(size=(side * side * 3, components))
    path = tmp_path / name
    write_texture_space(path, TextureSpace(kind, mean, basis))
    with np.load(path) as stored:
        assert sorted(stored.files) == sorted(keys)
        expected_shapes = ((side, side, 3), (side, side, 3, components)) if kind == "FLAME" else (
            (side * side * 3,), (side * side * 3, components))
        assert (stored[keys[0]].shape, stored[keys[1]].shape) == expected_shapes
    space = read_texture_space(path)
    assert space.kind == kind
    np.testing.assert_array_equal(space.mean.reshape(-1), mean)
    np.testing.assert_array_equal(space.basis.reshape(-1, components), basis)


def test_texture_space_errors(tmp_path):
    with pytest.raises(AssetError, match=r"FLAME_albedo_from_BFM\.npz.*BFM_to_FLAME"):
        read_texture_space(tmp_path / "FLAME_albedo_from_BFM.npz")
    path = tmp_path / "FLAME_texture.npz"
    np.savez(path, something=np.zeros(3))
    with pytest.raises(AssetError, match="not mean/tex_dir"):
        read_texture_space(path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    np.savez(path, mean=np.zeros(12), tex_dir=np.array([Payload()], dtype=object))  # a pickle inside
    with pytest.raises(AssetError, match=r"FLAME_texture\.npz is not a valid FLAME albedo space .*Object arrays"):
        read_texture_space(path)
    assert not marker.exists()  # refused before anything was unpickled
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(AssetError, match="FLAME_texture.npz is not a valid"):
        read_texture_space(path)


# ------------------------------------------------------------------ images and arrays


def test_real_masks_and_texture(deca_public):
    from PIL import Image

    mask = read_mask(deca_public / "uv_face_eye_mask.png")
    raw = np.asarray(Image.open(deca_public / "uv_face_eye_mask.png"))
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    np.testing.assert_allclose(mask, raw[..., 0] / 255.0, atol=1e-7)
    assert 0.0 == mask.min() and mask.max() == 1.0
    rgb = read_rgb(deca_public / "mean_texture.jpg")
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.float32 and 0.0 <= rgb.min() and rgb.max() <= 1.0
    displacement = read_array(deca_public / "fixed_displacement_256.npy")
    assert displacement.shape == (256, 256)


def test_image_round_trip_and_errors(tmp_path):
    mask = np.zeros((6, 7))
    mask[2:4, 1:5] = 1.0
    write_image(tmp_path / "uv_face_mask.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "uv_face_mask.png"), mask.astype(np.float32))
    rgb = np.random.default_rng(4).random((5, 4, 3))
    write_image(tmp_path / "x.png", rgb)
    np.testing.assert_allclose(read_rgb(tmp_path / "x.png"), rgb, atol=0.5 / 255 + 1e-6)
    with pytest.raises(AssetError, match=r"uv_face_eye_mask\.png.*DECA"):
        read_mask(tmp_path / "uv_face_eye_mask.png")
    (tmp_path / "mean_texture.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(AssetError, match="mean_texture.jpg is not a valid"):
        read_rgb(tmp_path / "mean_texture.jpg")
    pickled = tmp_path / "fixed_displacement_256.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(AssetError, match="fixed_displacement_256.npy"):
        read_array(pickled)


# ------------------------------------------------------------------ DECA checkpoint


def test_deca_checkpoint_round_trip(tmp_path):
    parts = {name: {"layer.weight": torch.randn(3, 2), "layer.bias": torch.arange(3.0)}
             for name in ("E_flame", "E_detail", "D_detail")}
    path = tmp_path / "deca_model.tar"
    write_deca_checkpoint(path, parts)
    loaded = read_deca_checkpoint(path)
    assert sorted(loaded) == sorted(parts)
    for name, state in parts.items():
        assert sorted(loaded[name]) == sorted(state)
        for key, tensor in state.items():
            assert torch.equal(loaded[name][key], tensor)


def test_deca_checkpoint_errors(tmp_path):
    path = tmp_path / "deca_model.tar"
    with pytest.raises(AssetError, match=r"deca_model\.tar.*fetch_data"):
        read_deca_checkpoint(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(AssetError, match=r"deca_model\.tar is not a valid"):
        read_deca_checkpoint(path)
    torch.save({"something": {"w": torch.zeros(1)}}, path)
    with pytest.raises(AssetError, match="none of E_flame"):
        read_deca_checkpoint(path)

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"E_flame": {"w": torch.zeros(1)}, "opt": Exploit()}, path)
    with pytest.raises(UnsafePickleError, match="system"):
        read_deca_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------ asset folders


def test_asset_path_and_folder(tmp_path, monkeypatch):
    (tmp_path / "head_template.obj").write_text("v 0 0 0\n")
    assert assets.asset_path(tmp_path, "head_template.obj") == tmp_path / "head_template.obj"
    with pytest.raises(AssetError, match=r"generic_model\.pkl.*FLAME 2020.*flame\.is\.tue\.mpg\.de"):
        assets.asset_path(tmp_path, "generic_model.pkl")
    assert assets.resolve_deca_dir(tmp_path) == tmp_path
    with pytest.raises(AssetError, match=r"does not exist.*generic_model\.pkl.*'builtin'"):
        assets.resolve_deca_dir(tmp_path / "nowhere")
    monkeypatch.setenv("DIFFRIG_DECA_DIR", str(tmp_path))
    assert assets.resolve_deca_dir() == tmp_path


def test_builtin_folder_is_generated_on_demand(tmp_path, monkeypatch):
    calls = []
    builtin = types.ModuleType("diffrig.deca.builtin")
    builtin.ensure_builtin = lambda root=None: calls.append(root) or tmp_path
    monkeypatch.setitem(sys.modules, "diffrig.deca.builtin", builtin)
    assert assets.resolve_deca_dir("builtin") == tmp_path and calls == [None]
