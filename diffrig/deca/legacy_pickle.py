"""Write pickles laid out exactly like two third-party files that DECA reads.

diffrig never pickles its own data. This module exists only because DECA's ``generic_model.pkl``
and ``landmark_embedding.npy`` *are* pickles, and the built-in asset set must be readable by the
official code as well as by ours. The standard pickler cannot produce them faithfully: it would
name ``numpy._core`` (which NumPy 1.x cannot import) and it needs chumpy and scipy installed to
pickle their objects. So the opcodes are written here directly, from a small tree of values:

- plain values: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, tuples, lists, dicts,
  sets, NumPy arrays and dtypes, torch tensors (CPU);
- :class:`Global` (a named module attribute), :class:`Call` (``func(*args)`` then an optional
  state set through ``__setstate__``), :class:`NewObject` (``cls.__new__(cls)`` then a state),
  :class:`PersistentId` (torch's legacy storage references).

Two dialects: ``python2=True`` writes strings and raw bytes as Python 2 ``str`` (what a file
made with Python 2's cPickle holds; Python 3 reads them with ``encoding="latin1"``), otherwise
Python 3 ``str``/``bytes``. No memo is written: every value is spelled out where it occurs, which
unpicklers accept unchanged.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# Torch's legacy (pre-zip) serialization, used by ``torch.storage._load_from_bytes``.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001
# torch writes this fixed dict whatever the platform; its element sizes are not consulted on load.
TORCH_LEGACY_SYS_INFO = {"protocol_version": TORCH_LEGACY_PROTOCOL, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}
TORCH_STORAGE_NAMES = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}

# The names NumPy 1.x pickles arrays with; NumPy 2 still resolves them.
NUMPY_RECONSTRUCT = ("numpy.core.multiarray", "_reconstruct")


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """``func(*args)``; then ``obj.__setstate__(state)`` unless state is None."""

    func: Global
    args: tuple
    state: Any = None


@dataclass(frozen=True)
class NewObject:
    """``cls.__new__(cls)`` then ``obj.__setstate__(state)``: how protocol 2 pickles a plain class."""

    cls: Global
    state: Any


@dataclass(frozen=True)
class PersistentId:
    pid: tuple


class PickleWriter:
    """Serialize one value tree into pickle opcodes (see the module docstring)."""

    def __init__(self, protocol: int, python2: bool = False):
        if protocol not in (2, 3) or (python2 and protocol != 2):
            raise ValueError("PickleWriter writes protocol 2 (optionally Python 2 flavoured) or 3")
        self.protocol, self.python2 = protocol, python2
        self._out = io.BytesIO()

    def dumps(self, value: Any) -> bytes:
        self._out = io.BytesIO()
        self._raw(b"\x80" + bytes([self.protocol]))
        self._value(value)
        self._raw(b".")
        return self._out.getvalue()

    def _raw(self, data: bytes) -> None:
        self._out.write(data)

    def _value(self, value: Any) -> None:  # noqa: C901 - one branch per value kind
        if value is None:
            self._raw(b"N")
        elif isinstance(value, (bool, np.bool_)):
            self._raw(b"\x88" if value else b"\x89")
        elif isinstance(value, (int, np.integer)):
            self._int(int(value))
        elif isinstance(value, (float, np.floating)):
            self._raw(b"G" + struct.pack(">d", float(value)))
        elif isinstance(value, str):
            self._str(value)
        elif isinstance(value, (bytes, bytearray)):
            self._bytes(bytes(value))
        elif isinstance(value, tuple):
            self._tuple(value)
        elif isinstance(value, list):
            self._list(value)
        elif isinstance(value, dict):
            self._dict(value)
        elif isinstance(value, (set, frozenset)):
            builtins = "__builtin__" if self.python2 else "builtins"
            self._value(Call(Global(builtins, "set"), (sorted(value) if value else [],)))
        elif isinstance(value, Global):
            self._raw(b"c" + f"{value.module}\n{value.name}\n".encode("ascii"))
        elif isinstance(value, Call):
            self._value(value.func)
            self._tuple(value.args)
            self._raw(b"R")
            if value.state is not None:
                self._value(value.state)
                self._raw(b"b")
        elif isinstance(value, NewObject):
            self._value(value.cls)
            self._raw(b")\x81")
            self._value(value.state)
            self._raw(b"b")
        elif isinstance(value, PersistentId):
            self._tuple(value.pid)
            self._raw(b"Q")
        elif isinstance(value, np.dtype):
            self._value(numpy_dtype_call(value))
        elif isinstance(value, np.ndarray):
            self._value(numpy_array_call(value))
        elif type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
            self._value(torch_tensor_call(value))
        else:
            raise TypeError(f"PickleWriter cannot write a {type(value).__name__}")

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self._raw(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            self._raw(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self._raw(b"J" + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self._raw(b"\x8a" + bytes([len(data)]) + data)

    def _str(self, value: str) -> None:
        if self.python2 and value.isascii():
            self._py2_str(value.encode("ascii"))
        else:
            data = value.encode("utf-8")
            self._raw(b"X" + struct.pack("<I", len(data)) + data)

    def _bytes(self, value: bytes) -> None:
        if self.python2:
            self._py2_str(value)
        elif self.protocol >= 3:
            self._raw((b"C" + bytes([len(value)])) if len(value) < 256 else (b"B" + struct.pack("<I", len(value))))
            self._raw(value)
        else:
            self._value(Call(Global("_codecs", "encode"), (value.decode("latin1"), "latin1")))

    def _py2_str(self, data: bytes) -> None:
        self._raw((b"U" + bytes([len(data)])) if len(data) < 256 else (b"T" + struct.pack("<I", len(data))))
        self._raw(data)

    def _tuple(self, items: tuple) -> None:
        if not items:
            self._raw(b")")
            return
        if len(items) > 3:
            self._raw(b"(")
        for item in items:
            self._value(item)
        self._raw({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t"))

    def _list(self, items: list) -> None:
        self._raw(b"]")
        if len(items) == 1:
            self._value(items[0])
            self._raw(b"a")
        elif items:
            self._raw(b"(")
            for item in items:
                self._value(item)
            self._raw(b"e")

    def _dict(self, items: dict) -> None:
        self._raw(b"}")
        if len(items) == 1:
            ((key, item),) = items.items()
            self._value(key)
            self._value(item)
            self._raw(b"s")
        elif items:
            self._raw(b"(")
            for key, item in items.items():
                self._value(key)
                self._value(item)
            self._raw(b"u")


def numpy_dtype_call(dtype: np.dtype) -> Call:
    """``numpy.dtype(descr, 0, 1)`` plus its state, as NumPy pickles a simple dtype."""
    _, (descr, align, copy), state = dtype.__reduce__()
    if dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"only simple dtypes are written, not {dtype}")
    return Call(Global("numpy", "dtype"), (descr, int(align), int(copy)), state)


def numpy_array_call(array: np.ndarray) -> Call:
    """``_reconstruct(ndarray, (0,), b'b')`` then ``(1, shape, dtype, is_fortran, data)``."""
    array = np.asarray(array)
    _, _, (version, shape, dtype, is_fortran, data) = array.__reduce__()
    if isinstance(data, list):  # object arrays hold their items, each pickled in turn
        data = list(data)
    return Call(Global(*NUMPY_RECONSTRUCT), (Global("numpy", "ndarray"), (0,), b"b"),
                (version, tuple(shape), dtype, bool(is_fortran), data))


def torch_tensor_call(tensor) -> Call:
    """A CPU tensor the way ``pickle`` stores one: rebuilt over a legacy-serialized storage."""
    if tensor.requires_grad or tensor.device.type != "cpu":
        tensor = tensor.detach().cpu()
    tensor = tensor.contiguous()
    storage = Call(Global("torch.storage", "_load_from_bytes"), (torch_legacy_storage_bytes(tensor),))
    hooks = Call(Global("collections", "OrderedDict"), ())
    return Call(Global("torch._utils", "_rebuild_tensor_v2"),
                (storage, 0, tuple(tensor.shape), tuple(tensor.stride()), False, hooks))


def torch_legacy_storage_bytes(tensor) -> bytes:
    """The storage of a contiguous tensor in torch's legacy format: five pickles, then raw data.

    Magic number, protocol version, system info, the storage as a persistent id, the list of
    storage keys; then per key its element count (int64, little-endian) and its bytes.
    """
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in TORCH_STORAGE_NAMES:
        raise TypeError(f"no legacy storage type for {tensor.dtype}")
    key, numel = "0", tensor.numel()
    storage_type = Global("torch", TORCH_STORAGE_NAMES[dtype_name])
    writer = PickleWriter(protocol=2)
    parts = [
        writer.dumps(TORCH_LEGACY_MAGIC),
        writer.dumps(TORCH_LEGACY_PROTOCOL),
        writer.dumps(TORCH_LEGACY_SYS_INFO),
        writer.dumps(PersistentId(("storage", storage_type, key, "cpu", numel, None))),
        writer.dumps([key]),
        struct.pack("<q", numel),
        _tensor_bytes(tensor),
    ]
    return b"".join(parts)


def _tensor_bytes(tensor) -> bytes:
    flat = tensor.reshape(-1)
    if str(flat.dtype) == "torch.bfloat16":  # no NumPy bfloat16: view the same bytes as int16
        import torch

        flat = flat.view(torch.int16)
    return flat.numpy().astype(flat.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
