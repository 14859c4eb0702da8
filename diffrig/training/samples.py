"""The periodic sample grid: a fixed batch reconstructed from its buffers and global latent.

Rows: the rendered buffer, the real photo, the model's DDIM sample from fixed noise. The same noise
and inputs at every step make grids of successive steps directly comparable.
"""

from __future__ import annotations

import contextlib

import torch
from torchvision.utils import make_grid

from diffrig.diffusion import NoiseSchedule, sample


@torch.no_grad()
def sample_grid(model, batch: dict, noise: torch.Tensor, schedule: NoiseSchedule, steps: int,
                autocast=contextlib.nullcontext) -> torch.Tensor:
    """batch: image (N,3,H,W) in [-1,1], buffers (N,9,H,W); noise (N,3,H,W) -> grid (3, H', W') in [0,1]."""
    was_training = model.training
    model.eval()
    try:
        with autocast():
            latent = model.encode_latent(batch["image"])
            images = sample(model, batch["buffers"], latent, noise, num_inference_steps=steps, schedule=schedule)
    finally:
        model.train(was_training)
    rows = [batch["buffers"][:, :3].clamp(0, 1), (batch["image"] + 1) / 2, (images.float().clamp(-1, 1) + 1) / 2]
    return make_grid(torch.cat(rows).float().cpu(), nrow=noise.shape[0], padding=2)
