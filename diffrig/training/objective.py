"""The training loss as a module, so that Accelerate can wrap it (DDP, autocast) and torch.compile can fuse it.

It computes exactly :func:`diffrig.diffusion.training_loss` (same float64-derived coefficients, cast
to float32 before use) but looks them up on the device, with no host round trip per step.
"""

from __future__ import annotations

import torch
from torch import nn

from diffrig.diffusion import NoiseSchedule


class DiffusionObjective(nn.Module):
    """``(image (B,3,H,W) in [-1,1], buffers (B,9,H,W), timesteps (B,) long, noise (B,3,H,W)) -> (B,)``
    per-sample P2-weighted ε-MSE; the model encodes its global latent from the clean image."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.model = model
        self.num_train_timesteps = schedule.num_train_timesteps
        alpha_bar = schedule.alphas_cumprod
        all_steps = torch.arange(schedule.num_train_timesteps)
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - alpha_bar).sqrt().float(), persistent=False)
        self.register_buffer("p2_weight", schedule.p2_weight(all_steps), persistent=False)

    def forward(self, image, buffers, timesteps, noise):
        shape = (-1,) + (1,) * (image.dim() - 1)
        noisy = (self.sqrt_alpha_bar[timesteps].view(shape).to(image.dtype) * image
                 + self.sqrt_one_minus_alpha_bar[timesteps].view(shape).to(image.dtype) * noise)
        eps = self.model(noisy, timesteps, buffers, image=image)
        mse = (noise.float() - eps.float()).pow(2).mean(dim=tuple(range(1, noise.dim())))
        return self.p2_weight[timesteps] * mse
