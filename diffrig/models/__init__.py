"""The DiffusionRig denoiser: guided-diffusion UNet + ResNet global encoder, official conversion."""
