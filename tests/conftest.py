import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Real photos and DECA's public files live beside the checkout (not in a user's clone).
SHARED = Path(os.environ.get("DIFFRIG_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (only in the developers' checkout and CI)")
    return SHARED


@pytest.fixture(scope="session")
def deca_public(shared_dir) -> Path:
    path = shared_dir / "deca_public"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def faces_dir(shared_dir) -> Path:
    path = shared_dir / "faces"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


# Tests never write into the user's ~/.cache. The built-in asset set (~340 MB, versioned and
# deterministic) is generated once per machine into the temp dir, not once per session.
TEST_CACHE = Path(os.environ.setdefault("DIFFRIG_CACHE", str(Path(tempfile.gettempdir()) / "diffrig-test-cache")))


@pytest.fixture(scope="session")
def builtin_cache() -> Path:
    """The cache root holding ``builtin/<version>``."""
    return TEST_CACHE


@pytest.fixture(scope="module")
def load_rig_once():
    """DECA.from_dir reads every asset: within a module, each folder (and device) loads once and
    the same rig is shared. Use it with ``pytestmark = pytest.mark.usefixtures("load_rig_once")``."""
    from diffrig.deca.rig import DECA

    load = functools.lru_cache(maxsize=None)(DECA.from_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DECA, "from_dir", staticmethod(
            lambda path=None, device="cpu", texture=None: load(str(path), device=str(device))))
        yield


@pytest.fixture
def triton_interpreter():
    """``run(code)``: ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton kernels on CPU
    tensors; the interpreter must be chosen before Triton is imported); returns the JSON its last line
    prints. Skips without Triton."""
    pytest.importorskip("triton")
    return _run_under_triton_interpreter


def _run_under_triton_interpreter(code: str, timeout: int = 600):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
