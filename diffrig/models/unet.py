"""The denoising UNet of DiffusionRig (guided-diffusion's ADM UNet with a global-latent FiLM).

Layout (``L = len(channel_mult)`` levels, ``N = num_res_blocks``):

- ``conv_in``: 3×3 conv from ``in_channels`` (noisy image + physical buffers) to
  ``channel_mult[0] · num_channels``;
- ``down_blocks[l]`` (l = 0..L-1): ``N`` ResBlocks (``resnets``), each followed by an
  attention block (``attentions``) when ``2**l`` is one of the attention downsample rates,
  then, except at the last level, a ``downsampler`` (a down-ResBlock with
  ``resblock_updown``, else a stride-2 conv);
- ``mid_block``: ResBlock, attention, ResBlock;
- ``up_blocks[k]`` (level ``l = L-1-k``): ``N + 1`` ResBlocks, each taking the previous
  output concatenated with one skip activation, optional attention as above, then, except
  at level 0, an ``upsampler`` (an up-ResBlock, else nearest ×2 + 3×3 conv);
- ``norm_out``, SiLU, ``conv_out`` (zero-initialised).

Skip activations are taken after ``conv_in``, after every down ResBlock(+attention) and
after every downsampler, and consumed in reverse order by the up ResBlocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from diffrig.models.blocks import (GROUPS, AttentionBlock, Downsample, GroupNorm32, ResBlock, Upsample,
                                   concat_channels, norm_silu, zero_init)

# guided-diffusion's per-resolution defaults, used when ``channel_mult`` is empty
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def resolve_channel_mult(image_size: int, channel_mult: str | Sequence[float]) -> tuple[float, ...]:
    """Per-level channel multipliers: ``"1,1,2,2,4,4"``, a sequence, or ``""`` for the default of ``image_size``."""
    if isinstance(channel_mult, str):
        if not channel_mult.strip():
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"no default channel_mult for image_size {image_size} (defaults exist for "
                    f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult, e.g. '1,2,2,4'"
                )
            return DEFAULT_CHANNEL_MULT[image_size]
        try:
            return tuple(int(part) for part in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"channel_mult must be comma-separated integers, got {channel_mult!r}") from None
    mult = tuple(channel_mult)
    if not mult:
        return resolve_channel_mult(image_size, "")
    return mult


def attention_downsample_rates(image_size: int, attention_resolutions: str | Sequence[int]) -> tuple[int, ...]:
    """Downsample rates (1, 2, 4, ...) with attention, from feature resolutions such as ``"32,16,8"``."""
    if isinstance(attention_resolutions, str):
        parts = [part for part in attention_resolutions.split(",") if part.strip()]
        try:
            resolutions = [int(part) for part in parts]
        except ValueError:
            raise ValueError(
                f"attention_resolutions must be comma-separated integers, got {attention_resolutions!r}"
            ) from None
    else:
        resolutions = [int(res) for res in attention_resolutions]
    if any(res <= 0 for res in resolutions):
        raise ValueError(f"attention resolutions must be positive, got {resolutions}")
    return tuple(image_size // res for res in resolutions)


class DownBlock(nn.Module):
    """One encoder level: ResBlocks with optional attention, then an optional downsampler."""

    def __init__(self, resnets: list[ResBlock], attentions: list[AttentionBlock], downsampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty, or one per ResBlock
        self.downsampler = downsampler


class UpBlock(nn.Module):
    """One decoder level: ResBlocks (on skip-concatenated input) with optional attention, then an optional upsampler."""

    def __init__(self, resnets: list[ResBlock], attentions: list[AttentionBlock], upsampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsampler = upsampler


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution."""

    def __init__(self, resnets: list[ResBlock], attention: AttentionBlock):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])


