"""The global latent encoder: a torchvision ResNet whose classifier outputs the latent code."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

ENCODER_TYPES = ("resnet18", "resnet50")


class GlobalEncoder(nn.Module):
    """``image (B, 3, H, W) in [-1, 1] -> latent (B, latent_dim)``.

    A randomly initialised torchvision ResNet-18/50 (``backbone``) whose ``fc`` maps the
    pooled features to ``latent_dim``. The image goes in as the diffusion model sees it
    (in [-1, 1], no ImageNet normalisation), as in the official training.
    """

    def __init__(self, encoder_type: str = "resnet18", latent_dim: int = 64):
        super().__init__()
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"unknown encoder_type {encoder_type!r}; use one of {', '.join(ENCODER_TYPES)}")
        self.backbone = getattr(torchvision.models, encoder_type)(weights=None, num_classes=latent_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)
