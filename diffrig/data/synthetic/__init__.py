"""The synthetic portrait world: FFHQ-like portraits whose true rig codes are known.

Every portrait is rendered from the face rig (``DECA.from_dir("builtin")`` by default) with codes
drawn from sensible priors, plus what DECA's buffers do not carry and a diffusion model must
learn: per-identity hair (hairline, fringe, volume, length, colour, strands), skin detail
(freckles and moles at identity-specific places of the UV map), a specular term (per-identity
strength and sharpness, lit by the dominant direction of the SH light) and, per photo, a
background and clothes. A photo is a deterministic function of
``(identity, codes, tform, nuisance seed)``, so the true photo under *edited* codes can be
rendered: the reference an edit is scored against (:meth:`SyntheticWorld.render`).

Folder layout (``scripts/make_synthetic.py`` / :meth:`SyntheticWorld.write_folder`), flat like
FFHQ (many identities) or a personal album (``--identities 1``)::

    DIR/world.json                         the world: format, seed, size, deca_dir, what was written
    DIR/<identity:05d>_<image:04d>.png     8-bit RGB portrait, size x size
    DIR/<identity:05d>_<image:04d>.codes.safetensors   its ground truth (below)
    DIR/identities/<identity:05d>.safetensors          the identity's parameters (hair, skin, ...)

Image ``k`` of identity ``i`` is the same photo whichever folder it is written to (its randomness
is seeded by ``(seed, i, k)``), so ``--first_identity`` / ``--first_image`` write held-out
identities or further photos of a person without overlap.

Ground-truth sidecar ``<stem>.codes.safetensors`` (format ``diffrig.synthetic.codes/1``), float32
tensors without a batch axis, DECA's code layout (:mod:`diffrig.deca.codes`):

    shape (100,), tex (50,), exp (50,), pose (6,), cam (3,), light (9, 3)
    tform (3, 3)   DECA's crop transform: pixel of this PNG -> pixel of the 224² crop (column
                   vectors, pixel centres), a uniform scale plus a shift; ``cam`` is in that
                   crop's frame, exactly what DECA's encoder would regress from the crop.
                   ``DECA.decode(codes, size=(S, S), tform=tform[None])`` renders the buffers in
                   the PNG's frame (the face mask equals the photo's face).

and string metadata ``format``, ``identity``, ``image``, ``nuisance_seed``, ``world_seed``,
``size`` (the PNG's side, pixels) and ``deca_dir``. :class:`GroundTruthCodes` reads them (the
"estimator" behind ``create_data.py --codes ground_truth``); for an image resized to another
size it rescales ``tform`` (:func:`diffrig.data.crop.resize_transform`).
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
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "GroundTruthCodes",
    "PortraitTruth",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]
