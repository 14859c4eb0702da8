"""diffrig: DiffusionRig (Ding et al., CVPR 2023) on current PyTorch.

Submodules follow the data flow: ``diffrig.deca`` (face rig and physical buffers) →
``diffrig.data`` (alignment, LMDB datasets, synthetic world) → ``diffrig.models`` →
``diffrig.diffusion`` → ``diffrig.training`` → ``diffrig.pipeline``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``diffrig.RigEditPipeline`` without importing torch & co. on ``import diffrig``
    if name == "RigEditPipeline":
        from diffrig.pipeline import RigEditPipeline

        return RigEditPipeline
    raise AttributeError(f"module 'diffrig' has no attribute {name!r}")
