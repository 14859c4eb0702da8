"""The FLAME head model as DECA drives it: shape, expression and pose codes to a mesh and landmarks.

DECA's conventions, kept here so codes and checkpoints stay interchangeable:

- shape codes read shapedirs columns ``0..n_shape``; expression codes read columns
  ``300..300 + n_exp`` (FLAME 2020 stores 300 shape then 100 expression components);
- joints are root, neck, jaw and the two eyes; the pose code is ``[global (3), jaw (3)]``
  (axis-angle, radians), the neck stays at rest and the eyes at rest unless ``eye_pose`` is given;
- ``landmarks2d`` are 17 face-contour landmarks, picked from a table by the neck's world yaw,
  followed by 51 static ones; ``landmarks3d`` are the 68 fixed ("full") landmarks.
"""
from __future__ import annotations

from collections.abc import Mapping
from os import PathLike

import numpy as np
import torch
from torch import nn

from diffrig.deca.files import DECA_REPO_DATA, FLAME_SITE
from diffrig.deca.formats import read_flame_model, read_landmark_embedding
from diffrig.deca.lbs import blend_shapes, forward_kinematics, pose_feature, pose_rotations, skin
from diffrig.errors import AssetError

EXPRESSION_COLUMN = 300  # first expression column of shapedirs, as DECA reads it
NUM_JOINTS = 5  # root, neck, jaw, eye, eye
NECK = 1

MODEL_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")
EMBEDDING_KEYS = (
    "static_lmk_faces_idx", "static_lmk_bary_coords",
    "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords",
    "full_lmk_faces_idx", "full_lmk_bary_coords",
)


