"""FLAME with DECA's semantics: blendshape columns, skinning, pose correctives, landmarks."""
import math

import numpy as np
import pytest
import torch

from diffrig.deca.flame import FLAME, contour_row
from diffrig.deca.lbs import pose_rotations
from diffrig.errors import AssetError

# vertex groups of the toy model, by the joint that drives them
ROOT_ONLY, NECK_ONLY, JAW_ONLY, NECK_JAW, EYE_A, EYE_B = (
    np.arange(0, 10), np.arange(10, 20), np.arange(20, 30), np.arange(30, 35), np.arange(35, 42), np.arange(42, 49)
)
NUM_VERTICES, NUM_FACES = 49, 60


def toy_model(seed=0, columns=400, posedirs=True):
    rng = np.random.default_rng(seed)
    weights = np.zeros((NUM_VERTICES, 5))
    for group, joints in ((ROOT_ONLY, [0]), (NECK_ONLY, [1]), (JAW_ONLY, [2]), (NECK_JAW, [1, 2]),
                          (EYE_A, [3]), (EYE_B, [4])):
        weights[np.ix_(group, joints)] = 1.0 / len(joints)
    regressor = np.zeros((5, NUM_VERTICES))
    for joint, group in enumerate((ROOT_ONLY, NECK_ONLY, JAW_ONLY, EYE_A, EYE_B)):
        regressor[joint, group] = rng.uniform(0.5, 1.0, len(group))
    regressor /= regressor.sum(axis=1, keepdims=True)
    return {
        "v_template": rng.normal(scale=0.1, size=(NUM_VERTICES, 3)),
        "f": rng.integers(0, NUM_VERTICES, size=(NUM_FACES, 3)),
        "shapedirs": rng.normal(scale=0.01, size=(NUM_VERTICES, 3, columns)),
        "posedirs": rng.normal(scale=0.01, size=(NUM_VERTICES, 3, 36)) * posedirs,
        "J_regressor": regressor,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "weights": weights,
    }


def toy_embedding(seed=1):
    rng = np.random.default_rng(seed)

    def bary(*shape):
        b = rng.uniform(0.05, 1.0, size=shape + (3,))
        return b / b.sum(axis=-1, keepdims=True)

    return {  # same types and shapes as DECA's file: numpy and torch, full set with a leading 1
        "static_lmk_faces_idx": rng.integers(0, NUM_FACES, 51),
        "static_lmk_bary_coords": bary(51),
        "dynamic_lmk_faces_idx": torch.from_numpy(rng.integers(0, NUM_FACES, (79, 17))),
        "dynamic_lmk_bary_coords": torch.from_numpy(bary(79, 17)).float(),
        "full_lmk_faces_idx": rng.integers(0, NUM_FACES, (1, 68)),
        "full_lmk_bary_coords": bary(1, 68).astype(np.float32),
    }


def codes(flame, batch=1, seed=2, scale=0.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, n, generator=g) for n in (flame.n_shape, flame.n_exp, 6)]


def barycentric(vertices, faces, face_idx, bary):
    """Reference landmark interpolation in numpy: (V, 3) -> (L, 3)."""
    corners = vertices[np.asarray(faces)[np.asarray(face_idx).reshape(-1)]]
    return np.einsum("lki,lk->li", corners, np.asarray(bary, dtype=np.float64).reshape(-1, 3))


def moved(before, after, tol=1e-6):
    return set(np.flatnonzero((after - before).norm(dim=-1).squeeze(0).numpy() > tol))


def test_zero_codes_give_the_template():
    model = toy_model()
    flame = FLAME.from_arrays(model, toy_embedding())
    vertices, landmarks2d, landmarks3d = flame(*codes(flame, batch=2))
    assert vertices.shape == (2, NUM_VERTICES, 3) and vertices.dtype == torch.float32
    assert landmarks2d.shape == (2, 68, 3) and landmarks3d.shape == (2, 68, 3)
    torch.testing.assert_close(vertices, torch.tensor(model["v_template"]).float().expand(2, -1, -1),
                               atol=1e-6, rtol=0)