class DiffusionRigUNet(nn.Module):
    """Noise predictor ``(x (B, in_channels, H, W), timesteps (B,), latent (B, latent_dim)) -> (B, out_channels, H, W)``.

    ``gradient_checkpointing`` (diffusers' convention, toggled by
    ``ModelMixin.enable_gradient_checkpointing``) recomputes every ResBlock and attention
    block in the backward pass instead of storing its activations.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_channels: int,
        channel_mult: Sequence[float],
        num_res_blocks: int,
        attention_rates: Sequence[int],
        num_heads: int,
        num_head_channels: int,
        num_heads_upsample: int,
        dropout: float,
        resblock_updown: bool,
        use_new_attention_order: bool,
        latent_dim: int,
    ):
        super().__init__()
        widths = [int(mult * num_channels) for mult in channel_mult]
        if any(width <= 0 or width % GROUPS for width in widths):
            raise ValueError(
                f"every level's width num_channels × channel_mult must be a positive multiple of {GROUPS} "
                f"(GroupNorm groups); num_channels={num_channels} with channel_mult={tuple(channel_mult)} "
                f"gives {widths}"
            )
        self.num_channels = num_channels
        self.gradient_checkpointing = False
        time_embed_dim = 4 * num_channels
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        def heads_for(channels: int, heads: int) -> int:
            if num_head_channels == -1:
                return heads
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            return channels // num_head_channels

        def res(c_in: int, c_out: int, **resample) -> ResBlock:
            return ResBlock(c_in, c_out, time_embed_dim, latent_dim, dropout, **resample)

        def attn(channels: int, heads: int) -> AttentionBlock:
            return AttentionBlock(channels, heads_for(channels, heads), legacy_order=not use_new_attention_order)

        self.time_proj = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(num_channels, time_embed_dim)

        ch = int(channel_mult[0] * num_channels)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            resnets, attentions = [], []
            for _ in range(num_res_blocks):
                resnets.append(res(ch, int(mult * num_channels)))
                ch = int(mult * num_channels)
                if 2**level in attention_rates:
                    attentions.append(attn(ch, num_heads))
                skip_channels.append(ch)
            downsampler = None
            if level != len(channel_mult) - 1:
                downsampler = res(ch, ch, down=True) if resblock_updown else Downsample(ch, use_conv=True)
                skip_channels.append(ch)
            self.down_blocks.append(DownBlock(resnets, attentions, downsampler))

        self.mid_block = MidBlock([res(ch, ch), res(ch, ch)], attn(ch, num_heads))

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            resnets, attentions = [], []
            for _ in range(num_res_blocks + 1):
                resnets.append(res(ch + skip_channels.pop(), int(mult * num_channels)))
                ch = int(mult * num_channels)
                if 2**level in attention_rates:
                    attentions.append(attn(ch, num_heads_upsample))
            upsampler = None
            if level != 0:
                upsampler = res(ch, ch, up=True) if resblock_updown else Upsample(ch, use_conv=True)
            self.up_blocks.append(UpBlock(resnets, attentions, upsampler))

        self.norm_out = GroupNorm32(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W), timesteps (B,), latent (B, latent_dim) -> (B, out_channels, H, W)."""
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        latent = latent.to(dtype)

        h = self.conv_in(x.to(dtype))
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, emb, latent)
                if len(block.attentions):
                    h = self._run(block.attentions[i], h)
                skips.append(h)
            if block.downsampler is not None:
                h = self._resample(block.downsampler, h, emb, latent)
                skips.append(h)

        first, second = self.mid_block.resnets
        h = self._run(first, h, emb, latent)
        h = self._run(self.mid_block.attentions[0], h)
        h = self._run(second, h, emb, latent)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._run(resnet, concat_channels(h, skips.pop()), emb, latent)
                if len(block.attentions):
                    h = self._run(block.attentions[i], h)
            if block.upsampler is not None:
                h = self._resample(block.upsampler, h, emb, latent)

        return self.conv_out(norm_silu(self.norm_out, h))

    def _resample(self, sampler: nn.Module, h, emb, latent):
        if isinstance(sampler, ResBlock):
            return self._run(sampler, h, emb, latent)
        return sampler(h)
