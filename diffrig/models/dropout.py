"""Dropout whose random mask on CUDA costs one Philox call and one byte per 8 elements.

Compiled by Inductor, ``F.dropout`` draws a whole Philox4x32-10 random number for every element and
keeps a byte-per-element mask for the backward pass; at 256² and batch 32 the random arithmetic,
not memory, bounds the kernels that apply the dropout. Here a Triton kernel (:func:`keep_bits`)
splits each Philox call's four 32-bit words into eight 16-bit draws and packs the eight keep
decisions into one byte; Inductor fuses the unpacking and the multiplication into the kernels that
use the mask. (What the compiled backward pass keeps is the partitioner's choice: in the stage-1 graph
it is the unpacked mask, one byte per element, as before.)

The drop probability is rounded to a multiple of 1/65536 and the kept values are scaled by the
inverse of the rounded keep probability, so the output's expectation is still its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: plain dropout everywhere
    triton = None

DRAWS = 1 << 16  # each keep decision compares a 16-bit draw with the threshold
BITS = 8  # keep decisions per byte (and per Philox call)


def drop_threshold(p: float) -> int:
    """Draws below this (out of 65536) drop their element: ``p`` rounded to the nearest 1/65536."""
    return round(p * DRAWS)


if triton is not None:

    @triton.jit
    def _keep_bits_kernel(seed_ptr, out_ptr, num_bytes, threshold, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # byte = Philox counter
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), index)
        low = 0xFFFF
        byte = (((r0 & low) >= threshold).to(tl.int32) | (((r0 >> 16) >= threshold).to(tl.int32) << 1)
                | (((r1 & low) >= threshold).to(tl.int32) << 2) | (((r1 >> 16) >= threshold).to(tl.int32) << 3)
                | (((r2 & low) >= threshold).to(tl.int32) << 4) | (((r2 >> 16) >= threshold).to(tl.int32) << 5)
                | (((r3 & low) >= threshold).to(tl.int32) << 6) | (((r3 >> 16) >= threshold).to(tl.int32) << 7))
        tl.store(out_ptr + index, byte.to(tl.uint8), mask=index < num_bytes)


@torch.library.custom_op("diffrig::keep_bits", mutates_args=())
def keep_bits(seed: torch.Tensor, shape: list[int], threshold: int) -> torch.Tensor:
    """Packed keep decisions: a contiguous uint8 tensor of ``shape`` on seed's device whose bit j of
    each byte is 1 with probability ``1 - threshold/65536``, all independent, drawn from the int64
    one-element ``seed``. Unpack with :func:`unpack_bits`."""
    bits = torch.empty(shape, dtype=torch.uint8, device=seed.device)
    if seed.is_cuda and triton is not None:
        block = 1024
        _keep_bits_kernel[(triton.cdiv(bits.numel(), block),)](seed, bits, bits.numel(), threshold, BLOCK=block)
        return bits
    generator = torch.Generator(device=seed.device).manual_seed(int(seed.item()))
    keep = torch.randint(0, DRAWS, (*shape, BITS), generator=generator, device=seed.device) >= threshold
    return bits.copy_((keep.to(torch.uint8) << torch.arange(BITS, device=seed.device, dtype=torch.uint8)).sum(-1))


@keep_bits.register_fake
def _(seed: torch.Tensor, shape: list[int], threshold: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.uint8, device=seed.device)


def unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., N) uint8 -> (..., 8·N) bool, bit j of byte k becoming element 8k + j."""
    shifts = torch.arange(BITS, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()


def packed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a contiguous or channels_last (B, C, H, W) ``x`` whose innermost
    dimension in memory is a multiple of 8, with :func:`keep_bits`' mask."""
    channels_last = not x.is_contiguous()
    order = (0, 2, 3, 1) if channels_last else (0, 1, 2, 3)  # x's dimensions, outermost in memory first
    dense = x.permute(order)
    threshold = drop_threshold(p)
    seed = torch.randint(0, 2**62, (1,), device=x.device)
    bits = keep_bits(seed, [*dense.shape[:-1], dense.shape[-1] // BITS], threshold)
    keep = unpack_bits(bits)
    if channels_last:
        keep = keep.permute(0, 3, 1, 2)
    return x * keep * (DRAWS / (DRAWS - threshold))


def packable(x: torch.Tensor) -> bool:
    """Whether :func:`packed_dropout` takes ``x``: 4-D, dense in memory, innermost dimension a multiple of 8."""
    if x.dim() != 4:
        return False
    if x.is_contiguous():
        return x.shape[3] % BITS == 0
    return x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] % BITS == 0


class Dropout(nn.Module):
    """``nn.Dropout`` (same ``p``, same train/eval behaviour) with :func:`packed_dropout` on CUDA."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.is_cuda and triton is not None and packable(x):
            return packed_dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"