def test_shape_reads_first_columns_and_expression_reads_from_column_300():
    model = toy_model()
    flame = FLAME.from_arrays(model, toy_embedding(), n_shape=3, n_exp=2)
    template = torch.tensor(model["v_template"]).float()
    for which, index, column in (("shape", 2, 2), ("expression", 0, 300), ("expression", 1, 301)):
        shape, expression, pose = codes(flame)
        (shape if which == "shape" else expression)[0, index] = 1.0
        vertices = flame(shape, expression, pose)[0][0]
        torch.testing.assert_close(vertices - template, torch.tensor(model["shapedirs"][:, :, column]).float(),
                                   atol=1e-6, rtol=0)


def test_jaw_rotation_turns_only_jaw_weighted_vertices_about_the_jaw_joint():
    model = toy_model(posedirs=False)
    flame = FLAME.from_arrays(model, toy_embedding())
    shape, expression, pose = codes(flame)
    rest = flame(shape, expression, pose)[0]
    pose[0, 3:] = torch.tensor([0.4, 0.1, -0.05])
    opened = flame(shape, expression, pose)[0]

    assert moved(rest, opened) == set(np.flatnonzero(model["weights"][:, 2] > 0))
    jaw_joint = model["J_regressor"][2] @ model["v_template"]
    rotation = pose_rotations(pose[:, 3:]).squeeze().double().numpy()
    expected = (model["v_template"][JAW_ONLY] - jaw_joint) @ rotation.T + jaw_joint
    np.testing.assert_allclose(opened[0, JAW_ONLY].numpy(), expected, atol=1e-6)


def test_global_rotation_turns_the_whole_head_about_the_root_joint():
    model = toy_model(posedirs=False)
    flame = FLAME.from_arrays(model, toy_embedding())
    shape, expression, pose = codes(flame)
    pose[0, :3] = torch.tensor([0.3, -1.2, 0.2])
    vertices = flame(shape, expression, pose)[0][0].double().numpy()
    root = model["J_regressor"][0] @ model["v_template"]
    rotation = pose_rotations(pose[:, :3]).squeeze().double().numpy()
    np.testing.assert_allclose(vertices, (model["v_template"] - root) @ rotation.T + root, atol=1e-6)


def test_pose_correctives_add_posedirs_times_rotation_minus_identity():
    model = toy_model()
    flame = FLAME.from_arrays(model, toy_embedding())
    shape, expression, pose = codes(flame)
    pose[0, 3] = 0.5
    vertices = flame(shape, expression, pose)[0][0].double().numpy()
    feature = np.zeros(36)
    feature[9:18] = (pose_rotations(pose[:, 3:]).squeeze().double().numpy() - np.eye(3)).reshape(-1)  # jaw slot
    expected = model["v_template"] + model["posedirs"] @ feature
    np.testing.assert_allclose(vertices[ROOT_ONLY], expected[ROOT_ONLY], atol=1e-6)


def test_eye_pose_turns_only_its_own_eye():
    model = toy_model(posedirs=False)
    flame = FLAME.from_arrays(model, toy_embedding())
    shape, expression, pose = codes(flame)
    rest = flame(shape, expression, pose)[0]
    for offset, eye in ((0, EYE_A), (3, EYE_B)):
        eye_pose = torch.zeros(1, 6)
        eye_pose[0, offset:offset + 3] = torch.tensor([0.2, 0.3, 0.0])
        assert moved(rest, flame(shape, expression, pose, eye_pose)[0]) == set(eye)
    torch.testing.assert_close(flame(shape, expression, pose, torch.zeros(1, 6))[0], rest)


def test_landmarks_are_barycentric_points_of_the_embedding_faces():
    model, embedding = toy_model(), toy_embedding()
    flame = FLAME.from_arrays(model, embedding)
    shape, expression, pose = codes(flame, scale=0.3)
    pose[0, :3] = torch.tensor([0.3, 0.0, 0.0])  # a nod has no yaw: contour row 0
    vertices, landmarks2d, landmarks3d = flame(shape, expression, pose)
    v = vertices[0].double().numpy()
    full = barycentric(v, model["f"], embedding["full_lmk_faces_idx"], embedding["full_lmk_bary_coords"])
    np.testing.assert_allclose(landmarks3d[0].numpy(), full, atol=1e-6)
    contour = barycentric(v, model["f"], embedding["dynamic_lmk_faces_idx"][0], embedding["dynamic_lmk_bary_coords"][0])
    static = barycentric(v, model["f"], embedding["static_lmk_faces_idx"], embedding["static_lmk_bary_coords"])
    np.testing.assert_allclose(landmarks2d[0].numpy(), np.concatenate([contour, static]), atol=1e-6)


