"""Our own DECA-compatible face rig: FLAME, albedo spaces, encoder, rasterizer, physical buffers.

Typical use::

    from diffrig.deca import DECA

    deca = DECA.from_dir("builtin")           # or a DECA data folder
    codes = deca.encode(crops)                # (B, 3, 224, 224) in [0, 1] -> RigCodes
    buffers = deca.decode(codes, size=256, tform=tform).buffers   # (B, 9, 256, 256)

Names are imported on first use, so ``import diffrig.deca`` stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "DECA": "diffrig.deca.rig",
    "RigOutput": "diffrig.deca.rig",
    "RigCodes": "diffrig.deca.codes",
    "CODE_SIZES": "diffrig.deca.codes",
    "FLAME": "diffrig.deca.flame",
    "AlbedoSpace": "diffrig.deca.texture",
    "DecaEncoder": "diffrig.deca.encoder",
    "load_deca_encoder": "diffrig.deca.encoder",
    "BufferRenderer": "diffrig.deca.render",
    "rasterize": "diffrig.deca.rasterizer",
    "ensure_builtin": "diffrig.deca.builtin",
    "resolve_deca_dir": "diffrig.deca.assets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffrig.deca' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
