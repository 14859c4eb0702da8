import os
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


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """One built-in asset cache for the whole session (generation is deterministic)."""
    path = tmp_path_factory.mktemp("diffrig_cache")
    os.environ["DIFFRIG_CACHE"] = str(path)
    return path
