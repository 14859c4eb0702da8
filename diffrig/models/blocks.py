"""Building blocks of the guided-diffusion UNet used by DiffusionRig.

Every block is shape-static (no branches on tensor values), works on ``channels_last``
tensors and under bf16/fp16 autocast, so the UNet can be wrapped by ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffrig.models import fused_norm
from diffrig.models.dropout import Dropout

GROUPS = 32


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm of x (B, C, *spatial), computed in float32, returned in x's dtype and memory layout.

    Statistics are taken per channel over the spatial positions and then pooled per group, which
    is exact (every channel of a group counts the same positions: the group variance is the mean
    of the channel variances plus the variance of the channel means). A channels_last input is
    thus read along its contiguous channel axis; ``F.group_norm``'s compiled form instead regroups
    it into a contiguous (B, G, C/G·H·W) copy and hands contiguous tensors back to the convolutions.
    """
    b, c = x.shape[:2]
    x32 = x.float()
    channel_var, channel_mean = torch.var_mean(x32, dim=tuple(range(2, x.dim())), correction=0)  # (B, C)
    channel_mean = channel_mean.view(b, num_groups, -1)
    group_mean = channel_mean.mean(dim=2, keepdim=True)  # (B, G, 1)
    group_var = (channel_var.view(b, num_groups, -1) + (channel_mean - group_mean).square()).mean(dim=2, keepdim=True)
    scale = weight.float().view(1, num_groups, -1) * torch.rsqrt(group_var + eps)  # (B, G, C/G)
    shift = bias.float().view(1, num_groups, -1) - group_mean * scale
    per_channel = (b, c) + (1,) * (x.dim() - 2)
    return (x32 * scale.reshape(per_channel) + shift.reshape(per_channel)).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and returned in the input's dtype and layout.

    Normalising in float32 keeps low-precision training stable; returning the input dtype
    keeps bf16 activations bf16 (plain ``nn.GroupNorm`` under autocast returns float32).
    """

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)
        self.fused = False  # see set_fused_norm

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Whether this norm of ``x`` (and what follows it) runs as :mod:`diffrig.models.fused_norm`'s
        kernels: :func:`set_fused_norm` asked for them and they apply to ``x``."""
        return self.fused and fused_norm.usable(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_fused(x):
            return fused_norm.norm_act(x, self.weight, self.bias, self.eps)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def set_fused_norm(module: nn.Module, enabled: bool = True) -> None:
    """Let every :class:`GroupNorm32` in ``module`` (and the FiLM, SiLU and dropout that follow it in a
    ResBlock) run as :mod:`diffrig.models.fused_norm`'s kernels where those apply (eager CUDA,
    channels_last); elsewhere, and with ``enabled=False``, the plain formulation runs."""
    for norm in module.modules():
        if isinstance(norm, GroupNorm32):
            norm.fused = enabled


def norm_silu(norm: GroupNorm32, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``, one pass with :func:`set_fused_norm`."""
    if norm.runs_fused(x):
        return fused_norm.norm_act(x, norm.weight, norm.bias, norm.eps, act=True)
    return F.silu(norm(x))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so that a residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, optionally followed by a 3×3 convolution."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        x = upsample_nearest_2x(x)
        return x if self.conv is None else self.conv(x)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), every value repeated over a 2×2 block, in x's memory layout.

    The same values as ``F.interpolate(x, scale_factor=2, mode="nearest")``, written as a broadcast
    so that its gradient is a sum over each block rather than a scatter of atomic additions.
    """
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, 2, w, 2, c)
        return nhwc.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class _ChannelConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        ctx.split = first.shape[1]
        channels_last = first.is_contiguous(memory_format=torch.channels_last)
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format
        return torch.cat([first, second], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (grad[:, :ctx.split].contiguous(memory_format=ctx.layout),
                grad[:, ctx.split:].contiguous(memory_format=ctx.layout))


def concat_channels(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``torch.cat([first, second], dim=1)``: (B, C1, H, W), (B, C2, H, W) -> (B, C1 + C2, H, W), with
    gradients handed back dense, in ``first``'s memory layout.

    Plain ``cat`` hands back channel slices of its gradient; in channels_last those are strided
    views, which cuDNN's convolution backward copies one at a time (about 5% of a 256² training
    step). Made dense here, the copy is part of the compiled kernel that computes the gradient.
    """
    return _ChannelConcat.apply(first, second)


class Downsample(nn.Module):
    """×2 downsampling: a stride-2 3×3 convolution, or 2×2 average pooling without one."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return F.avg_pool2d(x, 2) if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block modulated by the timestep embedding, then by the global latent.

    ``h = conv1(silu(norm1(x)))`` (resampled between the activation and the convolution
    when ``up``/``down``), then ``h = norm2(h)``, ``h = h·(1 + s_t) + b_t`` with
    ``(s_t, b_t) = time_emb_proj(silu(emb))``, ``h = h·(1 + s_z) + b_z`` with
    ``(s_z, b_z) = latent_emb_proj(silu(latent))``, ``h = conv2(dropout(silu(h)))`` (zero-
    initialised), output ``shortcut(x) + h``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        latent_dim: int,
        dropout: float,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        self.norm1 = GroupNorm32(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_embed_dim, 2 * out_channels)
        self.latent_emb_proj = nn.Linear(latent_dim, 2 * out_channels)
        self.norm2 = GroupNorm32(out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        if up:
            self.resample = Upsample(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False)
        else:
            self.resample = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), emb (B, time_embed_dim), latent (B, latent_dim) -> (B, C_out, H', W')."""
        h = norm_silu(self.norm1, x)
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.conv1(h)
        film_time, film_latent = self.time_emb_proj(F.silu(emb)), self.latent_emb_proj(F.silu(latent))
        if self.norm2.runs_fused(h):
            h = fused_norm.norm_act(h, self.norm2.weight, self.norm2.bias, self.norm2.eps, act=True,
                                    film_time=film_time, film_latent=film_latent,
                                    p=self.dropout.p if self.training else 0.0)
        else:
            h = self.norm2(h)
            time_scale, time_shift = film_time.to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + time_scale) + time_shift
            latent_scale, latent_shift = film_latent.to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = self.dropout(F.silu(h * (1 + latent_scale) + latent_shift))
        h = self.conv2(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, through ``scaled_dot_product_attention``.

    ``to_qkv`` produces, per position, the channels in the official layout: with
    ``legacy_order`` (guided-diffusion's default) head-major ``[h0: q k v, h1: q k v, ...]``,
    otherwise ``[q: h0 h1 ..., k: ..., v: ...]``. Output: ``x + to_out(attention(norm(x)))``
    with ``to_out`` zero-initialised.
    """

    def __init__(self, channels: int, num_heads: int, legacy_order: bool = True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention over {channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.legacy_order = legacy_order
        self.norm = GroupNorm32(channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, T, C)
        qkv = self.to_qkv(tokens)  # (B, T, 3C)
        head_dim = c // self.num_heads
        if self.legacy_order:
            q, k, v = qkv.view(b, -1, self.num_heads, 3, head_dim).unbind(dim=3)
        else:
            q, k, v = qkv.view(b, -1, 3, self.num_heads, head_dim).unbind(dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = self.to_out(out.transpose(1, 2).reshape(b, -1, c))  # (B, T, C)
        return x + out.transpose(1, 2).reshape(b, c, height, width)
