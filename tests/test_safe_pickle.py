import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from diffrig.deca.legacy_pickle import Call, Global, PersistentId, PickleWriter, torch_legacy_storage_bytes
from diffrig.deca.safe_pickle import (
    FLAME_GLOBALS,
    LANDMARK_GLOBALS,
    ChumpyArray,
    SparseMatrix,
    load_legacy_storage,
    restricted_load,
)
from diffrig.errors import AssetError, UnsafePickleError


def _touch_pickle(module: str, name: str, marker) -> bytes:
    """A protocol-2 pickle calling module.name('touch <marker>') when loaded unrestricted."""
    command = f"touch {marker}".encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + len(command).to_bytes(4, "little")
            + command + b"\x85R.")


@pytest.mark.parametrize("allowed", [FLAME_GLOBALS, LANDMARK_GLOBALS])
def test_os_system_is_refused_and_not_run(tmp_path, allowed):
    marker = tmp_path / "pwned"
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(_touch_pickle("os", "system", marker))
    with pytest.raises(UnsafePickleError, match=r"names the global 'os\.system'") as info:
        restricted_load(path, allowed)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_reduce_exploit_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps({"v_template": Exploit()}, protocol=4)  # STACK_GLOBAL, memoized
    with pytest.raises(UnsafePickleError, match=r"'(posix|nt)\.system'"):
        restricted_load(io.BytesIO(data), FLAME_GLOBALS, source="evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load"),
                                         ("torch", "load"), ("copyreg", "_reconstructor_evil")])
def test_other_globals_are_refused(module, name):
    with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'"):
        restricted_load(io.BytesIO(_touch_pickle(module, name, "/nonexistent")), LANDMARK_GLOBALS, source="x")


def test_persistent_ids_are_refused():
    data = PickleWriter(protocol=2).dumps(PersistentId(("x",)))
    with pytest.raises(UnsafePickleError, match="persistent reference"):
        restricted_load(io.BytesIO(data), LANDMARK_GLOBALS, source="x")


def test_copyreg_reconstructor_only_builds_stand_ins():
    # an allowed helper must not become a way to build classes other than our stand-ins
    call = Call(Global("copy_reg", "_reconstructor"), (Global("numpy", "ndarray"), Global("__builtin__", "object"), None))
    data = PickleWriter(protocol=2).dumps(call)
    with pytest.raises(AssetError, match="it does not unpickle"):
        restricted_load(io.BytesIO(data), FLAME_GLOBALS, source="x")


def test_malicious_storage_bytes_inside_landmark_pickle_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    inner = _touch_pickle("os", "system", marker)
    data = PickleWriter(protocol=3).dumps(Call(Global("torch.storage", "_load_from_bytes"), (inner,)))
    with pytest.raises(UnsafePickleError, match="os.system"):
        restricted_load(io.BytesIO(data), LANDMARK_GLOBALS, source="landmark_embedding.npy")
    assert not marker.exists()


def test_garbage_and_truncation_are_asset_errors(tmp_path):
    good = pickle.dumps({"a": np.arange(10.0)}, protocol=2)
    for data in (b"not a pickle at all", good[: len(good) // 2]):
        with pytest.raises(AssetError, match="bad.pkl"):
            restricted_load(io.BytesIO(data), FLAME_GLOBALS, source="bad.pkl")


@pytest.fixture
def fake_chumpy(monkeypatch):
    """A module named chumpy.ch whose Ch pickles like chumpy's (plain class, __dict__ state)."""

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x, dtype=np.float64)
            self._dirty_vars = set()
            self._itr = None
            self._depends_on_deps = {}

    module = types.ModuleType("chumpy.ch")
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    module.Ch = Ch
    monkeypatch.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
    monkeypatch.setitem(sys.modules, "chumpy.ch", module)
    return Ch


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_chumpy_style_pickle_round_trip(fake_chumpy, protocol):
    value = np.random.default_rng(0).normal(size=(7, 3, 4))
    data = pickle.dumps({"shapedirs": fake_chumpy(value), "f": np.arange(6, dtype=np.uint32)}, protocol=protocol)
    loaded = restricted_load(io.BytesIO(data), FLAME_GLOBALS, source="m.pkl")
    assert isinstance(loaded["shapedirs"], ChumpyArray)
    np.testing.assert_array_equal(loaded["shapedirs"].r, value)
    np.testing.assert_array_equal(np.asarray(loaded["shapedirs"], dtype=np.float32), value.astype(np.float32))
    assert loaded["f"].dtype == np.uint32


@pytest.mark.parametrize("kind", ["csc", "csr"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_scipy_sparse_matrix_reads_as_dense(kind, protocol):
    sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(1)
    dense = np.where(rng.random((5, 40)) < 0.2, rng.normal(size=(5, 40)), 0.0)
    matrix = sparse.csc_matrix(dense) if kind == "csc" else sparse.csr_matrix(dense)
    loaded = restricted_load(io.BytesIO(pickle.dumps(matrix, protocol=protocol)), FLAME_GLOBALS, source="j.pkl")
    assert isinstance(loaded, SparseMatrix) and loaded.shape == (5, 40)
    np.testing.assert_array_equal(loaded.toarray(), dense)


def test_inconsistent_sparse_state_is_rejected():
    sparse = pytest.importorskip("scipy.sparse")
    matrix = sparse.csc_matrix(np.eye(3))
    matrix.indices[0] = 7  # row out of range
    with pytest.raises(AssetError, match="inconsistent CSC"):
        restricted_load(io.BytesIO(pickle.dumps(matrix, protocol=2)), FLAME_GLOBALS, source="j.pkl")


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.float64, torch.uint8, torch.bool])
def test_torch_tensor_pickle_matches_torch(dtype):
    tensor = (torch.arange(24) % 5).to(dtype).reshape(2, 3, 4)
    view = tensor.transpose(0, 2)  # non-contiguous: stride handling
    loaded = restricted_load(io.BytesIO(pickle.dumps({"t": view}, protocol=3)), LANDMARK_GLOBALS, source="l.npy")
    assert loaded["t"].dtype == dtype
    assert torch.equal(loaded["t"], view)


def test_legacy_storage_bytes_round_trip():
    tensor = torch.linspace(-1, 1, 13, dtype=torch.float32)
    storage = load_legacy_storage(torch_legacy_storage_bytes(tensor))
    assert torch.equal(storage.flat, tensor)
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        load_legacy_storage(torch_legacy_storage_bytes(tensor)[:-4])
