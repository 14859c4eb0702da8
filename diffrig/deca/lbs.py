"""Linear blend skinning for FLAME-like models: blendshapes, a joint tree, skinning weights.

Pure functions on batched float tensors. ``B`` is the batch, ``V`` vertices, ``J`` joints,
``K`` blendshape coefficients. Rotations are 3x3 matrices applied to column vectors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix


def blend_shapes(coefficients: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Offsets ``sum_k coefficients[b, k] * directions[v, :, k]``.

    coefficients: (B, K); directions: (V, 3, K). Returns (B, V, 3).
    """
    num_vertices = directions.shape[0]
    flat = directions.reshape(num_vertices * 3, -1)
    return (coefficients @ flat.T).view(coefficients.shape[0], num_vertices, 3)


def pose_feature(rotations: torch.Tensor) -> torch.Tensor:
    """Pose-corrective feature: ``R - I`` of every joint but the root, flattened row-major.

    rotations: (B, J, 3, 3). Returns (B, (J - 1) * 9).
    """
    identity = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    return (rotations[:, 1:] - identity).flatten(1)


def pose_rotations(axis_angles: torch.Tensor) -> torch.Tensor:
    """Per-joint rotation matrices from axis-angle vectors.

    axis_angles: (B, J * 3) in radians. Returns (B, J, 3, 3).
    """
    return axis_angle_to_rotation_matrix(axis_angles.view(axis_angles.shape[0], -1, 3))


def forward_kinematics(
    rotations: torch.Tensor, joints: torch.Tensor, parents: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """World rotations and skinning translations of a joint tree.

    Joint ``i`` turns by ``rotations[:, i]`` about its rest location ``joints[:, i]``, in its
    parent's frame. ``parents[0]`` is the root (its value is ignored); every other joint's
    parent must come before it.

    rotations: (B, J, 3, 3); joints: (B, J, 3) rest locations.
    Returns ``(world_rotations (B, J, 3, 3), translations (B, J, 3))`` such that a rest-pose
    point ``p`` bound rigidly to joint ``i`` moves to ``world_rotations[:, i] @ p + translations[:, i]``.
    """
    world_rotations = [rotations[:, 0]]
    world_origins = [joints[:, 0]]
    for i in range(1, len(parents)):
        parent = parents[i]
        offset = joints[:, i] - joints[:, parent]
        world_origins.append(world_origins[parent] + _apply(world_rotations[parent], offset))
        world_rotations.append(world_rotations[parent] @ rotations[:, i])
    world_rotation = torch.stack(world_rotations, dim=1)
    translation = torch.stack(world_origins, dim=1) - _apply(world_rotation, joints)
    return world_rotation, translation


def skin(
    vertices: torch.Tensor, weights: torch.Tensor, world_rotations: torch.Tensor, translations: torch.Tensor
) -> torch.Tensor:
    """Linear blend skinning: each vertex moves by its weighted blend of joint transforms.

    vertices: (B, V, 3) rest-pose vertices (pose correctives already added); weights: (V, J);
    world_rotations: (B, J, 3, 3) and translations: (B, J, 3) from :func:`forward_kinematics`.
    Returns (B, V, 3).
    """
    batch, num_joints = world_rotations.shape[:2]
    transforms = torch.cat([world_rotations.reshape(batch, num_joints, 9), translations], dim=2)
    blended = weights @ transforms  # (B, V, 12)
    rotation = blended[..., :9].unflatten(-1, (3, 3))
    return _apply(rotation, vertices) + blended[..., 9:]


def _apply(rotation: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``rotation @ point`` over matching leading dims: (..., 3, 3), (..., 3) -> (..., 3)."""
    return (rotation @ points.unsqueeze(-1)).squeeze(-1)
