"""Readers and writers for the third-party files of a DECA data folder.

What each file holds (checked on the public files in DECA's repository; for the licensed FLAME
model, from chumpy's and scipy's pickling code, DECA's/TF_FLAME's readers and public reports of
the file's keys, shapes and pickle globals):

``generic_model.pkl`` (FLAME 2020)
    A pickle written by Python 2 (protocol 2; read it with ``encoding="latin1"``) of a dict:
    ``v_template`` (5023, 3) f8, ``f`` (9976, 3) faces, ``shapedirs`` (5023, 3, 400) as a
    ``chumpy.ch.Ch`` (300 identity then 100 expression components), ``posedirs`` (5023, 3, 36),
    ``J_regressor`` (5, 5023) as a ``scipy.sparse.csc.csc_matrix``, ``J`` (5, 3),
    ``kintree_table`` (2, 5) int64 (row 0: parents; the root's entry is not -1, DECA overwrites
    it), ``weights`` (5023, 5), ``bs_style`` ``"lbs"``, ``bs_type`` ``"lrotmin"``. Arrays pickle
    as ``numpy.core.multiarray._reconstruct`` + ``numpy.ndarray`` + ``numpy.dtype``; a ``Ch``
    as ``chumpy.ch.Ch`` created bare (``NEWOBJ``) with the state dict ``x`` (the float64 value),
    ``_dirty_vars`` (a ``__builtin__.set``), ``_itr``, ``_make_dense``, ``_make_sparse``,
    ``_depends_on_deps``, ``_status``; the CSC matrix likewise with ``_shape``, ``data``,
    ``indices``, ``indptr`` (newer scipy spells the class ``scipy.sparse._csc.csc_matrix``).
    The faces' dtype (uint32 in MPI's SMPL-family files) is an assumption; DECA casts to int64.

``landmark_embedding.npy`` (DECA's repository; inspected with ``pickletools``)
    An ``.npy`` v1.0 file of a 0-d object array (``descr '|O'``) whose pickle (protocol 3) holds a
    dict: ``static_lmk_faces_idx`` (51,) int64 and ``static_lmk_bary_coords`` (51, 3) float64
    (Fortran order), ``full_lmk_faces_idx`` (1, 68) int64 and ``full_lmk_bary_coords``
    (1, 68, 3) float32 as NumPy arrays; ``dynamic_lmk_faces_idx`` (79, 17) int64 and
    ``dynamic_lmk_bary_coords`` (79, 17, 3) float32 as torch tensors, each pickled as
    ``torch._utils._rebuild_tensor_v2(torch.storage._load_from_bytes(<bytes>), 0, size, stride,
    False, collections.OrderedDict())``, the bytes being the storage in torch's legacy format.
    Globals named: ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``,
    ``torch._utils._rebuild_tensor_v2``, ``torch.storage._load_from_bytes``,
    ``collections.OrderedDict`` (and ``torch.LongStorage``/``torch.FloatStorage`` inside the bytes).

``head_template.obj``
    Wavefront OBJ: 5023 ``v``, 5118 ``vt``, 9976 ``f a/b c/d e/f`` (1-based; vertex/uv).

``FLAME_texture.npz`` / ``FLAME_albedo_from_BFM.npz``
    ``mean`` (512, 512, 3) and ``tex_dir`` (512, 512, 3, 200), 0..255; or ``MU`` (512*512*3,)
    and ``PC`` (512*512*3, 199), 0..1 (written by BFM_to_FLAME's ``col_to_tex.py``). Both are
    BGR UV images, pixel-major; DECA flips them to RGB.

``deca_model.tar``
    ``torch.save`` of ``{"E_flame": state_dict, "E_detail": ..., "D_detail": ...}``.

``uv_face_mask.png``, ``uv_face_eye_mask.png`` (256² RGBA; DECA uses channel 0),
``mean_texture.jpg`` (512² RGB), ``fixed_displacement_256.npy`` (plain (256, 256) float64).

Missing files raise :class:`AssetError` naming the file and where users get it; damaged ones
raise :class:`AssetError` naming the file; pickles naming anything but the expected globals raise
:class:`UnsafePickleError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import IO, Any

import numpy as np

from diffrig.atomic import write_atomically
from diffrig.deca.assets import malformed_asset_error, missing_asset_error
from diffrig.deca.legacy_pickle import Global, NewObject, PickleWriter
from diffrig.deca.safe_pickle import FLAME_GLOBALS, LANDMARK_GLOBALS, ChumpyArray, SparseMatrix, restricted_load
from diffrig.errors import AssetError, DiffrigError, UnsafePickleError

PathArg = str | PathLike

FLAME_MODEL_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")

# key -> (stored as, dtype, memory order) exactly as in DECA's landmark_embedding.npy
LANDMARK_LAYOUT = {
    "static_lmk_faces_idx": ("numpy", np.int64, "C"),
    "static_lmk_bary_coords": ("numpy", np.float64, "F"),
    "dynamic_lmk_faces_idx": ("torch", np.int64, "C"),
    "dynamic_lmk_bary_coords": ("torch", np.float32, "C"),
    "full_lmk_faces_idx": ("numpy", np.int64, "C"),
    "full_lmk_bary_coords": ("numpy", np.float32, "C"),
}
LANDMARK_KEYS = tuple(LANDMARK_LAYOUT)

TEXTURE_KEYS = {"FLAME": ("mean", "tex_dir"), "BFM": ("MU", "PC")}
DECA_CHECKPOINT_PARTS = ("E_flame", "E_detail", "D_detail")


# ----------------------------------------------------------------------------- helpers


@contextmanager
def _reading(path: PathArg) -> Iterator[Path]:
    """Missing file -> AssetError saying where to get it; any failure to parse -> AssetError."""
    path = Path(path)
    if not path.is_file():
        raise missing_asset_error(path)
    try:
        yield path
    except DiffrigError:
        raise
    except Exception as error:  # noqa: BLE001 - every parser failure means "damaged file"
        raise malformed_asset_error(path, str(error) or type(error).__name__) from error


def _as_array(value: Any, key: str) -> np.ndarray:
    if isinstance(value, ChumpyArray):
        return value.r
    if isinstance(value, SparseMatrix):
        return value.toarray()
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    if type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
        return value.detach().cpu().numpy().copy()
    raise ValueError(f"{key!r} holds a {type(value).__name__}, not an array")


# ----------------------------------------------------------------------------- FLAME model


def read_flame_model(path: PathArg) -> dict[str, np.ndarray]:
    """FLAME's ``generic_model.pkl`` -> arrays, without chumpy or scipy.

    Returns ``v_template`` (V, 3), ``f`` (F, 3) int64, ``shapedirs`` (V, 3, S), ``posedirs``
    (V, 3, P), ``J_regressor`` (J, V) dense, ``kintree_table`` (2, J) int64 (as stored: ignore
    the root's parent), ``weights`` (V, J); floats as stored (float64 in FLAME 2020).
    """
    with _reading(path) as path:
        model = restricted_load(path, FLAME_GLOBALS)
        if not isinstance(model, dict):
            raise ValueError(f"the pickle holds a {type(model).__name__}, not FLAME's dict")
        missing = [key for key in FLAME_MODEL_KEYS if key not in model]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        arrays = {key: _as_array(model[key], key) for key in FLAME_MODEL_KEYS}
        for key in ("f", "kintree_table"):
            if arrays[key].dtype.kind not in "iu":
                raise ValueError(f"{key} is {arrays[key].dtype}, not integers")
            arrays[key] = arrays[key].astype(np.int64)
        _check_flame_shapes(arrays)
        return arrays


def _check_flame_shapes(arrays: Mapping[str, np.ndarray]) -> None:
    num_vertices = arrays["v_template"].shape[0]
    num_joints = arrays["kintree_table"].shape[-1]
    shapes = {
        "v_template": (num_vertices, 3), "f": (arrays["f"].shape[0], 3),
        "shapedirs": (num_vertices, 3, arrays["shapedirs"].shape[-1]),
        "posedirs": (num_vertices, 3, arrays["posedirs"].shape[-1]),
        "J_regressor": (num_joints, num_vertices), "kintree_table": (2, num_joints),
        "weights": (num_vertices, num_joints),
    }
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise ValueError(f"{key} has shape {arrays[key].shape}, expected {shape}")


def write_flame_model(path: PathArg, arrays: Mapping[str, Any]) -> None:
    """Write ``generic_model.pkl`` with FLAME 2020's pickle structure (see the module docstring).

    ``arrays``: the keys of :func:`read_flame_model` (``J_regressor`` dense (J, V)); ``J`` (J, 3)
    is computed as ``J_regressor @ v_template`` unless given. The result unpickles with chumpy and
    scipy (as DECA reads it) and with :func:`read_flame_model`; neither library is needed here.
    """
    missing = [key for key in FLAME_MODEL_KEYS if key not in arrays]
    if missing:
        raise AssetError(f"cannot write {path}: no {', '.join(missing)}")
    floats = {key: np.ascontiguousarray(arrays[key], dtype=np.float64)
              for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights")}
    faces = np.ascontiguousarray(arrays["f"], dtype=np.uint32)
    tree = np.ascontiguousarray(arrays["kintree_table"], dtype=np.int64)
    try:
        _check_flame_shapes({**floats, "f": faces, "kintree_table": tree})
    except ValueError as error:
        raise AssetError(f"cannot write {path}: {error}") from error
    joints = np.ascontiguousarray(arrays["J"] if "J" in arrays else floats["J_regressor"] @ floats["v_template"],
                                  dtype=np.float64)
    model = {
        "f": faces,
        "J_regressor": _csc_matrix(floats["J_regressor"]),
        "kintree_table": tree,
        "J": joints,
        "weights": floats["weights"],
        "posedirs": floats["posedirs"],
        "v_template": floats["v_template"],
        "shapedirs": _chumpy_constant(floats["shapedirs"]),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    data = PickleWriter(protocol=2, python2=True).dumps(model)
    write_atomically(path, lambda stream: stream.write(data))


def _chumpy_constant(value: np.ndarray) -> NewObject:
    """A ``chumpy.ch.Ch`` holding ``value``, with the state chumpy pickles after evaluating it."""
    state = {"x": value, "_dirty_vars": set(), "_itr": None, "_make_dense": False, "_make_sparse": False,
             "_depends_on_deps": {}, "_status": "new"}
    return NewObject(Global("chumpy.ch", "Ch"), state)


def _csc_matrix(dense: np.ndarray) -> NewObject:
    """A Python-2-era ``scipy.sparse.csc.csc_matrix`` of ``dense`` (J, V)."""
    cols_major = dense.T  # CSC walks columns; nonzero() of the transpose is column-major order
    col_index, row_index = np.nonzero(cols_major)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(col_index, minlength=dense.shape[1]))])
    state = {
        "_shape": tuple(int(n) for n in dense.shape), "maxprint": 50, "format": "csc",
        "indices": row_index.astype(np.int32), "indptr": indptr.astype(np.int32),
        "data": np.ascontiguousarray(cols_major[col_index, row_index], dtype=np.float64),
    }
    return NewObject(Global("scipy.sparse.csc", "csc_matrix"), state)


# ----------------------------------------------------------------------------- landmark embedding


def read_landmark_embedding(path: PathArg) -> dict[str, np.ndarray]:
    """DECA's ``landmark_embedding.npy`` -> its six arrays (``LANDMARK_KEYS``) as NumPy, dtypes as stored."""
    with _reading(path) as path, open(path, "rb") as stream:
        version = np.lib.format.read_magic(stream)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = readers[version](stream, max_header_size=2**20)
        if shape != () or dtype != np.dtype(object):
            raise ValueError(f"holds a {dtype} array of shape {shape}, not a pickled dict")
        array = restricted_load(stream, LANDMARK_GLOBALS, source=str(path))
        embedding = array[()] if isinstance(array, np.ndarray) and array.shape == () else array
        if not isinstance(embedding, dict):
            raise ValueError(f"holds a {type(embedding).__name__}, not a dict")
        missing = [key for key in LANDMARK_KEYS if key not in embedding]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return {key: _as_array(embedding[key], key) for key in LANDMARK_KEYS}


def write_landmark_embedding(path: PathArg, embedding: Mapping[str, Any]) -> None:
    """Write ``landmark_embedding.npy`` as DECA ships it: the same keys, types (NumPy or torch),
    dtypes and pickle globals, so DECA's own pickle-enabled NumPy loader reads it unchanged."""
    import torch

    missing = [key for key in LANDMARK_KEYS if key not in embedding]
    if missing:
        raise AssetError(f"cannot write {path}: no {', '.join(missing)}")
    content: dict[str, Any] = {}
    for key, (kind, dtype, order) in LANDMARK_LAYOUT.items():
        value = embedding[key]
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        value = np.array(value, dtype=dtype, order=order)
        content[key] = torch.from_numpy(np.ascontiguousarray(value)) if kind == "torch" else value
    holder = np.empty((), dtype=object)
    holder[()] = content
    data = PickleWriter(protocol=3).dumps(holder)

    def write(stream: IO[bytes]) -> None:
        np.lib.format.write_array_header_1_0(stream, {"descr": "|O", "fortran_order": False, "shape": ()})
        stream.write(data)

    write_atomically(path, write)


# ----------------------------------------------------------------------------- OBJ mesh


@dataclass(frozen=True)
class ObjMesh:
    """A triangle mesh with UVs. vertices (V, 3) float32; faces (F, 3) int64 0-based;
    uvcoords (T, 2) float32; uvfaces (F, 3) int64 0-based, or (0, 3) when the file has no UVs."""

    vertices: np.ndarray
    faces: np.ndarray
    uvcoords: np.ndarray
    uvfaces: np.ndarray


def read_obj(path: PathArg) -> ObjMesh:
    """Read ``v``, ``vt`` and ``f`` lines (``a``, ``a/b``, ``a/b/c``, ``a//c``; negative indices
    count back; polygons become triangle fans). Other lines are ignored."""
    with _reading(path) as path:
        vertices, uvcoords, faces, uvfaces = [], [], [], []
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                tokens = line.split()
                if not tokens:
                    continue
                tag = tokens[0]
                if tag == "v":
                    vertices.append([float(x) for x in tokens[1:4]])
                elif tag == "vt":
                    uvcoords.append([float(x) for x in tokens[1:3]])
                elif tag == "f":
                    corners = [_obj_corner(token, len(vertices), len(uvcoords), number) for token in tokens[1:]]
                    if len(corners) < 3:
                        raise ValueError(f"line {number}: a face with {len(corners)} corners")
                    for i in range(1, len(corners) - 1):
                        triangle = (corners[0], corners[i], corners[i + 1])
                        faces.append([c[0] for c in triangle])
                        uvfaces.append([c[1] for c in triangle])
        vertices_array = np.array(vertices, dtype=np.float32).reshape(-1, 3)
        uv_array = np.array(uvcoords, dtype=np.float32).reshape(-1, 2)
        faces_array = np.array(faces, dtype=np.int64).reshape(-1, 3)
        has_uv = np.array([[uv is not None for uv in face] for face in uvfaces], dtype=bool).reshape(-1, 3)
        if has_uv.all() and faces:
            uvfaces_array = np.array(uvfaces, dtype=np.int64)
        elif not has_uv.any():
            uvfaces_array = np.zeros((0, 3), dtype=np.int64)
        else:
            raise ValueError("some face corners have texture indices and others do not")
        if faces_array.size and (faces_array.min() < 0 or faces_array.max() >= len(vertices_array)):
            raise ValueError("a face refers to a vertex that does not exist")
        if uvfaces_array.size and (uvfaces_array.min() < 0 or uvfaces_array.max() >= len(uv_array)):
            raise ValueError("a face refers to a texture coordinate that does not exist")
        return ObjMesh(vertices_array, faces_array, uv_array, uvfaces_array)


def _obj_corner(token: str, num_vertices: int, num_uvs: int, number: int) -> tuple[int, int | None]:
    parts = token.split("/")
    vertex = _obj_index(parts[0], num_vertices, number)
    uv = _obj_index(parts[1], num_uvs, number) if len(parts) > 1 and parts[1] else None
    return vertex, uv


def _obj_index(text: str, count: int, number: int) -> int:
    index = int(text)
    if index == 0:
        raise ValueError(f"line {number}: OBJ indices start at 1")
    return index - 1 if index > 0 else count + index


def write_obj(path: PathArg, mesh: ObjMesh) -> None:
    """Write ``v``, ``vt`` and ``f a/b`` lines (1-based), readable by :func:`read_obj` and DECA."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    uvcoords = np.asarray(mesh.uvcoords, dtype=np.float64).reshape(-1, 2)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3) + 1
    uvfaces = np.asarray(mesh.uvfaces, dtype=np.int64).reshape(-1, 3) + 1
    if len(uvfaces) not in (0, len(faces)):
        raise AssetError(f"cannot write {path}: {len(uvfaces)} uv faces for {len(faces)} faces")
    out = [f"v {x:.9g} {y:.9g} {z:.9g}\n" for x, y, z in vertices.tolist()]
    out += [f"vt {u:.9g} {v:.9g}\n" for u, v in uvcoords.tolist()]
    if len(uvfaces):
        pairs = zip(faces.tolist(), uvfaces.tolist())
        out += [f"f {a}/{ta} {b}/{tb} {c}/{tc}\n" for (a, b, c), (ta, tb, tc) in pairs]
    else:
        out += [f"f {a} {b} {c}\n" for a, b, c in faces.tolist()]
    data = "".join(out).encode("ascii")
    write_atomically(path, lambda stream: stream.write(data))


# ----------------------------------------------------------------------------- texture spaces


@dataclass(frozen=True)
class TextureSpace:
    """An albedo space as stored: ``kind`` "FLAME" (values 0..255) or "BFM" (values 0..1);
    ``mean`` with S*S*3 values and ``basis`` with S*S*3 rows times K components, both BGR
    pixel-major UV images in the file's own array shapes."""

    kind: str
    mean: np.ndarray
    basis: np.ndarray


def read_texture_space(path: PathArg) -> TextureSpace:
    """``FLAME_texture.npz`` (``mean``, ``tex_dir``) or ``FLAME_albedo_from_BFM.npz`` (``MU``, ``PC``),
    the kind told by the keys. No pickles are read."""
    with _reading(path) as path, np.load(path, allow_pickle=False) as archive:
        for kind, (mean_key, basis_key) in TEXTURE_KEYS.items():
            if mean_key in archive.files and basis_key in archive.files:
                mean, basis = np.asarray(archive[mean_key]), np.asarray(archive[basis_key])
                break
        else:
            raise ValueError(f"has {archive.files}, not mean/tex_dir (FLAME) or MU/PC (BFM)")
        if basis.ndim < 2 or int(np.prod(basis.shape[:-1])) != mean.size:
            raise ValueError(f"{basis_key} {basis.shape} does not match {mean_key} {mean.shape}")
        return TextureSpace(kind, mean, basis)


def write_texture_space(path: PathArg, space: TextureSpace) -> None:
    """Write the file of ``space.kind`` with its keys and shapes: FLAME as (S, S, 3) and
    (S, S, 3, K) like ``FLAME_texture.npz``, BFM flat like BFM_to_FLAME's output."""
    if space.kind not in TEXTURE_KEYS:
        raise AssetError(f"cannot write {path}: unknown texture space kind {space.kind!r}")
    mean = np.asarray(space.mean, dtype=np.float64).reshape(-1)
    basis = np.asarray(space.basis, dtype=np.float64)
    side = int(round((mean.size / 3) ** 0.5))
    if basis.ndim < 2 or basis.size != mean.size * basis.shape[-1] or 3 * side * side != mean.size:
        raise AssetError(f"cannot write {path}: mean and basis must hold square 3-channel UV images")
    basis = basis.reshape(mean.size, basis.shape[-1])
    mean_key, basis_key = TEXTURE_KEYS[space.kind]
    if space.kind == "FLAME":
        arrays = {mean_key: mean.reshape(side, side, 3), basis_key: basis.reshape(side, side, 3, -1)}
    else:
        arrays = {mean_key: mean, basis_key: basis}
    write_atomically(path, lambda stream: np.savez(stream, **arrays))


# ----------------------------------------------------------------------------- images and arrays


def read_mask(path: PathArg) -> np.ndarray:
    """A mask image -> float32 (H, W) in [0, 1]; of a colour image its first channel, as DECA does."""
    image = _read_image(path)
    return image[..., 0] if image.ndim == 3 else image


def read_rgb(path: PathArg) -> np.ndarray:
    """An image -> float32 (H, W, 3) RGB in [0, 1] (grey is repeated, alpha dropped)."""
    from PIL import Image

    with _reading(path) as path, Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _read_image(path: PathArg) -> np.ndarray:
    from PIL import Image

    with _reading(path) as path, Image.open(path) as image:
        pixels = np.asarray(image)
        if pixels.dtype == bool:
            return pixels.astype(np.float32)
        if pixels.dtype.kind not in "ui":
            raise ValueError(f"unsupported pixel type {pixels.dtype}")
        top = 65535.0 if pixels.dtype.itemsize > 1 or image.mode.startswith("I") else 255.0
        return np.clip(pixels.astype(np.float32) / top, 0.0, 1.0)


def write_image(path: PathArg, pixels: np.ndarray) -> None:
    """float (H, W) or (H, W, 3) in [0, 1] -> 8-bit PNG or JPEG (format from the suffix)."""
    from PIL import Image

    data = np.asarray(pixels, dtype=np.float64)
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] != 3):
        raise AssetError(f"cannot write {path}: expected (H, W) or (H, W, 3), got {data.shape}")
    image = Image.fromarray(np.round(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8))
    suffix = Path(path).suffix.lower()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix)
    if fmt is None:
        raise AssetError(f"cannot write {path}: use .png or .jpg")
    options = {"quality": 95} if fmt == "JPEG" else {}
    write_atomically(path, lambda stream: image.save(stream, format=fmt, **options))


