"""What this installation can do: version, CUDA, optional face-landmark models, DECA assets."""

import importlib.util
from pathlib import Path

from diffrig import __version__
from diffrig.deca.files import DECA_FILES, TEXTURE_FILES
from diffrig.paths import cache_dir, default_deca_dir


def dlib_models() -> dict:
    """Paths of the dlib models shipped by ``face_recognition_models``, found without importing it
    (its ``__init__`` needs the removed ``pkg_resources``). Empty when the extra is not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return {}
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    names = {
        "landmarks68": "shape_predictor_68_face_landmarks.dat",
        "cnn_detector": "mmod_human_face_detector.dat",
    }
    return {k: models / v for k, v in names.items() if (models / v).is_file()}


def deca_assets(folder: Path) -> dict:
    """Which DECA files exist in ``folder``: name -> bool."""
    return {name: (folder / name).is_file() for name in DECA_FILES}


def report() -> str:
    """A human-readable multi-line summary."""
    lines = [f"diffrig {__version__}"]
    try:
        import torch

        cuda = torch.cuda.is_available()
        dev = f" ({torch.cuda.get_device_name(0)})" if cuda else ""
        lines.append(f"torch {torch.__version__}; CUDA available: {'yes' + dev if cuda else 'no'}")
    except ImportError:  # pragma: no cover - torch is a hard dependency
        lines.append("torch: not installed")
    lines.append(f"dlib: {'yes' if importlib.util.find_spec('dlib') else 'no (pip install diffrig[faces])'}")
    models = dlib_models()
    lines.append(f"dlib 68-landmark model: {models.get('landmarks68', 'not found (pip install diffrig[faces])')}")
    folder = default_deca_dir().resolve()
    found = deca_assets(folder)
    have = [n for n, ok in found.items() if ok]
    lines.append(f"DECA data dir: {folder} ({len(have)}/{len(found)} files)")
    missing = [n for n, ok in found.items() if not ok and DECA_FILES[n][2]]
    if not any(found[t] for t in TEXTURE_FILES):
        missing.append(" or ".join(TEXTURE_FILES))
    lines.append("  missing: " + (", ".join(missing) if missing else "none"))
    lines.append(f"built-in asset cache: {cache_dir() / 'builtin'} (use --deca_dir builtin)")
    return "\n".join(lines)
