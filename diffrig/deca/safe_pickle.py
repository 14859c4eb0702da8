"""Read third-party pickles through an allowlist, without chumpy, scipy or arbitrary code.

Unpickling runs whatever callables a file names, so a tampered ``generic_model.pkl`` could run
``os.system``. :func:`restricted_load` resolves a global only when its ``(module, name)`` is in
the allowlist given, and maps it to an object we trust:

- NumPy's own array/dtype rebuilders (harmless: they only build arrays);
- stand-ins that merely *record* data: :class:`ChumpyArray` for ``chumpy.ch.Ch`` (chumpy stores
  its value under ``x``), :class:`SparseMatrix` for scipy's CSC/CSR matrices (``data``,
  ``indices``, ``indptr``, shape), :func:`rebuild_tensor` and :func:`load_legacy_storage` for the
  torch tensors pickled inside ``landmark_embedding.npy``;
- a few builtins that Python 2 / protocol-2 files need (``set``, ``object``,
  ``copy_reg._reconstructor`` restricted to our stand-ins, ``_codecs.encode`` restricted to
  latin-1).

Any other global, and any persistent id, raises :class:`~diffrig.errors.UnsafePickleError` before
anything is called. Other damage (truncation, wrong content) raises
:class:`~diffrig.errors.AssetError`. See :mod:`diffrig.deca.formats` for what each file holds.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Mapping
from os import PathLike
from typing import Any, BinaryIO

import numpy as np

from diffrig.deca.legacy_pickle import TORCH_LEGACY_MAGIC, TORCH_LEGACY_PROTOCOL, TORCH_STORAGE_NAMES
from diffrig.deca.assets import malformed_asset_error
from diffrig.errors import DiffrigError, UnsafePickleError

# NumPy's rebuilders, taken from NumPy itself so that both numpy.core (1.x) and numpy._core (2.x)
# spellings in a file resolve to the running NumPy's functions.
_numpy_reconstruct = np.ndarray.__reduce__(np.empty(0))[0]
_numpy_scalar = np.float64(0).__reduce__()[0]


def _numpy_frombuffer(buffer, dtype, shape, order):
    """What NumPy's ``_frombuffer`` does for protocol-5 pickles, on a copy we own."""
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order).copy()


class ChumpyArray:
    """What a pickled ``chumpy.ch.Ch`` holds: its state dict, whose ``x`` is the value.

    Only the bare ``Ch`` class is supported (a constant, as FLAME stores its bases); derived
    chumpy expressions pickle under other class names and are refused by the allowlist.
    """

    state: dict

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or "x" not in state:
            raise pickle.UnpicklingError("a chumpy object without its value 'x'")
        value = np.asarray(state["x"])
        if value.dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"a chumpy object whose value is not numeric ({value.dtype})")
        self.state = state

    @property
    def r(self) -> np.ndarray:
        """The value as chumpy returns it: float64, at least 1-D, C order."""
        return np.ascontiguousarray(np.atleast_1d(np.asarray(self.state["x"], dtype=np.float64)))

    def __array__(self, dtype=None, copy=None):
        value = self.r
        return value if dtype is None else value.astype(dtype)