def read_array(path: PathArg) -> np.ndarray:
    """A plain ``.npy`` array (e.g. ``fixed_displacement_256.npy``); pickled content is refused."""
    with _reading(path) as path:
        return np.load(path, allow_pickle=False)


# ----------------------------------------------------------------------------- DECA weights


def read_deca_checkpoint(path: PathArg) -> dict[str, dict[str, Any]]:
    """``deca_model.tar`` -> ``{"E_flame": state_dict, "E_detail": ..., "D_detail": ...}`` (CPU).

    Read with ``torch.load(weights_only=True)``: tensors and plain containers only. Entries that
    are not state dicts (name -> tensor) are left out.
    """
    import torch

    with _reading(path) as path:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises several types for bad files
            found = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(error), re.IGNORECASE)
            if found:
                raise UnsafePickleError(
                    f"{path} names the global '{found.group(1)}', which torch.load(weights_only=True) "
                    "refuses and diffrig does not load. The file may have been tampered with; replace it "
                    "with DECA's original deca_model.tar."
                ) from error
            raise ValueError(f"torch.load cannot read it: {torch_load_reason(error)}") from error
        if not isinstance(content, Mapping):
            raise ValueError(f"holds a {type(content).__name__}, not a dict of state dicts")
        parts = {
            str(name): dict(state) for name, state in content.items()
            if isinstance(state, Mapping) and state and all(isinstance(t, torch.Tensor) for t in state.values())
        }
        if not any(name in parts for name in DECA_CHECKPOINT_PARTS):
            raise ValueError(f"has none of {', '.join(DECA_CHECKPOINT_PARTS)} (found {sorted(content)})")
        return parts