@pytest.mark.parametrize(
    "yaw, row",
    [(0.0, 0), (0.4, 0), (20.0, 20), (39.2, 39), (70.0, 39), (-0.6, 40), (-20.0, 59), (-38.6, 78), (-80.0, 78)],
)
def test_contour_follows_head_yaw(yaw, row):
    model, embedding = toy_model(), toy_embedding()
    flame = FLAME.from_arrays(model, embedding)
    shape, expression, pose = codes(flame)
    pose[0, :3] = torch.tensor([0.0, math.radians(yaw), 0.0])
    vertices, landmarks2d, _ = flame(shape, expression, pose)
    expected = barycentric(vertices[0].double().numpy(), model["f"], embedding["dynamic_lmk_faces_idx"][row],
                           embedding["dynamic_lmk_bary_coords"][row])
    np.testing.assert_allclose(landmarks2d[0, :17].numpy(), expected, atol=1e-6)
    assert contour_row(torch.tensor([yaw]), 39).item() == row


def test_batch_equals_one_at_a_time_and_gradients_are_finite_at_rest():
    flame = FLAME.from_arrays(toy_model(), toy_embedding())
    shape, expression, pose = codes(flame, batch=3, scale=0.5)
    pose[0] = 0.0
    for code in (shape, expression, pose):
        code.requires_grad_(True)
    batched = flame(shape, expression, pose)
    for i in range(3):
        single = flame(shape[i:i + 1], expression[i:i + 1], pose[i:i + 1])
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i:i + 1], s, atol=1e-6, rtol=0)
    sum(out.sum() for out in batched).backward()
    for code in (shape, expression, pose):
        assert torch.isfinite(code.grad).all() and code.grad.abs().sum() > 0


def test_buffers_follow_the_module_and_stay_out_of_the_state_dict():
    flame = FLAME.from_arrays(toy_model(), toy_embedding()).to(torch.device("cpu"))
    buffers = dict(flame.named_buffers())
    assert buffers["faces"].dtype == torch.long and buffers["faces"].shape == (NUM_FACES, 3)
    assert buffers["shapedirs"].shape == (NUM_VERTICES, 3, 150) and buffers["shapedirs"].dtype == torch.float32
    assert flame.state_dict() == {}
    if torch.cuda.is_available():
        on_gpu = FLAME.from_arrays(toy_model(), toy_embedding()).cuda()
        shape, expression, pose = codes(flame, scale=0.3)
        for cpu, gpu in zip(flame(shape, expression, pose), on_gpu(shape.cuda(), expression.cuda(), pose.cuda())):
            torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "columns, n_shape, n_exp, fits",
    [(400, 300, 100, True), (350, 100, 50, True), (350, 100, 51, False), (400, 301, 50, False), (300, 100, 0, True),
     (300, 100, 1, False)],
)
def test_codes_must_fit_the_shapedirs_columns(columns, n_shape, n_exp, fits):
    model = toy_model(columns=columns)
    if fits:
        assert FLAME.from_arrays(model, toy_embedding(), n_shape, n_exp).shapedirs.shape[-1] == n_shape + n_exp
    else:
        with pytest.raises(AssetError, match=f"{columns} shapedirs columns"):
            FLAME.from_arrays(model, toy_embedding(), n_shape, n_exp)


def test_malformed_assets_raise_asset_errors():
    model, embedding = toy_model(), toy_embedding()
    with pytest.raises(AssetError, match="lacks posedirs"):
        FLAME.from_arrays({k: v for k, v in model.items() if k != "posedirs"}, embedding)
    with pytest.raises(AssetError, match="weights"):
        FLAME.from_arrays({**model, "weights": model["weights"][:, :4]}, embedding)
    with pytest.raises(AssetError, match="kintree_table parents"):
        FLAME.from_arrays({**model, "kintree_table": np.array([[-1, 0, 4, 1, 1], [0, 1, 2, 3, 4]])}, embedding)
    with pytest.raises(AssetError, match="static landmarks"):
        FLAME.from_arrays(model, {**embedding, "static_lmk_faces_idx": embedding["static_lmk_faces_idx"] + NUM_FACES})
    with pytest.raises(AssetError, match="contour table"):
        FLAME.from_arrays(model, {**embedding, "dynamic_lmk_faces_idx": embedding["dynamic_lmk_faces_idx"][:78],
                                  "dynamic_lmk_bary_coords": embedding["dynamic_lmk_bary_coords"][:78]})


