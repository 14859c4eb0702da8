"""DiffusionRigModel: the denoising UNet and the global encoder, as one diffusers model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffrig.models.blocks import set_fused_norm
from diffrig.models.global_encoder import GlobalEncoder
from diffrig.models.unet import DiffusionRigUNet, attention_downsample_rates, resolve_channel_mult

IMAGE_CHANNELS = 3
BUFFER_CHANNELS = 9  # rendered, normal, albedo (3 each)


class DiffusionRigModel(ModelMixin, ConfigMixin):
    """DiffusionRig's noise predictor: ``model(noisy, timesteps, buffers, latent=None, image=None) -> eps``.

    The configuration uses the names (and defaults) of the official ``script_util.py``, so a
    set of official training flags builds the same network:

    - ``image_size`` (256), ``num_channels`` (base width, 128), ``num_res_blocks`` (2),
      ``channel_mult`` (``""`` = default for the size: 64 → 1,2,3,4; 128 → 1,1,2,3,4;
      256 → 1,1,2,2,4,4; 512 → 0.5,1,1,2,2,4,4; else ``"1,2,4"`` or a sequence);
    - ``attention_resolutions`` (``"16"``: feature-map sizes with self-attention),
      ``num_heads`` (1), ``num_head_channels`` (-1: use ``num_heads``), ``num_heads_upsample``
      (-1: same as ``num_heads``), ``use_new_attention_order`` (False);
    - ``dropout`` (0.1), ``use_scale_shift_norm`` (True; the official model cannot run
      without it), ``resblock_updown`` (True), ``use_checkpoint`` (False; turns on gradient
      checkpointing);
    - ``latent_dim`` (64), ``encoder_type`` (``"resnet18"`` | ``"resnet50"``),
      ``in_channels`` (12 = noisy image + 9 buffer channels), ``learn_sigma`` (False; True
      doubles the output channels to predict the variance too).

    With the defaults it has 144,610,179 parameters, as the official model.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        image_size: int = 256,
        num_channels: int = 128,
        num_res_blocks: int = 2,
        channel_mult: str | Sequence[float] = "",
        attention_resolutions: str | Sequence[int] = "16",
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_new_attention_order: bool = False,
        dropout: float = 0.1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        use_checkpoint: bool = False,
        latent_dim: int = 64,
        encoder_type: str = "resnet18",
        in_channels: int = IMAGE_CHANNELS + BUFFER_CHANNELS,
        learn_sigma: bool = False,
    ):
        super().__init__()
        if not use_scale_shift_norm:
            raise ValueError(
                "use_scale_shift_norm=False is not supported: the official model's latent "
                "modulation needs scale-shift normalisation (its code fails without it)"
            )
        if in_channels <= IMAGE_CHANNELS:
            raise ValueError(f"in_channels must count the noisy image (3) and the buffers, got {in_channels}")
        self.unet = DiffusionRigUNet(
            in_channels=in_channels,
            out_channels=2 * IMAGE_CHANNELS if learn_sigma else IMAGE_CHANNELS,
            num_channels=num_channels,
            channel_mult=resolve_channel_mult(image_size, channel_mult),
            num_res_blocks=num_res_blocks,
            attention_rates=attention_downsample_rates(image_size, attention_resolutions),
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            dropout=dropout,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            latent_dim=latent_dim,
        )
        self.encoder = GlobalEncoder(encoder_type, latent_dim)
        self._frozen_encoder_batchnorm = False
        if use_checkpoint:
            self.enable_gradient_checkpointing()

    def encode_latent(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [-1, 1] -> global latent (B, latent_dim)."""
        return self.encoder(image)

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor | int,
        buffers: torch.Tensor,
        latent: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise (and, with ``learn_sigma``, the variance values).

        noisy (B, 3, H, W) x_t; timesteps (B,) or a scalar; buffers (B, 9, H, W) as
        ``cat([rendered, normal, albedo], 1)``; exactly one of latent (B, latent_dim) or
        image (B, 3, H', W') in [-1, 1] to encode -> (B, 3 or 6, H, W).
        """
        if (latent is None) == (image is None):
            raise ValueError("pass exactly one of latent= (a global latent code) or image= (to encode one)")
        if noisy.dim() != 4 or buffers.dim() != 4:
            raise ValueError(f"noisy and buffers must be batches (B, C, H, W), got {tuple(noisy.shape)} and "
                             f"{tuple(buffers.shape)}")
        if noisy.shape[1] + buffers.shape[1] != self.config.in_channels:
            raise ValueError(
                f"noisy ({noisy.shape[1]} channels) and buffers ({buffers.shape[1]}) must add up to "
                f"in_channels={self.config.in_channels}"
            )
        batch = noisy.shape[0]
        if buffers.shape[0] != batch or buffers.shape[2:] != noisy.shape[2:]:
            raise ValueError(f"buffers {tuple(buffers.shape)} must match noisy {tuple(noisy.shape)} in batch and size")
        if latent is None:
            if not image.is_floating_point():
                raise TypeError(f"image must be float in [-1, 1], got {image.dtype}: use image.float() / 127.5 - 1")
            latent = self.encode_latent(image)
        elif latent.dim() != 2 or latent.shape[0] not in (1, batch) or latent.shape[1] != self.config.latent_dim:
            raise ValueError(f"latent must be ({batch}, {self.config.latent_dim}) (or one row for all), "
                             f"got {tuple(latent.shape)}")
        timesteps = torch.as_tensor(timesteps, device=noisy.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        elif timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or ({batch},), got {tuple(timesteps.shape)}")
        return self.unet(torch.cat([noisy, buffers.to(noisy.dtype)], dim=1), timesteps, latent)

    def enable_fused_norm(self, enabled: bool = True) -> None:
        """Run the UNet's GroupNorms, with the FiLM, SiLU and dropout after them, as diffrig's Triton
        kernels where they apply (eager CUDA, channels_last; see :mod:`diffrig.models.fused_norm`)."""
        set_fused_norm(self.unet, enabled)

    def freeze_encoder(self, frozen: bool = True, freeze_batchnorm: bool = False) -> None:
        """Stop (or restart) training the global encoder, as stage 2 does.

        Freezing turns off gradients for the encoder's parameters. Its BatchNorm layers
        still follow ``train()``/``eval()`` (batch statistics in training, running
        statistics updated), as in the official stage 2, unless ``freeze_batchnorm`` holds
        them in evaluation mode too.
        """
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(not frozen)
        self._frozen_encoder_batchnorm = frozen and freeze_batchnorm
        self.train(self.training)

    @property
    def encoder_frozen(self) -> bool:
        """True when no encoder parameter receives gradients."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> DiffusionRigModel:
        super().train(mode)
        if self._frozen_encoder_batchnorm:
            self.encoder.eval()
        return self

    def unet_parameters(self) -> list[nn.Parameter]:
        """Parameters of the denoising UNet alone (what stage 2 optimises)."""
        return list(self.unet.parameters())
