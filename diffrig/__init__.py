"""diffrig: DiffusionRig (Ding et al., CVPR 2023) on current PyTorch.

Submodules follow the data flow: ``diffrig.deca`` (face rig and physical buffers) →
``diffrig.data`` (alignment, LMDB datasets, synthetic world) → ``diffrig.models`` →
``diffrig.diffusion`` → ``diffrig.training`` → ``diffrig.pipeline``.
"""

__version__ = "0.1.0"