class FLAME(nn.Module):
    """FLAME with DECA's landmark conventions; batched, float32, any device.

    Built from the arrays of a FLAME model (``read_flame_model``'s keys) and of DECA's landmark
    embedding (``read_landmark_embedding``'s keys). The model is fixed data, not learned: its
    buffers follow ``.to(device)`` but stay out of ``state_dict()``.

    Buffers: ``v_template`` (V, 3), ``faces`` (F, 3) long, ``shapedirs`` (V, 3, n_shape + n_exp),
    ``posedirs`` (V, 3, 36), ``J_regressor`` (5, V), ``lbs_weights`` (V, 5);
    per landmark set (``static``, ``dynamic`` contour table, ``full``) ``*_landmark_vertices``
    (its triangles' vertex indices, long) and ``*_landmark_bary`` (barycentric weights).
    """

    def __init__(
        self,
        model: Mapping[str, object],
        embedding: Mapping[str, object],
        n_shape: int = 100,
        n_exp: int = 50,
        *,
        model_name: str = "FLAME model",
        embedding_name: str = "landmark embedding",
    ):
        super().__init__()
        arrays = _checked_model(model, n_shape, n_exp, model_name)
        faces = arrays["f"]
        landmarks = _checked_embedding(embedding, len(faces), embedding_name)
        self.n_shape, self.n_exp = n_shape, n_exp
        self._parents = tuple(int(p) for p in arrays["parents"])
        self.max_contour_yaw = (landmarks["dynamic_lmk_faces_idx"].shape[0] - 1) // 2

        shapedirs = arrays["shapedirs"]
        shapedirs = np.concatenate(
            [shapedirs[:, :, :n_shape], shapedirs[:, :, EXPRESSION_COLUMN:EXPRESSION_COLUMN + n_exp]], axis=2
        )
        self._buffer("v_template", arrays["v_template"])
        self._buffer("faces", faces, torch.long)
        self._buffer("shapedirs", shapedirs)
        self._buffer("posedirs", arrays["posedirs"])
        self._buffer("J_regressor", arrays["J_regressor"])
        self._buffer("lbs_weights", arrays["weights"])
        for kind in ("static", "dynamic", "full"):
            self._buffer(f"{kind}_landmark_vertices", faces[landmarks[f"{kind}_lmk_faces_idx"]], torch.long)
            self._buffer(f"{kind}_landmark_bary", landmarks[f"{kind}_lmk_bary_coords"])

    @classmethod
    def from_arrays(
        cls, model: Mapping[str, object], embedding: Mapping[str, object], n_shape: int = 100, n_exp: int = 50
    ) -> "FLAME":
        """FLAME from in-memory arrays with the keys of ``read_flame_model`` / ``read_landmark_embedding``."""
        return cls(model, embedding, n_shape, n_exp)

    @classmethod
    def from_files(
        cls,
        model_path: str | PathLike,
        landmark_embedding_path: str | PathLike,
        n_shape: int = 100,
        n_exp: int = 50,
    ) -> "FLAME":
        """FLAME from ``generic_model.pkl`` and ``landmark_embedding.npy`` (read without chumpy)."""
        return cls(
            read_flame_model(model_path),
            read_landmark_embedding(landmark_embedding_path),
            n_shape,
            n_exp,
            model_name=str(model_path),
            embedding_name=str(landmark_embedding_path),
        )

    def forward(
        self,
        shape: torch.Tensor,
        expression: torch.Tensor,
        pose: torch.Tensor | None = None,
        eye_pose: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posed mesh and landmarks.

        shape: (B, n_shape); expression: (B, n_exp); pose: (B, 6) global and jaw axis-angle,
        zero if None; eye_pose: (B, 6) the two eyes' axis-angle, zero if None.
        Returns ``vertices`` (B, V, 3), ``landmarks2d`` (B, 68, 3) (17 dynamic contour + 51
        static), ``landmarks3d`` (B, 68, 3).
        """
        batch = shape.shape[0]
        zeros = shape.new_zeros(batch, 6)
        pose = zeros if pose is None else pose
        eye_pose = zeros if eye_pose is None else eye_pose
        for name, value, width in (
            ("shape", shape, self.n_shape), ("expression", expression, self.n_exp),
            ("pose", pose, 6), ("eye_pose", eye_pose, 6),
        ):
            if tuple(value.shape) != (batch, width):
                raise ValueError(f"FLAME: {name} must have shape ({batch}, {width}), got {tuple(value.shape)}")
            if value.dtype != self.v_template.dtype:
                raise TypeError(f"FLAME runs in {self.v_template.dtype}: {name} is {value.dtype}; use .float()")

        neck_pose = zeros[:, :3]
        full_pose = torch.cat([pose[:, :3], neck_pose, pose[:, 3:], eye_pose], dim=1)
        rotations = pose_rotations(full_pose)

        shaped = self.v_template + blend_shapes(torch.cat([shape, expression], dim=1), self.shapedirs)
        joints = self.J_regressor @ shaped
        posed = shaped + blend_shapes(pose_feature(rotations), self.posedirs)
        world_rotations, translations = forward_kinematics(rotations, joints, self._parents)
        vertices = skin(posed, self.lbs_weights, world_rotations, translations)

        row = contour_row(yaw_degrees(world_rotations[:, NECK]), self.max_contour_yaw)
        contour = interpolate(vertices, self.dynamic_landmark_vertices[row], self.dynamic_landmark_bary[row])
        static = interpolate(vertices, self.static_landmark_vertices, self.static_landmark_bary)
        landmarks2d = torch.cat([contour, static], dim=1)
        landmarks3d = interpolate(vertices, self.full_landmark_vertices, self.full_landmark_bary)
        return vertices, landmarks2d, landmarks3d

    def _buffer(self, name: str, array: np.ndarray, dtype: torch.dtype = torch.float32) -> None:
        self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(array)).to(dtype), persistent=False)


def yaw_degrees(rotation: torch.Tensor) -> torch.Tensor:
    """Yaw in degrees: the y angle of ``R = Rz @ Ry @ Rx``, within [-90, 90]. (B, 3, 3) -> (B,)."""
    cos_yaw = torch.sqrt(rotation[:, 0, 0] ** 2 + rotation[:, 1, 0] ** 2)
    return torch.rad2deg(torch.atan2(-rotation[:, 2, 0], cos_yaw))


def contour_row(yaw: torch.Tensor, max_yaw: int) -> torch.Tensor:
    """Row of the contour table for a head yaw in degrees: (B,) float -> (B,) long.

    Rows ``0..max_yaw`` hold yaw 0..max_yaw degrees, rows ``max_yaw + 1..2 max_yaw`` yaw -1..-max_yaw;
    the yaw is rounded to whole degrees and saturates at both ends.
    """
    degrees = torch.round(yaw.clamp(max=max_yaw)).long()
    return torch.where(degrees >= 0, degrees, (max_yaw - degrees).clamp(max=2 * max_yaw))


def interpolate(vertices: torch.Tensor, triangles: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """Points at barycentric coordinates in mesh triangles.

    vertices: (B, V, 3); triangles: (L, 3) or (B, L, 3) vertex indices; bary: (L, 3) or (B, L, 3).
    Returns (B, L, 3).
    """
    if triangles.dim() == 2:
        corners = vertices[:, triangles]
    else:
        batch_index = torch.arange(vertices.shape[0], device=vertices.device).view(-1, 1, 1)
        corners = vertices[batch_index, triangles]
    return (corners * bary.unsqueeze(-1)).sum(dim=-2)


def _checked_model(model: Mapping[str, object], n_shape: int, n_exp: int, name: str) -> dict[str, np.ndarray]:
    """FLAME arrays with their shapes checked against each other and against n_shape / n_exp."""
    fix = f"Use FLAME 2020's generic_model.pkl ({FLAME_SITE})."
    missing = [key for key in MODEL_KEYS if key not in model]
    if missing:
        raise AssetError(f"{name} lacks {', '.join(missing)}; it is not a FLAME model. {fix}")
    arrays = {key: np.asarray(model[key]) for key in MODEL_KEYS}
    num_vertices = arrays["v_template"].shape[0]
    num_columns = arrays["shapedirs"].shape[-1] if arrays["shapedirs"].ndim == 3 else 0
    expected = {
        "v_template": (num_vertices, 3),
        "f": (arrays["f"].shape[0], 3),
        "shapedirs": (num_vertices, 3, num_columns),
        "posedirs": (num_vertices, 3, (NUM_JOINTS - 1) * 9),
        "J_regressor": (NUM_JOINTS, num_vertices),
        "kintree_table": (2, NUM_JOINTS),
        "weights": (num_vertices, NUM_JOINTS),
    }
    for key, shape in expected.items():
        if arrays[key].shape != shape or arrays[key].dtype == object:
            raise AssetError(
                f"{name}: {key} has shape {arrays[key].shape} ({arrays[key].dtype}), expected {shape} "
                f"for {num_vertices} vertices and {NUM_JOINTS} joints (root, neck, jaw, eyes). {fix}"
            )
    if not 0 <= n_shape <= min(EXPRESSION_COLUMN, num_columns) or not (
        n_exp == 0 or 0 < n_exp <= num_columns - EXPRESSION_COLUMN
    ):
        raise AssetError(
            f"{name} has {num_columns} shapedirs columns, but n_shape={n_shape}, n_exp={n_exp} need shape "
            f"columns 0..{n_shape} (at most {EXPRESSION_COLUMN}) and expression columns "
            f"{EXPRESSION_COLUMN}..{EXPRESSION_COLUMN + n_exp}. Lower n_shape/n_exp or {fix[0].lower()}{fix[1:]}"
        )
    faces = arrays["f"]
    if not np.issubdtype(faces.dtype, np.integer) or faces.min() < 0 or faces.max() >= num_vertices:
        raise AssetError(f"{name}: faces f must be integer indices into its {num_vertices} vertices. {fix}")
    parents = arrays["kintree_table"][0].astype(np.int64)
    parents[0] = -1
    if any(not 0 <= parents[i] < i for i in range(1, NUM_JOINTS)):
        raise AssetError(
            f"{name}: kintree_table parents {parents[1:].tolist()} do not form a tree rooted at joint 0. {fix}"
        )
    arrays["parents"] = parents
    return arrays


def _checked_embedding(embedding: Mapping[str, object], num_faces: int, name: str) -> dict[str, np.ndarray]:
    """Landmark embedding arrays (full set flattened to (68,), (68, 3)) with shapes and indices checked."""
    fix = f"Use DECA's landmark_embedding.npy ({DECA_REPO_DATA})."
    missing = [key for key in EMBEDDING_KEYS if key not in embedding]
    if missing:
        raise AssetError(f"{name} lacks {', '.join(missing)}; it is not DECA's landmark embedding. {fix}")
    arrays = {key: np.asarray(embedding[key]) for key in EMBEDDING_KEYS}
    arrays["full_lmk_faces_idx"] = arrays["full_lmk_faces_idx"].reshape(-1)
    arrays["full_lmk_bary_coords"] = arrays["full_lmk_bary_coords"].reshape(-1, 3)
    for kind, index_dims in (("static", 1), ("dynamic", 2), ("full", 1)):
        index, bary = arrays[f"{kind}_lmk_faces_idx"], arrays[f"{kind}_lmk_bary_coords"]
        if (
            index.ndim != index_dims
            or bary.shape != index.shape + (3,)
            or not np.issubdtype(index.dtype, np.integer)
            or index.size == 0
            or index.min() < 0
            or index.max() >= num_faces
        ):
            raise AssetError(
                f"{name}: {kind} landmarks have face indices {index.shape} ({index.dtype}) and barycentric "
                f"coordinates {bary.shape}; expected {index_dims}-d integer indices into the model's "
                f"{num_faces} faces and one (3,) weight row per index. {fix}"
            )
    if arrays["dynamic_lmk_faces_idx"].shape[0] % 2 != 1:
        raise AssetError(
            f"{name}: the contour table has {arrays['dynamic_lmk_faces_idx'].shape[0]} rows; expected an odd "
            f"number (yaw 0..m then -1..-m degrees). {fix}"
        )
    return arrays