def torch_load_reason(error: Exception) -> str:
    """What made ``torch.load(weights_only=True)`` fail, in one line, without torch's advice to load
    the file with ``weights_only=False`` (which would run whatever code it holds)."""
    text = str(error)
    unsafe = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if unsafe:
        return f"it names the global '{unsafe.group(1)}', which weights-only loading refuses (not plain tensors)"
    if re.search(r"Unsupported operand|invalid load key", text):
        return "it is not a file written by torch.save (neither a zip archive nor a pickle)"
    marker = text.find("WeightsUnpickler error:")
    if marker >= 0:  # torch's own reason follows its generic advice
        text = text[marker + len("WeightsUnpickler error:"):]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in text.splitlines()]
    detail = [line for line in lines if line and not line.startswith(boilerplate) and "weights_only" not in line]
    return f"{type(error).__name__}: " + ("; ".join(detail)[:300] or "no details")


def write_deca_checkpoint(path: PathArg, parts: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``deca_model.tar`` as DECA does: ``torch.save`` of a dict of state dicts.

    The one place diffrig calls ``torch.save``: this is a third-party format that DECA's own
    loader must read, and it holds only tensors in dicts, so ``weights_only`` loading accepts it.
    """
    import torch

    content = {str(name): {str(key): tensor.detach().cpu() for key, tensor in state.items()}
               for name, state in parts.items()}
    write_atomically(path, lambda stream: torch.save(content, stream))


__all__ = [
    "DECA_CHECKPOINT_PARTS", "FLAME_MODEL_KEYS", "LANDMARK_KEYS", "ObjMesh", "TextureSpace",
    "read_array", "read_deca_checkpoint", "read_flame_model", "read_landmark_embedding", "read_mask",
    "read_obj", "read_rgb", "read_texture_space", "write_deca_checkpoint", "write_flame_model",
    "write_image", "write_landmark_embedding", "write_obj", "write_texture_space",
]
