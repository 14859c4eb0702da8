"""The DiffusionRig denoiser: guided-diffusion UNet + ResNet global encoder, official conversion."""

from diffrig.models.convert import (
    convert_official_checkpoint,
    convert_state_dict,
    load_official_checkpoint,
    official_key_map,
    read_official_checkpoint,
    to_official_state_dict,
)
from diffrig.models.diffusion_rig import DiffusionRigModel
from diffrig.models.global_encoder import GlobalEncoder
from diffrig.models.unet import DiffusionRigUNet

__all__ = [
    "DiffusionRigModel",
    "DiffusionRigUNet",
    "GlobalEncoder",
    "convert_official_checkpoint",
    "convert_state_dict",
    "load_official_checkpoint",
    "official_key_map",
    "read_official_checkpoint",
    "to_official_state_dict",
]
