"""The synthetic portrait world: FFHQ-like portraits whose true rig codes are known.

Every portrait is rendered from the face rig (``"builtin"`` by default) with codes drawn from
sensible priors (:mod:`.priors`), plus what DECA's buffers do not carry and a diffusion model
must learn (:mod:`.appearance`): per-identity hair (hairline, fringe, volume, length, colour,
strands), skin detail (freckles and moles at identity-specific places of the UV map), a specular
term (per-identity strength and sharpness, lit by the dominant direction of the SH light) and,
per photo, a backdrop and clothes. A photo is a deterministic function of
``(identity, codes, tform, nuisance seed)``, so the true photo under *edited* codes can be
rendered: the reference an edit is scored against (:meth:`SyntheticWorld.render`, :mod:`.world`).

    world = SyntheticWorld("builtin", size=64, seed=0)
    person = world.identity(3)
    shots = world.sample(person, range(4))                  # codes, tform, nuisance seeds
    photos = world.render(person, shots.codes, shots.tform, shots.nuisance_seed)
    edited = shots.codes.replace(light=other.codes.light)   # the truth of a relighting:
    truth = world.render(person, edited, shots.tform, shots.nuisance_seed)
    world.write_folder("album/", [3], 20)                   # or scripts/make_synthetic.py

Folder layout (:meth:`SyntheticWorld.write_folder`, ``scripts/make_synthetic.py``), flat like
FFHQ (many identities) or a personal album (``--identities 1``)::

    DIR/<identity:05d>_<image:04d>.png                  8-bit RGB portrait, size x size
    DIR/<identity:05d>_<image:04d>.codes.safetensors    its ground truth (below)
    DIR/world/world.json        the world: format, seed, size, deca_dir (one world per folder)
    DIR/world/identities.json   the written identities' parameters (codes, hair, skin, shine) by "<identity:05d>"

Image ``k`` of identity ``i`` is drawn from ``(seed, i, k)`` alone, so ``--first_identity`` /
``--first_image`` write held-out people or further photos of a person without overlap.

Ground-truth sidecar ``<stem>.codes.safetensors`` (format ``diffrig.synthetic.codes/1``), float32
tensors without a batch axis, DECA's code layout (:mod:`diffrig.deca.codes`):

    shape (100,), tex (50,), exp (50,), pose (6,), cam (3,), light (9, 3)
    tform (3, 3)   DECA's crop transform: pixel of this PNG -> pixel of the 224² crop (column
                   vectors, pixel centres), a uniform scale plus a shift; ``cam`` is in that
                   crop's frame, exactly what DECA's encoder would regress from the crop.
                   ``DECA.decode(codes, size=(S, S), tform=tform[None])`` renders the buffers in
                   the PNG's frame (their alpha is the photo's face).

and string metadata ``format``, ``identity``, ``image``, ``nuisance_seed``, ``world_seed``,
``size`` (the PNG's side, pixels) and ``deca_dir``; the bytes depend on the content only.
:class:`GroundTruthCodes` reads them (the "estimator" behind ``create_data.py --codes
ground_truth``); for an image resized to another size it rescales ``tform``
(:func:`diffrig.data.crop.resize_transform`).
"""

from diffrig.data.synthetic.sidecar import (
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    GroundTruthCodes,
    PortraitTruth,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

__all__ = [
    "Identity",
    "Portraits",
    "SyntheticWorld",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "GroundTruthCodes",
    "PortraitTruth",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]


def __getattr__(name: str):
    """The world itself is imported on first use (the sidecar readers stay light)."""
    if name in ("SyntheticWorld", "Identity", "Portraits"):
        from diffrig.data.synthetic import world

        return getattr(world, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
