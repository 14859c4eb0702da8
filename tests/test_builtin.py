"""The built-in asset set: every file in DECA's formats, a sound mesh, landmarks and blendshapes
that mean what they say, deterministic and race-safe generation."""

import filecmp
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrig.deca import builtin, formats
from diffrig.deca.builtin import VERSION, ensure_builtin, flame_code_prior
from diffrig.deca.encoder import load_deca_encoder
from diffrig.deca.files import DECA_FILES
from diffrig.deca.flame import FLAME
from diffrig.deca.procedural_rig import LEFT_EYE, NAMED_EXPRESSIONS, RIGHT_EYE

SMILE, MOUTH_OPEN, BROW_RAISE, FROWN, PUCKER = range(5)
assert NAMED_EXPRESSIONS == ("smile", "mouth open", "brow raise", "frown", "pucker")


@pytest.fixture(scope="module")
def folder(builtin_cache) -> Path:
    return ensure_builtin()


@pytest.fixture(scope="module")
def model(folder):
    return formats.read_flame_model(folder / "generic_model.pkl")


@pytest.fixture(scope="module")
def flame(folder):
    return FLAME.from_files(folder / "generic_model.pkl", folder / "landmark_embedding.npy")


def run_flame(flame, exp=None, pose=None, eye_pose=None, shape=None):
    """One posed head: (vertices (V, 3), landmarks3d (68, 3)) as numpy."""
    zeros = lambda n: torch.zeros(1, n)  # noqa: E731
    e, s, p = zeros(50), zeros(100), zeros(6)
    for index, value in (exp or {}).items():
        e[0, index] = value
    for index, value in (shape or {}).items():
        s[0, index] = value
    for index, value in (pose or {}).items():
        p[0, index] = value
    with torch.no_grad():
        vertices, _, landmarks = flame(s, e, p, None if eye_pose is None else torch.tensor([eye_pose]))
    return vertices[0].numpy().astype(np.float64), landmarks[0].numpy().astype(np.float64)


# ----------------------------------------------------------------------------- files


def test_folder_is_versioned_and_complete(folder, builtin_cache):
    assert folder == Path(builtin_cache) / "builtin" / VERSION
    assert sorted(p.name for p in folder.iterdir()) == sorted(DECA_FILES)