class SparseMatrix:
    """A pickled scipy CSC or CSR matrix: its compressed arrays and shape, densified on demand."""

    format = "csc"
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a sparse matrix without its state dict")
        shape = state.get("_shape", state.get("shape"))
        try:
            rows, cols = (int(n) for n in shape)
            data = np.asarray(state["data"])
            indices = np.asarray(state["indices"], dtype=np.int64)
            indptr = np.asarray(state["indptr"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise pickle.UnpicklingError(f"a sparse matrix with an incomplete state ({error})") from error
        major, minor = (cols, rows) if self.format == "csc" else (rows, cols)
        if (
            data.ndim != 1 or indices.shape != data.shape or indptr.shape != (major + 1,)
            or (indptr.size and (indptr[0] != 0 or indptr[-1] != data.size or np.any(np.diff(indptr) < 0)))
            or (indices.size and (indices.min() < 0 or indices.max() >= minor))
        ):
            raise pickle.UnpicklingError(f"an inconsistent {self.format.upper()} matrix of shape {(rows, cols)}")
        self.data, self.indices, self.indptr, self.shape = data, indices, indptr, (rows, cols)

    def toarray(self) -> np.ndarray:
        """Dense (rows, cols) array; repeated entries add up, as in scipy."""
        dense = np.zeros(self.shape, dtype=self.data.dtype)
        major = np.repeat(np.arange(self.indptr.size - 1), np.diff(self.indptr))
        rows, cols = (self.indices, major) if self.format == "csc" else (major, self.indices)
        np.add.at(dense, (rows, cols), self.data)
        return dense

    def __array__(self, dtype=None, copy=None):
        dense = self.toarray()
        return dense if dtype is None else dense.astype(dtype)


class CsrMatrix(SparseMatrix):
    format = "csr"


def _object_reconstructor(cls, base, state):
    """``copy_reg._reconstructor`` as protocol 0/1 uses it for plain classes, for our stand-ins only."""
    if cls not in (ChumpyArray, SparseMatrix, CsrMatrix) or base is not object or state is not None:
        raise pickle.UnpicklingError("copy_reg._reconstructor is only accepted for chumpy/scipy objects")
    return object.__new__(cls)


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it to store bytes."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError("_codecs.encode is only accepted for latin-1 text")
    return text.encode("latin-1")


class LegacyStorage:
    """A torch storage read from the legacy format: a flat tensor of its elements."""

    def __init__(self, flat):
        self.flat = flat


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` over a :class:`LegacyStorage`: a strided view of it."""
    import torch

    if not isinstance(storage, LegacyStorage):
        raise pickle.UnpicklingError("a tensor whose storage is not a torch storage")
    if backward_hooks or metadata:
        raise pickle.UnpicklingError("a tensor with backward hooks or metadata")
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or min((*size, 0)) < 0 or storage_offset < 0:
        raise pickle.UnpicklingError(f"a tensor with invalid size {size} / stride {stride}")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else -1
    if last >= storage.flat.numel() or min((*stride, 0)) < 0:
        raise pickle.UnpicklingError(f"a tensor {size} that reaches past its storage of {storage.flat.numel()}")
    tensor = torch.as_strided(storage.flat, size, stride, storage_offset)
    if requires_grad and tensor.is_floating_point():
        tensor.requires_grad_(True)
    return tensor


class _StorageType:
    """Stand-in for ``torch.LongStorage`` & co. inside a legacy-format storage pickle."""

    def __init__(self, name: str):
        self.name = name


_STORAGE_DTYPE_NAMES = {storage: dtype for dtype, storage in TORCH_STORAGE_NAMES.items()}
_STORAGE_GLOBALS = {("torch", name): _StorageType(name) for name in _STORAGE_DTYPE_NAMES}


def load_legacy_storage(data: bytes, source: str = "a torch storage") -> LegacyStorage:
    """``torch.storage._load_from_bytes``, safely: parse torch's legacy format ourselves.

    The format is five pickles (magic number, protocol version, system info, the object with
    storages as persistent ids ``('storage', <type>, key, location, numel, view)``, the list of
    keys) followed by each storage's element count (int64) and raw little-endian bytes.
    """
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch storage bytes expected")
    stream = io.BytesIO(data)
    header = [_Unpickler(stream, {}, source).load() for _ in range(3)]
    magic, protocol, sys_info = header
    if magic != TORCH_LEGACY_MAGIC or protocol != TORCH_LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("not a torch legacy-format storage")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise pickle.UnpicklingError("a big-endian torch storage")

    records: dict[str, tuple[str, int, Any]] = {}

    def storage_reference(pid):
        is_storage = isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
        if not (is_storage and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(
                f"{source} holds a persistent reference other than a torch storage; diffrig does not load it"
            )
        _, storage_type, key, _location, numel, view = pid
        records[str(key)] = (storage_type.name, int(numel), view)
        return ("storage", str(key))

    root = _Unpickler(stream, _STORAGE_GLOBALS, source, persistent_load=storage_reference).load()
    keys = _Unpickler(stream, {}, source).load()
    flats = {}
    for key in keys:
        if key not in records:
            raise pickle.UnpicklingError(f"storage key {key!r} was never referenced")
        name, _, _ = records[key]
        dtype = getattr(torch, _STORAGE_DTYPE_NAMES[name])
        (numel,) = struct.unpack("<q", _read_exact(stream, 8))
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = bytearray(_read_exact(stream, numel * itemsize))
        flats[key] = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    if not (isinstance(root, tuple) and root[:1] == ("storage",) and root[1] in flats):
        raise pickle.UnpicklingError("the legacy torch payload is not a single storage")
    _, _, view = records[root[1]]
    flat = flats[root[1]]
    if view is not None:  # old torch pickled storage slices as (view_key, offset, size)
        _, offset, view_size = view
        flat = flat[int(offset):int(offset) + int(view_size)]
    return LegacyStorage(flat)


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if count < 0 or len(data) != count:
        raise pickle.UnpicklingError("torch storage data is truncated")
    return data


NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

# Python 2 names as written in the file (the unpickler's own renaming is bypassed by find_class).
BUILTIN_GLOBALS: dict[tuple[str, str], Any] = {
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("copy_reg", "_reconstructor"): _object_reconstructor,
    ("copyreg", "_reconstructor"): _object_reconstructor,
    ("_codecs", "encode"): _latin1_encode,
}

#: FLAME's ``generic_model.pkl``: NumPy arrays, chumpy ``Ch`` constants, a scipy CSC matrix.
FLAME_GLOBALS: dict[tuple[str, str], Any] = {
    **NUMPY_GLOBALS,
    **BUILTIN_GLOBALS,
    ("chumpy.ch", "Ch"): ChumpyArray,
    **{(f"scipy.sparse.{module}", f"{fmt}_{kind}"): (SparseMatrix if fmt == "csc" else CsrMatrix)
       for fmt in ("csc", "csr") for module in (fmt, f"_{fmt}") for kind in ("matrix", "array")},
}

#: DECA's ``landmark_embedding.npy``: NumPy arrays and torch tensors in a pickled dict.
LANDMARK_GLOBALS: dict[tuple[str, str], Any] = {
    **NUMPY_GLOBALS,
    **BUILTIN_GLOBALS,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): load_legacy_storage,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed, source, encoding="latin1", persistent_load=None):
        super().__init__(file, encoding=encoding)
        self._allowed, self._source, self._persistent = allowed, source, persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._source} names the global '{module}.{name}', which diffrig does not load: "
                "only NumPy arrays, chumpy constants, scipy sparse matrices and torch tensors are "
                "accepted in these files. The file may have been tampered with; replace it with the "
                "original download."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError(f"{self._source} holds a persistent reference, which diffrig does not load")
        return self._persistent(pid)


def restricted_load(
    file: str | PathLike | BinaryIO,
    allowed: Mapping[tuple[str, str], Any],
    *,
    encoding: str = "latin1",
    source: str | None = None,
) -> Any:
    """Unpickle ``file`` (a path or a binary stream), resolving globals only through ``allowed``.

    ``allowed`` maps ``(module, name)`` as written in the file to the object to use instead
    (e.g. :data:`FLAME_GLOBALS`, :data:`LANDMARK_GLOBALS`). ``encoding="latin1"`` reads Python 2
    strings (byte-exact for array data). Raises :class:`UnsafePickleError` for any other global or
    a persistent id, :class:`AssetError` when the data is not a complete, sound pickle.
    """
    if isinstance(file, (str, PathLike)):
        source = source or str(file)
        with open(file, "rb") as stream:
            return restricted_load(stream, allowed, encoding=encoding, source=source)
    source = source or getattr(file, "name", None) or "the pickle"
    table = dict(allowed)
    if ("torch.storage", "_load_from_bytes") in table:
        table[("torch.storage", "_load_from_bytes")] = lambda data: load_legacy_storage(data, source)
    try:
        return _Unpickler(file, table, source, encoding=encoding).load()
    except DiffrigError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, RuntimeError, UnicodeDecodeError) as error:
        raise malformed_asset_error(source, f"it does not unpickle: {error}") from error


__all__ = [
    "BUILTIN_GLOBALS", "ChumpyArray", "CsrMatrix", "FLAME_GLOBALS", "LANDMARK_GLOBALS", "LegacyStorage",
    "NUMPY_GLOBALS", "SparseMatrix", "load_legacy_storage", "rebuild_tensor", "restricted_load",
]