def test_wrong_code_sizes_are_rejected():
    flame = FLAME.from_arrays(toy_model(), toy_embedding())
    shape, expression, pose = codes(flame, batch=2)
    with pytest.raises(ValueError, match="expression must have shape"):
        flame(shape, expression[:, :10], pose)
    with pytest.raises(ValueError, match="pose must have shape"):
        flame(shape, expression, pose[:1])


def test_real_embedding_on_the_head_template(deca_public):
    from diffrig.deca.formats import read_landmark_embedding, read_obj

    mesh = read_obj(deca_public / "head_template.obj")
    num_vertices = len(mesh.vertices)
    rng = np.random.default_rng(0)
    weights = np.zeros((num_vertices, 5))
    weights[:, 0] = 1.0
    model = {
        "v_template": mesh.vertices, "f": mesh.faces,
        "shapedirs": rng.normal(scale=1e-3, size=(num_vertices, 3, 400)),
        "posedirs": np.zeros((num_vertices, 3, 36)),
        "J_regressor": np.full((5, num_vertices), 1.0 / num_vertices),
        "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]), "weights": weights,
    }
    flame = FLAME.from_arrays(model, read_landmark_embedding(deca_public / "landmark_embedding.npy"))
    shape, expression, pose = codes(flame, batch=1, scale=0.5)
    shape, expression, pose = shape.expand(2, -1), expression.expand(2, -1), pose.repeat(2, 1)
    pose[:, :3] = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.radians(30), 0.0]])
    vertices, landmarks2d, landmarks3d = flame(shape, expression, pose)
    assert vertices.shape == (2, num_vertices, 3) and landmarks2d.shape == (2, 68, 3)
    # DECA's static landmarks are the last 51 of the full set; the contour is its own table
    torch.testing.assert_close(landmarks2d[:, 17:], landmarks3d[:, 17:], atol=1e-6, rtol=0)
    assert (landmarks2d[0, :17] - landmarks3d[0, :17]).norm(dim=-1).max() > 1e-3
    # undo the head turn: static landmarks land where they were, the contour slides to other points
    root = flame.J_regressor[0] @ vertices[0]
    turn = pose_rotations(pose[1:, :3])[0, 0]
    unturned = (landmarks2d[1] - root) @ turn + root
    torch.testing.assert_close(unturned[17:], landmarks2d[0, 17:], atol=1e-5, rtol=0)
    assert (unturned[:17] - landmarks2d[0, :17]).norm(dim=-1).max() > 5e-3


def test_from_files_reads_the_third_party_formats(tmp_path):
    from diffrig.deca.formats import write_flame_model, write_landmark_embedding

    model, embedding = toy_model(), toy_embedding()
    model_path, embedding_path = tmp_path / "generic_model.pkl", tmp_path / "landmark_embedding.npy"
    with pytest.raises(AssetError, match="generic_model.pkl"):
        FLAME.from_files(model_path, embedding_path)
    write_flame_model(model_path, model)
    write_landmark_embedding(embedding_path, embedding)
    loaded = FLAME.from_files(model_path, embedding_path, n_shape=10, n_exp=5)
    reference = FLAME.from_arrays(model, embedding, n_shape=10, n_exp=5)
    shape, expression, pose = codes(reference, batch=2, scale=0.5)
    for got, expected in zip(loaded(shape, expression, pose), reference(shape, expression, pose)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_codes_of_another_dtype_are_refused_by_name():
    flame = FLAME.from_arrays(toy_model(), toy_embedding())
    shape, expression, pose = codes(flame)
    with pytest.raises(TypeError, match="expression is torch.float64"):
        flame(shape, expression.double(), pose)