def test_flame_model_has_flame_layout(folder, model):
    v, f = model["v_template"], model["f"]
    assert 4500 < len(v) < 6000 and 9000 < len(f) < 12000
    assert model["shapedirs"].shape == (len(v), 3, 400)
    assert model["posedirs"].shape == (len(v), 3, 36)
    assert model["J_regressor"].shape == (5, len(v)) and model["weights"].shape == (len(v), 5)
    assert model["kintree_table"][0, 1:].tolist() == [0, 1, 1, 1]
    np.testing.assert_allclose(model["J_regressor"].sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(model["weights"].sum(1), 1.0, atol=1e-9)
    assert model["J_regressor"].min() >= 0 and model["weights"].min() >= 0
    # metres, y up, z to the camera, FLAME's size and place
    width = np.ptp(v[:, 0])
    assert 0.15 < width < 0.19 and np.abs(v.mean(0)[0]) < 1e-9
    assert -0.2 < v[:, 1].min() < -0.15 and 0.1 < v[:, 1].max() < 0.15
    nose_tip = v[v[:, 2].argmax()]
    assert abs(nose_tip[0]) < 1e-3 and -0.02 < nose_tip[1] < 0.02 and 0.08 < nose_tip[2] < 0.1
    obj = formats.read_obj(folder / "head_template.obj")
    np.testing.assert_array_equal(obj.faces, f)
    np.testing.assert_allclose(obj.vertices, v, atol=1e-6)
    assert obj.uvfaces.shape == f.shape and obj.uvcoords.min() >= 0 and obj.uvcoords.max() <= 1


def test_texture_files_hold_50_bgr_components(folder):
    flame_space = formats.read_texture_space(folder / "FLAME_texture.npz")
    bfm_space = formats.read_texture_space(folder / "FLAME_albedo_from_BFM.npz")
    assert flame_space.kind == "FLAME" and flame_space.mean.shape == (256, 256, 3)
    assert flame_space.basis.shape == (256, 256, 3, 50)
    assert bfm_space.kind == "BFM" and bfm_space.mean.shape == (256 * 256 * 3,)
    assert bfm_space.basis.shape == (256 * 256 * 3, 50)
    np.testing.assert_allclose(flame_space.mean / 255.0, bfm_space.mean.reshape(256, 256, 3), atol=1e-5)
    mean = bfm_space.mean.reshape(256, 256, 3)
    skin = mean[30, 128]  # forehead, stored B, G, R
    assert skin[2] > skin[1] > skin[0] > 0.3
    mean_rgb = formats.read_rgb(folder / "mean_texture.jpg")
    assert np.abs(mean_rgb - mean[..., ::-1]).mean() < 0.01
    # the first component darkens the skin (darker for +1), the third reddens only the lips
    tone = bfm_space.basis.reshape(256, 256, 3, 50)[..., 0]
    assert (tone[30, 128] < -0.05).all()
    lips = bfm_space.basis.reshape(256, 256, 3, 50)[..., 2]
    assert np.abs(lips[30, 128]).max() == 0 and lips[..., 2].max() > 0.05


def test_masks_displacement_and_weights_load(folder):
    face = formats.read_mask(folder / "uv_face_mask.png")
    face_eyes = formats.read_mask(folder / "uv_face_eye_mask.png")
    assert face.shape == face_eyes.shape == (256, 256)
    assert 0.2 < face.mean() < 0.6 and (face_eyes >= face - 1e-6).all() and face_eyes.sum() > face.sum()
    displacement = formats.read_array(folder / "fixed_displacement_256.npy")
    assert displacement.shape == (256, 256) and displacement.dtype == np.float64
    assert 0 < np.abs(displacement).max() < 0.002
    checkpoint = formats.read_deca_checkpoint(folder / "deca_model.tar")
    assert set(checkpoint) == {"E_flame", "E_detail", "D_detail"}
    encoder = load_deca_encoder(checkpoint["E_flame"], outsize=236)
    load_deca_encoder(checkpoint["E_detail"], outsize=128)
    assert checkpoint["D_detail"]["l1.0.weight"].shape == (128 * 8 * 8, 181)
    assert checkpoint["D_detail"]["conv_blocks.21.weight"].shape == (1, 16, 3, 3)
    with torch.no_grad():
        grey = encoder(torch.full((1, 3, 224, 224), 0.5))[0]
        other = encoder(torch.linspace(0, 1, 224).expand(1, 3, 224, 224))[0]
    np.testing.assert_allclose(grey.numpy(), flame_code_prior(), atol=1e-3)
    assert 0 < (other - grey).abs().max() < 3 and 6 < other[206] < 12  # camera scale stays plausible


# ----------------------------------------------------------------------------- generation


def test_generation_is_deterministic(folder, tmp_path):
    again = ensure_builtin(tmp_path / "again")
    try:
        for name in DECA_FILES:
            assert filecmp.cmp(folder / name, again / name, shallow=False), name
    finally:
        shutil.rmtree(again)  # half a gigabyte


def test_ensure_is_idempotent(folder):
    stamp = (folder / "generic_model.pkl").stat().st_mtime_ns
    assert ensure_builtin() == folder
    assert (folder / "generic_model.pkl").stat().st_mtime_ns == stamp


def _fake_generate(tag):
    def generate(target):
        for name in DECA_FILES:
            Path(target, name).write_text(tag)
    return generate


def test_losing_a_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    root = tmp_path / "set"

    def winner_finishes_meanwhile(target):
        _fake_generate("winner")(tmp_path / "winner")
        os.replace(tmp_path / "winner", root)
        _fake_generate("loser")(target)

    (tmp_path / "winner").mkdir()
    monkeypatch.setattr(builtin, "generate_builtin", winner_finishes_meanwhile)
    assert ensure_builtin(root) == root
    assert {(root / name).read_text() for name in DECA_FILES} == {"winner"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging folder left


def test_an_interrupted_folder_is_completed(tmp_path, monkeypatch):
    root = tmp_path / "set"
    root.mkdir()
    (root / "generic_model.pkl").write_text("earlier")
    monkeypatch.setattr(builtin, "generate_builtin", _fake_generate("new"))
    ensure_builtin(root)
    assert (root / "generic_model.pkl").read_text() == "earlier"
    assert all((root / name).read_text() == "new" for name in DECA_FILES if name != "generic_model.pkl")


# ----------------------------------------------------------------------------- mesh


def _components(faces, num_vertices):
    parent = np.arange(num_vertices)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, c in faces:
        for x, y in ((a, b), (b, c)):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[rx] = ry
    return np.array([find(i) for i in range(num_vertices)])


def test_mesh_is_closed_oriented_and_outward(model):
    v, f = model["v_template"], model["f"]
    directed = Counter((a, b) for face in f.tolist() for a, b in zip(face, face[1:] + face[:1]))
    # every edge is shared by exactly two faces that traverse it in opposite directions
    assert max(directed.values()) == 1
    assert all((b, a) in directed for a, b in directed)
    labels = _components(f, len(v))
    assert len(np.unique(labels)) == 3  # skin with mouth bag, two eyeballs
    for label in np.unique(labels):
        faces = f[labels[f[:, 0]] == label]
        vertices = np.unique(faces)
        edges = len({tuple(sorted(e)) for face in faces.tolist() for e in zip(face, face[1:] + face[:1])})
        assert len(vertices) - edges + len(faces) == 2  # a sphere each
        a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
        assert (a * np.cross(b, c)).sum() / 6 > 0  # positive volume: normals point out


def test_deca_style_vertex_normals_point_out(model):
    v, f = model["v_template"], model["f"]
    # DECA: face normal = (v2 - v1) x (v0 - v1), summed per vertex
    face_normals = np.cross(v[f[:, 2]] - v[f[:, 1]], v[f[:, 0]] - v[f[:, 1]])
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, f[:, k], face_normals)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    assert normals[v[:, 2].argmax(), 2] > 0.9  # nose tip faces the camera
    assert normals[v[:, 1].argmax(), 1] > 0.9  # top of the head faces up
    assert normals[v[:, 0].argmax(), 0] > 0.7  # the +x side faces +x
    left_eye = model["weights"][:, LEFT_EYE] == 1
    centre = v[left_eye].mean(0)
    assert ((normals[left_eye] * (v[left_eye] - centre)).sum(1) > 0).all()


# ----------------------------------------------------------------------------- landmarks


def test_landmark_embedding_is_valid(folder, model):
    embedding = formats.read_landmark_embedding(folder / "landmark_embedding.npy")
    num_faces = len(model["f"])
    for kind in ("static", "dynamic", "full"):
        faces, bary = embedding[f"{kind}_lmk_faces_idx"], embedding[f"{kind}_lmk_bary_coords"]
        assert faces.min() >= 0 and faces.max() < num_faces
        assert bary.min() >= 0
        np.testing.assert_allclose(bary.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embedding["full_lmk_faces_idx"][0, 17:], embedding["static_lmk_faces_idx"])
    np.testing.assert_array_equal(embedding["full_lmk_faces_idx"][0, :17], embedding["dynamic_lmk_faces_idx"][0])


def test_landmarks_sit_on_their_features(flame):
    _, lm = run_flame(flame)
    x, y, z = lm.T
    nose_tip, nose_base = lm[30], lm[33]
    assert z[30] == z.max() and abs(x[30]) < 1e-3
    # iBUG order: index 0..16 jaw from the subject's right (x < 0) to left, 8 the chin, lowest
    assert np.all(np.diff(x[:17]) > 0) and y[8] == y.min()
    for right, left in ((36, 45), (39, 42), (17, 26), (21, 22), (31, 35), (48, 54), (0, 16)):
        assert x[right] < 0 < x[left]
        np.testing.assert_allclose(lm[left] * [-1, 1, 1], lm[right], atol=1e-4)  # mirror images
    eyes = lm[36:48]
    assert (eyes[:, 1] > nose_tip[1]).all() and (eyes[:, 1] < lm[18:26, 1].min()).all()  # brows above
    assert x[36] < x[39] < 0 and 0 < x[42] < x[45]  # eye corners either side of the nose
    assert y[37] > y[41] and y[44] > y[46]  # upper lids above lower lids
    mouth = lm[48:68]
    assert (mouth[:, 1] < nose_base[1]).all() and (mouth[:, 1] > y[8]).all()
    assert y[51] > y[62] and y[66] > y[57]  # outer lips enclose the lip line
    np.testing.assert_allclose(lm[62], lm[66], atol=1e-9)  # closed lips at rest


def test_contour_follows_the_yaw(folder, model):
    embedding = formats.read_landmark_embedding(folder / "landmark_embedding.npy")
    v, f = model["v_template"], model["f"]
    faces, bary = embedding["dynamic_lmk_faces_idx"], embedding["dynamic_lmk_bary_coords"]
    contour = (v[f[faces]] * bary[..., None]).sum(-2)  # (79, 17, 3)
    turned_left, turned_right = contour[30], contour[39 + 30]  # +30 and -30 degrees
    # turning by +yaw hides the +x side: its outline moves forward onto the cheek
    assert (turned_left[10:17, 2] > contour[0, 10:17, 2] - 1e-9).all()
    assert turned_left[10:17, 2].mean() > contour[0, 10:17, 2].mean() + 0.005
    np.testing.assert_allclose(turned_right * [-1, 1, 1], turned_left[::-1], atol=1e-4)


# ----------------------------------------------------------------------------- blendshapes and pose


def test_expressions_do_what_their_names_say(flame):
    _, rest = run_flame(flame)

    def moved(index):
        return run_flame(flame, exp={index: 1.5})[1] - rest

    smile = moved(SMILE)
    assert (smile[[48, 54], 1] > 0.004).all() and np.abs(smile[17:27]).max() < 1e-4
    opened = moved(MOUTH_OPEN)
    assert opened[57, 1] < -0.006 and opened[66, 1] < -0.006 and abs(opened[62, 1]) < 0.001
    raised = moved(BROW_RAISE)
    assert (raised[17:27, 1] > 0.002).all() and np.abs(raised[48:68]).max() < 1e-4
    frown = moved(FROWN)
    assert frown[21, 0] > 0.001 and frown[22, 0] < -0.001 and (frown[[19, 24], 1] < 0).all()
    pucker = moved(PUCKER)
    assert (pucker[[51, 57, 62], 2] > 0.003).all() and pucker[48, 0] > 0.001 and pucker[54, 0] < -0.001


def test_jaw_rotation_parts_the_lips(flame):
    _, rest = run_flame(flame)
    _, opened = run_flame(flame, pose={3: 0.2})
    assert rest[62, 1] - rest[66, 1] == pytest.approx(0.0, abs=1e-6)
    assert opened[62, 1] - opened[66, 1] > 0.008
    np.testing.assert_allclose(opened[17:48], rest[17:48], atol=5e-5)  # brows, nose and eyes stay


def test_eye_pose_turns_only_the_eyeballs(flame, model):
    rest, _ = run_flame(flame)
    turned, _ = run_flame(flame, eye_pose=[0.0, 0.4, 0.0, 0.0, 0.4, 0.0])
    eyes = (model["weights"][:, LEFT_EYE] == 1) | (model["weights"][:, RIGHT_EYE] == 1)
    np.testing.assert_allclose(turned[~eyes], rest[~eyes], atol=1e-7)
    left = model["weights"][:, LEFT_EYE] == 1
    centre = rest[left].mean(0)
    np.testing.assert_allclose(np.linalg.norm(turned[left] - centre, axis=1),
                               np.linalg.norm(rest[left] - centre, axis=1), atol=1e-6)
    assert turned[left][:, 0].max() > rest[left][:, 0].max() - 1e-4 and np.abs(turned[left] - rest[left]).max() > 0.003


def test_shape_space_is_smooth_low_rank_and_keeps_eyes_rigid(model):
    shapedirs = model["shapedirs"]
    sizes = np.linalg.norm(shapedirs, axis=1).max(0)  # largest vertex displacement per column (m)
    assert (sizes[:12] > 0.0015).all() and (sizes[:12] < 0.012).all()  # named: mm to a centimetre
    assert sizes[12] > 10 * sizes[290]  # random components shrink
    assert (sizes[300:305] > 0.003).all() and sizes[305] > sizes[399] > 0
    for joint in (LEFT_EYE, RIGHT_EYE):
        eye = shapedirs[model["weights"][:, joint] == 1]
        np.testing.assert_allclose(eye, np.broadcast_to(eye[:1], eye.shape), atol=1e-12)
